"""Memory under a burst: the daemon's RSS while the broker pushes N readings at it.

A Pi Zero has 512 MB of RAM, and a broker replaying a long outage must not multiply the
gateway's memory (issue #11). The daemon (`python -m gateway run`, a subprocess) runs
against a private Mosquitto with the cloud down, so every reading is only buffered; a
publisher (its own process, raw paho, 1000 in flight) sends N QoS 1 readings over 20
sensors, each with its own `ts`. Two modes:

* ``live``    the daemon is connected while they are published (on 2 vCPU the publisher
              cannot outrun the daemon by much: it shares the cores with it and the broker)
* ``replay``  the daemon is stopped while they are published (its session stays), then
              started: the broker pushes its whole queue at once, the gateway's worst case

Measured, from `/proc/<pid>/status`:

* ``peak``    VmHWM of the daemon once every reading is committed (the high-water mark)
* ``steady``  VmRSS `--settle` seconds after the last commit (what the box keeps paying)

against the **floor**, measured in the same run: a Python process that has only imported
the daemon's runtime dependencies (those `pyproject.toml` lists: paho, aiosqlite, httpx,
pydantic, pydantic-settings, structlog, prometheus-client at the time of writing) and
nothing of ours. `--env` passes extra environment to the daemon, e.g.
`--env MALLOC_ARENA_MAX=2`. Probes inside the daemon (`memtrace/sitecustomize.py`, put on
its PYTHONPATH): `--tracemalloc N` traces allocations with N frames and takes a snapshot
right after the burst and one at steady state, printing the top allocation sites of each
(tracing itself costs memory: read those runs' RSS as attribution, not as figures);
`--trim` calls malloc_trim(0) in the daemon at steady state and reports the RSS it gives
back (heap that was free but kept by the allocator).

    .venv/bin/python benchmarks/memory_burst.py --readings 1000000 --repeats 3 --mode replay
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

from gateway.testing.broker import MosquittoBroker
from gateway.testing.process import GatewayProcess, daemon_config, write_config
from gateway.testing.sandbox import SandboxCloud
from gateway.testing.sandbox_run import SandboxThread

REPO = Path(__file__).resolve().parent.parent
MEMTRACE_DIR = Path(__file__).resolve().parent / "memtrace"
# The publisher, a script of its own: paho alone, nothing of ours to import.
PUBLISHER = Path(__file__).resolve().parent / "burst_publisher.py"
SENSORS = 20
DEVICES = {400 + i: {1: "double"} for i in range(SENSORS)}
ROUTES = [
    {"topic": f"burst/s{i}", "device_id": 400 + i, "datastream_id": 1} for i in range(SENSORS)
]
# Modules to import for a distribution whose top-level package imports little by itself.
_ENTRY_MODULES = {"paho": "paho.mqtt.client"}
# What the floor process prints: its own VmRSS after the imports, in KiB.
_FLOOR_CODE = """
import asyncio, json, sqlite3, ssl
{imports}
with open("/proc/self/status") as f:
    print(next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")))
"""


def proc_status_kib(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def runtime_modules() -> list[str]:
    """The modules of the daemon's runtime dependencies, read from the `pyproject.toml`
    next to the `gateway` package being measured (others add dependencies: the floor must
    follow), mapped to import names through the installed distributions."""
    import gateway

    pyproject = Path(gateway.__file__).resolve().parent.parent / "pyproject.toml"
    requirements = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    wanted = {
        re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements
    }
    modules = []
    for top, dists in importlib.metadata.packages_distributions().items():
        if any(d.lower().replace("_", "-") in wanted for d in dists) and top.isidentifier():
            modules.append(_ENTRY_MODULES.get(top, top))
    return sorted(modules)


def floor_rss_mib(python: list[str] | None = None) -> float:
    """RSS of a Python that imported only the daemon's runtime dependencies: what no
    change in our code can go below, so the targets are stated above it."""
    code = _FLOOR_CODE.format(imports="\n".join(f"import {m}" for m in runtime_modules()))
    out = subprocess.run(
        [*(python or [sys.executable]), "-c", code], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip()) / 1024


@dataclass
class BurstResult:
    readings: int
    peak_mib: float
    steady_mib: float
    ingest_s: float
    publish_s: float
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (s, MiB)
    sites: list[str] = field(default_factory=list)  # top tracemalloc sites, if traced
    # MiB at steady state: RSS before and after malloc_trim(0), SQLite's heap, its peak.
    trimmed: tuple[float, ...] | None = None

    @property
    def rate(self) -> float:
        return self.readings / self.ingest_s if self.ingest_s else float("nan")


class _Sampler:
    """Samples the daemon's VmRSS every `period_s` on a thread (a timeline for the report;
    the peak itself comes from VmHWM, which misses nothing between samples)."""

    def __init__(self, pid: int, period_s: float = 0.25) -> None:
        self.pid = pid
        self.period_s = period_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                rss = proc_status_kib(self.pid, "VmRSS") / 1024
            except OSError:
                return
            self.samples.append((time.monotonic() - self._t0, rss))

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


def stored_readings(db: Path) -> int:
    """Rows in the buffer, read-only (a scan: called about once a second at the end)."""
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        (count,) = connection.execute("SELECT count(*) FROM readings").fetchone()
        return int(count)
    finally:
        connection.close()


def publish_process(broker: MosquittoBroker, client_id: str, n: int, base_ts: int) -> None:
    """`burst_publisher.py` in a child process; returns once the broker acknowledged all n."""
    argv = [broker.host, str(broker.port), client_id, str(n), str(base_ts)]
    subprocess.run([sys.executable, str(PUBLISHER), *argv], check=True, timeout=900)


def burst(
    workdir: Path,
    broker: MosquittoBroker,
    sandbox: SandboxThread,
    readings: int,
    settle_s: float = 5.0,
    env: dict[str, str] | None = None,
    tracemalloc_frames: int = 0,
    trim: bool = False,
    mode: str = "live",
    snapshot_every_s: float = 0.0,
) -> BurstResult:
    """One burst of `readings` with the cloud down; the daemon's peak and steady RSS.

    ``live``: the daemon is connected while a publisher (its own process) sends as fast
    as the broker takes them. ``replay``: the daemon's session exists but the daemon is
    stopped while they are published, then it starts and the broker replays its queue
    (the gateway coming back after being down). `broker` must queue at least `readings`
    messages per session (max_queued_messages), or Mosquitto drops what the daemon has
    not taken yet and the run never completes.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="burst-", dir=workdir))
    db = run_dir / "buffer.db"
    config = daemon_config(
        broker.port,
        sandbox.base_url,
        db,
        ROUTES,
        mqtt={"host": broker.host, "client_id": f"burst-{run_dir.name}"},
        cloud={"daily_points_limit": 10_000_000},
    )
    config_path = write_config(run_dir / "gateway.toml", config)
    daemon_env = dict(env or {})
    trace_dir = run_dir / "memtrace"
    if tracemalloc_frames > 0 or trim:
        trace_dir.mkdir()
        inherited = daemon_env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        daemon_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(MEMTRACE_DIR), inherited) if p)
        daemon_env["BENCH_MEMTRACE_DIR"] = str(trace_dir)
        daemon_env["BENCH_TRACEMALLOC_FRAMES"] = str(tracemalloc_frames)
    sandbox.call(lambda cloud: cloud.set_fault("down"))
    base_ts = int(time.time() * 1000) - readings - 60_000
    publisher_id = f"pub-{run_dir.name}"
    sites: list[str] = []
    trimmed: tuple[float, ...] | None = None
    try:
        with GatewayProcess(config_path, env=daemon_env) as process:
            process.start()
            process.wait_for_event("mqtt_connected", 30.0)
            if mode == "replay":
                process.stop(30.0)  # the session stays: the broker queues for it
                published_at = time.monotonic()
                publish_process(broker, publisher_id, readings, base_ts)
                publish_s = time.monotonic() - published_at
                process.start()
            started = time.monotonic()
            with _Sampler(process.pid) as sampler:
                if mode == "live":
                    publish_process(broker, publisher_id, readings, base_ts)
                    publish_s = time.monotonic() - started
                deadline = time.monotonic() + 1800
                during: list[tuple[Path, float]] = []  # snapshots while it ingests, RSS
                next_snapshot = time.monotonic() + snapshot_every_s
                while stored_readings(db) < readings:
                    if time.monotonic() > deadline or not process.running:
                        raise RuntimeError(f"burst not stored in time:\n{process.tail(20)}")
                    if tracemalloc_frames and snapshot_every_s and time.monotonic() > next_snapshot:
                        rss = proc_status_kib(process.pid, "VmRSS") / 1024
                        during.append((_probe(process, trace_dir, signal.SIGUSR1, "*.snap"), rss))
                        next_snapshot = time.monotonic() + snapshot_every_s
                    time.sleep(0.5 if readings > 50_000 else 0.1)
                done = time.monotonic()
                peak = proc_status_kib(process.pid, "VmHWM") / 1024
                if during:
                    sites.append(_biggest(during))
                if tracemalloc_frames:
                    sites.append(top_sites(_probe(process, trace_dir, signal.SIGUSR1, "*.snap")))
                time.sleep(settle_s)
                steady = proc_status_kib(process.pid, "VmRSS") / 1024
                if tracemalloc_frames:
                    sites.append(top_sites(_probe(process, trace_dir, signal.SIGUSR1, "*.snap")))
                if trim:
                    text = _probe(process, trace_dir, signal.SIGUSR2, "*.txt").read_text()
                    numbers, *details = text.splitlines()
                    trimmed = tuple(int(kib) / 1024 for kib in numbers.split())
                    sites.extend(details)
            process.stop(30.0)
    finally:
        sandbox.call(lambda cloud: cloud.set_fault("none"))
        shutil.rmtree(run_dir, ignore_errors=True)
    return BurstResult(
        readings,
        peak,
        steady,
        done - started,
        publish_s,
        sampler.samples,
        sites,
        trimmed,
    )


def _probe(process: GatewayProcess, trace_dir: Path, signum: int, pattern: str) -> Path:
    """Signal a probe in the daemon and wait for the file it writes (renamed when done)."""
    before = set(trace_dir.glob(pattern))
    process.send_signal(signum)
    deadline = time.monotonic() + 120
    while True:
        new = set(trace_dir.glob(pattern)) - before
        if new:
            return new.pop()
        if time.monotonic() > deadline or not process.running:
            raise RuntimeError(f"no {pattern} from the daemon's probe within 120 s")
        time.sleep(0.2)


def _biggest(snapshots: list[tuple[Path, float]]) -> str:
    """The traced total of every snapshot taken during the burst (with the RSS at that
    moment), and the top sites of the biggest one."""
    totals = []
    for path, rss in snapshots:
        snapshot = tracemalloc.Snapshot.load(str(path))
        totals.append((sum(t.size for t in snapshot.traces) / 2**20, rss, path))
    timeline = ", ".join(f"{traced:.0f}/{rss:.0f}" for traced, rss, _ in totals)
    biggest = max(totals, key=lambda item: item[0])
    return (
        f"during the burst, traced/RSS MiB per snapshot: {timeline}\n"
        f"biggest (RSS then {biggest[1]:.0f} MiB): {top_sites(biggest[2])}"
    )


def top_sites(snapshot_path: Path, limit: int = 15, frames: int = 4) -> str:
    """The biggest allocation sites of a snapshot (grouped by `frames` innermost frames)."""
    snapshot = tracemalloc.Snapshot.load(str(snapshot_path)).filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    total = sum(stat.size for stat in snapshot.statistics("filename"))
    lines = [f"{snapshot_path.name}: traced {total / 2**20:.1f} MiB"]
    for stat in snapshot.statistics("traceback")[:limit]:
        where = " <- ".join(
            f"{Path(f.filename).name}:{f.lineno}" for f in list(stat.traceback)[:frames]
        )
        lines.append(f"  {stat.size / 2**20:7.2f} MiB {stat.count:>9,} blocks  {where}")
    return "\n".join(lines)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=("live", "replay"), default="live")
    parser.add_argument("--settle", type=float, default=5.0, help="s after the last commit")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES")
    parser.add_argument(
        "--snapshot-every", type=float, default=0.0, metavar="S", help="also while ingesting"
    )
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) at steady state")
    parser.add_argument("--timeline", action="store_true", help="print RSS every 0.25 s")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    workdir = Path(tempfile.mkdtemp(prefix=".bench-memory-", dir=args.workdir or REPO))
    broker = MosquittoBroker(
        workdir / "broker", max_queued_messages=args.readings + 10_000, persistence=False
    )
    broker.start()
    sandbox = SandboxThread(SandboxCloud(DEVICES, daily_points_limit=100_000_000))
    sandbox.start()
    floors: list[float] = []
    results: list[BurstResult] = []
    try:
        for repeat in range(args.repeats):
            floors.append(floor_rss_mib())
            result = burst(
                workdir,
                broker,
                sandbox,
                args.readings,
                args.settle,
                env,
                tracemalloc_frames=args.tracemalloc,
                trim=args.trim,
                mode=args.mode,
                snapshot_every_s=args.snapshot_every,
            )
            results.append(result)
            print(
                f"  repeat {repeat + 1}: floor {floors[-1]:.1f} MiB, peak {result.peak_mib:.1f}, "
                f"steady {result.steady_mib:.1f} MiB; {result.rate:,.0f} readings/s stored "
                f"(published in {result.publish_s:.1f} s)",
                flush=True,
            )
            if args.timeline:
                step = max(1, len(result.timeline) // 40)
                print("    " + " ".join(f"{t:.0f}s:{m:.0f}" for t, m in result.timeline[::step]))
            for sites in result.sites:
                print(sites)
            if result.trimmed:
                before, after, sqlite_now, sqlite_peak = result.trimmed
                print(
                    f"    malloc_trim(0) at steady state: {before:.1f} -> {after:.1f} MiB; "
                    f"SQLite heap {sqlite_now:.1f} MiB (peak {sqlite_peak:.1f})"
                )
    finally:
        sandbox.stop()
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    floor = median(floors)
    peak = median([r.peak_mib for r in results])
    steady = median([r.steady_mib for r in results])
    print(
        f"\n{args.readings:,} readings, {args.mode}, env {env or '-'}: floor {floor:.1f} MiB; "
        f"peak {peak:.1f} MiB (floor + {peak - floor:.1f}); "
        f"steady {steady:.1f} MiB (floor + {steady - floor:.1f})"
    )
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "readings": args.readings,
                    "env": env,
                    "floor_mib": floors,
                    "peak_mib": [r.peak_mib for r in results],
                    "steady_mib": [r.steady_mib for r in results],
                    "timeline": [r.timeline for r in results],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
