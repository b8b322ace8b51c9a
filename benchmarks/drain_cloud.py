"""Upload drain rate: points/s the daemon uploads from a buffered backlog, against raw httpx.

The gateway spends most of an outage's aftermath draining its buffer, so how close its
upload path comes to the HTTP client it is built on matters. A buffer of N readings over
20 datastreams is built with the store's own schema (`startup_backlog.build`); the daemon
(`python -m gateway run`, a subprocess, default flush settings) starts on a copy of it with
the sandbox cloud up. **The baseline, in the same run against the same sandbox:** a bare
`httpx.Client` in its own process posting the very same batches (the daemon's batch size,
the daemon's round-robin order over datastreams, the same JSON) one after another, with a
token fetched once and the bodies built before timing. Both are timed the same way, from
this process: from the first point the sandbox accepts to the last, so neither pays for
its start-up; the difference is what reading, leasing, acknowledging and deleting in
SQLite, plus the flush loop's bookkeeping, cost per point.

`--latency-ms` makes the sandbox answer every request that much later, for both (a real
cloud is 30-300 ms away; issue 18). The baseline posts `--concurrency` requests at a
time (default 4, the daemon's `cloud.max_concurrent_requests` since issue 18; 1 was the
daemon's way before, bound to ~10 batches/s at 100 ms).

    .venv/bin/python benchmarks/drain_cloud.py --readings 200000 --repeats 3
    .venv/bin/python benchmarks/drain_cloud.py --readings 200000 --latency-ms 100
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from startup_backlog import DEVICES, build

from gateway.testing.broker import MosquittoBroker
from gateway.testing.process import (
    GatewayProcess,
    daemon_config,
    write_config,
)
from gateway.testing.sandbox import SandboxCloud
from gateway.testing.sandbox_run import SandboxThread

REPO = Path(__file__).resolve().parent.parent
# The baseline client, a script of its own (`python benchmarks/httpx_poster.py`).
POSTER = Path(__file__).resolve().parent / "httpx_poster.py"
BATCH_SIZE = 1000  # the daemon's default flush.batch_size
CONCURRENCY = 8  # the daemon's default cloud.max_concurrent_requests
DRAIN_TIMEOUT_S = 600.0


def _timed_until(sandbox: SandboxThread, target: int, alive: object) -> float:
    """Points/s from the first accepted point to `target` points, polled every 10 ms."""
    start_count = sandbox.call(lambda cloud: cloud.accepted_count())
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    first_at, first_count = None, 0
    while True:
        count = sandbox.call(lambda cloud: cloud.accepted_count())
        now = time.perf_counter()
        if first_at is None and count > start_count:
            first_at, first_count = now, count
        if count >= start_count + target:
            break
        if time.monotonic() > deadline or not alive():  # type: ignore[operator]
            raise RuntimeError(f"drain stopped at {count - start_count} of {target} points")
        time.sleep(0.01)
    assert first_at is not None
    return (start_count + target - first_count) / max(now - first_at, 1e-6)


def daemon_drain(
    db: Path, readings: int, broker: MosquittoBroker, sandbox: SandboxThread, workdir: Path
) -> float:
    """Points/s the daemon uploads from the buffer `db` (which it consumes)."""
    config = daemon_config(
        broker.port,
        sandbox.base_url,
        db,
        [
            {"topic": f"bench/{device}", "device_id": device, "datastream_id": 1}
            for device in DEVICES
        ],
        mqtt={"host": broker.host, "client_id": f"drain-{time.time_ns()}"},
        cloud={"daily_points_limit": 10_000_000},
        flush={"batch_size": BATCH_SIZE},
        log={"level": "warning"},
    )
    config_path = write_config(workdir / "drain.toml", config)
    with GatewayProcess(config_path) as process:
        process.start()
        try:
            return _timed_until(sandbox, readings, lambda: process.running)
        finally:
            process.stop(30.0)


def httpx_drain(
    readings: int, base_ts: int, sandbox: SandboxThread, concurrency: int = CONCURRENCY
) -> float:
    """Points/s of the baseline client, `httpx_poster.py` in a child process."""
    process = subprocess.Popen(
        [
            sys.executable,
            str(POSTER),
            sandbox.base_url,
            str(readings),
            str(base_ts),
            str(BATCH_SIZE),
            str(concurrency),
        ]
    )
    try:
        return _timed_until(sandbox, readings, lambda: process.poll() in (None, 0))
    finally:
        if process.wait(60) != 0:
            raise RuntimeError(f"raw httpx poster exited with {process.returncode}")


def measure(
    source: Path,
    readings: int,
    base_ts: int,
    broker: MosquittoBroker,
    sandbox: SandboxThread,
    workdir: Path,
    latency_ms: float = 0.0,
    concurrency: int = CONCURRENCY,
) -> tuple[float, float]:
    """(daemon points/s, raw httpx points/s) for one repeat, the sandbox up and answering
    `latency_ms` late (back to its previous latency afterwards)."""
    sandbox.call(lambda cloud: cloud.set_fault("none"))
    previous = sandbox.call(lambda cloud: cloud.latency)
    sandbox.call(lambda cloud: cloud.set_latency(latency_ms))
    copy = workdir / "drain-run.db"
    shutil.copyfile(source, copy)
    try:
        try:
            daemon = daemon_drain(copy, readings, broker, sandbox, workdir)
        finally:
            for suffix in ("", "-wal", "-shm", ".reserve"):
                Path(f"{copy}{suffix}").unlink(missing_ok=True)
        return daemon, httpx_drain(readings, base_ts, sandbox, concurrency)
    finally:
        sandbox.call(
            lambda cloud: cloud.set_latency(previous.latency_ms, jitter_ms=previous.jitter_ms)
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="sandbox round trip")
    parser.add_argument(
        "--concurrency", type=int, default=CONCURRENCY, help="the baseline's requests at once"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix=".bench-drain-", dir=args.workdir or REPO))
    broker = MosquittoBroker(workdir / "broker", persistence=False)
    sandbox = SandboxThread(SandboxCloud(DEVICES, daily_points_limit=10_000_000))
    try:
        base_ts = int(time.time() * 1000) - 3_600_000
        source = workdir / "backlog.db"
        build(source, args.readings, base_ts)
        broker.start()
        sandbox.start()
        results = [
            measure(
                source,
                args.readings,
                base_ts,
                broker,
                sandbox,
                workdir,
                args.latency_ms,
                args.concurrency,
            )
            for _ in range(args.repeats)
        ]
    finally:
        sandbox.stop()
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    daemon = statistics.median(r[0] for r in results)
    raw = statistics.median(r[1] for r in results)
    print(
        json.dumps(
            {"daemon_points_per_s": [r[0] for r in results], "httpx": [r[1] for r in results]}
        )
    )
    print(
        f"drain at {args.latency_ms:g} ms: daemon {daemon:,.0f} points/s, "
        f"raw httpx {raw:,.0f} points/s: {daemon / raw:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
