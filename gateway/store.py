"""The durable buffer: the only module that speaks SQL.

Storage rules (kept simple on purpose, like litestream's):
1. A reading is acknowledged to the broker only after the transaction holding it commits
   (WAL, `synchronous=FULL` by default, so a commit survives a power cut).
2. Readings leave the `readings` table in exactly three ways, each in one transaction:
   delivered (deleted together with the quota-ledger update), dead-lettered (moved to
   `dead_letters` with a reason), or evicted by the capacity policy (counted).
3. A lease is held in memory only: if the process dies mid-upload the rows are still in
   `readings` and are sent again, so a crash can duplicate a batch but never lose one.
4. `(stream, ts, value)` is unique, so a message the broker redelivers after a crash
   between commit and PUBACK does not become a second point.

`ingest` writes here and `flush` reads here; they never talk to each other directly. The
`new_rows` event is how the flush loop learns that there is something to send.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from gateway.errors import StoreError
from gateway.models import Batch, Point, Reading, StreamKey

SCHEMA_VERSION = 1

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
}

Synchronous = Literal["NORMAL", "FULL", "EXTRA"]


@dataclass(frozen=True, slots=True)
class AppendResult:
    inserted: int
    duplicates: int


@dataclass(frozen=True, slots=True)
class RejectedPayload:
    """An MQTT message that could not become a reading, kept for the operator to inspect."""

    reason: str
    topic: str
    payload: bytes
    device_id: int | None = None
    datastream_id: int | None = None


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


def _wrap(exc: sqlite3.Error) -> StoreError:
    """Name the condition the operator can act on (full disk, read-only fs, I/O)."""
    code = getattr(exc, "sqlite_errorname", "") or ""
    if code.startswith("SQLITE_FULL") or "disk is full" in str(exc):
        return StoreError(f"disk full: {exc}")
    if code.startswith("SQLITE_READONLY") or "readonly" in str(exc):
        return StoreError(f"database is read-only: {exc}")
    return StoreError(f"{code or type(exc).__name__}: {exc}")


class Store:
    """Async facade over one SQLite connection; every operation is one transaction."""

    def __init__(
        self,
        connection: aiosqlite.Connection,
        path: Path,
        clock_ms: Callable[[], int],
    ) -> None:
        self._db = connection
        self.path = path
        self._clock_ms = clock_ms
        self._lock = asyncio.Lock()
        self._stream_ids: dict[StreamKey, int] = {}
        self.pending_points = 0
        self.new_rows = asyncio.Event()

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        synchronous: Synchronous = "FULL",
        clock_ms: Callable[[], int] | None = None,
    ) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            connection = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise _wrap(exc) from exc
        store = cls(connection, path, clock_ms or (lambda: time.time_ns() // 1_000_000))
        try:
            await store._prepare(synchronous)
        except sqlite3.Error as exc:
            await connection.close()
            raise _wrap(exc) from exc
        return store

    async def _prepare(self, synchronous: Synchronous) -> None:
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute(f"PRAGMA synchronous={synchronous}")
        await self._db.execute("PRAGMA busy_timeout=5000")
        await self._db.execute("PRAGMA foreign_keys=OFF")
        await self._migrate()
        for stream_id, device_id, datastream_id in await self._db.execute_fetchall(
            "SELECT id, device_id, datastream_id FROM streams"
        ):
            self._stream_ids[StreamKey(device_id, datastream_id)] = stream_id
        (count,) = await self._fetchone("SELECT count(*) FROM readings")
        self.pending_points = int(count)
        if self.pending_points:
            self.new_rows.set()

    async def _migrate(self) -> None:
        (version,) = await self._fetchone("PRAGMA user_version")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this gateway "
                f"understands ({SCHEMA_VERSION}); upgrade the gateway"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in _MIGRATIONS[target].split(";\n"):
                    if statement.strip():
                        await self._db.execute(statement)
                await self._db.execute(f"PRAGMA user_version={target}")
                await self._db.execute("COMMIT")
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        async with self._lock:
            with contextlib.suppress(sqlite3.Error):
                await self._db.execute("PRAGMA optimize")
            await self._db.close()

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...]:
        async with self._db.execute(sql, params) as cursor:
            row = await cursor.fetchone()
        if row is None:
            raise StoreError(f"no row for {sql!r}")
        return tuple(row)

    async def _in_transaction(self, work: Callable[[], Any]) -> Any:
        """Run `work` inside BEGIN IMMEDIATE/COMMIT, translating SQLite errors."""
        async with self._lock:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = await work()
                    await self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        await self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise _wrap(exc) from exc
            return result

    # ------------------------------------------------------------------ ingest side

    async def append(
        self, readings: Sequence[Reading], rejected: Sequence[RejectedPayload] = ()
    ) -> AppendResult:
        """Commit a group of readings (and bad payloads) in one transaction: one fsync."""

        async def work() -> AppendResult:
            rows = []
            new_streams: dict[StreamKey, int] = {}
            for reading in readings:
                key = StreamKey(reading.device_id, reading.datastream_id)
                stream_id = self._stream_ids.get(key) or new_streams.get(key)
                if stream_id is None:
                    stream_id = await self._create_stream(key)
                    new_streams[key] = stream_id
                rows.append((stream_id, reading.ts_ms, reading.value_json))
            before = self._db.total_changes
            if rows:
                await self._db.executemany(
                    "INSERT OR IGNORE INTO readings (stream_id, ts_ms, value) VALUES (?, ?, ?)",
                    rows,
                )
            inserted = self._db.total_changes - before
            if rejected:
                await self._insert_rejected(rejected)
            self._stream_ids.update(new_streams)
            return AppendResult(inserted=inserted, duplicates=len(rows) - inserted)

        result: AppendResult = await self._in_transaction(work)
        self.pending_points += result.inserted
        if result.inserted:
            self.new_rows.set()
        return result

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
            "payload) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (now_ms, item.reason, item.device_id, item.datastream_id, item.topic, item.payload)
                for item in rejected
            ],
        )

    # ------------------------------------------------------------------ flush side

    async def pending_streams(self) -> list[StreamState]:
        """Streams that have buffered readings, in a stable order (for round-robin)."""
        async with self._lock:
            rows = await self._db.execute_fetchall(
                "SELECT device_id, datastream_id, parked_reason, parked_until_ms FROM streams s "
                "WHERE EXISTS (SELECT 1 FROM readings r WHERE r.stream_id = s.id) ORDER BY s.id"
            )
        return [StreamState(StreamKey(row[0], row[1]), row[2], row[3]) for row in rows]

    async def lease(self, stream: StreamKey, limit: int, newest_first: bool = False) -> Batch:
        """The next `limit` readings of a stream, oldest (or newest) first.

        The lease lives only in the caller: until `ack` or `dead_letter`, the rows stay in
        the table and a crash makes them eligible again.
        """
        stream_id = self._stream_ids.get(stream)
        if stream_id is None or limit <= 0:
            return Batch(stream, ())
        direction = "DESC" if newest_first else "ASC"
        async with self._lock:
            rows = await self._db.execute_fetchall(
                "SELECT id, ts_ms, value FROM readings WHERE stream_id = ? "
                f"ORDER BY ts_ms {direction}, value {direction} LIMIT ?",
                (stream_id, limit),
            )
        return Batch(stream, tuple(Point(row[0], row[1], row[2]) for row in rows))

    async def ack(self, batch: Batch, day: str) -> None:
        """The cloud accepted the batch: delete it and count it against the day's quota."""

        async def work() -> int:
            deleted = await self._delete_points(batch.points)
            await self._db.execute(
                "INSERT INTO quota_days (device_id, day, points) VALUES (?, ?, ?) "
                "ON CONFLICT (device_id, day) DO UPDATE SET points = points + excluded.points",
                (batch.stream.device_id, day, len(batch.points)),
            )
            return deleted

        deleted: int = await self._in_transaction(work)
        self.pending_points -= deleted

    async def _delete_points(self, points: Iterable[Point]) -> int:
        before = self._db.total_changes
        await self._db.executemany(
            "DELETE FROM readings WHERE id = ?", [(point.row_id,) for point in points]
        )
        return self._db.total_changes - before

    async def dead_letter(self, batch: Batch, reason: str) -> None:
        """Move points the cloud will never take out of the queue, keeping them for inspection."""
        now_ms = self._clock_ms()

        async def work() -> int:
            await self._db.executemany(
                "INSERT INTO dead_letters (dead_at_ms, reason, device_id, datastream_id, ts_ms, "
                "value) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        now_ms,
                        reason,
                        batch.stream.device_id,
                        batch.stream.datastream_id,
                        point.ts_ms,
                        point.value_json,
                    )
                    for point in batch.points
                ],
            )
            return await self._delete_points(batch.points)

        deleted: int = await self._in_transaction(work)
        self.pending_points -= deleted

    async def expire(self, cutoff_ms: int, reason: str = "expired") -> int:
        """Dead-letter every reading older than `cutoff_ms`: the cloud would refuse it.

        Walks the covering index per stream, so the cost is the rows moved, not the table.
        """
        now_ms = self._clock_ms()

        async def work() -> int:
            moved = 0
            for stream_id in list(self._stream_ids.values()):
                await self._db.execute(
                    "INSERT INTO dead_letters (dead_at_ms, reason, device_id, datastream_id, "
                    "ts_ms, value) SELECT ?, ?, s.device_id, s.datastream_id, r.ts_ms, r.value "
                    "FROM readings r JOIN streams s ON s.id = r.stream_id "
                    "WHERE r.stream_id = ? AND r.ts_ms < ?",
                    (now_ms, reason, stream_id, cutoff_ms),
                )
                before = self._db.total_changes
                await self._db.execute(
                    "DELETE FROM readings WHERE stream_id = ? AND ts_ms < ?", (stream_id, cutoff_ms)
                )
                moved += self._db.total_changes - before
            return moved

        moved: int = await self._in_transaction(work)
        self.pending_points -= moved
        return moved

    async def park(self, stream: StreamKey, reason: str, until_ms: int) -> None:
        """Hold a stream back (its data kept) until `until_ms`, remembering why."""

        async def work() -> None:
            await self._db.execute(
                "UPDATE streams SET parked_reason = ?, parked_until_ms = ? "
                "WHERE device_id = ? AND datastream_id = ?",
                (reason, until_ms, stream.device_id, stream.datastream_id),
            )

        await self._in_transaction(work)

    async def unpark(self, stream: StreamKey | None = None) -> None:
        """Release one parked stream, or all of them (after a config reload)."""

        async def work() -> None:
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

        await self._in_transaction(work)

    # ------------------------------------------------------------------ quota ledger

    async def points_sent(self, device_id: int, day: str) -> tuple[int, bool]:
        """(points the cloud accepted for the device on `day`, whether it refused more)."""
        async with self._lock:
            rows = await self._db.execute_fetchall(
                "SELECT points, exhausted FROM quota_days WHERE device_id = ? AND day = ?",
                (device_id, day),
            )
        for points, exhausted in rows:
            return int(points), bool(exhausted)
        return 0, False

    async def mark_exhausted(self, device_id: int, day: str) -> None:
        """The cloud refused the device for its daily limit: do not try again that day."""

        async def work() -> None:
            await self._db.execute(
                "INSERT INTO quota_days (device_id, day, exhausted) VALUES (?, ?, 1) "
                "ON CONFLICT (device_id, day) DO UPDATE SET exhausted = 1",
                (device_id, day),
            )

        await self._in_transaction(work)

    # ------------------------------------------------------------------ inspection

    async def dead_letters(self, limit: int = 100, reason: str | None = None) -> list[DeadLetter]:
        where, params = ("WHERE reason = ?", (reason, limit)) if reason else ("", (limit,))
        async with self._lock:
            rows = await self._db.execute_fetchall(
                "SELECT id, dead_at_ms, reason, device_id, datastream_id, ts_ms, value, topic "
                f"FROM dead_letters {where} ORDER BY id LIMIT ?",
                params,
            )
        return [DeadLetter(*row) for row in rows]

    async def counts(self) -> dict[str, int]:
        """Row counts the operator cares about (used by status and tests)."""
        async with self._lock:
            (readings,) = await self._fetchone("SELECT count(*) FROM readings")
            (dead,) = await self._fetchone("SELECT count(*) FROM dead_letters")
            (parked,) = await self._fetchone(
                "SELECT count(*) FROM streams WHERE parked_reason IS NOT NULL"
            )
        return {"buffered": readings, "dead_letters": dead, "parked_streams": parked}

    async def buffered_points(self) -> list[tuple[int, int, int, str]]:
        """Every buffered (device, datastream, ts, value) — for tests and the demo only."""
        async with self._lock:
            rows = await self._db.execute_fetchall(
                "SELECT s.device_id, s.datastream_id, r.ts_ms, r.value FROM readings r "
                "JOIN streams s ON s.id = r.stream_id ORDER BY r.id"
            )
        return [(row[0], row[1], row[2], row[3]) for row in rows]
