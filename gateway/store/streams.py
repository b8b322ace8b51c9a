"""The `streams` table: one row per (device, datastream), the small integer id its readings
carry, and whether the flush loop holds it back (parked) and why; and `accepted_streams`,
the streams the cloud has accepted a batch of."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

import aiosqlite

from gateway.errors import StoreError
from gateway.models import StreamKey
from gateway.store.parts import StoreParts


@dataclass(frozen=True, slots=True)
class StreamState:
    key: StreamKey
    parked_reason: str | None
    parked_until_ms: int | None


async def load(db: aiosqlite.Connection) -> dict[StreamKey, int]:
    """Every stream's id."""
    rows = await db.execute_fetchall("SELECT id, device_id, datastream_id FROM streams")
    return {StreamKey(device_id, datastream_id): id_ for id_, device_id, datastream_id in rows}


async def create(db: aiosqlite.Connection, key: StreamKey) -> int:
    """The stream's id, registering it if it is new (inside the caller's transaction)."""
    async with db.execute(
        "INSERT INTO streams (device_id, datastream_id) VALUES (?, ?) "
        "ON CONFLICT (device_id, datastream_id) DO UPDATE SET device_id = excluded.device_id "
        "RETURNING id",
        (key.device_id, key.datastream_id),
    ) as cursor:
        row = await cursor.fetchone()
    if row is None:
        raise StoreError(f"could not register stream {key}")
    return int(row[0])


async def with_readings(db: aiosqlite.Connection) -> list[StreamState]:
    """Streams that have buffered readings, by id (a stable order for round-robin)."""
    rows = await db.execute_fetchall(
        "SELECT device_id, datastream_id, parked_reason, parked_until_ms FROM streams s "
        "WHERE EXISTS (SELECT 1 FROM readings r WHERE r.stream_id = s.id) ORDER BY s.id"
    )
    return [StreamState(StreamKey(row[0], row[1]), row[2], row[3]) for row in rows]


async def park(db: aiosqlite.Connection, stream: StreamKey, reason: str, until_ms: int) -> None:
    await db.execute(
        "UPDATE streams SET parked_reason = ?, parked_until_ms = ? "
        "WHERE device_id = ? AND datastream_id = ?",
        (reason, until_ms, stream.device_id, stream.datastream_id),
    )


async def unpark(db: aiosqlite.Connection, stream: StreamKey | None) -> None:
    """Release one parked stream, or all of them."""
    where = "parked_reason IS NOT NULL"
    params: tuple[int, ...] = ()
    if stream is not None:
        where = "device_id = ? AND datastream_id = ?"
        params = (stream.device_id, stream.datastream_id)
    await db.execute(
        f"UPDATE streams SET parked_reason = NULL, parked_until_ms = NULL WHERE {where}",
        params,
    )


async def accepted(db: aiosqlite.Connection) -> set[StreamKey]:
    """Every stream the cloud has accepted a batch of (schema v4, `accepted_streams`)."""
    rows = await db.execute_fetchall("SELECT device_id, datastream_id FROM accepted_streams")
    return {StreamKey(device_id, datastream_id) for device_id, datastream_id in rows}


async def mark_accepted(db: aiosqlite.Connection, keys: Iterable[StreamKey]) -> None:
    """Remember streams the cloud accepted (inside the caller's transaction)."""
    await db.executemany(
        "INSERT OR IGNORE INTO accepted_streams (device_id, datastream_id) VALUES (?, ?)",
        [(key.device_id, key.datastream_id) for key in keys],
    )


class AcceptedStreams(StoreParts):
    """The store's memory of which streams the cloud accepted, mixed into `Store`.

    The flush loop keeps the set in memory (one entry per real stream: only the cloud's
    acceptance adds one, so junk topics cannot grow it) and writes each new entry once.
    """

    async def accepted_streams(self) -> set[StreamKey]:
        return await self._read(lambda: accepted(self._db))

    async def mark_accepted(self, keys: Collection[StreamKey]) -> None:
        """One transaction for all of `keys` (a no-op for none)."""
        if keys:
            await self._write(lambda: mark_accepted(self._db, keys))
