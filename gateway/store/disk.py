"""A full disk must not stop uploads, whatever was free at start (storage rule 7).

In WAL mode a transaction is written to the WAL, and a checkpoint later copies it into
the file, extending the file by the pages it added. The WAL is reused from its start only
once a checkpoint has copied all of it. Measured on a 3 MiB tmpfs filled to 0 bytes: if
the disk fills while the WAL holds pages that extend the file, the checkpoint cannot be
written, the WAL cannot be reused, and no DELETE can ever be committed again (uploads
stop for good). Three things keep that state from arising:

1. The commit guard (`check_commit`): a transaction that extends the file commits only if
   the filesystem has room for its WAL frames and for the checkpoint of everything not yet
   in the file; otherwise it is refused as disk full before a byte is written. Our own
   appends can thus never take the room the checkpoint needs.
2. The reserve file (`<name>.reserve`, allocated without writing data) covers the room
   other programs take meanwhile: released on a full disk, it lets the checkpoint through.
   It is sized to what the disk allows: the configured size, else a quarter of the space
   it could have (`disk_reserve_reduced`), else none (`disk_reserve_unavailable`), grown
   again when space appears, and kept across restarts. The WAL is checkpointed often
   enough that the file growth it holds stays within half the reserve (after every commit
   when there is none).
3. Once checkpointed, the WAL is rewritten from its start: deletes need no new bytes, only
   transactions small enough for the WAL file (`Store.ack_many` splits them).

In disk-full mode appends are refused (ingest holds its MQTT acks) except into pages that
uploads have freed inside the file, until the disk has room for the reserve again
(`disk_space_recovered`). `inject_fault` simulates a full disk or a read-only filesystem
for tests and drills.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiosqlite

from gateway.errors import DiskFull, StoreCorrupt, StoreError
from gateway.log import get_logger
from gateway.models import Batch
from gateway.store.files import PRIVATE_FILE_MODE
from gateway.store.progress import LongWorkObserver
from gateway.store.sql import fetch_one

log = get_logger("store")

StoreFault = Literal["none", "read-only", "full"]
ReserveState = Literal["full-size", "reduced", "unavailable", "refused"]

# While the disk is full, an append is tried only if the file's free pages can hold it.
_BYTES_PER_READING_BOUND = 128
_MAX_PAGE_COUNT = 4294967294
_FS_BLOCK = 4096
# The reserve takes at most this share of the space it could have: the rest is for readings.
RESERVE_SHARE = 4
# A smaller reserve is not worth a file: the commit guard then keeps deletes possible alone.
MIN_RESERVE_BYTES = 64 * 1024
# While the reserve is smaller than configured, it is grown again at most this often.
RESERVE_RETRY_S = 30.0
# SQLite's own default: with a full reserve the WAL is checkpointed every 1000 pages.
DEFAULT_CHECKPOINT_PAGES = 1000
# Pages a commit may change besides those it adds (their WAL frames need room too).
_CHANGED_PAGES_MARGIN = 64
# Opening the buffer needs its -shm (32 KiB) and the WAL's first frames.
OPEN_ROOM_BYTES = 64 * 1024
# While the disk is too full to open the buffer, the owner tries again this often.
OPEN_RETRY_S = 5.0
# Disk-full mode ends when, with the reserve taken back, this much is still free.
RECOVERED_MARGIN_BYTES = 256 * 1024


class ReserveRefused(Exception):
    """The reserve's path holds something we must not write through (a symlink...)."""


def reserve_size_for(available: int, wanted: int) -> int:
    """How big a reserve the disk allows: `wanted`, or a share of `available`, or none."""
    size = min(wanted, available // RESERVE_SHARE)
    size -= size % _FS_BLOCK
    return size if size >= min(MIN_RESERVE_BYTES, wanted) and size > 0 else 0


def checkpoint_pages_for(reserve_bytes: int, page_size: int) -> int:
    """WAL pages between checkpoints, so their file growth fits in half the reserve."""
    return max(1, min(DEFAULT_CHECKPOINT_PAGES, reserve_bytes // (2 * page_size)))


def free_disk_bytes(directory: Path) -> int:
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


class ReserveFile:
    """The reserve itself: opened once without following a symlink and kept open, so its
    name cannot be redirected later; released by truncation, never unlinked."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def open(self) -> None:
        """Open or create it (0600); raises `ReserveRefused` for anything but our file."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, PRIVATE_FILE_MODE)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ReserveRefused("a symlink is planted at its path; not followed") from exc
            raise ReserveRefused(f"cannot open it: {exc.strerror}") from exc
        info = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(info.st_mode):
            problem = "it is not a regular file"
        elif info.st_uid != os.geteuid():
            problem = f"it belongs to uid {info.st_uid}, not to the gateway's user"
        if problem is not None:
            os.close(fd)
            raise ReserveRefused(problem)
        if stat.S_IMODE(info.st_mode) != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
        self._fd = fd

    def held(self) -> int:
        """Bytes really allocated (a file a kill left sparse or short counts for what it has)."""
        if self._fd is None:
            return 0
        info = os.fstat(self._fd)
        return min(info.st_size, info.st_blocks * 512)

    def grow_to(self, size: int) -> int:
        """Allocate up to `size` bytes (blocks only, no data: no SD wear); what it holds."""
        if self._fd is None or self.held() >= size:
            return self.held()
        try:
            os.posix_fallocate(self._fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._write_zeros(size)  # no fallocate on this filesystem
            elif exc.errno != errno.ENOSPC:
                raise
        return self.held()

    def _write_zeros(self, size: int) -> None:
        assert self._fd is not None
        chunk = bytes(1 << 20)
        with contextlib.suppress(OSError):
            for offset in range(0, size, len(chunk)):
                os.pwrite(self._fd, chunk[: size - offset], offset)
        with contextlib.suppress(OSError):
            os.fsync(self._fd)

    def shrink_to(self, size: int) -> int:
        """Give back what is beyond `size`; the bytes released."""
        held = self.held()
        if self._fd is None or held <= size:
            return 0
        os.ftruncate(self._fd, size)
        return held - self.held()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True, slots=True)
class _Taken:
    held: int
    free: int
    target: int


class DiskGuard:
    """The reserve, the commit guard and the disk-full mode of one buffer file.

    Only the owner (the daemon) holds a reserve; every store has the guard.
    """

    def __init__(self, path: Path, reserve_bytes: int, *, owner: bool) -> None:
        self._path = path
        self._directory = path.parent
        self._reserve = ReserveFile(path.with_name(path.name + ".reserve"))
        self._wanted = reserve_bytes
        self._owner = owner
        # The daemon keeps a reserve unless configured not to (0).
        self._keeps_reserve = owner and reserve_bytes > 0
        # Disk full: appends only into freed pages until the reserve can be re-created.
        self.full = False
        self._full_since = 0.0
        self._fault: StoreFault = "none"
        self.reserve_bytes = 0  # what the reserve holds now
        self._state: ReserveState | None = None
        self._next_growth_at = 0.0
        self._checkpoint_pages = DEFAULT_CHECKPOINT_PAGES
        # Released when the disk filled: disk-full mode ends when it can be taken back.
        self._released = 0

    # ------------------------------------------------------------------ the reserve

    def open_reserve(self) -> None:
        """Before the buffer is opened (worker thread): find the reserve, and if the disk is
        too full to open the buffer (its -shm needs 32 KiB), give back what that needs."""
        if not self._keeps_reserve:
            return
        try:
            self._reserve.open()
        except ReserveRefused as exc:
            self._refused(str(exc))
            return
        short = OPEN_ROOM_BYTES - free_disk_bytes(self._directory)
        if short > 0:
            held = self._reserve.held()
            self._reserve.shrink_to(max(0, held - short - _FS_BLOCK))

    async def connect_when_room(
        self,
        connect: Callable[[], Awaitable[None]],
        stop: asyncio.Event | None,
        long_work: LongWorkObserver | None = None,
    ) -> None:
        """`connect`; while the disk is too full even to open the buffer (no room for its
        -shm, and no reserve to give back), the owner waits for room instead of exiting:
        systemd would soon give up restarting it, and the broker keeps the readings
        meanwhile. One line when it starts waiting; `stop` ends the wait (StoreError).
        Each try is reported to `long_work` (the notifier: it extends systemd's start
        timeout and shows the wait in `systemctl status`, instead of a restart every
        `TimeoutStartSec`)."""
        since: float | None = None
        try:
            while True:
                try:
                    await connect()
                except StoreCorrupt:
                    raise
                except StoreError as exc:
                    free = await asyncio.to_thread(free_disk_bytes, self._directory)
                    if not self._owner or free >= OPEN_ROOM_BYTES:
                        raise
                    if since is None:
                        since = time.monotonic()
                        log.error(
                            "store_open_waiting_for_space",
                            error=str(exc),
                            db=str(self._path),
                            free_disk_bytes=free,
                            action="the disk is too full to open the buffer; free some "
                            f"space: the gateway tries again every {OPEN_RETRY_S:g} s",
                        )
                    if long_work is not None:
                        long_work.long_work(
                            f"waiting for disk space to open the buffer ({free} bytes free)",
                            holds_store=True,
                        )
                    await self._wait_to_retry(stop, exc)
                    continue
                if since is not None:
                    log.info("store_opened", waited_s=round(time.monotonic() - since, 1))
                return
        finally:
            if since is not None and long_work is not None:
                long_work.long_work_done()

    @staticmethod
    async def _wait_to_retry(stop: asyncio.Event | None, error: StoreError) -> None:
        if stop is None:
            await asyncio.sleep(OPEN_RETRY_S)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(OPEN_RETRY_S):
                await stop.wait()
        if stop.is_set():
            raise StoreError(f"stopped while waiting for room: {error}") from error

    async def connected(self, db: aiosqlite.Connection, page_size: int) -> None:
        """A new connection (open, or after a salvage): bound its WAL to the reserve."""
        self._checkpoint_pages = DEFAULT_CHECKPOINT_PAGES
        await self._bound_wal(db, page_size)

    async def size_reserve(
        self, db: aiosqlite.Connection, page_size: int, *, at_least: int = 0
    ) -> _Taken | None:
        """Take the reserve the disk allows (and `at_least` that much), log a change of
        state, bound the WAL to it."""
        if not self._keeps_reserve or self.full:
            return None
        self._next_growth_at = time.monotonic() + RESERVE_RETRY_S
        if not self._reserve.is_open:
            await asyncio.to_thread(self._reopen)
        taken = None
        if self._reserve.is_open:
            taken = await asyncio.to_thread(self._take, at_least)
            self.reserve_bytes = taken.held
            self._log_state(taken)
        await self._bound_wal(db, page_size)
        return taken

    def _reopen(self) -> None:
        """A refused reserve is tried again (the operator may have removed the symlink)."""
        with contextlib.suppress(ReserveRefused):
            self._reserve.open()

    def _take(self, at_least: int) -> _Taken:
        held = self._reserve.held()
        free = free_disk_bytes(self._directory)
        target = max(at_least, reserve_size_for(free + held, self._wanted))
        if held > self._wanted:
            self._reserve.shrink_to(self._wanted)  # the configured size was lowered
        elif target > held:
            self._reserve.grow_to(target)
        return _Taken(self._reserve.held(), free_disk_bytes(self._directory), target)

    def _log_state(self, taken: _Taken) -> None:
        state: ReserveState
        if taken.held >= self._wanted:
            state = "full-size"
        elif taken.held >= min(MIN_RESERVE_BYTES, self._wanted):
            state = "reduced"
        else:
            state = "unavailable"
        if state == self._state:
            return
        was, self._state = self._state, state
        common = {
            "path": str(self._reserve.path),
            "wanted_bytes": self._wanted,
            "free_disk_bytes": taken.free,
        }
        if state == "reduced":
            log.warning(
                "disk_reserve_reduced",
                size_bytes=taken.held,
                **common,
                action="the disk has less room than store.disk_reserve_bytes asks for; "
                "deletes stay possible on a full disk; grown again when space appears",
            )
        elif state == "unavailable":
            log.warning(
                "disk_reserve_unavailable",
                **common,
                action="no room for a reserve: every commit is checkpointed so deletes stay "
                "possible on a full disk; taken as soon as space appears",
            )
        elif was is not None:
            log.info("disk_reserve_restored", size_bytes=taken.held, **common)

    def _refused(self, reason: str) -> None:
        if self._state != "refused":
            self._state = "refused"
            log.error(
                "disk_reserve_refused",
                path=str(self._reserve.path),
                reason=reason,
                action="remove it; the gateway runs without a reserve meanwhile",
            )

    async def _bound_wal(self, db: aiosqlite.Connection, page_size: int) -> None:
        pages = DEFAULT_CHECKPOINT_PAGES
        if self._keeps_reserve:
            pages = checkpoint_pages_for(self.reserve_bytes, page_size)
        if pages != self._checkpoint_pages:
            self._checkpoint_pages = pages
            await db.execute(f"PRAGMA wal_autocheckpoint={pages}")

    def close(self) -> None:
        """The reserve stays on disk for the next start (a full disk may not allow one)."""
        self._reserve.close()

    # ------------------------------------------------------------------ commits

    async def check_commit(self, db: aiosqlite.Connection, page_size: int) -> None:
        """Inside a write transaction, before COMMIT: refuse it (`DiskFull`) unless the disk
        has room for its WAL frames and for the checkpoint that extends the file.

        The pages not yet in the file were counted by the commits before, and this one's
        frames are at most its new pages plus the pages it changed: twice the growth and
        a margin. A transaction that adds no page (deletes) always passes.
        """
        (pages,) = await fetch_one(db, "PRAGMA page_count")
        # Two quick syscalls on a local file: not worth a thread hop on every commit.
        growth = int(pages) * page_size - os.stat(self._path).st_size
        if growth <= 0:
            return
        free = free_disk_bytes(self._directory)
        needed = 2 * _round_up(growth) + _CHANGED_PAGES_MARGIN * page_size + _FS_BLOCK
        if free < needed:
            raise DiskFull(
                f"disk full: {free} bytes free, this commit and its checkpoint need {needed}"
            )

    async def committed(self, db: aiosqlite.Connection, page_size: int) -> None:
        """After a COMMIT: on a full disk checkpoint at once, so the next transaction reuses
        the WAL from its start; else grow a reduced reserve now and then."""
        if self.full:
            await checkpoint_restart(db)
        elif (
            self._keeps_reserve
            and self.reserve_bytes < self._wanted
            and time.monotonic() >= self._next_growth_at
        ):
            await self.size_reserve(db, page_size)

    # ------------------------------------------------------------------ disk full

    async def enter_full(self, db: aiosqlite.Connection, error: str, *, buffered: int) -> None:
        """Under the store lock: release the reserve and checkpoint, so deletes can be written."""
        released = 0
        if self._fault != "full" and self._reserve.is_open:
            released = await asyncio.to_thread(self._reserve.shrink_to, 0)
            self.reserve_bytes = 0
            self._released = max(self._released, released)
        await checkpoint_restart(db)
        if self.full:
            return
        self.full = True
        self._full_since = time.monotonic()
        free = await asyncio.to_thread(free_disk_bytes, self._directory)
        log.error(
            "disk_full",
            error=error,
            db=str(self._path),
            free_disk_bytes=free,
            reserve_released=released > 0,
            released_bytes=released,
            buffered=buffered,
            action="new readings are held (not acknowledged); uploads continue and free "
            "space inside the file; resumes by itself when there is room",
        )

    async def room_for(
        self, db: aiosqlite.Connection, readings: int, *, page_size: int, buffered: int
    ) -> bool:
        """Under the store lock: leave disk-full mode when the reserve fits again; else
        whether `readings` fit into the pages uploads have freed inside the file."""
        if self._fault != "full" and await self._recovered(db, page_size, buffered):
            return True
        (free_pages,) = await fetch_one(db, "PRAGMA freelist_count")
        needed = readings * _BYTES_PER_READING_BOUND + 4 * page_size
        return int(free_pages) * page_size >= needed

    async def _recovered(self, db: aiosqlite.Connection, page_size: int, buffered: int) -> bool:
        """The disk has room again for the reserve released when it filled (or for the one
        it now allows, if larger) and a margin beyond: leave disk-full mode, take it."""
        free = await asyncio.to_thread(free_disk_bytes, self._directory)
        target = 0
        if self._keeps_reserve:
            target = max(self._released, reserve_size_for(free, self._wanted))
        if free - target < RECOVERED_MARGIN_BYTES:
            return False
        self.full = False
        taken = await self.size_reserve(db, page_size, at_least=target)
        if taken is not None and taken.held < target:  # someone else was quicker
            self.full = True
            return False
        self._released = 0
        log.info(
            "disk_space_recovered",
            free_disk_bytes=free,
            reserve_bytes=self.reserve_bytes,
            down_s=round(time.monotonic() - self._full_since, 1),
            buffered=buffered,
        )
        return True

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


class PartialAcks:
    """On a full disk a transaction must fit into the WAL file as it is: a batch is acked
    in parts, halving a part that does not fit (`DiskFull`).

    The parts acked are remembered until the whole batch is, so the flush loop's retry
    of a batch that failed half-way neither deletes nor counts a point twice. A single
    point that does not fit raises (the flush loop retries later).
    """

    def __init__(self) -> None:
        # (start, end) slices acked so far, by (batch, quota day)
        self._done: dict[tuple[Batch, str], list[tuple[int, int]]] = {}

    async def ack(
        self, batch: Batch, day: str, ack: Callable[[Batch, str], Awaitable[object]]
    ) -> None:
        done = self._done.setdefault((batch, day), [])
        todo = [(0, len(batch.points))]
        while todo:
            start, end = todo.pop()
            if any(low <= start and end <= high for low, high in done):
                continue
            if not any(start <= low and high <= end for low, high in done):
                try:
                    await ack(batch.with_points(batch.points[start:end]), day)
                    done.append((start, end))
                    continue
                except DiskFull:
                    if end - start <= 1:
                        raise
            middle = (start + end) // 2
            todo += [(middle, end), (start, middle)]
        del self._done[(batch, day)]


def _round_up(size: int) -> int:
    return -(-size // _FS_BLOCK) * _FS_BLOCK


async def checkpoint_restart(db: aiosqlite.Connection) -> None:
    """Copy the WAL into the file and make the next writer reuse the WAL from its start."""
    with contextlib.suppress(sqlite3.Error):
        await db.execute_fetchall("PRAGMA wal_checkpoint(RESTART)")
