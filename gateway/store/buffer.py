"""The durable buffer: `Store`, one SQLite connection, every operation one transaction.

Storage rules (kept simple on purpose, like litestream's):
1. A reading is acknowledged to the broker only after the transaction holding it commits
   (WAL, `synchronous=FULL` by default, so a commit survives a power cut).
2. Readings leave the `readings` table in exactly three ways, each in one transaction:
   delivered (deleted together with the quota-ledger update, `ledger.py`), dead-lettered
   (moved to `dead_letters` with a reason, `deadletters.py`), or evicted by the capacity
   policy (counted per device, `capacity.py`).
3. A lease is held in memory only: if the process dies mid-upload the rows are still in
   `readings` and are sent again, so a crash can duplicate a batch but never lose one.
4. `(stream, ts, value)` is the primary key, so a message the broker redelivers after a
   crash between commit and PUBACK does not become a second point. Rows are identified by
   that key, not by a row id, so a lease stays valid even across a salvage of the file.
5. Capacity is enforced on every append, in the same transaction, from an in-memory row
   count and the file's page counts, never by scanning the table (`capacity.py`).
6. A damaged file never stops the gateway: the owner (the daemon) moves it aside, salvages
   every row it can still read into a fresh file, logs `buffer_corrupt`, and carries on
   (`recovery.py`, `rawpages.py`). Long work (salvage, upgrade, full check) reports its
   progress to the owner's `LongWorkObserver` (`progress.py`): systemd must not kill it.
7. A full disk must not stop uploads: a commit that extends the file needs room for its
   checkpoint, and the owner keeps a reserve sized to the disk to release when it fills,
   so deletes can always be written (`disk.py`).

`ingest` writes here and `flush` reads here; they never talk to each other directly. The
`new_rows` notifier is how the flush loop learns that there is something to send, and
`space_freed` is how ingest learns that a full buffer has room again.

This module opens the file, runs the transactions and appends; the flush loop's side
(lease, ack, expire, dead-letter) is the `OutflowOps` mixin (`outflow.py`), and what all
of `Store`'s mixins share is declared once in `parts.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import aiosqlite

from gateway.aio import Notifier, uncancelled
from gateway.clock import read_boot_id
from gateway.errors import DiskFull, StoreCorrupt, StoreError, UnstorableValue
from gateway.log import get_logger
from gateway.models import ProvisionalReading, Reading, StreamKey
from gateway.store import (
    deadletters,
    files,
    provisional,
    recovery,
    schema,
    streams,
    windows,
)
from gateway.store.arrivals import Arrivals
from gateway.store.bindable import BINDING_ERRORS
from gateway.store.capacity import Capacity, CapacityPolicy, Row
from gateway.store.deadletters import (
    DeadLetterOps,
    RejectedPayload,
)
from gateway.store.disk import DiskGuard, PartialAcks, StoreFault
from gateway.store.inspection import ReadViews
from gateway.store.ledger import QuotaLedger
from gateway.store.outflow import OutflowOps
from gateway.store.progress import LongWorkObserver
from gateway.store.provisional import HeldRow, ProvisionalOps
from gateway.store.quota_journal import QuotaJournal
from gateway.store.rawpages import check_header
from gateway.store.recovery import SalvageReport, is_corruption, store_error
from gateway.store.reservations import QuotaReservations
from gateway.store.schema import DEFAULT_PAGE_SIZE
from gateway.store.sql import fetch_one, used_bytes
from gateway.store.staging import Staging
from gateway.store.streams import AcceptedStreams
from gateway.store.windows import SamplingState, WindowOps

log = get_logger("store")

Synchronous = Literal["NORMAL", "FULL", "EXTRA"]

T = TypeVar("T")


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
    late: int = 0  # for windows already closed: dead-lettered (windows.py)
    # of `inserted`: held for the clock (provisional.py), not in the upload queue yet
    held: int = 0


class Store(
    QuotaLedger,
    DeadLetterOps,
    ReadViews,
    AcceptedStreams,
    WindowOps,
    ProvisionalOps,
    OutflowOps,
):
    """Async facade over one SQLite connection; every operation is one transaction."""

    def __init__(
        self,
        path: Path,
        *,
        clock_ms: Callable[[], int],
        capacity: Capacity,
        synchronous: Synchronous,
        owner: bool,
        page_size: int,
        monotonic: Callable[[], float],
        long_work: LongWorkObserver | None,
        boot_id: str,
        quota_journal: Path | None = None,
    ) -> None:
        self.path = path
        self._long_work = long_work
        self._db: aiosqlite.Connection
        self._clock_ms = clock_ms
        self._capacity = capacity
        self._synchronous = synchronous
        self._owner = owner
        self._new_page_size = page_size
        self._lock = asyncio.Lock()
        self._stream_ids: dict[StreamKey, int] = {}
        self._stream_keys: dict[int, StreamKey] = {}
        self.pending_points = 0
        # Readings held for the clock, this boot's and earlier ones' (provisional.py).
        self.provisional_points = 0
        self.boot_id = boot_id
        self._boot_row: int | None = None
        self.boot_offset_ms: int | None = None
        # Announced after every commit that added rows: the flush loop listens.
        self.new_rows = Notifier()
        # Announced whenever rows leave the table: ingest listens while the buffer is full.
        self.space_freed = Notifier()
        self.page_size = page_size
        self.used_bytes = 0
        self._policy = CapacityPolicy(capacity, clock_ms, monotonic)
        self._pruned_log = deadletters.PruneReporter(capacity.max_dead_letters, clock=monotonic)
        self._pruned = 0  # dead letters pruned by the transaction under way
        self._ledger_day: str | None = None  # quota days were last pruned on this one
        # Pass-through: readings offered for upload before any write (see staging.py).
        self.staging = Staging()
        self.arrivals = Arrivals()  # on the flush loop's clock, not `monotonic`
        journal = None
        if owner and quota_journal is not None:
            journal = QuotaJournal(quota_journal, boot_id)
        self._reservations = QuotaReservations(journal)
        self.sampling = SamplingState(started_ms=clock_ms())  # windows.py
        self._disk = DiskGuard(path, capacity.disk_reserve_bytes, owner=owner)
        self._partial_acks = PartialAcks()
        self._clean_record = False
        self._data_version = 0
        self.recovery: SalvageReport | None = None
        self.started_clean = False
        self.open_ms = 0.0

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
        monotonic: Callable[[], float] | None = None,
        long_work: LongWorkObserver | None = None,
        stop: asyncio.Event | None = None,
        boot_id: str | None = None,
        quota_journal: Path | None = None,
    ) -> Store:
        """Open (creating or upgrading) the buffer.

        `owner=True` is the daemon: only the owner writes the clean-shutdown record and
        recovers a damaged file (moving it aside while `status` reads it would be wrong).
        Anyone else gets `StoreCorrupt`. The owner also waits for room on a disk too full to
        open the file until `stop` is set (`DiskGuard.connect_when_room`). `monotonic`
        paces the summary log lines (tests inject one). `long_work` hears how a salvage, an
        upgrade or the full check progresses, here and for as long as the store is open.
        `boot_id` keys the readings held for the clock (the kernel's, gateway/clock.py,
        unless a test gives one). `quota_journal` is the owner's RAM file of unused
        pass-through reservations (quota_journal.py): what a crash left there is given
        back here.
        """
        started = time.perf_counter()
        await asyncio.to_thread(files.prepare_buffer_path, path, owner=owner)
        store = cls(
            path,
            clock_ms=clock_ms or (lambda: time.time_ns() // 1_000_000),
            capacity=capacity or Capacity(),
            synchronous=synchronous,
            owner=owner,
            page_size=page_size,
            monotonic=monotonic or time.monotonic,
            long_work=long_work,
            boot_id=boot_id or read_boot_id() or "unknown",
            quota_journal=quota_journal,
        )
        await asyncio.to_thread(store._disk.open_reserve)
        try:
            await store._disk.connect_when_room(store._connect, stop, long_work)
        except StoreCorrupt as exc:
            if not owner:
                raise
            report = await asyncio.to_thread(
                recovery.recover_file, path, str(exc), page_size, long_work
            )
            await store._connect()
            store.recovery = report
            report.emit(buffered=store.pending_points)
        store.started_clean = store._clean_record
        await store._disk.size_reserve(store._db, store.page_size)
        if owner:
            await store.recover_reservations()
        store.open_ms = (time.perf_counter() - started) * 1000
        return store

    async def _connect(self) -> None:
        problem = await asyncio.to_thread(check_header, self.path)
        if problem is not None:
            raise StoreCorrupt(problem)
        try:
            await asyncio.to_thread(
                schema.prepare_file, self.path, self._new_page_size, self._long_work
            )
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise store_error(exc) from exc
        try:
            await self._prepare()
        except (sqlite3.Error, StoreError) as exc:
            with contextlib.suppress(sqlite3.Error):
                await self._db.close()
            if isinstance(exc, sqlite3.Error):
                raise store_error(exc) from exc
            raise

    async def _prepare(self) -> None:
        db = self._db
        await db.execute(f"PRAGMA synchronous={self._synchronous}")
        await db.execute("PRAGMA busy_timeout=5000")
        await db.execute("PRAGMA foreign_keys=OFF")
        (self.page_size,) = await fetch_one(db, "PRAGMA page_size")
        self._stream_ids = await streams.load(db)
        self._stream_keys = {stream_id: key for key, stream_id in self._stream_ids.items()}
        rows = await db.execute_fetchall("SELECT value FROM meta WHERE key = 'pending_points'")
        clean = [int(row[0]) for row in rows]
        # The last owner closed cleanly and nobody wrote since: no need to count.
        self._clean_record = bool(clean)
        if clean:
            self.pending_points = clean[0]
        else:
            # One opcode reading every leaf page, so SQLite reports no progress: at start
            # (before READY=1, under TimeoutStartSec=), or on a file a salvage just wrote.
            (count,) = await fetch_one(db, "SELECT count(*) FROM readings")
            self.pending_points = int(count)
        self.provisional_points = await provisional.count(db)
        await recovery.probe(db, self._stream_keys)
        await windows.load(db, self._stream_keys, self.sampling)
        (self._data_version,) = await fetch_one(db, "PRAGMA data_version")
        self.used_bytes = await used_bytes(db, self.page_size)
        await self._disk.connected(db, self.page_size)

    async def close(self) -> None:
        """Close; the owner also records the row count and lets SQLite refresh its stats.

        Others (`blynk-gateway status` next to a running daemon) write nothing.
        """
        async with self._lock:
            self._pruned_log.flush()
            if self._owner:
                with contextlib.suppress(sqlite3.Error):
                    await self._give_back_reservations()
                    self._reservations.close()
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("PRAGMA optimize")
                with contextlib.suppress(sqlite3.Error):
                    await self._write_clean_record()
            await self._db.close()
            self._disk.close()

    async def _write_clean_record(self) -> None:
        """Remember the exact row count, so the next start need not count a big backlog.

        Only the owner writes it, and only if no other connection committed anything since
        it opened (`PRAGMA data_version` unchanged): then our in-memory count is exact.
        """
        (data_version,) = await fetch_one(self._db, "PRAGMA data_version")
        if data_version != self._data_version:
            return
        await self._db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('pending_points', ?)",
            (self.pending_points,),
        )

    async def set_trace_callback(self, callback: Callable[[str], None] | None) -> None:
        """Show every SQL statement as SQLite runs it (tests, debugging); None stops it.

        The callback runs in the connection's worker thread.
        """
        await self._db.set_trace_callback(cast(Any, callback))  # None is sqlite3's "off"

    # ------------------------------------------------------------------ running SQL

    async def _read(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run a read under the lock; a damaged file is recovered and the read retried once."""
        for attempt in (1, 2):
            async with self._lock:
                try:
                    return await work()
                except sqlite3.Error as exc:
                    if attempt == 1 and self._owner and is_corruption(exc):
                        await self._recover_locked(f"{type(exc).__name__}: {exc}")
                        continue
                    raise store_error(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _in_transaction(
        self, work: Callable[[], Awaitable[tuple[T, Callable[[], None] | None]]]
    ) -> T:
        """Run `work` inside BEGIN IMMEDIATE/COMMIT, translating SQLite errors.

        `work` returns (result, on_commit): in-memory state is only touched by `on_commit`
        after COMMIT succeeded, so a failed commit (disk full) leaves no trace in memory.
        Once COMMIT is issued, cancelling the caller waits for it and `on_commit` first
        (the shutdown cancels the flush loop mid-ack). A damaged file is recovered and the
        transaction retried once.
        """
        for attempt in (1, 2):
            async with self._lock:
                try:
                    await self._db.execute("BEGIN IMMEDIATE")
                    self._pruned = 0
                    try:
                        if self._clean_record:
                            # The file is about to change: the recorded count goes stale.
                            await self._db.execute("DELETE FROM meta WHERE key = 'pending_points'")
                        result, on_commit = await work()
                        await self._disk.check_commit(self._db, self.page_size)
                        await uncancelled(self._commit(on_commit))
                    except BaseException:
                        # Even if the connection is not in a transaction yet: a cancelled
                        # BEGIN may still be queued on its thread, and must not stay open.
                        with contextlib.suppress(sqlite3.Error):
                            await self._db.execute("ROLLBACK")
                        raise
                except sqlite3.Error as exc:
                    if attempt == 1 and self._owner and is_corruption(exc):
                        await self._recover_locked(f"{type(exc).__name__}: {exc}")
                        continue
                    error = store_error(exc)
                    if isinstance(error, DiskFull):
                        await self._disk.enter_full(
                            self._db, str(exc), buffered=self.pending_points
                        )
                    raise error from exc
                except DiskFull as exc:  # refused by the commit guard, nothing written
                    await self._disk.enter_full(self._db, str(exc), buffered=self.pending_points)
                    raise
                await self._disk.committed(self._db, self.page_size)
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _commit(self, on_commit: Callable[[], None] | None) -> None:
        """COMMIT, then mirror it in memory: one step (`aio.uncancelled`), never half of it."""
        await self._db.execute("COMMIT")
        self._clean_record = False
        if on_commit is not None:
            on_commit()
        self._pruned_log.pruned(self._pruned)

    async def _write(self, work: Callable[[], Awaitable[object]]) -> None:
        """A transaction that changes nothing held in memory."""

        async def run() -> tuple[None, None]:
            await work()
            return None, None

        await self._in_transaction(run)

    async def _prune_dead_letters(self) -> None:
        """Inside a transaction: keep the newest `max_dead_letters` (logged after COMMIT)."""
        self._pruned += await deadletters.prune(self._db, self._capacity.max_dead_letters)

    # ------------------------------------------------------------------ full disk

    @property
    def disk_full(self) -> bool:
        """The filesystem filled up: appends go only into pages that uploads have freed."""
        return self._disk.full

    async def inject_fault(self, fault: StoreFault) -> None:
        """Fault switch for tests and drills, like the sandbox cloud's.

        "read-only" fails every write as on a read-only filesystem, "full" keeps the file
        from growing as on a full disk, "none" clears both.
        """
        async with self._lock:
            await self._disk.inject_fault(self._db, fault)

    # ------------------------------------------------------------------ ingest side

    def limit(self) -> int:
        """The row limit in force: `max_points`, or less while the byte cap applies."""
        return self._policy.limit()

    async def append(
        self,
        readings: Sequence[Reading],
        rejected: Sequence[RejectedPayload] = (),
        kept: Mapping[StreamKey, tuple[int, str]] | None = None,
    ) -> AppendResult:
        """Commit a group of readings (and bad payloads) in one transaction: one fsync.

        Applies the capacity policy in the same transaction, so what was acknowledged is
        exactly what is stored, plus what the policy dropped (counted, logged).
        Raises `BufferFull` (backpressure), `DiskFull` or `StoreError` (read-only, I/O):
        nothing was stored and the caller must not acknowledge. Raises `UnstorableValue`
        when a value cannot be bound (an id beyond 64 bits): nothing was stored either, and
        retrying the same rows would fail the same way (see `bindable.py`).
        `kept`: each deadband stream's last kept reading. Readings for closed windows are
        dead-lettered as late here, under the lock: none joins a window being sent.
        """
        # Readings held for the clock are in the buffer too (and leave it only by moving).
        held_points = self.provisional_points
        self._policy.check_room(self.pending_points + held_points, len(readings))
        if self.disk_full:
            async with self._lock:
                room = await self._disk.room_for(
                    self._db,
                    len(readings) + len(rejected),
                    page_size=self.page_size,
                    buffered=self.pending_points,
                )
            if not room:
                raise DiskFull("disk full: waiting for uploads or the operator to free space")

        async def work() -> tuple[AppendResult, Callable[[], None]]:
            try:
                return await insert()
            except BINDING_ERRORS as exc:  # raised before SQLite wrote the row
                raise UnstorableValue(f"{type(exc).__name__}: {exc}") from exc

        async def insert() -> tuple[AppendResult, Callable[[], None]]:
            rows: list[Row] = []
            held: list[HeldRow] = []
            new_streams: dict[StreamKey, int] = {}
            per_stream: Counter[StreamKey] = Counter()  # arrivals, for pacing.py

            async def stream_id_of(key: StreamKey) -> int:
                stream_id = self._stream_ids.get(key) or new_streams.get(key)
                if stream_id is None:
                    stream_id = new_streams[key] = await streams.create(self._db, key)
                return stream_id

            stored, late = self.sampling.split_late(readings)
            touched: set[StreamKey] = set()
            for reading in stored:
                key = StreamKey(reading.device_id, reading.datastream_id)
                touched.add(key)
                stream_id = self._stream_ids.get(key) or new_streams.get(key)
                if stream_id is None:
                    stream_id = await stream_id_of(key)
                ts_ms = reading.ts_ms
                if type(reading) is ProvisionalReading:  # a boottime: held for the clock
                    if self.boot_offset_ms is None:
                        held.append((stream_id, ts_ms, reading.value_json))
                        continue
                    ts_ms += self.boot_offset_ms  # the clock became trusted meanwhile
                rows.append((stream_id, ts_ms, reading.value_json))
                per_stream[key] += 1
            if late:
                await windows.add_late(self._db, self._clock_ms(), late, self.sampling)
            sampled = await self._write_sampling(touched, kept or {}, stream_id_of)
            inserted, duplicates, refused = await self._policy.insert(
                self._db, rows, self.pending_points + held_points
            )
            held_in, boot = await self._hold(held) if held else (0, self._boot_row)
            if rejected:
                await deadletters.add_rejected(self._db, self._clock_ms(), rejected)
                await self._prune_dead_letters()
            known = {**self._stream_keys, **{sid: key for key, sid in new_streams.items()}}
            drops = await self._policy.make_room(
                self._db,
                buffered=self.pending_points + held_points + held_in + inserted,
                page_size=self.page_size,
                stream_ids=sorted(known),
                device_of=lambda stream_id: known[stream_id].device_id,
                refused_rows=refused,
            )
            result = AppendResult(
                inserted=inserted + held_in,
                duplicates=duplicates + len(held) - held_in,
                evicted=sum(drops.evicted.values()),
                refused=len(refused),
                evicted_by_device=drops.evicted,
                refused_by_device=drops.refused,
                late=len(late),
                held=held_in,
            )

            def on_commit() -> None:
                for key, stream_id in new_streams.items():
                    self._stream_ids[key] = stream_id
                    self._stream_keys[stream_id] = key
                sampled()
                self.pending_points += inserted - result.evicted
                self.provisional_points += held_in
                self._boot_row = boot
                self.used_bytes = drops.used_bytes
                self._policy.committed(drops, buffered=self.pending_points)
                if inserted:
                    self.arrivals.note(per_stream)
                    self.new_rows.notify()

            return result, on_commit

        return await self._in_transaction(work)

    # ------------------------------------------------------------------ integrity

    async def verify(self) -> bool:
        """Full `PRAGMA quick_check` on a second connection; recover the file if it fails.

        O(file size), so the daemon runs it in the background after start-up: WAL lets it
        read a snapshot while ingest and flush keep writing. Returns True if the file was ok.
        """
        started = time.perf_counter()
        try:
            problems = await asyncio.to_thread(recovery.quick_check, self.path, self._long_work)
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
        """Swap a damaged file for a salvaged one under the caller's lock (owner only).

        Runs to its end even if the caller is cancelled meanwhile (shutdown cancels the
        background `verify`): stopped half-way, the store would have no open connection.
        """
        await uncancelled(self._swap_for_salvaged(error))

    async def _swap_for_salvaged(self, error: str) -> None:
        with contextlib.suppress(sqlite3.Error, ValueError):
            await self._db.close()
        report = await asyncio.to_thread(
            recovery.recover_file, self.path, error, self.page_size, self._long_work
        )
        await self._connect()
        self._policy.byte_cap = None
        self.recovery = report
        report.emit(buffered=self.pending_points)
        self.space_freed.notify()
