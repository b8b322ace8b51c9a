"""A real, small filesystem filled to its last byte: uploads go on (issue 16, item 6).

Each test mounts its own size-limited tmpfs (we run as root here and in CI) and fills
it for real: with readings published over Mosquitto to the running gateway, then with a
filler file up to 0 bytes free. No fault is injected; SQLite meets ENOSPC as it would on
a nearly full SD card. README "Data safety": a full disk stops acknowledgements, not
uploads.
"""

from __future__ import annotations

import asyncio
import errno
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
from test_systemd import WATCHDOG_USEC, NotifyListener

from gateway.app import Gateway
from gateway.config import Settings
from gateway.errors import DiskFull, StoreError
from gateway.models import Batch, Point, StreamKey
from gateway.ops.systemd import ServiceNotifier
from gateway.store import disk
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import InProcessGateway, accepted_set, events, wait_until

TOPIC = "sensors/boiler/status"
ROUTES = [{"topic": TOPIC, "device_id": 101, "datastream_id": 7}]  # a string datastream
TEXT = "x" * 200  # string readings fill a small disk quickly
MiB = 1024 * 1024


class TinyFs:
    """A size-limited tmpfs mounted under the test's tmp_path, unmounted at teardown."""

    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        root.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.fail("these tests mount a tmpfs: run them as root (CI does)")
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(root)],
            check=True,
            capture_output=True,
        )

    @property
    def db_path(self) -> Path:
        return self.root / "buffer.db"

    def free_bytes(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def occupy(self, name: str, size: int) -> Path:
        """Another application's file of `size` bytes (really allocated)."""
        path = self.root / name
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        return path

    def fill_to_zero(self, name: str = "filler") -> Path:
        """Write zeros until the filesystem refuses the last byte."""
        path = self.root / name
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
        try:
            for chunk in (MiB, 64 * 1024, 4096, 512, 1):
                zeros = bytes(chunk)
                while True:
                    try:
                        os.write(fd, zeros)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC
                        break
        finally:
            os.close(fd)
        assert self.free_bytes() == 0
        return path

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.root)], check=False, capture_output=True)


@pytest.fixture
def make_tiny_fs(tmp_path: Path) -> Iterator[Callable[[int], TinyFs]]:
    mounted: list[TinyFs] = []

    def make(size: int) -> TinyFs:
        mounted.append(TinyFs(tmp_path / f"tiny{len(mounted)}", size))
        return mounted[-1]

    yield make
    for fs in mounted:
        fs.unmount()


def now_ms() -> int:
    return int(time.time() * 1000) - 3_600_000


def readings(count: int, base_ts: int, offset: int = 0) -> tuple[list[tuple[str, str]], set[Any]]:
    """Messages with their own timestamps, and the points the cloud should receive."""
    numbers = range(offset, offset + count)
    messages = [(TOPIC, json.dumps({"value": f"{i}{TEXT}", "ts": base_ts + i})) for i in numbers]
    return messages, {(101, 7, base_ts + i, f"{i}{TEXT}") for i in numbers}


async def publish_all(publisher: AckedPublisher, messages: list[tuple[str, str]]) -> int:
    """QoS 1 to the broker; its PUBACK is the publisher's "acknowledged"."""
    return await asyncio.to_thread(publisher.publish_many, messages, 1, 120)


async def fill_with_readings(
    gateway: Any, publisher: AckedPublisher, base: int, count: int
) -> set[Any]:
    """Publish until the gateway meets the full disk and holds its acknowledgements."""
    messages, expected = readings(count, base)
    assert await publish_all(publisher, messages) == count
    store, ingest = gateway.store, gateway.ingest
    await wait_until(lambda: store.disk_full and ingest.holding, 60, "the disk to fill up")
    return expected


async def test_a_3_mib_disk_filled_to_0_bytes_delivers_every_reading_with_default_settings(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    make_tiny_fs: Callable[[int], TinyFs],
    log_output: io.StringIO,
) -> None:
    fs = make_tiny_fs(3 * MiB)
    other = fs.occupy("other-application.log", MiB)  # the disk is shared, as on a Pi
    settings = make_settings(routes=ROUTES, store={"path": str(fs.db_path)})
    assert settings.store.disk_reserve_bytes == 8 * MiB  # the default, more than is free
    base = now_ms()
    await sandbox.set_fault("down")
    async with InProcessGateway(settings) as gateway:
        store, ingest = gateway.store, gateway.ingest
        assert store is not None and ingest is not None
        [reduced] = events(log_output, "disk_reserve_reduced")
        assert 0 < reduced["size_bytes"] < 8 * MiB and reduced["wanted_bytes"] == 8 * MiB
        expected = await fill_with_readings(gateway, publisher, base, 9000)
        filler = fs.fill_to_zero()  # and whatever else was left: 0 bytes free
        # The cloud comes back: everything the broker acknowledged to the publisher
        # arrives, through pages the uploads free inside the file.
        await sandbox.set_fault("none")
        await wait_until(lambda: accepted_set(sandbox) >= expected, 60, "every reading")
        assert fs.free_bytes() == 0
        # The operator frees space: the gateway says the problem is over, once.
        filler.unlink()
        other.unlink()
        more, points = readings(10, base, offset=100_000)
        expected |= points
        assert await publish_all(publisher, more) == 10
        await wait_until(lambda: accepted_set(sandbox) >= expected, 30, "the last ones")
        await wait_until(lambda: not store.disk_full, 30, "the disk mode to end")
    assert accepted_set(sandbox) == expected
    assert len(sandbox.accepted) == len(expected)  # nothing uploaded twice
    assert not events(log_output, "flush_store_unavailable")
    assert len(events(log_output, "disk_full")) == 1
    assert len(events(log_output, "disk_space_recovered")) == 1


async def test_with_no_room_for_a_reserve_at_start_a_disk_at_0_bytes_still_uploads(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    make_tiny_fs: Callable[[int], TinyFs],
    log_output: io.StringIO,
) -> None:
    """The commit guard and a checkpoint after every commit alone keep deletes possible."""
    fs = make_tiny_fs(3 * MiB)
    fs.occupy("other-application.log", 3 * MiB - 200 * 1024)  # 200 KiB left
    settings = make_settings(routes=ROUTES, store={"path": str(fs.db_path)})
    base = now_ms()
    await sandbox.set_fault("down")
    async with InProcessGateway(settings) as gateway:
        [unavailable] = events(log_output, "disk_reserve_unavailable")
        assert unavailable["wanted_bytes"] == 8 * MiB
        assert not events(log_output, "disk_reserve_reduced")
        expected = await fill_with_readings(gateway, publisher, base, 1500)
        fs.fill_to_zero()
        await sandbox.set_fault("none")
        await wait_until(lambda: accepted_set(sandbox) >= expected, 60, "every reading")
        assert fs.free_bytes() == 0
    assert accepted_set(sandbox) == expected
    assert len(sandbox.accepted) == len(expected)
    assert not events(log_output, "flush_store_unavailable")


async def test_another_program_taking_the_last_bytes_and_the_released_reserve(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    make_tiny_fs: Callable[[int], TinyFs],
    log_output: io.StringIO,
) -> None:
    """Not our commits but a neighbour fills the disk, while the WAL holds pages not yet
    in the file: the next commit is refused, the released reserve lets the checkpoint
    through, and then the neighbour takes the released reserve too."""
    fs = make_tiny_fs(3 * MiB)
    settings = make_settings(routes=ROUTES, store={"path": str(fs.db_path)})
    base = now_ms()
    await sandbox.set_fault("down")
    async with InProcessGateway(settings) as gateway:
        store, ingest = gateway.store, gateway.ingest
        assert store is not None and ingest is not None
        first, expected = readings(600, base)
        assert await publish_all(publisher, first) == 600
        await wait_until(lambda: store.pending_points == 600)
        neighbour = fs.fill_to_zero("neighbour")
        more, points = readings(3000, base, offset=600)
        expected |= points
        assert await publish_all(publisher, more) == 3000
        await wait_until(lambda: store.disk_full and ingest.holding, 60, "the full disk")
        fs.fill_to_zero("neighbour")  # the released reserve goes the same way
        assert neighbour.stat().st_size > 0
        await sandbox.set_fault("none")
        await wait_until(lambda: accepted_set(sandbox) >= expected, 60, "every reading")
        assert fs.free_bytes() == 0
    assert accepted_set(sandbox) == expected
    [full] = events(log_output, "disk_full")
    assert full["reserve_released"] is True


async def test_a_restart_on_a_disk_at_0_bytes_opens_the_buffer_and_uploads(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    make_tiny_fs: Callable[[int], TinyFs],
    log_output: io.StringIO,
) -> None:
    """A clean stop removes the WAL and SHM; a start on a full disk needs room for them:
    the reserve the last run left on disk gives it back."""
    fs = make_tiny_fs(3 * MiB)
    settings = make_settings(routes=ROUTES, store={"path": str(fs.db_path)})
    base = now_ms()
    messages, expected = readings(2000, base)
    await sandbox.set_fault("down")
    async with InProcessGateway(settings) as gateway:
        assert gateway.store is not None
        assert await publish_all(publisher, messages) == 2000
        await wait_until(lambda: gateway.store is not None and gateway.store.pending_points == 2000)
    fs.fill_to_zero()
    await sandbox.set_fault("none")
    async with InProcessGateway(settings) as gateway:
        await wait_until(lambda: accepted_set(sandbox) >= expected, 60, "every reading")
    assert accepted_set(sandbox) == expected


async def test_a_first_start_on_a_disk_at_0_bytes_waits_for_room_instead_of_exiting(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    make_tiny_fs: Callable[[int], TinyFs],
    log_output: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No reserve of ours, no WAL to reuse, no room for the -shm: the daemon cannot open
    the buffer. It says so once and waits (systemd would give up restarting it), and
    tells systemd it is still starting: EXTEND_TIMEOUT_USEC with a STATUS= naming the
    wait, at every try (before, TimeoutStartSec= restarted it every 300 s), until READY."""
    monkeypatch.setattr(disk, "OPEN_RETRY_S", 0.1)
    fs = make_tiny_fs(3 * MiB)
    filler = fs.fill_to_zero()
    settings = make_settings(routes=ROUTES, store={"path": str(fs.db_path)})
    listener = NotifyListener(f"@blynk-test-{os.urandom(8).hex()}")
    notifier = ServiceNotifier(listener.address, watchdog_usec=WATCHDOG_USEC)
    notifier.long_work_every_s = 0.05  # every try is told (the daemon's: once a second)
    gateway = Gateway(settings, notifier=notifier)
    running = asyncio.create_task(gateway.run())
    try:
        await wait_until(lambda: bool(events(log_output, "store_open_waiting_for_space")))
        await asyncio.sleep(0.5)  # several more tries: still waiting, still one line
        assert not running.done()
        [waiting] = events(log_output, "store_open_waiting_for_space")
        assert waiting["free_disk_bytes"] == 0 and waiting["level"] == "error"
        extended = [m for _, m in listener.with_key("EXTEND_TIMEOUT_USEC")]
        assert len(extended) >= 3
        assert extended[-1]["STATUS"].startswith("waiting for disk space to open the buffer")
        assert not any("READY" in m for _, m in listener.messages())
        filler.unlink()  # the operator frees space
        await wait_until(lambda: gateway.ingest is not None and gateway.ingest.connected.is_set())
        await wait_until(lambda: any(m.get("READY") == "1" for _, m in listener.messages()))
        assert not notifier.long_work_active
    finally:
        notifier.close()
        listener.close()
    messages, expected = readings(10, now_ms())
    assert await publish_all(publisher, messages) == 10
    await wait_until(lambda: accepted_set(sandbox) >= expected, 30, "the readings")
    gateway.request_stop()
    await running
    assert len(events(log_output, "store_opened")) == 1


async def test_a_stop_while_waiting_for_room_to_open_ends_the_wait(
    make_settings: Callable[..., Settings],
    make_tiny_fs: Callable[[int], TinyFs],
    log_output: io.StringIO,
) -> None:
    fs = make_tiny_fs(3 * MiB)
    fs.fill_to_zero()
    gateway = Gateway(make_settings(routes=ROUTES, store={"path": str(fs.db_path)}))
    running = asyncio.create_task(gateway.run())
    await wait_until(lambda: bool(events(log_output, "store_open_waiting_for_space")))
    gateway.request_stop()
    with pytest.raises(StoreError, match="stopped while waiting for room"):
        async with asyncio.timeout(2):  # not OPEN_RETRY_S
            await running


async def test_acks_on_a_full_disk_are_halved_until_they_fit_and_a_retry_counts_none_twice() -> (
    None
):
    """`PartialAcks` alone: a transaction that does not fit into the WAL file (DiskFull) is
    halved; parts acked before a failure are not acked again when the flush loop retries."""
    batch = Batch(StreamKey(101, 7), tuple(Point(i, f'"{i}"') for i in range(100)))
    acked: list[int] = []
    room = {"points": 30, "transactions": 2}  # what fits in one, how many more fit at all

    async def ack(part: Batch, day: str) -> None:
        assert day == "2026-12-05"
        if len(part.points) > room["points"] or room["transactions"] == 0:
            raise DiskFull("disk full: the WAL file cannot grow")
        room["transactions"] -= 1
        acked.extend(point.ts_ms for point in part.points)

    partial = disk.PartialAcks()
    with pytest.raises(DiskFull):
        await partial.ack(batch, "2026-12-05", ack)
    assert sorted(acked) == list(range(50))  # two transactions of 25 made it
    room["transactions"] = 100  # uploads freed pages: the flush loop retries the batch
    await partial.ack(batch, "2026-12-05", ack)
    assert sorted(acked) == list(range(100))  # each point exactly once
