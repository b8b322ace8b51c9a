"""The buffer under pressure, end to end: real Mosquitto → gateway → SQLite → sandbox cloud.

Capacity policies at the limit, a full disk (a real size-limited tmpfs when this machine
lets us mount one, else the store's injected SQLITE_FULL), a read-only store, and a damaged
buffer file at start-up. What matters in each: no reading the broker handed over is lost
unless the configured policy says so (and then it is counted and logged).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Settings
from gateway.ingest import MqttIngest
from gateway.ingest import ingest as ingest_module
from gateway.models import Reading
from gateway.store import Store
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import (
    InProcessGateway,
    accepted_set,
    events,
    publish,
    ts_payload,
    wait_for_passes,
    wait_until,
)

TOPIC = "sensors/boiler/temperature"
TEXT_TOPIC = "sensors/boiler/status"
ROUTES = [
    {"topic": TOPIC, "device_id": 101, "datastream_id": 5},
    {"topic": TEXT_TOPIC, "device_id": 101, "datastream_id": 7},
]


def now_ms() -> int:
    """An hour ago: recent enough for the cloud's age limit, distinct per test run."""
    return int(time.time() * 1000) - 3_600_000


def numbered(count: int, base_ts: int, offset: int = 0) -> tuple[list[tuple[str, str]], list[Any]]:
    """Messages with their own ts (so redeliveries are recognisable) and the points expected."""
    messages = [(TOPIC, ts_payload(float(i), base_ts + i)) for i in range(offset, offset + count)]
    expected = [(101, 5, base_ts + i, float(i)) for i in range(offset, offset + count)]
    return messages, expected


async def more_held_commits(ingest: MqttIngest, count: int = 1) -> None:
    """Until ingest has tried (and been refused) `count` more commits: the state is settled."""
    target = ingest.stats.held_commits + count
    await wait_until(lambda: ingest.stats.held_commits >= target, 30, f"{count} more held commits")


# --------------------------------------------------------------------------- policies


async def test_backpressure_holds_acks_so_the_broker_keeps_the_rest(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingest_module, "PENDING_MAX_MESSAGES", 150)
    base = now_ms()
    messages, expected = numbered(400, base)
    settings = make_settings(store={"max_points": 100, "full_policy": "backpressure"})
    await sandbox.set_fault("down")
    async with InProcessGateway(settings) as gateway:
        assert gateway.store is not None and gateway.ingest is not None
        assert await publish(publisher, messages[:300]) == 300  # the broker took them all
        await wait_until(lambda: gateway.ingest is not None and gateway.ingest.holding)
        await more_held_commits(gateway.ingest)
        buffered = gateway.store.pending_points
        # Never beyond the limit; the rest waits in the broker.
        assert 100 - settings.commit_max_readings() < buffered <= 100
        # Whatever the broker pushes (Mosquitto 2.0 may ignore its in-flight window), the
        # gateway's memory does not grow past the cap while it holds: the rest stays unacked.
        held = gateway.ingest.held_messages
        assert await publish(publisher, messages[300:]) == 100
        await more_held_commits(gateway.ingest)
        assert gateway.ingest.held_messages <= max(held, 150)
        assert gateway.store.pending_points == buffered
    [full] = events(log_output, "buffer_full")
    assert full["policy"] == "backpressure" and full["level"] == "warning"
    # Restart while still full: what was held comes back from the broker's queue.
    async with InProcessGateway(settings) as gateway:
        assert gateway.store is not None
        await wait_until(lambda: gateway.ingest is not None and gateway.ingest.holding)
        assert gateway.store.pending_points == buffered
        await sandbox.set_fault("none")
        await wait_until(lambda: accepted_set(sandbox) >= set(expected), 30, "all 400 delivered")
        await wait_for_passes(gateway)  # a duplicate would go out now
    assert accepted_set(sandbox) == set(expected)
    assert len(sandbox.accepted) == 400
    assert events(log_output, "buffer_full_ended")


async def test_drop_oldest_delivers_the_newest_and_counts_the_rest(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    base = now_ms()
    messages, expected = numbered(500, base)
    settings = make_settings(store={"max_points": 200})  # drop-oldest is the default
    await sandbox.set_fault("down")
    async with InProcessGateway(settings) as gateway:
        assert gateway.store is not None and gateway.ingest is not None
        assert await publish(publisher, messages) == 500
        await wait_until(
            lambda: gateway.ingest is not None and gateway.ingest.stats.received == 500
        )
        await wait_until(lambda: gateway.ingest is not None and gateway.ingest.stats.evicted == 300)
        assert gateway.store.pending_points == 200
        assert await gateway.store.capacity_drops() == {101: (300, 0)}
        await sandbox.set_fault("none")
        await wait_until(lambda: len(sandbox.accepted) >= 200, 30, "the kept 200 delivered")
        await wait_for_passes(gateway)
    assert accepted_set(sandbox) == set(expected[300:])
    full = events(log_output, "buffer_full")
    assert len(full) == 1 and full[0]["policy"] == "drop-oldest"
    assert full[0]["by_device"] == {"101": full[0]["evicted"]}
    assert full[0]["oldest_kept_ts"] > base


async def test_drop_newest_delivers_the_first_and_counts_the_refused(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    base = now_ms()
    messages, expected = numbered(500, base)
    settings = make_settings(store={"max_points": 200, "full_policy": "drop-newest"})
    await sandbox.set_fault("down")
    async with InProcessGateway(settings) as gateway:
        assert gateway.store is not None
        assert await publish(publisher, messages) == 500
        await wait_until(lambda: gateway.ingest is not None and gateway.ingest.stats.refused == 300)
        assert (await gateway.store.counts())["refused"] == 300
        await sandbox.set_fault("none")
        await wait_until(lambda: len(sandbox.accepted) >= 200, 30, "the first 200 delivered")
        await wait_for_passes(gateway)
    assert accepted_set(sandbox) == set(expected[:200])
    [full] = events(log_output, "buffer_full")
    assert full["policy"] == "drop-newest" and full["refused"] > 0


# --------------------------------------------------------------------------- full disk


class SmallDisk:
    """A 6 MiB tmpfs for the buffer, or (where mounting is not allowed) a store whose file
    cannot grow (`Store.inject_fault("full")`, the same SQLITE_FULL the disk would give)."""

    SIZE = 6 * 1024 * 1024

    def __init__(self, root: Path, try_mount: bool) -> None:
        self.root = root
        self.root.mkdir()
        self.mounted = False
        if try_mount and shutil.which("mount") and os.geteuid() == 0:
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={self.SIZE},mode=0755", "tmpfs", str(root)],
                capture_output=True,
                check=False,
            )
            self.mounted = done.returncode == 0
        self.filler = root / "filler"

    @property
    def db_path(self) -> Path:
        return self.root / "buffer.db"

    def free_bytes(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    async def fill(self, store: Store, leave_bytes: int) -> None:
        """Leave `leave_bytes` free on the filesystem (or freeze the file's size)."""
        if not self.mounted:
            await store.inject_fault("full")
            return
        size = self.free_bytes() - leave_bytes
        with self.filler.open("wb") as handle:
            handle.write(b"\0" * max(0, size))

    async def free(self, store: Store) -> None:
        """The operator cleans up."""
        if not self.mounted:
            await store.inject_fault("none")
            return
        self.filler.unlink()

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.root)], check=False)


@pytest.fixture(params=["tmpfs", "injected"])
def small_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SmallDisk]:
    """Both ways; where mounting is not permitted "tmpfs" falls back to the injected fault."""
    disk = SmallDisk(tmp_path / "small", try_mount=request.param == "tmpfs")
    if request.param == "tmpfs" and not disk.mounted:
        print("tmpfs mount not permitted here: using the injected SQLITE_FULL instead")
    yield disk
    disk.close()


async def test_full_disk_holds_acks_keeps_uploading_and_resumes_by_itself(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    small_disk: SmallDisk,
    log_output: io.StringIO,
) -> None:
    base = now_ms()
    text = "x" * 200  # string readings fill the disk quickly

    def batch(count: int, offset: int) -> tuple[list[tuple[str, str]], set[Any]]:
        msgs = [
            (TEXT_TOPIC, json.dumps({"value": f"{i}{text}", "ts": base + i}))
            for i in range(offset, offset + count)
        ]
        return msgs, {(101, 7, base + i, f"{i}{text}") for i in range(offset, offset + count)}

    settings = make_settings(
        routes=ROUTES,
        store={"path": str(small_disk.db_path), "disk_reserve_bytes": 512 * 1024},
    )
    await sandbox.set_fault("down")
    expected: set[Any] = set()
    async with InProcessGateway(settings) as gateway:
        store, ingest = gateway.store, gateway.ingest
        assert store is not None and ingest is not None
        first, points = batch(500, 0)
        assert await publish(publisher, first) == 500
        expected |= points
        await wait_until(lambda: store.pending_points == 500)
        await small_disk.fill(store, leave_bytes=64 * 1024)
        # Readings keep coming while the disk is full: the gateway holds their PUBACKs.
        more, points = batch(4000, 500)
        expected |= points
        publisher_task = asyncio.create_task(publish(publisher, more))
        await wait_until(lambda: ingest.holding, 30, "acks held on the full disk")
        held_at = store.pending_points
        await more_held_commits(ingest, 2)
        assert ingest.holding and store.pending_points == held_at and store.disk_full
        assert ingest.stats.received < 4500  # the broker keeps the rest for our session
        # The cloud comes back: uploads delete what they delivered, which frees pages in
        # the file, and ingest resumes into them by itself.
        await sandbox.set_fault("none")
        await wait_until(lambda: accepted_set(sandbox) >= expected, 60, "all delivered")
        await publisher_task
        # The operator frees space: the reserve is re-created and the disk mode ends.
        await small_disk.free(store)
        last, points = batch(10, 10_000)
        expected |= points
        assert await publish(publisher, last) == 10
        await wait_until(lambda: accepted_set(sandbox) >= expected, 30, "the last ones too")
        assert not store.disk_full
    assert accepted_set(sandbox) == expected
    assert len(events(log_output, "disk_full")) == 1
    assert len(events(log_output, "store_write_failed")) == 1
    assert len(events(log_output, "store_recovered")) == 1
    assert len(events(log_output, "disk_space_recovered")) == 1
    [failed] = events(log_output, "store_write_failed")
    assert "disk full" in failed["error"]


async def test_read_only_store_holds_acks_and_resumes(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    base = now_ms()
    messages, expected = numbered(300, base)
    await sandbox.set_fault("down")  # the flush loop only reads meanwhile
    async with InProcessGateway(make_settings()) as gateway:
        store, ingest = gateway.store, gateway.ingest
        assert store is not None and ingest is not None
        await publish(publisher, messages[:100])
        await wait_until(lambda: store.pending_points == 100)
        await store.inject_fault("read-only")
        await publish(publisher, messages[100:])
        await wait_until(lambda: ingest.holding)
        await more_held_commits(ingest, 2)
        assert store.pending_points == 100
        await store.inject_fault("none")
        await wait_until(lambda: store.pending_points == 300, 30, "resumed by itself")
        await sandbox.set_fault("none")
        await wait_until(lambda: len(sandbox.accepted) >= 300, 30)
    assert accepted_set(sandbox) == set(expected)
    [failed] = events(log_output, "store_write_failed")
    assert "read-only" in failed["error"]
    assert len(events(log_output, "store_recovered")) == 1


# --------------------------------------------------------------------------- corruption


async def test_damaged_buffer_at_start_is_set_aside_and_the_gateway_runs(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    tmp_path: Path,
    log_output: io.StringIO,
) -> None:
    base = now_ms()
    db_path = tmp_path / "buffer.db"
    store = await Store.open(db_path, owner=True)
    await store.append([Reading(101, 5, base + i, f"{i}.0") for i in range(1000)])
    await store.close()
    with db_path.open("r+b") as handle:  # a torn write over the header
        handle.write(os.urandom(100))
    messages, expected = numbered(100, base, offset=5000)
    async with InProcessGateway(make_settings()) as gateway:
        assert gateway.store is not None and gateway.store.recovery is not None
        await publish(publisher, messages)
        await wait_until(lambda: len(sandbox.accepted) >= 1100, 30, "salvaged + new delivered")
    salvaged = {(101, 5, base + i, float(i)) for i in range(1000)}
    assert accepted_set(sandbox) == salvaged | set(expected)
    [corrupt] = events(log_output, "buffer_corrupt")
    assert corrupt["level"] == "error" and corrupt["salvaged_readings"] == 1000
    assert [p.name for p in tmp_path.glob("buffer.db.corrupt-*")] == [
        Path(corrupt["moved_to"]).name
    ]
    [started] = events(log_output, "gateway_started")
    assert started["recovered_from"] == corrupt["moved_to"]
