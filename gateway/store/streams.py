"""The `streams` table: one row per (device, datastream), the small integer id its readings
carry, and whether the flush loop holds it back (parked) and why."""

from __future__ import annotations

from dataclasses import dataclass

import aiosqlite

from gateway.errors import StoreError
from gateway.models import StreamKey


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
