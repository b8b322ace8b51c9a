"""Memory probes inside the daemon, for `benchmarks/memory_burst.py` (never in production).

Python imports `sitecustomize` at start-up from the path, so putting this directory on the
daemon's PYTHONPATH instruments it without touching its code. With BENCH_MEMTRACE_DIR set:

* BENCH_TRACEMALLOC_FRAMES=N (N > 0) starts tracemalloc with N frames; SIGUSR1 then writes
  a snapshot to BENCH_MEMTRACE_DIR/<pid>-<ns>.snap (renamed into place when complete);
* SIGUSR2 calls glibc's malloc_trim(0) and writes "rss_before_kib rss_after_kib
  sqlite_used_kib sqlite_highwater_kib" to BENCH_MEMTRACE_DIR/trim-<ns>.txt: how much of
  the RSS is free heap not given back, and how much SQLite itself holds; then the RSS by
  kind of mapping, pymalloc's arena statistics, and the largest number of messages the
  ingest held in memory (a thread samples it every 20 ms).
"""

import os

_DIR = os.environ.get("BENCH_MEMTRACE_DIR")

if _DIR:
    import ctypes
    import signal
    import time
    import tracemalloc

    def _rss_kib() -> int:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))

    def _snapshot(signum: int, frame: object) -> None:
        if not tracemalloc.is_tracing():
            return
        path = os.path.join(_DIR, f"{os.getpid()}-{time.time_ns()}")
        tracemalloc.take_snapshot().dump(path + ".tmp")
        os.rename(path + ".tmp", path + ".snap")

    def _sqlite_kib() -> tuple[int, int]:
        """SQLite's own heap now and at its high-water mark (the library `_sqlite3` uses)."""
        try:
            lib = ctypes.CDLL("libsqlite3.so.0")
        except OSError:
            return -1, -1
        lib.sqlite3_memory_used.restype = ctypes.c_int64
        lib.sqlite3_memory_highwater.restype = ctypes.c_int64
        return lib.sqlite3_memory_used() // 1024, lib.sqlite3_memory_highwater(0) // 1024

    def _smaps_kib() -> dict[str, int]:
        """RSS by kind of mapping: the brk heap, anonymous maps by size (pymalloc arenas are
        1 MiB, glibc thread arenas up to 64 MiB), stacks, files."""
        kinds: dict[str, int] = {}
        kind = ""
        with open("/proc/self/smaps") as handle:
            for line in handle:
                head = line.split()
                if "-" in head[0] and not line.startswith(("Rss", "Size")) and len(head) >= 5:
                    start, end = (int(x, 16) for x in head[0].split("-"))
                    size = end - start
                    name = head[5] if len(head) > 5 else ""
                    if name.startswith("["):
                        kind = name
                    elif name:
                        kind = "file"
                    elif size <= 1 << 20:
                        kind = "anon <= 1 MiB"
                    elif size <= 8 << 20:
                        kind = "anon 1-8 MiB"
                    else:
                        kind = "anon > 8 MiB"
                elif line.startswith("Rss:"):
                    kinds[kind] = kinds.get(kind, 0) + int(head[1])
        return kinds

    def _pymalloc_stats() -> str:
        """sys._debugmallocstats() (it writes to the C stderr), arena lines only."""
        import sys
        import tempfile

        with tempfile.TemporaryFile("w+") as out:
            saved = os.dup(2)
            os.dup2(out.fileno(), 2)
            try:
                sys._debugmallocstats()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            out.seek(0)
            lines = out.read().splitlines()
        keep = ("arenas", "bytes in allocated blocks", "bytes in available blocks", "Total")
        return "; ".join(" ".join(x.split()) for x in lines if any(k in x for k in keep))

    def _trim(signum: int, frame: object) -> None:
        smaps, pymalloc = _smaps_kib(), _pymalloc_stats()
        before = _rss_kib()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        used, highwater = _sqlite_kib()
        path = os.path.join(_DIR, f"trim-{time.time_ns()}")
        with open(path + ".tmp", "w") as handle:
            handle.write(f"{before} {_rss_kib()} {used} {highwater}\n")
            handle.write(f"smaps rss kib: {smaps}\npymalloc: {pymalloc}\n")
            ingest = _held["ingest"]
            if ingest is not None:
                stats = ingest.stats
                handle.write(
                    f"ingest: max held_messages {_held['max']}, commits {stats.commits}, "
                    f"stored {stats.stored}, deferred {stats.deferred}\n"
                )
        os.rename(path + ".tmp", path + ".txt")

    _held = {"max": 0, "ingest": None}

    def _watch_held() -> None:
        """Finds the daemon's MqttIngest, then samples its `held_messages` (received, not
        yet committed) every 20 ms: the in-memory queue the broker's push builds up."""
        import contextlib
        import gc

        while _held["ingest"] is None:
            time.sleep(0.5)
            found = [o for o in gc.get_objects() if type(o).__name__ == "MqttIngest"]
            if found:
                _held["ingest"] = found[0]
        ingest = _held["ingest"]
        while True:
            with contextlib.suppress(Exception):  # a list resized under us: next time
                _held["max"] = max(_held["max"], ingest.held_messages)
            time.sleep(0.02)

    import threading

    threading.Thread(target=_watch_held, name="bench-held", daemon=True).start()

    _frames = int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "0"))
    if _frames > 0:
        tracemalloc.start(_frames)
    signal.signal(signal.SIGUSR1, _snapshot)
    signal.signal(signal.SIGUSR2, _trim)
