"""Start-up with a large backlog: time to ready and to the first upload, and memory.

Builds a buffer of N readings (default 1,000,000 over 20 datastreams, made with the store's
own schema) and measures, against an empty buffer measured in the same run (the baseline):

* ``Store.open`` -> first ``lease``: after a clean close (the row count is recorded) and
  after a crash (no record: the store counts the rows), in this process
* the integrity checks: start-up probe (part of open) and the full ``quick_check`` that the
  daemon runs in the background after start-up
* the daemon (`python -m gateway run`, a subprocess) from exec to `gateway_started` and to
  the first batch accepted by the sandbox cloud
* the daemon's resident memory (VmRSS, and its peak VmHWM) after 5 s of uploading
* upgrading a version-1 file of N rows (a one-off, at the first start of this version)

Figures are medians of the repeats. With --drop-caches (root only) the page cache is
dropped before each timed open, so the file is read from disk as after a reboot.

    .venv/bin/python benchmarks/startup_backlog.py --rows 1000000 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.store import Store, migrate, quick_check
from gateway.testing.broker import MosquittoBroker
from gateway.testing.process import GatewayProcess, daemon_config, write_config
from gateway.testing.sandbox import SandboxCloud
from gateway.testing.sandbox_run import SandboxThread

REPO = Path(__file__).resolve().parent.parent

STREAMS = 20
DEVICES = {300 + i: {1: "double"} for i in range(STREAMS)}


def drop_caches(enabled: bool) -> None:
    if not enabled:
        return
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as handle:
        handle.write("3\n")


def rows(count: int, base_ts: int) -> Any:
    for i in range(count):
        yield (i % STREAMS + 1, base_ts + i, f"{20 + (i % 1000) / 100:.2f}")


def build(path: Path, count: int, base_ts: int, version: int = 2) -> None:
    """A buffer of `count` readings; version 1 builds the old layout (for the upgrade)."""
    if version == 2:
        asyncio.run(_create(path))
    connection = sqlite3.connect(path, isolation_level=None)
    if version == 1:
        connection.execute("PRAGMA page_size=4096")
        connection.execute("PRAGMA journal_mode=WAL")
        migrate(connection, target=1)
    connection.execute("BEGIN")
    connection.executemany(
        "INSERT OR IGNORE INTO streams (id, device_id, datastream_id) VALUES (?, ?, 1)",
        [(i + 1, 300 + i) for i in range(STREAMS)],
    )
    connection.executemany(
        "INSERT INTO readings (stream_id, ts_ms, value) VALUES (?, ?, ?)", rows(count, base_ts)
    )
    if version == 2:
        connection.execute("DELETE FROM meta WHERE key = 'pending_points'")
    connection.execute("COMMIT")
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()


async def _create(path: Path) -> None:
    store = await Store.open(path, owner=True)
    await store.close()


async def open_to_lease(path: Path) -> tuple[float, float, int]:
    """(ms to open, ms to open + first lease, rows the store counts)."""
    started = time.perf_counter()
    store = await Store.open(path, owner=True)
    opened = time.perf_counter()
    streams = await store.pending_streams()
    if streams:
        await store.lease(streams[0].key, 1000)
    leased = time.perf_counter()
    pending = store.pending_points
    await store.close()
    return (opened - started) * 1000, (leased - started) * 1000, pending


def forget_clean_record(path: Path) -> None:
    connection = sqlite3.connect(path)
    connection.execute("DELETE FROM meta WHERE key = 'pending_points'")
    connection.commit()
    connection.close()


def proc_status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def daemon_run(
    path: Path,
    broker: MosquittoBroker,
    sandbox: SandboxThread,
    workdir: Path,
    settle_s: float = 5.0,
) -> dict[str, float]:
    """Exec the daemon on `path`; times to gateway_started and first upload, and memory
    `settle_s` after that (`benchmarks/run.py` shortens it in its quick mode)."""
    config = daemon_config(
        broker.port,
        sandbox.base_url,
        path,
        [
            {"topic": f"bench/{device}", "device_id": device, "datastream_id": 1}
            for device in DEVICES
        ],
        mqtt={"host": broker.host, "client_id": f"backlog-{time.time_ns()}"},
        cloud={"daily_points_limit": 10_000_000},
    )
    config_path = write_config(workdir / "gateway.toml", config)
    accepted_before = sandbox.call(lambda cloud: cloud.accepted_count())
    figures: dict[str, float] = {}
    with GatewayProcess(config_path) as process:
        started = time.perf_counter()
        process.start()
        try:
            process.wait_for_event("gateway_started", 60.0)
            figures["ready_ms"] = (time.perf_counter() - started) * 1000
            if path.stat().st_size > 100_000:
                deadline = time.monotonic() + 60
                while sandbox.call(lambda cloud: cloud.accepted_count()) == accepted_before:
                    if time.monotonic() > deadline:
                        raise RuntimeError("no upload within 60 s")
                    time.sleep(0.005)
                figures["first_upload_ms"] = (time.perf_counter() - started) * 1000
            time.sleep(settle_s)
            figures["rss_mib"] = proc_status_kib(process.pid, "VmRSS") / 1024
            figures["peak_rss_mib"] = proc_status_kib(process.pid, "VmHWM") / 1024
            figures["uploaded_in_5s"] = (
                sandbox.call(lambda cloud: cloud.accepted_count()) - accepted_before
            )
        finally:
            process.stop(30.0)
    return figures


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--drop-caches", action="store_true", help="root only: cold page cache")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix=".bench-backlog-", dir=args.workdir or REPO))
    try:
        return run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(args: Any, workdir: Path) -> int:
    base_ts = int(time.time() * 1000) - 3_600_000
    big, empty, old = workdir / "big.db", workdir / "empty.db", workdir / "v1.db"
    started = time.perf_counter()
    build(big, args.rows, base_ts)
    build(empty, 0, base_ts)
    print(
        f"built {args.rows:,} readings over {STREAMS} datastreams in "
        f"{time.perf_counter() - started:.1f} s: {big.stat().st_size / 1e6:.1f} MB "
        f"({big.stat().st_size / max(1, args.rows):.1f} bytes per reading)"
    )
    results: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    for _ in range(args.repeats):
        for label, path in (("empty", empty), ("backlog", big)):
            asyncio.run(_create(path))  # a clean close: the count is recorded
            drop_caches(args.drop_caches)
            opened, leased, pending = asyncio.run(open_to_lease(path))
            assert label == "empty" or pending == args.rows, pending
            note(f"open, clean start, {label}", opened)
            note(f"open + first lease, clean start, {label}", leased)
            forget_clean_record(path)
            drop_caches(args.drop_caches)
            opened, leased, _ = asyncio.run(open_to_lease(path))
            note(f"open, after a crash (count), {label}", opened)
            note(f"open + first lease, after a crash, {label}", leased)
            drop_caches(args.drop_caches)
            checked = time.perf_counter()
            assert quick_check(path) == []
            note(f"full quick_check (background), {label}", (time.perf_counter() - checked) * 1000)
    print(f"\nin-process, ms (median of {args.repeats}); ratio = backlog / empty:")
    names = sorted({name.rsplit(", ", 1)[0] for name in results})
    for name in names:
        empty_ms = median(results[f"{name}, empty"])
        backlog_ms = median(results[f"{name}, backlog"])
        ratio = backlog_ms / empty_ms
        print(f"  {name:<40} empty {empty_ms:8.1f}   backlog {backlog_ms:8.1f}   x{ratio:6.1f}")

    with tempfile.TemporaryDirectory(dir=workdir) as broker_dir:
        broker = MosquittoBroker(Path(broker_dir) / "broker")
        broker.start()
        sandbox = SandboxThread(SandboxCloud(DEVICES, daily_points_limit=100_000_000))
        sandbox.start()
        daemon: dict[str, dict[str, list[float]]] = {"empty": {}, "backlog": {}}
        try:
            for _ in range(args.repeats):
                for label, path in (("empty", empty), ("backlog", big)):
                    copy = workdir / f"run-{label}.db"
                    shutil.copyfile(path, copy)
                    drop_caches(args.drop_caches)
                    for key, value in daemon_run(copy, broker, sandbox, workdir).items():
                        daemon[label].setdefault(key, []).append(value)
                    for suffix in ("", "-wal", "-shm", ".reserve"):
                        Path(f"{copy}{suffix}").unlink(missing_ok=True)
        finally:
            sandbox.stop()
            broker.stop()
    print(f"\ndaemon subprocess (median of {args.repeats}):")
    for key in ("ready_ms", "first_upload_ms", "rss_mib", "peak_rss_mib", "uploaded_in_5s"):
        empty_value = median(daemon["empty"].get(key, []))
        backlog_value = median(daemon["backlog"].get(key, []))
        ratio = (
            backlog_value / empty_value
            if empty_value == empty_value and empty_value
            else float("nan")
        )
        print(
            f"  {key:<16} empty {empty_value:10.1f}   backlog {backlog_value:10.1f}   x{ratio:6.2f}"
        )

    build(old, args.rows, base_ts, version=1)
    drop_caches(args.drop_caches)
    started = time.perf_counter()
    opened, _, pending = asyncio.run(open_to_lease(old))
    print(
        f"\nupgrade of a version-1 file with {pending:,} readings (one-off): "
        f"{(time.perf_counter() - started):.1f} s; "
        f"file {old.stat().st_size / 1e6:.1f} MB after (page size stays 4096)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
