"""SD-card wear: bytes the gateway writes to disk per stored reading, at a realistic rate.

The gateway runs as a subprocess (`python -m gateway run`) against a private Mosquitto and
the sandbox cloud; a publisher sends 50 readings/s spread over 5 sensors (each reading
carries its own timestamp). After a warm-up, the gateway's `write_bytes` from
`/proc/<pid>/io` is sampled over a window and divided by the readings the broker accepted
in that window. `write_bytes` counts what the process caused to be written to the block
layer (page-cache pages dirtied, 4 KiB each on ext4), which is what wears the card; it is
0 on tmpfs, so the work directory must be on a real disk (the default is under this
repository).

Variants, each on a fresh database, in one run so the machine's drift hits all alike:

* ``commit-per-message``  the naive baseline: one transaction (one fsync) per reading
                          (pass-through off, as in every write-first variant)
* ``default``             the daemon's defaults, cloud reachable: pass-through (upload
                          first, PUBACK on the cloud's 204, write only what is not taken)
* ``write-first``         pass-through off: WAL, synchronous=FULL, group commit 200 ms
                          (steady state: every reading inserted, uploaded, deleted)
* ``default-offline``     the same while the cloud is down (readings only inserted)
* ``offline-then-drain``  the window offline, then the cloud returns and the backlog is
                          uploaded in full batches: the writes of both, per reading. This
                          is what uploading in big batches (a flush "linger") would cost.
* ``sync-normal``         synchronous=NORMAL (fewer fsyncs; see README for the trade-off)
* ``commit-1s``           group commit every 1000 ms
* ``sampled-10s``,        the defaults with `sample = { every = "10s" }` (or "60s") on every
  ``sampled-60s``         route (issue 19): each reading written raw, one mean per window
                          uploaded, the window's rows deleted with its record; pass-through
                          never takes a windowed reading
* ``deadband-1``          the defaults with `sample = { deadband = 1 }`: a sensor's readings
                          move 0.5 each, so two in three are suppressed (never written);
                          the kept ones pass through, their memory written per commit

A second section compares the row layouts of schema v1 (table + covering index) and v2
(one WITHOUT ROWID table), and database page sizes, with the store's own insert statement,
in this process.

Figures are medians over repeats, and ratios against ``commit-per-message``.

`measure_steady` also counts the import requests the sandbox received in the window, per
reading it accepted, over any number of sensors (up to 20) and with the sandbox answering
late: `benchmarks/run.py --only latency` uses it for 100 readings/s over 20 datastreams
with the cloud 100 ms away (issue 18).

    .venv/bin/python benchmarks/sd_wear.py --window 15 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.store import migrate
from gateway.testing.broker import MosquittoBroker
from gateway.testing.process import GatewayProcess, daemon_config, write_config
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from gateway.testing.sandbox_run import SandboxThread

REPO = Path(__file__).resolve().parent.parent

SENSORS = 5  # the wear figures' sensors
MAX_SENSORS = 20
DEVICES = {200 + i: {1: "double"} for i in range(MAX_SENSORS)}


@dataclass(frozen=True)
class Variant:
    name: str
    store: dict[str, Any]
    flush: dict[str, Any] = field(default_factory=dict)
    cloud_up: bool = True
    sample: dict[str, Any] | None = None  # on every route (gateway/sampling.py)
    mqtt: dict[str, Any] = field(default_factory=dict)  # e.g. MQTT 5 and its window


WRITE_FIRST = {"pass_through": False}
VARIANTS = [
    Variant("commit-per-message", {"commit_interval_ms": 1, "commit_max_readings": 1}, WRITE_FIRST),
    Variant("default", {}),
    Variant("write-first", {}, WRITE_FIRST),
    Variant("default-offline", {}, cloud_up=False),
    Variant("offline-then-drain", {}, cloud_up=False),
    Variant("sync-normal", {"synchronous": "NORMAL"}, WRITE_FIRST),
    Variant("commit-1s", {"commit_interval_ms": 1000}, WRITE_FIRST),
    Variant("sampled-10s", {}, sample={"every": "10s"}),
    Variant("sampled-60s", {}, sample={"every": "60s"}),
    Variant("deadband-1", {}, sample={"deadband": 1}),
    # What-if (not in the default run): a broker window big enough for pass-through to hold
    # a paced group (MQTT 5's Receive Maximum), and one commit a second for what it declines.
    Variant(
        "mqtt5-window-1000",
        {"commit_interval_ms": 1000},
        mqtt={"protocol": "5", "inflight_window": 1000},
    ),
]
# Run by `run.py --only latency` (c), not by this script's default list.
WHAT_IF = ("mqtt5-window-1000",)


def write_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/io") as handle:
        for line in handle:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/<pid>/io")


class Rate:
    """Publishes `per_second` readings, round-robin over the sensors, until stopped."""

    def __init__(
        self, publisher: AckedPublisher, per_second: float, sensors: int = SENSORS
    ) -> None:
        self.publisher = publisher
        self.period_s = 1.0 / per_second
        self.sensors = sensors
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        index = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            ts = int(time.time() * 1000)
            payload = json.dumps({"value": round(20 + (index % 100) / 10, 1), "ts": ts})
            self.publisher.publish(f"bench/sensor{index % self.sensors}", payload)
            index += 1
            next_at += self.period_s
            time.sleep(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> Rate:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@contextmanager
def gateway(config_path: Path) -> Iterator[GatewayProcess]:
    """The daemon, connected to the broker. Its log goes to a pipe that this process reads:
    a log file written by the daemon would count in its write_bytes."""
    with GatewayProcess(config_path) as process:
        process.start()
        process.wait_for_event("mqtt_connected", 20.0)
        try:
            yield process
        finally:
            process.stop(30.0)


@dataclass(frozen=True)
class Steady:
    """One window of a steady rate: what the daemon wrote, and what the cloud saw."""

    bytes_per_reading: float  # per reading the broker accepted in the window
    requests_per_reading: float  # import requests per reading the cloud accepted
    published: int  # readings the broker accepted in the window
    delivered: int  # readings the cloud accepted in the window


def measure(
    variant: Variant, workdir: Path, broker: MosquittoBroker, sandbox: SandboxThread, args: Any
) -> float:
    """Bytes written per reading at `args.rate` over `SENSORS` sensors."""
    steady = measure_steady(
        variant, workdir, broker, sandbox, args.rate, args.warmup, args.window, SENSORS
    )
    return steady.bytes_per_reading


def measure_steady(
    variant: Variant,
    workdir: Path,
    broker: MosquittoBroker,
    sandbox: SandboxThread,
    rate: float,
    warmup_s: float,
    window_s: float,
    sensors: int,
) -> Steady:
    """`rate` readings/s round-robin over `sensors` datastreams (one device each), the
    daemon on a fresh buffer; counts over `window_s` after `warmup_s`."""
    if not 1 <= sensors <= MAX_SENSORS:
        raise ValueError(f"sensors must be 1..{MAX_SENSORS}")
    run_dir = Path(tempfile.mkdtemp(prefix=f"{variant.name}-", dir=workdir))
    config = daemon_config(
        broker.port,
        sandbox.base_url,
        run_dir / "buffer.db",
        [
            {"topic": f"bench/sensor{i}", "device_id": 200 + i, "datastream_id": 1}
            | ({"sample": variant.sample} if variant.sample else {})
            for i in range(sensors)
        ],
        mqtt={"host": broker.host, "client_id": f"wear-{run_dir.name}", **variant.mqtt},
        store=variant.store,
        flush={"interval_s": 1.0, **variant.flush},
    )
    config_path = write_config(run_dir / "gateway.toml", config)
    sandbox.call(lambda cloud: cloud.set_fault("none" if variant.cloud_up else "down"))
    publisher = AckedPublisher(broker.host, broker.port, client_id=f"pub-{run_dir.name}")
    publisher.connect()
    try:
        with gateway(config_path) as process:
            with Rate(publisher, rate, sensors):
                time.sleep(warmup_s)
                bytes_0, acked_0 = write_bytes(process.pid), publisher.acked_count
                requests_0, accepted_0 = _cloud_counts(sandbox)
                time.sleep(window_s)
                bytes_1, acked_1 = write_bytes(process.pid), publisher.acked_count
                requests_1, accepted_1 = _cloud_counts(sandbox)
            if variant.name == "offline-then-drain":
                target = sandbox.call(lambda cloud: cloud.accepted_count()) + acked_1
                sandbox.call(lambda cloud: cloud.set_fault("none"))
                deadline = time.monotonic() + 120
                while sandbox.call(lambda cloud: cloud.accepted_count()) < target:
                    if time.monotonic() > deadline:
                        raise RuntimeError("backlog not drained within 120 s")
                    time.sleep(0.2)
                time.sleep(1.0)
                bytes_1 = write_bytes(process.pid)
    finally:
        publisher.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    delivered = accepted_1 - accepted_0
    return Steady(
        bytes_per_reading=(bytes_1 - bytes_0) / max(1, acked_1 - acked_0),
        requests_per_reading=(requests_1 - requests_0) / max(1, delivered),
        published=acked_1 - acked_0,
        delivered=delivered,
    )


def _cloud_counts(sandbox: SandboxThread) -> tuple[int, int]:
    """(import requests, points accepted) so far, read in one call on the sandbox's loop."""
    return sandbox.call(lambda cloud: (len(cloud.requests), cloud.accepted_count()))


def layout_bytes_per_reading(
    workdir: Path, version: int, readings: int, page_size: int = 4096, quiet: bool = False
) -> float:
    """This process's write_bytes for the store's insert pattern on schema v1 or v2."""
    path = Path(tempfile.mkdtemp(dir=workdir)) / "layout.db"
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute(f"PRAGMA page_size={page_size}")
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    migrate(connection, target=version)
    connection.executemany(
        "INSERT INTO streams (id, device_id, datastream_id) VALUES (?, ?, 1)",
        [(i + 1, 200 + i) for i in range(SENSORS)],
    )
    ts = int(time.time() * 1000)
    before = write_bytes(os.getpid())
    for group in range(readings // 10):
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            "INSERT OR IGNORE INTO readings (stream_id, ts_ms, value) VALUES (?, ?, ?)",
            [
                ((group * 10 + i) % SENSORS + 1, ts + group * 200 + i, f"{20 + i / 10:.1f}")
                for i in range(10)
            ],
        )
        connection.execute("COMMIT")
    after = write_bytes(os.getpid())
    (pages,) = connection.execute("PRAGMA page_count").fetchone()
    (page_size,) = connection.execute("PRAGMA page_size").fetchone()
    connection.close()
    shutil.rmtree(path.parent, ignore_errors=True)
    if not quiet:
        per_row = pages * page_size / readings
        print(f"  schema v{version}, page {page_size}: {per_row:5.1f} bytes of file per row")
    return (after - before) / readings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0, help="readings per second")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--window", type=float, default=15.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="on a real disk (default: under the repo)"
    )
    parser.add_argument("--only", default="", help="comma-separated variant names")
    args = parser.parse_args()
    own_workdir = args.workdir is None
    if own_workdir:
        args.workdir = Path(tempfile.mkdtemp(prefix=".bench-sd-wear-", dir=REPO))
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        return run(args)
    finally:
        if own_workdir:
            shutil.rmtree(args.workdir, ignore_errors=True)


def run(args: Any) -> int:
    probe = write_bytes(os.getpid())
    (args.workdir / "probe").write_bytes(os.urandom(1 << 16))
    os.sync()
    if write_bytes(os.getpid()) == probe:
        print(f"warning: write_bytes does not count on {args.workdir} (tmpfs?); figures are 0")
    wanted = args.only.split(",") if args.only else []
    variants = [v for v in VARIANTS if v.name in wanted or (not wanted and v.name not in WHAT_IF)]
    results: dict[str, list[float]] = {v.name: [] for v in variants}
    print(
        f"SD wear at {args.rate:g} readings/s, {SENSORS} sensors, window {args.window:g} s, "
        f"{args.repeats} repeats, workdir {args.workdir}"
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as broker_dir:
        broker = MosquittoBroker(Path(broker_dir) / "broker")
        broker.start()
        sandbox = SandboxThread(SandboxCloud(DEVICES, daily_points_limit=10_000_000))
        sandbox.start()
        try:
            for repeat in range(args.repeats):
                for variant in variants:
                    figure = measure(variant, args.workdir, broker, sandbox, args)
                    results[variant.name].append(figure)
                    print(f"  repeat {repeat + 1}: {variant.name:<20} {figure:8.0f} bytes/reading")
        finally:
            sandbox.stop()
            broker.stop()
    baseline = statistics.median(results.get("commit-per-message") or [float("nan")])
    print("\nbytes written per stored reading (median), and the ratio to commit-per-message:")
    for name, figures in results.items():
        median = statistics.median(figures)
        print(f"  {name:<20} {median:8.0f}   x{median / baseline:5.2f}")
    print("\nrow layout, the store's insert statement, 10 readings per commit, FULL:")

    def median_of(version: int, page_size: int = 4096) -> float:
        layout_bytes_per_reading(args.workdir, version, 5000, page_size)
        return statistics.median(
            layout_bytes_per_reading(args.workdir, version, 5000, page_size, quiet=True)
            for _ in range(3)
        )

    v1 = median_of(1)
    print(f"  schema v1, page 4096 {v1:7.0f} bytes written/reading   x 1.00")
    for page_size in (4096, 2048, 1024):
        v2 = median_of(2, page_size)
        print(f"  schema v2, page {page_size:4d} {v2:7.0f} bytes written/reading   x{v2 / v1:5.2f}")
    (args.workdir / "probe").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
