"""Memory probes inside the daemon, for `benchmarks/memory_burst.py` (never in production).

Python imports `sitecustomize` at start-up from the path, so putting this directory on the
daemon's PYTHONPATH instruments it without touching its code. With BENCH_MEMTRACE_DIR set:

* BENCH_TRACEMALLOC_FRAMES=N (N > 0) starts tracemalloc with N frames; SIGUSR1 then writes
  a snapshot to BENCH_MEMTRACE_DIR/<pid>-<ns>.snap (renamed into place when complete);
* SIGUSR2 calls glibc's malloc_trim(0) and writes "rss_before_kib rss_after_kib" to
  BENCH_MEMTRACE_DIR/trim-<ns>.txt: how much of the RSS is free heap not given back.
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

    def _trim(signum: int, frame: object) -> None:
        before = _rss_kib()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        path = os.path.join(_DIR, f"trim-{time.time_ns()}")
        with open(path + ".tmp", "w") as handle:
            handle.write(f"{before} {_rss_kib()}\n")
        os.rename(path + ".tmp", path + ".txt")

    _frames = int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "0"))
    if _frames > 0:
        tracemalloc.start(_frames)
    signal.signal(signal.SIGUSR1, _snapshot)
    signal.signal(signal.SIGUSR2, _trim)
