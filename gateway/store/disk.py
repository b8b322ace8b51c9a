"""A full disk must not stop uploads (storage rule 7).

In WAL mode even a DELETE needs room (WAL frames, and a checkpoint that may extend the
file). So the owner keeps a reserve file (`<name>.reserve`, allocated without writing
data). On SQLITE_FULL it releases the reserve and checkpoints, so deletes work again;
appends are then refused (ingest holds its MQTT acks) except into pages that uploads have
freed inside the file, until the filesystem has room for the reserve again.

`inject_fault` simulates a full disk or a read-only filesystem for tests and drills.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import time
from pathlib import Path
from typing import Literal

import aiosqlite

from gateway.log import get_logger
from gateway.store.sql import fetch_one

log = get_logger("store")

StoreFault = Literal["none", "read-only", "full"]

# While the disk is full, an append is tried only if the file's free pages can hold it.
_BYTES_PER_READING_BOUND = 128
_MAX_PAGE_COUNT = 4294967294


class DiskGuard:
    """The reserve file and the disk-full mode of one buffer file."""

    def __init__(self, path: Path, reserve_bytes: int) -> None:
        self._path = path
        self._reserve_path = path.with_name(path.name + ".reserve")
        self._reserve_bytes = reserve_bytes
        # Disk full: appends only into freed pages until the reserve can be re-created.
        self.full = False
        self._full_since = 0.0
        self._fault: StoreFault = "none"

    def ensure_reserve(self) -> bool:
        """Allocate the reserve file (blocks only, no data written: no SD wear)."""
        size = self._reserve_bytes
        if size <= 0:
            return True
        try:
            if self._reserve_path.stat().st_size >= size:
                return True
        except FileNotFoundError:
            pass
        try:
            fd = os.open(self._reserve_path, os.O_CREAT | os.O_WRONLY, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    chunk = bytes(1 << 20)  # no fallocate on this filesystem: write zeros
                    for offset in range(0, size, len(chunk)):
                        os.pwrite(fd, chunk[: size - offset], offset)
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                self._reserve_path.unlink()
            return False
        return True

    def _free_disk_bytes(self) -> int:
        stats = os.statvfs(self._path.parent)
        return stats.f_bavail * stats.f_frsize

    async def enter_full(self, db: aiosqlite.Connection, error: str, *, buffered: int) -> None:
        """Under the store lock: release the reserve and checkpoint, so deletes can be written."""
        if self._fault == "full":
            released = False
        else:
            released = self._reserve_path.exists()
            with contextlib.suppress(OSError):
                self._reserve_path.unlink()
        await checkpoint_restart(db)
        if self.full:
            return
        self.full = True
        self._full_since = time.monotonic()
        free = await asyncio.to_thread(self._free_disk_bytes)
        log.error(
            "disk_full",
            error=error,
            db=str(self._path),
            free_disk_bytes=free,
            reserve_released=released,
            buffered=buffered,
            action="new readings are held (not acknowledged); uploads continue and free "
            "space inside the file; resumes by itself when there is room",
        )

    async def room_for(
        self, db: aiosqlite.Connection, readings: int, *, page_size: int, buffered: int
    ) -> bool:
        """Under the store lock: leave disk-full mode when the reserve fits again; else
        whether `readings` fit into the pages uploads have freed inside the file."""
        if self._fault != "full":
            free = await asyncio.to_thread(self._free_disk_bytes)
            wanted = self._reserve_bytes + 4 * page_size + (1 << 20)
            if free >= wanted and await asyncio.to_thread(self.ensure_reserve):
                self.full = False
                log.info(
                    "disk_space_recovered",
                    free_disk_bytes=free,
                    down_s=round(time.monotonic() - self._full_since, 1),
                    buffered=buffered,
                )
                return True
        (free_pages,) = await fetch_one(db, "PRAGMA freelist_count")
        needed = readings * _BYTES_PER_READING_BOUND + 4 * page_size
        return int(free_pages) * page_size >= needed

    async def inject_fault(self, db: aiosqlite.Connection, fault: StoreFault) -> None:
        """Under the store lock: "read-only" makes every write fail as on a read-only
        filesystem (`query_only`); "full" makes the file unable to grow, as on a full disk
        (`max_page_count`); "none" clears both."""
        self._fault = fault
        await db.execute(f"PRAGMA query_only={1 if fault == 'read-only' else 0}")
        if fault == "full":
            (pages,) = await fetch_one(db, "PRAGMA page_count")
            await db.execute(f"PRAGMA max_page_count={int(pages)}")
        else:
            await db.execute(f"PRAGMA max_page_count={_MAX_PAGE_COUNT}")


async def checkpoint_restart(db: aiosqlite.Connection) -> None:
    """Copy the WAL into the file and make the next writer reuse the WAL from its start."""
    with contextlib.suppress(sqlite3.Error):
        await db.execute_fetchall("PRAGMA wal_checkpoint(RESTART)")
