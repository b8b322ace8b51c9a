"""Read-only views for the operator (`blynk-gateway status`, metrics), the demo and tests."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from gateway.models import StreamKey
from gateway.store import deadletters
from gateway.store.deadletters import ALL, DeadLetter, DeadLetterFilter
from gateway.store.parts import StoreParts
from gateway.store.sql import fetch_one


async def counts(db: aiosqlite.Connection) -> dict[str, int]:
    (readings,) = await fetch_one(db, "SELECT count(*) FROM readings")
    (dead,) = await fetch_one(db, "SELECT count(*) FROM dead_letters")
    (parked,) = await fetch_one(db, "SELECT count(*) FROM streams WHERE parked_reason IS NOT NULL")
    (evicted, refused) = await fetch_one(
        db, "SELECT coalesce(sum(evicted), 0), coalesce(sum(refused), 0) FROM capacity_drops"
    )
    return {
        "buffered": readings,
        "dead_letters": dead,
        "parked_streams": parked,
        "evicted": evicted,
        "refused": refused,
    }


async def capacity_drops(db: aiosqlite.Connection) -> dict[int, tuple[int, int]]:
    rows = await db.execute_fetchall(
        "SELECT device_id, evicted, refused FROM capacity_drops ORDER BY device_id"
    )
    return {int(row[0]): (int(row[1]), int(row[2])) for row in rows}


async def buffered_points(db: aiosqlite.Connection) -> list[tuple[int, int, int, str]]:
    rows = await db.execute_fetchall(
        "SELECT s.device_id, s.datastream_id, r.ts_ms, r.value FROM readings r "
        "JOIN streams s ON s.id = r.stream_id ORDER BY r.stream_id, r.ts_ms, r.value"
    )
    return [(row[0], row[1], row[2], row[3]) for row in rows]


@dataclass(frozen=True, slots=True)
class StreamHead:
    """A stream with buffered readings, as cheap to learn as an index seek per stream."""

    key: StreamKey
    oldest_ts_ms: int
    parked_reason: str | None
    parked_until_ms: int | None


async def stream_heads(db: aiosqlite.Connection) -> list[StreamHead]:
    """Every stream's oldest buffered timestamp: `min(ts_ms)` is a seek on the primary key,
    so this costs the number of streams, not readings (metrics scrape it every few seconds)."""
    rows = await db.execute_fetchall(
        "SELECT device_id, datastream_id, parked_reason, parked_until_ms, oldest FROM "
        "(SELECT s.*, (SELECT min(ts_ms) FROM readings r WHERE r.stream_id = s.id) AS oldest "
        "FROM streams s) WHERE oldest IS NOT NULL ORDER BY device_id, datastream_id"
    )
    return [
        StreamHead(StreamKey(int(row[0]), int(row[1])), int(row[4]), row[2], row[3]) for row in rows
    ]


async def backlog_histogram(
    db: aiosqlite.Connection, bucket_ms: int
) -> list[tuple[StreamKey, int, int]]:
    """(stream, bucket start ms, readings) for every `bucket_ms` of buffered timestamps.

    Reads every row once (the operator's `status`, never the daemon's hot path); what it
    returns is small (streams x buckets), enough to forecast what will expire.
    """
    rows = await db.execute_fetchall(
        "SELECT s.device_id, s.datastream_id, r.ts_ms / ?1 * ?1 AS bucket, count(*) "
        "FROM readings r JOIN streams s ON s.id = r.stream_id "
        "GROUP BY r.stream_id, bucket ORDER BY s.device_id, s.datastream_id, bucket",
        (bucket_ms,),
    )
    return [(StreamKey(int(row[0]), int(row[1])), int(row[2]), int(row[3])) for row in rows]


async def quota_day(db: aiosqlite.Connection, day: str) -> dict[int, tuple[int, bool]]:
    """Per device: (points the cloud accepted on `day`, whether it refused more)."""
    rows = await db.execute_fetchall(
        "SELECT device_id, points, exhausted FROM quota_days WHERE day = ? ORDER BY device_id",
        (day,),
    )
    return {int(row[0]): (int(row[1]), bool(row[2])) for row in rows}


class ReadViews(StoreParts):
    """The store's read-only views, mixed into `Store` (kept here so buffer.py stays about
    moving rows). Each runs under the store's lock through `Store._read`, like every read."""

    path: Path

    async def counts(self) -> dict[str, int]:
        """Row counts the operator cares about (used by status and tests)."""
        return await self._read(lambda: counts(self._db))

    async def capacity_drops(self) -> dict[int, tuple[int, int]]:
        """Per device: (evicted by drop-oldest, refused by drop-newest), since the file began."""
        return await self._read(lambda: capacity_drops(self._db))

    async def buffered_points(self) -> list[tuple[int, int, int, str]]:
        """Every buffered (device, datastream, ts, value) — for tests and the demo only."""
        return await self._read(lambda: buffered_points(self._db))

    async def dead_letters(
        self, limit: int = 100, reason: str | None = None, selection: DeadLetterFilter = ALL
    ) -> list[DeadLetter]:
        """The oldest `limit` dead letters that match (of `reason`, if given)."""
        return await self._read(lambda: deadletters.read(self._db, limit, reason, selection))

    async def dead_letter_counts(self, selection: DeadLetterFilter = ALL) -> dict[str, int]:
        """Dead letters per reason (of those `selection` matches)."""
        return await self._read(lambda: deadletters.count_by_reason(self._db, selection))

    async def stream_heads(self) -> list[StreamHead]:
        """Streams with readings and their oldest timestamp (an index seek each)."""
        return await self._read(lambda: stream_heads(self._db))

    async def backlog_histogram(self, bucket_ms: int) -> list[tuple[StreamKey, int, int]]:
        """(stream, bucket start, readings) per `bucket_ms` of timestamps: reads every row."""
        return await self._read(lambda: backlog_histogram(self._db, bucket_ms))

    async def quota_day(self, day: str) -> dict[int, tuple[int, bool]]:
        """Per device: (points accepted on `day`, refused for the daily limit)."""
        rows = await self._read(lambda: quota_day(self._db, day))
        return {
            device: (points - self.reserved_quota(device, day), exhausted)
            for device, (points, exhausted) in rows.items()
        }

    def file_bytes(self) -> int:
        """The database, its WAL and shared-memory files, as they take space on the disk."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                total += (self.path.parent / (self.path.name + suffix)).stat().st_size
        return total
