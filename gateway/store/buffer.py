"""The durable buffer: the only module that speaks SQL.

Storage rules (kept simple on purpose, like litestream's):
1. A reading is acknowledged to the broker only after the transaction holding it commits
   (WAL, `synchronous=FULL` by default, so a commit survives a power cut).
2. Readings leave the `readings` table in exactly three ways, each in one transaction:
   delivered (deleted together with the quota-ledger update), dead-lettered (moved to
   `dead_letters` with a reason), or evicted by the capacity policy (counted per device).
3. A lease is held in memory only: if the process dies mid-upload the rows are still in
   `readings` and are sent again, so a crash can duplicate a batch but never lose one.
4. `(stream, ts, value)` is the primary key, so a message the broker redelivers after a
   crash between commit and PUBACK does not become a second point. Rows are identified by
   that key, not by a row id, so a lease stays valid even across a salvage of the file.
5. Capacity (`Capacity`) is enforced on every append from an in-memory row count and the
   file's page counts, never by scanning the table: `drop-oldest` evicts the oldest
   readings (by timestamp, across all streams), `drop-newest` refuses the new ones,
   `backpressure` raises `BufferFull` so ingest holds its MQTT acknowledgements.
6. A damaged file never stops the gateway: the owner (the daemon) moves it aside as
   `<name>.corrupt-<UTC timestamp>`, salvages every row it can still read into a fresh
   file, logs `buffer_corrupt`, and carries on.
7. A full disk must not stop uploads, yet in WAL mode even a DELETE needs room (WAL
   frames, and a checkpoint that may extend the file). So the owner keeps a reserve file
   (`<name>.reserve`, allocated without writing data). On SQLITE_FULL it releases the
   reserve and checkpoints, so deletes work again; appends are then refused (ingest holds
   its MQTT acks) except into pages that uploads have freed inside the file, until the
   filesystem has room for the reserve again.

`ingest` writes here and `flush` reads here; they never talk to each other directly. The
`new_rows` event is how the flush loop learns that there is something to send, and
`space_freed` is how ingest learns that a full buffer has room again.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import math
import os
import sqlite3
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite

from gateway.aio import Notifier
from gateway.errors import BufferFull, StoreCorrupt, StoreError
from gateway.log import get_logger
from gateway.models import Batch, Point, Reading, StreamKey
from gateway.store import rawpages

log = get_logger("store")

SCHEMA_VERSION = 3

# Each entry upgrades the schema from version N-1 to N, in one transaction. Statements end
# with ';' and a newline (that is how they are split).
_MIGRATIONS: dict[int, str] = {
    1: """
        CREATE TABLE streams (
            id INTEGER PRIMARY KEY,
            device_id INTEGER NOT NULL,
            datastream_id INTEGER NOT NULL,
            parked_reason TEXT,
            parked_until_ms INTEGER,
            UNIQUE (device_id, datastream_id)
        );
        -- value is the JSON text sent to the cloud, integer stream ids keep rows small
        CREATE TABLE readings (
            id INTEGER PRIMARY KEY,
            stream_id INTEGER NOT NULL,
            ts_ms INTEGER NOT NULL,
            value TEXT NOT NULL
        );
        -- covering index: batch selection by stream and time, and duplicate suppression
        CREATE UNIQUE INDEX readings_by_stream_ts ON readings (stream_id, ts_ms, value);
        CREATE TABLE dead_letters (
            id INTEGER PRIMARY KEY,
            dead_at_ms INTEGER NOT NULL,
            reason TEXT NOT NULL,
            device_id INTEGER,
            datastream_id INTEGER,
            ts_ms INTEGER,
            value TEXT,
            topic TEXT,
            payload BLOB
        );
        CREATE INDEX dead_letters_by_reason ON dead_letters (reason);
        -- points accepted by the cloud per device per day (the day in the configured zone)
        CREATE TABLE quota_days (
            device_id INTEGER NOT NULL,
            day TEXT NOT NULL,
            points INTEGER NOT NULL DEFAULT 0,
            exhausted INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (device_id, day)
        ) WITHOUT ROWID;
    """,
    # Version 2: each reading is stored once instead of twice (table + covering index), which
    # halves the file and the pages a commit dirties (SD wear). Adds the clean-shutdown
    # record that makes start-up O(1) and the per-device eviction counters.
    2: """
        CREATE TABLE readings_v2 (
            stream_id INTEGER NOT NULL,
            ts_ms INTEGER NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (stream_id, ts_ms, value)
        ) WITHOUT ROWID;
        INSERT INTO readings_v2 (stream_id, ts_ms, value)
            SELECT stream_id, ts_ms, value FROM readings ORDER BY stream_id, ts_ms, value;
        DROP TABLE readings;
        ALTER TABLE readings_v2 RENAME TO readings;
        -- key/value facts about the file; 'pending_points' exists only after a clean close
        CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        ) WITHOUT ROWID;
        -- readings the capacity policy dropped, per device, since the file was created
        CREATE TABLE capacity_drops (
            device_id INTEGER PRIMARY KEY,
            evicted INTEGER NOT NULL DEFAULT 0,
            refused INTEGER NOT NULL DEFAULT 0,
            last_at_ms INTEGER NOT NULL
        );
    """,
    # Version 3: a dead letter's reason is a stable code; the value that varies per message
    # (the bad number, the cloud's wording) goes to `detail`, so grouping by reason works.
    3: """
        ALTER TABLE dead_letters ADD COLUMN detail TEXT;
    """,
}

Synchronous = Literal["NORMAL", "FULL", "EXTRA"]
FullPolicy = Literal["drop-oldest", "drop-newest", "backpressure"]
StoreFault = Literal["none", "read-only", "full"]

# New files only (SQLite fixes the page size when the file is created). A commit writes
# every page it touches to the WAL, and small commits touch a few pages each: 1 KiB pages
# halve the bytes written per reading against 4 KiB (benchmarks/sd_wear.py). Values longer
# than about 200 bytes then spill into overflow pages, which costs space, not correctness.
DEFAULT_PAGE_SIZE = 1024
# One `buffer_full` summary line per interval while the policy is dropping readings.
CAPACITY_LOG_INTERVAL_S = 60.0
# The byte cap is lifted again once the file's used pages fall below this share of it.
BYTES_RESUME_FRACTION = 0.9
# Evictions are done in chunks of at most this many rows (one query per chunk).
EVICT_CHUNK = 5000
# Readings moved to the dead letters per transaction when they expire: the store lock is
# released between chunks, so ingest can commit during a sweep after a long power-off.
EXPIRE_CHUNK = 5000
_SQLITE_MAGIC = b"SQLite format 3\x00"
# While the disk is full, an append is tried only if the file's free pages can hold it.
_BYTES_PER_READING_BOUND = 128
_MAX_PAGE_COUNT = 4294967294

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Capacity:
    """How big the buffer may grow and what happens at the limit (see config.example.toml)."""

    max_points: int = 20_000_000
    max_bytes: int = 2 * 1024**3
    policy: FullPolicy = "drop-oldest"
    max_dead_letters: int = 100_000
    # Released on a full disk so deletes and checkpoints can still be written.
    disk_reserve_bytes: int = 8 * 1024**2


@dataclass(frozen=True, slots=True)
class AppendResult:
    inserted: int
    duplicates: int
    # drop-oldest: readings removed to make room (they were stored, now they are gone)
    evicted: int = 0
    # drop-newest: readings acknowledged but not stored because the buffer was full
    refused: int = 0
    evicted_by_device: Mapping[int, int] = field(default_factory=dict)
    refused_by_device: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RejectedPayload:
    """An MQTT message that could not become a reading, kept for the operator to inspect."""

    reason: str
    topic: str
    payload: bytes
    device_id: int | None = None
    datastream_id: int | None = None
    detail: str | None = None


@dataclass(frozen=True)
class Lease:
    """A batch to upload, and how many readings of its stream expired while it was built."""

    batch: Batch
    expired: int


@dataclass(frozen=True, slots=True)
class StreamState:
    key: StreamKey
    parked_reason: str | None
    parked_until_ms: int | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    dead_at_ms: int
    reason: str
    device_id: int | None
    datastream_id: int | None
    ts_ms: int | None
    value_json: str | None
    topic: str | None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class SalvageReport:
    """What a recovery saved from a damaged file, for the `buffer_corrupt` line and tests."""

    moved_to: Path
    readings: int
    streams: int
    dead_letters: int
    quota_days: int
    orphaned: int
    skipped_ranges: int
    header_repaired: bool
    error: str


def _wrap(exc: sqlite3.Error) -> StoreError:
    """Name the condition the operator can act on (full disk, read-only fs, I/O)."""
    code = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if _is_corruption(exc):
        return StoreCorrupt(f"database file is damaged: {code or type(exc).__name__}: {text}")
    if code.startswith("SQLITE_FULL") or "disk is full" in text:
        return StoreError(f"disk full: {text}")
    if code.startswith("SQLITE_READONLY") or "readonly" in text:
        return StoreError(f"database is read-only: {text}")
    return StoreError(f"{code or type(exc).__name__}: {text}")


def _is_corruption(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    return (
        code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
        or code in ("SQLITE_IOERR_READ", "SQLITE_IOERR_SHORT_READ")
        or "malformed" in text
        or "not a database" in text
    )


def _utc_stamp(now_s: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now_s))


class _CapacityReporter:
    """One `buffer_full` line when the policy starts dropping, then one summary per interval.

    Lines are emitted from append (there is no timer): a streak is closed by
    `buffer_full_ended` at the first append that finds room after a quiet interval.
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self.active = False
        self._last_line = 0.0
        self._window: Counter[int] = Counter()
        self._window_total = 0
        self._streak_total = 0
        self._oldest_kept_ts: int | None = None
        self._last_drop = 0.0

    def dropped(
        self,
        policy: FullPolicy,
        by_device: Mapping[int, int],
        *,
        buffered: int,
        limit: int,
        oldest_kept_ts: int | None,
        reason: str,
    ) -> None:
        count = sum(by_device.values())
        now = self._clock()
        self._window.update(by_device)
        self._window_total += count
        self._streak_total += count
        self._last_drop = now
        if oldest_kept_ts is not None:
            self._oldest_kept_ts = oldest_kept_ts
        if not self.active or now - self._last_line >= self._interval_s:
            self._emit(policy, buffered=buffered, limit=limit, reason=reason, first=not self.active)
            self.active = True

    def room(self, policy: FullPolicy, *, buffered: int) -> None:
        """An append found room: close the streak once the policy has been quiet a while."""
        if not self.active or self._clock() - self._last_drop < self._interval_s:
            return
        if self._window_total:
            self._emit(policy, buffered=buffered, limit=None, reason=None, first=False)
        log.info(
            "buffer_full_ended",
            policy=policy,
            buffered=buffered,
            dropped_total=self._streak_total,
        )
        self.active = False
        self._streak_total = 0

    def _emit(
        self,
        policy: FullPolicy,
        *,
        buffered: int,
        limit: int | None,
        reason: str | None,
        first: bool,
    ) -> None:
        field_name = "evicted" if policy == "drop-oldest" else "refused"
        oldest = self._oldest_kept_ts
        log.warning(
            "buffer_full",
            policy=policy,
            **{field_name: self._window_total},
            by_device={str(device): n for device, n in sorted(self._window.items())},
            oldest_kept_ts=oldest,
            oldest_kept_at=(
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(oldest / 1000))
                if oldest is not None
                else None
            ),
            buffered=buffered,
            limit=limit,
            reason=reason,
            first=first,
            interval_s=self._interval_s,
        )
        self._last_line = self._clock()
        self._window.clear()
        self._window_total = 0


class Store:
    """Async facade over one SQLite connection; every operation is one transaction."""

    def __init__(
        self,
        connection: aiosqlite.Connection,
        path: Path,
        clock_ms: Callable[[], int],
        *,
        capacity: Capacity,
        synchronous: Synchronous,
        owner: bool,
    ) -> None:
        self._db = connection
        self.path = path
        self._clock_ms = clock_ms
        self._capacity = capacity
        self._synchronous = synchronous
        self._owner = owner
        self._lock = asyncio.Lock()
        self._stream_ids: dict[StreamKey, int] = {}
        self._stream_keys: dict[int, StreamKey] = {}
        self.pending_points = 0
        # Announced after every commit that added rows: the flush loop listens.
        self.new_rows = Notifier()
        # Announced whenever rows leave the table: ingest listens while the buffer is full.
        self.space_freed = Notifier()
        self.page_size = DEFAULT_PAGE_SIZE
        self.used_bytes = 0
        self._byte_cap: int | None = None
        self._clean_record = False
        self._data_version = 0
        self._reporter = _CapacityReporter(CAPACITY_LOG_INTERVAL_S)
        self.recovery: SalvageReport | None = None
        self.started_clean = False
        self.open_ms = 0.0
        # Disk full: appends only into freed pages until the reserve can be re-created.
        self.disk_full = False
        self._disk_full_since = 0.0
        self._reserve_path = path.with_name(path.name + ".reserve")
        self._fault: StoreFault = "none"

    # ------------------------------------------------------------------ open / close

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        synchronous: Synchronous = "FULL",
        clock_ms: Callable[[], int] | None = None,
        capacity: Capacity | None = None,
        owner: bool = False,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Store:
        """Open (creating or upgrading) the buffer.

        `owner=True` is the daemon: only the owner writes the clean-shutdown record and
        recovers a damaged file (moving it aside while `status` reads it would be wrong).
        Anyone else gets `StoreCorrupt`.
        """
        started = time.perf_counter()
        clock = clock_ms or (lambda: time.time_ns() // 1_000_000)
        capacity = capacity or Capacity()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            store = await cls._connect(path, synchronous, clock, capacity, owner, page_size)
        except StoreCorrupt as exc:
            if not owner:
                raise
            report = await asyncio.to_thread(_recover_file, path, str(exc), page_size)
            store = await cls._connect(path, synchronous, clock, capacity, owner, page_size)
            store.recovery = report
            store._log_recovery(report)
        if owner:
            await asyncio.to_thread(store._ensure_reserve)
        store.open_ms = (time.perf_counter() - started) * 1000
        return store

    @classmethod
    async def _connect(
        cls,
        path: Path,
        synchronous: Synchronous,
        clock_ms: Callable[[], int],
        capacity: Capacity,
        owner: bool,
        page_size: int,
    ) -> Store:
        problem = await asyncio.to_thread(check_header, path)
        if problem is not None:
            raise StoreCorrupt(problem)
        try:
            connection = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise _wrap(exc) from exc
        store = cls(
            connection,
            path,
            clock_ms,
            capacity=capacity,
            synchronous=synchronous,
            owner=owner,
        )
        try:
            await store._prepare(page_size)
        except (sqlite3.Error, StoreError) as exc:
            with contextlib.suppress(sqlite3.Error):
                await connection.close()
            if isinstance(exc, sqlite3.Error):
                raise _wrap(exc) from exc
            raise
        return store

    async def _prepare(self, page_size: int) -> None:
        await self._db.execute(f"PRAGMA page_size={int(page_size)}")  # new files only
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute(f"PRAGMA synchronous={self._synchronous}")
        await self._db.execute("PRAGMA busy_timeout=5000")
        await self._db.execute("PRAGMA foreign_keys=OFF")
        await self._migrate()
        (self.page_size,) = await self._fetchone("PRAGMA page_size")
        await self._load_streams()
        rows = await self._db.execute_fetchall(
            "SELECT value FROM meta WHERE key = 'pending_points'"
        )
        clean = [int(row[0]) for row in rows]
        if clean:
            # The last owner closed cleanly and nobody wrote since: no need to count.
            self.pending_points = clean[0]
            self._clean_record = True
            self.started_clean = True
        else:
            (count,) = await self._fetchone("SELECT count(*) FROM readings")
            self.pending_points = int(count)
        await self._probe()
        (self._data_version,) = await self._fetchone("PRAGMA data_version")
        self.used_bytes = await self._used_bytes()

    async def _load_streams(self) -> None:
        self._stream_ids.clear()
        self._stream_keys.clear()
        for stream_id, device_id, datastream_id in await self._db.execute_fetchall(
            "SELECT id, device_id, datastream_id FROM streams"
        ):
            key = StreamKey(device_id, datastream_id)
            self._stream_ids[key] = stream_id
            self._stream_keys[stream_id] = key

    async def _probe(self) -> None:
        """Cheap start-up check: the small tables fully, the readings tree at its edges.

        Touches a few pages per stream whatever the size of the backlog; the full check
        (`verify`) runs in the background once the gateway is up.
        """
        for table in ("streams", "meta", "quota_days", "capacity_drops"):
            rows = [
                row[0] for row in await self._db.execute_fetchall(f"PRAGMA quick_check({table})")
            ]
            if rows != ["ok"]:
                raise StoreCorrupt(f"quick_check({table}): {rows[0]}")
        for stream_id in self._stream_keys:
            # Two queries: min() and max() together would scan the stream's whole range.
            for direction in ("ASC", "DESC"):
                await self._db.execute_fetchall(
                    "SELECT ts_ms FROM readings WHERE stream_id = ? "
                    f"ORDER BY ts_ms {direction}, value {direction} LIMIT 1",
                    (stream_id,),
                )
        await self._db.execute_fetchall("SELECT max(id) FROM dead_letters")

    async def _migrate(self) -> None:
        (version,) = await self._fetchone("PRAGMA user_version")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this gateway "
                f"understands ({SCHEMA_VERSION}); upgrade the gateway"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            started = time.perf_counter()
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(target):
                    await self._db.execute(statement)
                await self._db.execute(f"PRAGMA user_version={target}")
                await self._db.execute("COMMIT")
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            if version > 0:
                log.info(
                    "store_migrated",
                    schema_version=target,
                    duration_ms=round((time.perf_counter() - started) * 1000, 1),
                )

    async def close(self) -> None:
        """Close; the owner also records the row count and lets SQLite refresh its stats.

        Others (`blynk-gateway status` next to a running daemon) write nothing.
        """
        async with self._lock:
            if self._owner:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("PRAGMA optimize")
                with contextlib.suppress(sqlite3.Error):
                    await self._write_clean_record()
            await self._db.close()

    async def _write_clean_record(self) -> None:
        """Remember the exact row count, so the next start need not count a big backlog.

        Only the owner writes it, and only if no other connection committed anything since
        it opened (`PRAGMA data_version` unchanged): then our in-memory count is exact.
        """
        if not self._owner:
            return
        (data_version,) = await self._fetchone("PRAGMA data_version")
        if data_version != self._data_version:
            return
        await self._db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('pending_points', ?)",
            (self.pending_points,),
        )

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...]:
        async with self._db.execute(sql, params) as cursor:
            row = await cursor.fetchone()
        if row is None:
            raise StoreError(f"no row for {sql!r}")
        return tuple(row)

    async def _used_bytes(self) -> int:
        (pages,) = await self._fetchone(
            "SELECT (SELECT page_count FROM pragma_page_count()) "
            "- (SELECT freelist_count FROM pragma_freelist_count())"
        )
        return int(pages) * self.page_size

    # ------------------------------------------------------------------ running SQL

    async def _read(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run a read under the lock; a damaged file is recovered and the read retried once."""
        for attempt in (1, 2):
            async with self._lock:
                try:
                    return await work()
                except sqlite3.Error as exc:
                    if attempt == 1 and self._owner and _is_corruption(exc):
                        await self._recover_locked(f"{type(exc).__name__}: {exc}")
                        continue
                    raise _wrap(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _in_transaction(
        self, work: Callable[[], Awaitable[tuple[T, Callable[[], None] | None]]]
    ) -> T:
        """Run `work` inside BEGIN IMMEDIATE/COMMIT, translating SQLite errors.

        `work` returns (result, on_commit): in-memory state is only touched by `on_commit`
        after COMMIT succeeded, so a failed commit (disk full) leaves no trace in memory.
        A damaged file is recovered and the transaction retried once.
        """
        for attempt in (1, 2):
            async with self._lock:
                try:
                    await self._db.execute("BEGIN IMMEDIATE")
                    try:
                        if self._clean_record:
                            # The file is about to change: the recorded count goes stale.
                            await self._db.execute("DELETE FROM meta WHERE key = 'pending_points'")
                        result, on_commit = await work()
                        await self._db.execute("COMMIT")
                    except BaseException:
                        if self._db.in_transaction:
                            with contextlib.suppress(sqlite3.Error):
                                await self._db.execute("ROLLBACK")
                        raise
                except sqlite3.Error as exc:
                    if attempt == 1 and self._owner and _is_corruption(exc):
                        await self._recover_locked(f"{type(exc).__name__}: {exc}")
                        continue
                    error = _wrap(exc)
                    if str(error).startswith("disk full"):
                        await self._enter_disk_full(str(exc))
                    raise error from exc
                self._clean_record = False
                if on_commit is not None:
                    on_commit()
                if self.disk_full:
                    await self._checkpoint_restart()
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ full disk

    def _ensure_reserve(self) -> bool:
        """Allocate the reserve file (blocks only, no data written: no SD wear)."""
        size = self._capacity.disk_reserve_bytes
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
                    if exc.errno not in (95, 22):  # EOPNOTSUPP / EINVAL: write zeros instead
                        raise
                    chunk = bytes(1 << 20)
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
        stats = os.statvfs(self.path.parent)
        return stats.f_bavail * stats.f_frsize

    async def _enter_disk_full(self, error: str) -> None:
        """Under the lock: release the reserve and checkpoint, so deletes can be written."""
        if self._fault == "full":
            released = False
        else:
            released = self._reserve_path.exists()
            with contextlib.suppress(OSError):
                self._reserve_path.unlink()
        await self._checkpoint_restart()
        if self.disk_full:
            return
        self.disk_full = True
        self._disk_full_since = time.monotonic()
        free = await asyncio.to_thread(self._free_disk_bytes)
        log.error(
            "disk_full",
            error=error,
            db=str(self.path),
            free_disk_bytes=free,
            reserve_released=released,
            buffered=self.pending_points,
            action="new readings are held (not acknowledged); uploads continue and free "
            "space inside the file; resumes by itself when there is room",
        )

    async def _checkpoint_restart(self) -> None:
        """Copy the WAL into the file and make the next writer reuse the WAL from its start."""
        with contextlib.suppress(sqlite3.Error):
            await self._db.execute_fetchall("PRAGMA wal_checkpoint(RESTART)")

    async def _room_while_disk_full(self, readings: int) -> bool:
        """Leave disk-full mode when the reserve fits again; else fit into freed pages."""
        if self._fault != "full":
            free = await asyncio.to_thread(self._free_disk_bytes)
            wanted = self._capacity.disk_reserve_bytes + 4 * self.page_size + (1 << 20)
            if free >= wanted and await asyncio.to_thread(self._ensure_reserve):
                self.disk_full = False
                log.info(
                    "disk_space_recovered",
                    free_disk_bytes=free,
                    down_s=round(time.monotonic() - self._disk_full_since, 1),
                    buffered=self.pending_points,
                )
                return True
        (free_pages,) = await self._fetchone("PRAGMA freelist_count")
        needed = readings * _BYTES_PER_READING_BOUND + 4 * self.page_size
        return int(free_pages) * self.page_size >= needed

    async def inject_fault(self, fault: StoreFault) -> None:
        """Fault switch for tests and drills, like the sandbox cloud's.

        "read-only" makes every write fail as on a read-only filesystem (`query_only`);
        "full" makes the file unable to grow, as on a full disk (`max_page_count`);
        "none" clears both.
        """
        async with self._lock:
            self._fault = fault
            await self._db.execute(f"PRAGMA query_only={1 if fault == 'read-only' else 0}")
            if fault == "full":
                (pages,) = await self._fetchone("PRAGMA page_count")
                await self._db.execute(f"PRAGMA max_page_count={int(pages)}")
            else:
                await self._db.execute(f"PRAGMA max_page_count={_MAX_PAGE_COUNT}")

    # ------------------------------------------------------------------ ingest side

    def limit(self) -> int:
        """The row limit in force: `max_points`, or less while the byte cap applies."""
        if self._byte_cap is None:
            return self._capacity.max_points
        return min(self._capacity.max_points, self._byte_cap)

    async def append(
        self, readings: Sequence[Reading], rejected: Sequence[RejectedPayload] = ()
    ) -> AppendResult:
        """Commit a group of readings (and bad payloads) in one transaction: one fsync.

        Applies the capacity policy in the same transaction, so what was acknowledged is
        exactly what is stored, plus what the policy dropped (counted, logged).
        Raises `BufferFull` (backpressure) or `StoreError` (disk full, read-only): nothing
        was stored and the caller must not acknowledge.
        """
        policy = self._capacity.policy
        if (
            policy == "backpressure"
            and readings
            and self.pending_points > 0  # a group always fits into an empty buffer
            and self.pending_points + len(readings) > self.limit()
        ):
            self._refuse_full()
        if self.disk_full:
            async with self._lock:
                room = await self._room_while_disk_full(len(readings) + len(rejected))
            if not room:
                raise StoreError("disk full: waiting for uploads or the operator to free space")

        async def work() -> tuple[AppendResult, Callable[[], None]]:
            rows: list[tuple[int, int, str]] = []
            new_streams: dict[StreamKey, int] = {}
            for reading in readings:
                key = StreamKey(reading.device_id, reading.datastream_id)
                stream_id = self._stream_ids.get(key) or new_streams.get(key)
                if stream_id is None:
                    stream_id = await self._create_stream(key)
                    new_streams[key] = stream_id
                rows.append((stream_id, reading.ts_ms, reading.value_json))
            inserted = 0
            refused_rows: list[tuple[int, int, str]] = []
            if policy == "drop-newest":
                inserted, refused_rows = await self._insert_within(rows, self.limit())
            elif rows:
                inserted = await self._insert(rows)
            duplicates = len(rows) - inserted - len(refused_rows)
            refused_rows, already = await self._split_present(refused_rows)
            duplicates += already
            if rejected:
                await self._insert_rejected(rejected)
                await self._prune_dead_letters()
            evicted: Counter[int] = Counter()
            oldest_kept: int | None = None
            pending_after = self.pending_points + inserted
            used = await self._used_bytes()
            byte_cap = self._next_byte_cap(used, pending_after)
            limit = (
                self._capacity.max_points
                if byte_cap is None
                else min(self._capacity.max_points, byte_cap)
            )
            if policy == "drop-oldest" and pending_after > limit:
                evicted, oldest_kept = await self._evict_oldest(pending_after - limit, new_streams)
            refused_by_device: Counter[int] = Counter()
            for stream_id, _, _ in refused_rows:
                refused_by_device[self._device_of(stream_id, new_streams)] += 1
            if evicted or refused_by_device:
                await self._count_drops(evicted, refused_by_device)
            result = AppendResult(
                inserted=inserted,
                duplicates=duplicates,
                evicted=sum(evicted.values()),
                refused=len(refused_rows),
                evicted_by_device=dict(evicted),
                refused_by_device=dict(refused_by_device),
            )

            def on_commit() -> None:
                for key, stream_id in new_streams.items():
                    self._stream_ids[key] = stream_id
                    self._stream_keys[stream_id] = key
                self.pending_points += inserted - result.evicted
                self.used_bytes = used
                self._byte_cap = byte_cap
                if inserted:
                    self.new_rows.notify()
                if result.evicted or result.refused:
                    self._reporter.dropped(
                        policy,
                        evicted if result.evicted else refused_by_device,
                        buffered=self.pending_points,
                        limit=limit,
                        oldest_kept_ts=oldest_kept if result.evicted else None,
                        reason=self._full_reason(),
                    )
                else:
                    self._reporter.room(policy, buffered=self.pending_points)

            return result, on_commit

        return await self._in_transaction(work)

    def _refuse_full(self) -> None:
        """backpressure: refuse the commit; ingest holds the acks (and logs that state)."""
        raise BufferFull(
            f"buffer full ({self.pending_points} readings, limit {self.limit()}, "
            f"{self._full_reason()})",
            buffered=self.pending_points,
            limit=self.limit(),
        )

    def _full_reason(self) -> str:
        if self._byte_cap is not None and self._byte_cap < self._capacity.max_points:
            return f"max_bytes={self._capacity.max_bytes}"
        return f"max_points={self._capacity.max_points}"

    def _next_byte_cap(self, used: int, pending: int) -> int | None:
        """Turn `max_bytes` into a row limit, from the file's own bytes per row.

        Rows and pages grow together, so when the used pages pass `max_bytes` the row
        count is capped at what fits; freed pages are reused, so the file then stays put.
        The cap is lifted once uploads have freed a margin of pages again.
        """
        max_bytes = self._capacity.max_bytes
        if used > max_bytes:
            per_row = used / max(pending, 1)
            return max(0, pending - math.ceil((used - max_bytes) / per_row))
        if self._byte_cap is not None and used > max_bytes * BYTES_RESUME_FRACTION:
            return max(self._byte_cap, 0)
        return None

    async def _insert(self, rows: Sequence[tuple[int, int, str]]) -> int:
        before = self._db.total_changes
        await self._db.executemany(
            "INSERT OR IGNORE INTO readings (stream_id, ts_ms, value) VALUES (?, ?, ?)", rows
        )
        return self._db.total_changes - before

    async def _insert_within(
        self, rows: list[tuple[int, int, str]], limit: int
    ) -> tuple[int, list[tuple[int, int, str]]]:
        """drop-newest: store new rows while there is room; return the rows left over."""
        room = limit - self.pending_points
        inserted = 0
        while rows and room > 0:
            chunk, rows = rows[:room], rows[room:]
            added = await self._insert(chunk)
            inserted += added
            room -= added
        return inserted, rows

    async def _split_present(
        self, rows: list[tuple[int, int, str]]
    ) -> tuple[list[tuple[int, int, str]], int]:
        """Refused rows that are already stored (broker redeliveries) are not refusals."""
        missing = []
        present = 0
        for row in rows:
            found = await self._db.execute_fetchall(
                "SELECT 1 FROM readings WHERE stream_id = ? AND ts_ms = ? AND value = ?", row
            )
            if found:
                present += 1
            else:
                missing.append(row)
        return missing, present

    def _device_of(self, stream_id: int, new_streams: Mapping[StreamKey, int]) -> int:
        key = self._stream_keys.get(stream_id)
        if key is None:
            key = next(k for k, sid in new_streams.items() if sid == stream_id)
        return key.device_id

    def _all_stream_ids(self, new_streams: Mapping[StreamKey, int]) -> list[int]:
        return sorted({*self._stream_keys, *new_streams.values()})

    async def _evict_oldest(
        self, count: int, new_streams: Mapping[StreamKey, int]
    ) -> tuple[Counter[int], int | None]:
        """Delete the `count` readings with the oldest timestamps, across all streams.

        Reads at most `count + 1` keys per stream from the primary key (no scan), merges
        them, deletes a key prefix per stream. Returns the evictions per device and the
        timestamp of the oldest reading kept.
        """
        evicted: Counter[int] = Counter()
        oldest_kept: int | None = None
        stream_ids = self._all_stream_ids(new_streams)
        while count > 0 and stream_ids:
            chunk = min(count, EVICT_CHUNK)
            heads = await self._oldest_keys(stream_ids, chunk + 1)
            if not heads:
                break
            victims, kept = heads[:chunk], heads[chunk:]
            cut: dict[int, tuple[int, str]] = {}
            for ts_ms, stream_id, value in victims:
                cut[stream_id] = (ts_ms, value)
            before = self._db.total_changes
            await self._db.executemany(
                "DELETE FROM readings WHERE stream_id = ? AND (ts_ms, value) <= (?, ?)",
                [(stream_id, ts_ms, value) for stream_id, (ts_ms, value) in cut.items()],
            )
            deleted = self._db.total_changes - before
            for _, stream_id, _ in victims:
                evicted[self._device_of(stream_id, new_streams)] += 1
            oldest_kept = kept[0][0] if kept else None
            count -= deleted
            if deleted < len(victims):  # pragma: no cover - keys come from the same snapshot
                break
        return evicted, oldest_kept

    async def _oldest_keys(self, stream_ids: Sequence[int], per_stream: int) -> list[Any]:
        """The `per_stream` oldest (ts, stream, value) of the streams, merged, oldest first."""
        merged: list[tuple[int, int, str]] = []
        for start in range(0, len(stream_ids), 100):
            part = stream_ids[start : start + 100]
            sql = " UNION ALL ".join(
                "SELECT * FROM (SELECT ts_ms, stream_id, value FROM readings "
                "WHERE stream_id = ? ORDER BY ts_ms, value LIMIT ?)"
                for _ in part
            )
            params: list[int] = []
            for stream_id in part:
                params += [stream_id, per_stream]
            rows = await self._db.execute_fetchall(sql, params)
            merged.extend((int(r[0]), int(r[1]), str(r[2])) for r in rows)
        return heapq.nsmallest(per_stream, merged, key=lambda row: (row[0], row[1], row[2]))

    async def _count_drops(self, evicted: Mapping[int, int], refused: Mapping[int, int]) -> None:
        now_ms = self._clock_ms()
        await self._db.executemany(
            "INSERT INTO capacity_drops (device_id, evicted, refused, last_at_ms) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
            "evicted = evicted + excluded.evicted, refused = refused + excluded.refused, "
            "last_at_ms = excluded.last_at_ms",
            [
                (device, evicted.get(device, 0), refused.get(device, 0), now_ms)
                for device in {*evicted, *refused}
            ],
        )

    async def _create_stream(self, key: StreamKey) -> int:
        cursor = await self._db.execute(
            "INSERT INTO streams (device_id, datastream_id) VALUES (?, ?) "
            "ON CONFLICT (device_id, datastream_id) DO UPDATE SET device_id = excluded.device_id "
            "RETURNING id",
            (key.device_id, key.datastream_id),
        )
        row = await cursor.fetchone()
        await cursor.close()
        if row is None:
            raise StoreError(f"could not register stream {key}")
        return int(row[0])

    async def _insert_rejected(self, rejected: Sequence[RejectedPayload]) -> None:
        now_ms = self._clock_ms()
        await self._db.executemany(
            "INSERT INTO dead_letters (dead_at_ms, reason, device_id, datastream_id, topic, "
            "payload, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    now_ms,
                    item.reason,
                    item.device_id,
                    item.datastream_id,
                    item.topic,
                    item.payload,
                    item.detail,
                )
                for item in rejected
            ],
        )

    async def _prune_dead_letters(self) -> None:
        """Keep the newest `max_dead_letters` (ids only grow, so this is two index seeks)."""
        (newest,) = await self._fetchone("SELECT max(id) FROM dead_letters")
        if newest is None:
            return
        floor = int(newest) - self._capacity.max_dead_letters
        before = self._db.total_changes
        await self._db.execute("DELETE FROM dead_letters WHERE id <= ?", (floor,))
        pruned = self._db.total_changes - before
        if pruned:
            log.warning(
                "dead_letters_pruned",
                count=pruned,
                max_dead_letters=self._capacity.max_dead_letters,
            )

    # ------------------------------------------------------------------ flush side

    async def pending_streams(self) -> list[StreamState]:
        """Streams that have buffered readings, in a stable order (for round-robin)."""

        async def work() -> list[StreamState]:
            rows = await self._db.execute_fetchall(
                "SELECT device_id, datastream_id, parked_reason, parked_until_ms FROM streams s "
                "WHERE EXISTS (SELECT 1 FROM readings r WHERE r.stream_id = s.id) ORDER BY s.id"
            )
            return [StreamState(StreamKey(row[0], row[1]), row[2], row[3]) for row in rows]

        return await self._read(work)

    async def lease(
        self,
        stream: StreamKey,
        limit: int,
        *,
        newest_first: bool = False,
        expire_before_ms: int | None = None,
    ) -> Lease:
        """The next `limit` readings of a stream, oldest (or newest) first.

        With `expire_before_ms`, readings older than it are first moved to the dead letters
        as `expired`, in the same transaction, so a batch never carries a point the cloud
        would refuse for age, however recently that point arrived.

        The lease lives only in the caller: until `ack` or `dead_letter`, the rows stay in
        the table and a crash makes them eligible again. Rows are found again by
        (stream, ts, value).
        """
        if limit <= 0 or stream not in self._stream_ids:
            return Lease(Batch(stream, ()), 0)
        direction = "DESC" if newest_first else "ASC"

        async def select(stream_id: int) -> list[Any]:
            return list(
                await self._db.execute_fetchall(
                    "SELECT ts_ms, value FROM readings WHERE stream_id = ? "
                    f"ORDER BY ts_ms {direction}, value {direction} LIMIT ?",
                    (stream_id, limit),
                )
            )

        async def read() -> list[Any]:
            stream_id = self._stream_ids.get(stream)
            return [] if stream_id is None else await select(stream_id)

        async def expire_then_read() -> tuple[tuple[int, list[Any]], Callable[[], None]]:
            stream_id = self._stream_ids.get(stream)
            if stream_id is None:
                return (0, []), lambda: None
            assert expire_before_ms is not None
            moved = await self._expire_stream(stream_id, expire_before_ms, EXPIRE_CHUNK)
            return (moved, await select(stream_id)), lambda: self._rows_left(moved)

        expired = 0
        if expire_before_ms is not None and await self._has_older(stream, expire_before_ms):
            expired, rows = await self._in_transaction(expire_then_read)
        else:
            rows = await self._read(read)
        return Lease(Batch(stream, tuple(Point(row[0], row[1]) for row in rows)), expired)

    async def _has_older(self, stream: StreamKey, cutoff_ms: int) -> bool:
        """One primary-key probe: does the stream hold a reading older than `cutoff_ms`?"""

        async def work() -> bool:
            stream_id = self._stream_ids.get(stream)
            if stream_id is None:
                return False
            rows = await self._db.execute_fetchall(
                "SELECT 1 FROM readings WHERE stream_id = ? AND ts_ms < ? LIMIT 1",
                (stream_id, cutoff_ms),
            )
            return bool(rows)

        return await self._read(work)

    async def ack(self, batch: Batch, day: str) -> None:
        """The cloud accepted the batch: delete it and count it against the day's quota."""

        async def work() -> tuple[int, Callable[[], None]]:
            deleted = await self._delete_points(batch)
            await self._db.execute(
                "INSERT INTO quota_days (device_id, day, points) VALUES (?, ?, ?) "
                "ON CONFLICT (device_id, day) DO UPDATE SET points = points + excluded.points",
                (batch.stream.device_id, day, len(batch.points)),
            )
            return deleted, lambda: self._rows_left(deleted)

        await self._in_transaction(work)

    async def ack_many(self, delivered: Sequence[tuple[Batch, str]]) -> None:
        """Several accepted batches (with their quota days) in one transaction.

        Each transaction costs an fsync and a few page writes whatever its size, so a flush
        that uploads several small batches in a pass wears the SD card less by acking them
        together (benchmarks/sd_wear.py: the per-batch acks dominate the steady state).
        """

        async def work() -> tuple[int, Callable[[], None]]:
            deleted = 0
            for batch, day in delivered:
                deleted += await self._delete_points(batch)
                await self._db.execute(
                    "INSERT INTO quota_days (device_id, day, points) VALUES (?, ?, ?) "
                    "ON CONFLICT (device_id, day) DO UPDATE SET points = points + excluded.points",
                    (batch.stream.device_id, day, len(batch.points)),
                )
            return deleted, lambda: self._rows_left(deleted)

        if delivered:
            await self._in_transaction(work)

    def _rows_left(self, count: int) -> None:
        self.pending_points -= count
        if count:
            self.space_freed.notify()

    async def _delete_points(self, batch: Batch) -> int:
        stream_id = self._stream_ids.get(batch.stream)
        if stream_id is None:
            return 0
        before = self._db.total_changes
        await self._db.executemany(
            "DELETE FROM readings WHERE stream_id = ? AND ts_ms = ? AND value = ?",
            [(stream_id, point.ts_ms, point.value_json) for point in batch.points],
        )
        return self._db.total_changes - before

    async def dead_letter(self, batch: Batch, reason: str, detail: str | None = None) -> None:
        """Move points the cloud will never take out of the queue, keeping them for inspection.

        `reason` is a stable code (`expired`, `rejected`); `detail` says what was wrong.
        """
        now_ms = self._clock_ms()

        async def work() -> tuple[int, Callable[[], None]]:
            await self._db.executemany(
                "INSERT INTO dead_letters (dead_at_ms, reason, device_id, datastream_id, ts_ms, "
                "value, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        now_ms,
                        reason,
                        batch.stream.device_id,
                        batch.stream.datastream_id,
                        point.ts_ms,
                        point.value_json,
                        detail,
                    )
                    for point in batch.points
                ],
            )
            deleted = await self._delete_points(batch)
            await self._prune_dead_letters()
            return deleted, lambda: self._rows_left(deleted)

        await self._in_transaction(work)

    async def expire(self, cutoff_ms: int, reason: str = "expired") -> int:
        """Dead-letter every reading older than `cutoff_ms`: the cloud would refuse it.

        Walks the primary key per stream, so the cost is the rows moved, not the table, and
        moves at most EXPIRE_CHUNK rows per transaction: after a long power-off or a clock
        jump that can be most of the buffer, and ingest must not wait for all of it.
        """
        moved_total = 0
        for stream_id in list(self._stream_keys):
            while True:

                async def work(sid: int = stream_id) -> tuple[int, Callable[[], None]]:
                    moved = await self._expire_stream(sid, cutoff_ms, EXPIRE_CHUNK, reason)
                    return moved, lambda: self._rows_left(moved)

                moved = await self._in_transaction(work)
                moved_total += moved
                if moved < EXPIRE_CHUNK:
                    break
        return moved_total

    async def _expire_stream(
        self, stream_id: int, cutoff_ms: int, limit: int, reason: str = "expired"
    ) -> int:
        """Move up to `limit` of the stream's readings older than `cutoff_ms` (in a transaction)."""
        rows = list(
            await self._db.execute_fetchall(
                "SELECT ts_ms, value FROM readings WHERE stream_id = ? AND ts_ms < ? "
                "ORDER BY ts_ms, value LIMIT ?",
                (stream_id, cutoff_ms, limit),
            )
        )
        if not rows:
            return 0
        key = self._stream_keys[stream_id]
        now_ms = self._clock_ms()
        await self._db.executemany(
            "INSERT INTO dead_letters (dead_at_ms, reason, device_id, datastream_id, ts_ms, "
            "value) VALUES (?, ?, ?, ?, ?, ?)",
            [(now_ms, reason, key.device_id, key.datastream_id, ts, value) for ts, value in rows],
        )
        last_ts, last_value = rows[-1]
        before = self._db.total_changes
        await self._db.execute(
            "DELETE FROM readings WHERE stream_id = ? AND (ts_ms, value) <= (?, ?)",
            (stream_id, last_ts, last_value),
        )
        moved = self._db.total_changes - before
        await self._prune_dead_letters()
        return moved

    async def park(self, stream: StreamKey, reason: str, until_ms: int) -> None:
        """Hold a stream back (its data kept) until `until_ms`, remembering why."""

        async def work() -> tuple[None, None]:
            await self._db.execute(
                "UPDATE streams SET parked_reason = ?, parked_until_ms = ? "
                "WHERE device_id = ? AND datastream_id = ?",
                (reason, until_ms, stream.device_id, stream.datastream_id),
            )
            return None, None

        await self._in_transaction(work)

    async def unpark(self, stream: StreamKey | None = None) -> None:
        """Release one parked stream, or all of them (after a config reload)."""

        async def work() -> tuple[None, None]:
            if stream is None:
                await self._db.execute(
                    "UPDATE streams SET parked_reason = NULL, parked_until_ms = NULL "
                    "WHERE parked_reason IS NOT NULL"
                )
            else:
                await self._db.execute(
                    "UPDATE streams SET parked_reason = NULL, parked_until_ms = NULL "
                    "WHERE device_id = ? AND datastream_id = ?",
                    (stream.device_id, stream.datastream_id),
                )
            return None, None

        await self._in_transaction(work)

    # ------------------------------------------------------------------ quota ledger

    async def points_sent(self, device_id: int, day: str) -> tuple[int, bool]:
        """(points the cloud accepted for the device on `day`, whether it refused more)."""

        async def work() -> tuple[int, bool]:
            rows = await self._db.execute_fetchall(
                "SELECT points, exhausted FROM quota_days WHERE device_id = ? AND day = ?",
                (device_id, day),
            )
            for points, exhausted in rows:
                return int(points), bool(exhausted)
            return 0, False

        return await self._read(work)

    async def mark_exhausted(self, device_id: int, day: str) -> None:
        """The cloud refused the device for its daily limit: do not try again that day."""

        async def work() -> tuple[None, None]:
            await self._db.execute(
                "INSERT INTO quota_days (device_id, day, exhausted) VALUES (?, ?, 1) "
                "ON CONFLICT (device_id, day) DO UPDATE SET exhausted = 1",
                (device_id, day),
            )
            return None, None

        await self._in_transaction(work)

    # ------------------------------------------------------------------ inspection

    async def dead_letters(self, limit: int = 100, reason: str | None = None) -> list[DeadLetter]:
        where, params = ("WHERE reason = ?", (reason, limit)) if reason else ("", (limit,))

        async def work() -> list[DeadLetter]:
            rows = await self._db.execute_fetchall(
                "SELECT id, dead_at_ms, reason, device_id, datastream_id, ts_ms, value, topic, "
                f"detail FROM dead_letters {where} ORDER BY id LIMIT ?",
                params,
            )
            return [DeadLetter(*row) for row in rows]

        return await self._read(work)

    async def counts(self) -> dict[str, int]:
        """Row counts the operator cares about (used by status and tests)."""

        async def work() -> dict[str, int]:
            (readings,) = await self._fetchone("SELECT count(*) FROM readings")
            (dead,) = await self._fetchone("SELECT count(*) FROM dead_letters")
            (parked,) = await self._fetchone(
                "SELECT count(*) FROM streams WHERE parked_reason IS NOT NULL"
            )
            (evicted, refused) = await self._fetchone(
                "SELECT coalesce(sum(evicted), 0), coalesce(sum(refused), 0) FROM capacity_drops"
            )
            return {
                "buffered": readings,
                "dead_letters": dead,
                "parked_streams": parked,
                "evicted": evicted,
                "refused": refused,
            }

        return await self._read(work)

    async def capacity_drops(self) -> dict[int, tuple[int, int]]:
        """Per device: (evicted by drop-oldest, refused by drop-newest), since the file began."""

        async def work() -> dict[int, tuple[int, int]]:
            rows = await self._db.execute_fetchall(
                "SELECT device_id, evicted, refused FROM capacity_drops ORDER BY device_id"
            )
            return {int(row[0]): (int(row[1]), int(row[2])) for row in rows}

        return await self._read(work)

    async def buffered_points(self) -> list[tuple[int, int, int, str]]:
        """Every buffered (device, datastream, ts, value) — for tests and the demo only."""

        async def work() -> list[tuple[int, int, int, str]]:
            rows = await self._db.execute_fetchall(
                "SELECT s.device_id, s.datastream_id, r.ts_ms, r.value FROM readings r "
                "JOIN streams s ON s.id = r.stream_id ORDER BY r.stream_id, r.ts_ms, r.value"
            )
            return [(row[0], row[1], row[2], row[3]) for row in rows]

        return await self._read(work)

    # ------------------------------------------------------------------ integrity

    async def verify(self) -> bool:
        """Full `PRAGMA quick_check` on a second connection; recover the file if it fails.

        O(file size), so the daemon runs it in the background after start-up: WAL lets it
        read a snapshot while ingest and flush keep writing. Returns True if the file was ok.
        """
        started = time.perf_counter()
        try:
            problems = await asyncio.to_thread(_quick_check, self.path)
        except sqlite3.Error as exc:
            problems = [f"{type(exc).__name__}: {exc}"]
        duration_ms = round((time.perf_counter() - started) * 1000, 1)
        if not problems:
            log.info(
                "integrity_check_passed",
                duration_ms=duration_ms,
                db_size_bytes=self.used_bytes,
            )
            return True
        if not self._owner:
            raise StoreCorrupt(f"quick_check: {problems[0]}")
        async with self._lock:
            await self._recover_locked(f"quick_check: {'; '.join(problems[:3])}")
        return False

    async def _recover_locked(self, error: str) -> None:
        """Swap a damaged file for a salvaged one under the caller's lock (owner only)."""
        with contextlib.suppress(sqlite3.Error, ValueError):
            await self._db.close()
        report = await asyncio.to_thread(_recover_file, self.path, error, self.page_size)
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            await self._prepare(self.page_size)
        except sqlite3.Error as exc:
            raise _wrap(exc) from exc
        self._byte_cap = None
        self.recovery = report
        self._log_recovery(report)
        self.space_freed.notify()

    def _log_recovery(self, report: SalvageReport) -> None:
        log.error(
            "buffer_corrupt",
            error=report.error,
            moved_to=str(report.moved_to),
            salvaged_readings=report.readings,
            salvaged_streams=report.streams,
            salvaged_dead_letters=report.dead_letters,
            orphaned_readings=report.orphaned,
            skipped_ranges=report.skipped_ranges,
            header_repaired=report.header_repaired,
            buffered=self.pending_points,
            action="the damaged file was moved aside and kept for inspection; "
            "readings in its unreadable pages are lost; the gateway carries on",
        )


def _statements(version: int) -> list[str]:
    return [s for s in _MIGRATIONS[version].split(";\n") if s.strip()]


def _create_schema_sync(connection: sqlite3.Connection, page_size: int) -> None:
    connection.execute(f"PRAGMA page_size={int(page_size)}")
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("BEGIN IMMEDIATE")
    for version in range(1, SCHEMA_VERSION + 1):
        for statement in _statements(version):
            connection.execute(statement)
    connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    connection.execute("COMMIT")


def _quick_check(path: Path) -> list[str]:
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = connection.execute("PRAGMA quick_check(20)").fetchall()
    finally:
        connection.close()
    problems = [str(row[0]) for row in rows]
    return [] if problems == ["ok"] else problems


# ---------------------------------------------------------------------- header check


def check_header(path: Path) -> str | None:
    """A problem with the file's 100-byte header, or None. O(1): one read, one stat."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    try:
        with path.open("rb") as handle:
            header = handle.read(100)
    except OSError as exc:
        return f"cannot read the database file: {exc}"
    if len(header) < 100 or header[:16] != _SQLITE_MAGIC:
        return "not an SQLite database (bad header magic)"
    page_size = _page_size_field(header)
    if page_size is None:
        return f"bad page size in header: {header[16:18].hex()}"
    if size % page_size:
        return f"file size {size} is not a multiple of the page size {page_size}"
    return None


def _page_size_field(header: bytes) -> int | None:
    (raw,) = struct.unpack(">H", header[16:18])
    page_size = 65536 if raw == 1 else raw
    if page_size < 512 or page_size & (page_size - 1):
        return None
    return page_size


# ---------------------------------------------------------------------- salvage


def _recover_file(path: Path, error: str, page_size: int) -> SalvageReport:
    """Move a damaged database aside and salvage what it still holds into a fresh file.

    Runs in a worker thread with plain sqlite3 connections: it is a one-off that loops
    with try/except around every read, which is simplest synchronously.
    """
    aside = _move_aside(path)
    source = aside
    header_repaired = False
    if check_header(aside) is not None or not _schema_readable(aside):
        repaired = rawpages.repair_header(aside, default_page_size=page_size)
        if repaired is not None and _schema_readable(repaired):
            source, header_repaired = repaired, True
    fresh = sqlite3.connect(path, isolation_level=None)
    try:
        _create_schema_sync(fresh, page_size)
        if _schema_readable(source):
            counts = _salvage_rows(source, fresh)
            if counts.skipped_ranges:
                # SQLite cannot reach keys that sit in intact interior pages between
                # damaged leaves; the page scan can.
                counts.readings += _salvage_raw(aside, fresh, page_size, union=True).readings
        else:
            counts = _salvage_raw(aside, fresh, page_size)
    finally:
        fresh.close()
        if source != aside:
            rawpages.remove_copy(source)
    return SalvageReport(
        moved_to=aside,
        readings=counts.readings,
        streams=counts.streams,
        dead_letters=counts.dead_letters,
        quota_days=counts.quota_days,
        orphaned=counts.orphaned,
        skipped_ranges=counts.skipped_ranges,
        header_repaired=header_repaired,
        error=error,
    )


def _move_aside(path: Path) -> Path:
    stamp = _utc_stamp(time.time())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    serial = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{serial}")
        serial += 1
    os.replace(path, aside)
    for suffix in ("-wal", "-shm"):
        companion = Path(f"{path}{suffix}")
        if companion.exists():
            if suffix == "-shm":
                companion.unlink()  # rebuilt from the WAL by whoever opens the copy
            else:
                os.replace(companion, Path(f"{aside}{suffix}"))
    return aside


def _schema_readable(path: Path) -> bool:
    try:
        connection = sqlite3.connect(path)
        try:
            names = {
                row[0] for row in connection.execute("SELECT name FROM sqlite_schema").fetchall()
            }
        finally:
            connection.close()
    except sqlite3.Error:
        return False
    return "readings" in names


@dataclass
class SalvageCounts:
    readings: int = 0
    streams: int = 0
    dead_letters: int = 0
    quota_days: int = 0
    orphaned: int = 0
    skipped_ranges: int = 0


def _valid_reading(stream_id: object, ts_ms: object, value: object) -> bool:
    if not (isinstance(stream_id, int) and isinstance(ts_ms, int) and isinstance(value, str)):
        return False
    if stream_id <= 0 or not 0 < ts_ms < 10**14:
        return False
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _scan(
    connection: sqlite3.Connection,
    sql: str,
    start: tuple[Any, ...],
    advance: Callable[[tuple[Any, ...], int], tuple[Any, ...] | None],
    counts: SalvageCounts,
) -> Iterable[tuple[Any, ...]]:
    """Yield rows of a keyset query `sql` (params: the key to start after), skipping damage.

    When a read fails, probe for the nearest readable key after the last good one: grow
    the step exponentially until a probe succeeds, then halve back towards the damage so
    that as few good rows as possible are skipped. Rows are yielded as they are read.
    """
    key = start
    while True:
        try:
            for row in connection.execute(sql, key):
                key = tuple(row[: len(start)])
                yield tuple(row)
            return
        except sqlite3.DatabaseError:
            counts.skipped_ranges += 1
            resume = _probe_past_damage(connection, sql, key, advance)
            if resume is None:
                return
            key = resume


def _probe_past_damage(
    connection: sqlite3.Connection,
    sql: str,
    key: tuple[Any, ...],
    advance: Callable[[tuple[Any, ...], int], tuple[Any, ...] | None],
) -> tuple[Any, ...] | None:
    def readable(candidate: tuple[Any, ...]) -> bool:
        try:
            connection.execute(sql, candidate).fetchone()
        except sqlite3.DatabaseError:
            return False
        return True

    good: tuple[Any, ...] | None = None
    step_bits = 0
    while step_bits < 62:
        candidate = advance(key, 1 << step_bits)
        if candidate is None:
            return None
        if readable(candidate):
            good = candidate
            break
        step_bits += 1
    if good is None:
        return None
    low, high = (1 << (step_bits - 1)) if step_bits else 0, 1 << step_bits
    while high - low > 1:
        middle = (low + high) // 2
        candidate = advance(key, middle)
        if candidate is not None and readable(candidate):
            high, good = middle, candidate
        else:
            low = middle
    return good


def _salvage_rows(source_path: Path, fresh: sqlite3.Connection) -> SalvageCounts:
    counts = SalvageCounts()
    source = sqlite3.connect(source_path)
    try:
        source.execute("PRAGMA query_only=1")
        columns = {row[1] for row in _safe_rows(source, "PRAGMA table_info(readings)", counts)}
        has_rowid_layout = "id" in columns
        fresh.execute("BEGIN IMMEDIATE")
        stream_ids: set[int] = set()
        for row in _scan(
            source,
            "SELECT id, device_id, datastream_id, parked_reason, parked_until_ms FROM streams "
            "WHERE id > ? ORDER BY id",
            (0,),
            lambda k, step: (k[0] + step,),
            counts,
        ):
            if isinstance(row[0], int) and isinstance(row[1], int) and isinstance(row[2], int):
                with contextlib.suppress(sqlite3.IntegrityError):
                    fresh.execute(
                        "INSERT INTO streams (id, device_id, datastream_id, parked_reason, "
                        "parked_until_ms) VALUES (?, ?, ?, ?, ?)",
                        row,
                    )
                    stream_ids.add(row[0])
                    counts.streams += 1
        if has_rowid_layout:
            reading_sql = (
                "SELECT id, stream_id, ts_ms, value FROM readings WHERE id > ? ORDER BY id"
            )
            reading_rows: Iterable[tuple[Any, ...]] = (
                row[1:]
                for row in _scan(source, reading_sql, (0,), lambda k, step: (k[0] + step,), counts)
            )
        else:
            reading_rows = _scan(
                source,
                "SELECT stream_id, ts_ms, value FROM readings WHERE (stream_id, ts_ms, value) "
                "> (?, ?, ?) ORDER BY stream_id, ts_ms, value",
                (0, 0, ""),
                _advance_reading_key,
                counts,
            )
        batch: list[tuple[Any, ...]] = []
        orphans: list[tuple[Any, ...]] = []
        for stream_id, ts_ms, value in reading_rows:
            if not _valid_reading(stream_id, ts_ms, value):
                continue
            if stream_id in stream_ids:
                batch.append((stream_id, ts_ms, value))
            else:
                orphans.append((stream_id, ts_ms, value))
            if len(batch) >= 10_000:
                counts.readings += _insert_salvaged(fresh, batch)
                batch.clear()
        counts.readings += _insert_salvaged(fresh, batch)
        counts.orphaned = _dead_letter_orphans(fresh, orphans)
        for row in _scan(
            source,
            "SELECT id, dead_at_ms, reason, device_id, datastream_id, ts_ms, value, topic, "
            "payload FROM dead_letters WHERE id > ? ORDER BY id",
            (0,),
            lambda k, step: (k[0] + step,),
            counts,
        ):
            with contextlib.suppress(sqlite3.Error):
                fresh.execute(
                    "INSERT INTO dead_letters (dead_at_ms, reason, device_id, datastream_id, "
                    "ts_ms, value, topic, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    row[1:],
                )
                counts.dead_letters += 1
        for row in _scan(
            source,
            "SELECT device_id, day, points, exhausted FROM quota_days "
            "WHERE (device_id, day) > (?, ?) ORDER BY device_id, day",
            (-1, ""),
            lambda k, step: (k[0] + step, ""),
            counts,
        ):
            with contextlib.suppress(sqlite3.Error):
                fresh.execute(
                    "INSERT INTO quota_days (device_id, day, points, exhausted) "
                    "VALUES (?, ?, ?, ?)",
                    row,
                )
                counts.quota_days += 1
        if not has_rowid_layout:
            with contextlib.suppress(sqlite3.Error):
                fresh.executemany(
                    "INSERT OR IGNORE INTO capacity_drops (device_id, evicted, refused, "
                    "last_at_ms) VALUES (?, ?, ?, ?)",
                    source.execute(
                        "SELECT device_id, evicted, refused, last_at_ms FROM capacity_drops"
                    ).fetchall(),
                )
        fresh.execute("COMMIT")
    finally:
        source.close()
    return counts


def _salvage_raw(
    aside: Path, fresh: sqlite3.Connection, page_size: int, *, union: bool = False
) -> SalvageCounts:
    """Decode the pages ourselves: the last resort when SQLite cannot read the schema, or
    (`union`) a second pass adding keys the logical pass could not reach."""
    counts = SalvageCounts()
    pages = rawpages.RawPages.open(aside, page_size)
    if pages is None:
        return counts
    fresh.execute("BEGIN IMMEDIATE")
    if union:
        streams = {int(row[0]) for row in fresh.execute("SELECT id FROM streams")}
    else:
        found = rawpages.raw_streams(pages)
        for stream_id, (device_id, datastream_id) in found.items():
            with contextlib.suppress(sqlite3.IntegrityError):
                fresh.execute(
                    "INSERT INTO streams (id, device_id, datastream_id) VALUES (?, ?, ?)",
                    (stream_id, device_id, datastream_id),
                )
                counts.streams += 1
        streams = set(found)
    batch: list[tuple[int, int, str]] = []
    orphans: list[tuple[int, int, str]] = []
    for row in rawpages.raw_readings(pages):
        if not _valid_reading(*row):
            continue
        (batch if row[0] in streams else orphans).append(row)
        if len(batch) >= 10_000:
            counts.readings += _insert_salvaged(fresh, batch)
            batch.clear()
    counts.readings += _insert_salvaged(fresh, batch)
    if not union:
        counts.orphaned = _dead_letter_orphans(fresh, orphans)
    fresh.execute("COMMIT")
    return counts


def _dead_letter_orphans(fresh: sqlite3.Connection, orphans: Sequence[tuple[Any, ...]]) -> int:
    """Readings whose stream mapping is gone: kept for the operator, never dropped silently."""
    unique = sorted(set(orphans))
    now_ms = int(time.time() * 1000)
    fresh.executemany(
        "INSERT INTO dead_letters (dead_at_ms, reason, ts_ms, value, topic) VALUES (?, ?, ?, ?, ?)",
        [
            (now_ms, "salvaged_unknown_stream", ts, value, f"stream:{sid}")
            for sid, ts, value in unique
        ],
    )
    return len(unique)


def _safe_rows(
    connection: sqlite3.Connection, sql: str, counts: SalvageCounts
) -> list[tuple[Any, ...]]:
    try:
        return [tuple(row) for row in connection.execute(sql).fetchall()]
    except sqlite3.DatabaseError:
        counts.skipped_ranges += 1
        return []


def _advance_reading_key(key: tuple[Any, ...], step: int) -> tuple[Any, ...] | None:
    """A probe key `step` milliseconds past `key`; beyond any timestamp, the next stream."""
    stream_id, ts_ms = int(key[0]), int(key[1])
    if ts_ms + step < 10**14:
        return (stream_id, ts_ms + step, "")
    # Past the last plausible timestamp: move on by whole streams.
    streams_ahead = max(1, (ts_ms + step) // 10**14)
    if stream_id + streams_ahead > 2**40:
        return None
    return (stream_id + streams_ahead, 0, "")


def _insert_salvaged(fresh: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> int:
    if not rows:
        return 0
    before = fresh.total_changes
    fresh.executemany(
        "INSERT OR IGNORE INTO readings (stream_id, ts_ms, value) VALUES (?, ?, ?)", rows
    )
    return fresh.total_changes - before
