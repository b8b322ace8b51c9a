"""The flush loop's side of the buffer: lease, acknowledge, expire, dead-letter a batch.

`OutflowOps` is mixed into `Store` (buffer.py), which keeps opening the file, running
transactions and appending: everything here is how rows *leave* `readings` again, the
other half of the storage rules in buffer.py's docstring. A lease is held by the caller
only (rule 3), rows are found again by (stream, ts, value) (rule 4), and each way out is
one transaction with its bookkeeping: delivered rows are counted in the quota ledger
(`ledger.py`), undeliverable ones become dead letters (`deadletters.py`), and a sampled
stream's rows leave as the windows they were folded into (`windows.py`). The in-memory
counts follow each commit, and `space_freed` tells ingest a full buffer has room again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.aio import Notifier
from gateway.errors import DiskFull
from gateway.models import Batch, Point, StreamKey
from gateway.store import deadletters, ledger, streams
from gateway.store.disk import PartialAcks
from gateway.store.parts import StoreParts
from gateway.store.sql import changes_many, fetch_one, used_bytes
from gateway.store.staging import Staging
from gateway.store.streams import StreamState
from gateway.store.windows import WindowsDone

# Readings moved to the dead letters per transaction when they expire: the store lock is
# released between chunks, so ingest can commit during a sweep after a long power-off.
EXPIRE_CHUNK = 5000


@dataclass(frozen=True)
class Lease:
    """A batch to upload, and how many readings of its stream expired while it was built."""

    batch: Batch
    expired: int


class OutflowOps(StoreParts):
    """The store's flush-side methods, mixed into `Store`; each runs under the store's lock
    like every read and write (see the module docstring)."""

    page_size: int
    used_bytes: int
    # Announced whenever rows leave the table: ingest listens while the buffer is full.
    space_freed: Notifier
    # Pass-through's hand-over: once closed, unused quota reservations go back (acks).
    staging: Staging
    _partial_acks: PartialAcks  # acks on a full disk, in parts that fit (disk.py)
    _data_version: int  # `PRAGMA data_version` when this connection last looked
    _ledger_day: str | None  # quota days were last pruned on this one

    async def pending_streams(self) -> list[StreamState]:
        """Streams that have buffered readings, in a stable order (for round-robin).

        Every flush pass asks, so this is also where the owner notices rows another process
        committed (`blynk-gateway dead-letters retry`): they are counted and their new
        streams learned here, so they are leased like any other.
        """

        async def read() -> list[StreamState]:
            await self._adopt_external_commits()
            found = await streams.with_readings(self._db)
            self.sampling.buffered = {state.key for state in found}
            return found

        return await self._read(read)

    async def _adopt_external_commits(self) -> None:
        """Under the lock: recount and reload stream ids if another connection committed.

        `PRAGMA data_version` changes only for other connections' commits, so the daemon's
        own writes never cost a recount; it also makes the clean-shutdown count exact again.
        """
        (version,) = await fetch_one(self._db, "PRAGMA data_version")
        if version == self._data_version:
            return
        self._stream_ids = await streams.load(self._db)
        self._stream_keys = {stream_id: key for key, stream_id in self._stream_ids.items()}
        (count,) = await fetch_one(self._db, "SELECT count(*) FROM readings")
        grew = int(count) > self.pending_points
        self.pending_points = int(count)
        self.used_bytes = await used_bytes(self._db, self.page_size)
        self._data_version = version
        if grew:
            self.new_rows.notify()

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
        if self.windowed(stream):  # one point per closed window; always oldest first
            return Lease(*await self._lease_windows(stream, limit, expire_before_ms))
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
            moved = await self._expire_stream(stream_id, expire_before_ms)
            return (moved, await select(stream_id)), lambda: self._rows_left(moved)

        # The common case reads once: only a batch that would carry an expired point pays
        # for the write transaction (older rows beyond a newest-first batch wait their turn).
        expired = 0
        rows = await self._read(read)
        if expire_before_ms is not None and any(row[0] < expire_before_ms for row in rows):
            expired, rows = await self._in_transaction(expire_then_read)
        return Lease(Batch(stream, tuple(map(Point._make, rows))), expired)

    async def ack(self, batch: Batch, day: str) -> None:
        """The cloud accepted the batch: delete it and count it against the day's quota."""
        await self.ack_many([(batch, day)])

    async def ack_many(self, delivered: Sequence[tuple[Batch, str]]) -> None:
        """Several accepted batches (with their quota days) in one transaction.

        Each transaction costs an fsync and a few page writes whatever its size, so a flush
        that uploads several small batches in a pass wears the SD card less by acking them
        together (benchmarks/sd_wear.py: the per-batch acks dominate the steady state).
        On a full disk a transaction must fit into the WAL file as it is: the batches are
        then acked one by one, halved until they fit (`disk.PartialAcks`).
        """
        if not delivered:
            return
        if not self.disk_full:
            try:
                await self._in_transaction(self._ack_work(delivered))
                return
            except DiskFull:
                pass  # the reserve is released now: again, in parts that fit
        for batch, day in delivered:
            await self._partial_acks.ack(
                batch, day, lambda part, day: self._in_transaction(self._ack_work([(part, day)]))
            )

    def _ack_work(
        self, delivered: Sequence[tuple[Batch, str]]
    ) -> Callable[[], Awaitable[tuple[int, Callable[[], None]]]]:
        async def work() -> tuple[int, Callable[[], None]]:
            deleted = 0
            done = WindowsDone()
            for batch, day in delivered:
                deleted += await self._delete_points(batch, done)
                await ledger.count_delivered(
                    self._db, batch.stream.device_id, day, len(batch.points)
                )
            newest_day = max(day for _, day in delivered)
            if newest_day != self._ledger_day:  # the first ack of a day (or since open)
                await ledger.prune_days(self._db)
            give_back = None
            if not self.staging.open and self._reservations.outstanding:
                # pass-through closed: its unused reservations go back in this transaction
                give_back = await self._reservations.give_back(self._db)

            def on_commit() -> None:
                self._batch_gone(deleted, done)
                self._ledger_day = newest_day
                if give_back is not None:
                    self._reservations.given_back(*give_back)

            return deleted, on_commit

        return work

    def _rows_left(self, count: int) -> None:
        self.pending_points -= count
        if count:
            self.space_freed.notify()

    def _batch_gone(self, rows: int, done: WindowsDone) -> None:
        self._rows_left(rows)
        self._windows_committed(done)

    async def _delete_points(
        self, batch: Batch, done: WindowsDone, reason: str | None = None, detail: str | None = None
    ) -> int:
        """Inside a transaction: the rows behind a batch leave the buffer, delivered or (with
        a `reason`) dead-lettered; a window batch's are its windows' raw rows (windows.py)."""
        if batch.window_ms:
            return await self._window_rows_gone(batch, done, reason, detail)
        points = [(point.ts_ms, point.value_json) for point in batch.points]
        if reason is not None:
            await deadletters.add_points(
                self._db, self._clock_ms(), batch.stream, points, reason, detail
            )
        stream_id = self._stream_ids.get(batch.stream)
        if stream_id is None:
            return 0
        return await changes_many(
            self._db,
            "DELETE FROM readings WHERE stream_id = ? AND ts_ms = ? AND value = ?",
            [(stream_id, ts_ms, value) for ts_ms, value in points],
        )

    async def dead_letter(self, batch: Batch, reason: str, detail: str | None = None) -> None:
        """Move points the cloud will never take out of the queue, keeping them for inspection.

        `reason` is a stable code (`expired`, `rejected`); `detail` says what was wrong.
        """

        async def work() -> tuple[int, Callable[[], None]]:
            done = WindowsDone()
            deleted = await self._delete_points(batch, done, reason, detail)
            await self._prune_dead_letters()
            return deleted, lambda: self._batch_gone(deleted, done)

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
                    moved = await self._expire_stream(sid, cutoff_ms, reason)
                    return moved, lambda: self._rows_left(moved)

                moved = await self._in_transaction(work)
                moved_total += moved
                if moved < EXPIRE_CHUNK:
                    break
        return moved_total

    async def _expire_stream(self, stream_id: int, cutoff_ms: int, reason: str = "expired") -> int:
        """Inside a transaction: dead-letter up to EXPIRE_CHUNK readings older than `cutoff_ms`."""
        key = self._stream_keys[stream_id]
        moved = await deadletters.expire(
            self._db, stream_id, key, cutoff_ms, EXPIRE_CHUNK, self._clock_ms, reason
        )
        if moved:
            await self._prune_dead_letters()
        return moved

    async def park(self, stream: StreamKey, reason: str, until_ms: int) -> None:
        """Hold a stream back (its data kept) until `until_ms`, remembering why."""
        await self._write(lambda: streams.park(self._db, stream, reason, until_ms))

    async def unpark(self, stream: StreamKey | None = None) -> None:
        """Release one parked stream, or all of them (after a config reload)."""
        await self._write(lambda: streams.unpark(self._db, stream))
