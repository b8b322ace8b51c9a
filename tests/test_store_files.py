"""The buffer's files on disk: private modes whatever the umask, a reserve that is never
written through a symlink, and a reserve a kill left half-made (issue 16, item 7)."""

from __future__ import annotations

import io
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.config import Settings
from gateway.store import Store
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import InProcessGateway, accepted_set, events, publish, ts_payload, wait_until

TOPIC = "sensors/boiler/temperature"  # device 101, datastream 5 in harness.ROUTES
MiB = 1024 * 1024


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual login umask: files 0644 and directories 0755 unless the code says otherwise."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


async def test_buffer_wal_shm_reserve_and_created_directories_are_private_under_umask_022(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    tmp_path: Path,
    umask_022: None,
) -> None:
    db_path = tmp_path / "state" / "blynk" / "buffer.db"
    settings = make_settings(store={"path": str(db_path)})
    await sandbox.set_fault("down")  # the reading is written, so the WAL and SHM exist
    async with InProcessGateway(settings) as gateway:
        assert gateway.store is not None
        assert await publish(publisher, [(TOPIC, ts_payload(21.5, int(time.time() * 1000)))]) == 1
        await wait_until(lambda: gateway.store is not None and gateway.store.pending_points == 1)
        files = {
            name: mode(db_path.with_name(name))
            for name in ("buffer.db", "buffer.db-wal", "buffer.db-shm", "buffer.db.reserve")
        }
        assert files == dict.fromkeys(files, 0o600)
    assert mode(tmp_path / "state") == 0o700
    assert mode(tmp_path / "state" / "blynk") == 0o700
    # After a clean stop the WAL and SHM are gone; what stays is still private.
    assert mode(db_path) == 0o600 and mode(db_path.with_name("buffer.db.reserve")) == 0o600


async def test_files_an_older_version_left_readable_are_tightened_at_open(
    tmp_path: Path, umask_022: None, log_output: io.StringIO
) -> None:
    db_path = tmp_path / "buffer.db"
    old = sqlite3.connect(db_path)  # what SQLite alone makes of the umask: 0644
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE t (x)")
    old.commit()
    assert mode(db_path) == 0o644 and mode(Path(f"{db_path}-wal")) == 0o644
    store = await Store.open(db_path, owner=True)
    try:
        for name in ("buffer.db", "buffer.db-wal", "buffer.db-shm"):
            assert mode(tmp_path / name) == 0o600, name
    finally:
        await store.close()
        old.close()
    [tightened] = events(log_output, "buffer_permissions_tightened")
    assert tightened["files"] == ["buffer.db", "buffer.db-wal", "buffer.db-shm"]


@pytest.mark.parametrize("target_exists", [True, False], ids=["to-a-file", "dangling"])
async def test_a_symlink_planted_at_the_reserve_path_is_refused_never_followed(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    tmp_path: Path,
    log_output: io.StringIO,
    target_exists: bool,
) -> None:
    victim = tmp_path / "elsewhere" / "precious"
    victim.parent.mkdir()
    if target_exists:
        victim.write_bytes(b"not the gateway's")
        victim.chmod(0o644)
    reserve = tmp_path / "buffer.db.reserve"
    reserve.symlink_to(victim)
    async with InProcessGateway(make_settings()) as gateway:
        assert gateway.store is not None
        ts = int(time.time() * 1000)
        assert await publish(publisher, [(TOPIC, ts_payload(21.5, ts))]) == 1
        await wait_until(lambda: (101, 5, ts, 21.5) in accepted_set(sandbox))  # it runs on
    assert reserve.is_symlink() and os.readlink(reserve) == str(victim)
    if target_exists:
        assert victim.read_bytes() == b"not the gateway's" and mode(victim) == 0o644
    else:
        assert not victim.exists()
    [refused] = events(log_output, "disk_reserve_refused")
    assert refused["level"] == "error" and "symlink" in refused["reason"]
    assert refused["path"] == str(reserve)


@pytest.mark.parametrize("allocated", [0, MiB], ids=["sparse", "short"])
async def test_a_reserve_a_kill_left_half_made_is_completed_at_the_next_start(
    db_path: Path, allocated: int
) -> None:
    """A kill -9 during allocation leaves a short file, or a file whose size is set but
    whose blocks are not (a sparse one): both count for what they really hold."""
    reserve = db_path.with_name("buffer.db.reserve")
    fd = os.open(reserve, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        if allocated:
            os.posix_fallocate(fd, 0, allocated)
        os.ftruncate(fd, 8 * MiB)  # the size a half-made reserve may claim
    finally:
        os.close(fd)
    assert reserve.stat().st_blocks * 512 < 8 * MiB
    store = await Store.open(db_path, owner=True)
    try:
        assert reserve.stat().st_blocks * 512 >= 8 * MiB
        assert reserve.stat().st_size == 8 * MiB
    finally:
        await store.close()


@pytest.fixture(name="db_path")
def db_path_fixture(tmp_path: Path) -> Path:
    return tmp_path / "buffer.db"
