"""Read-only views for the operator (`blynk-gateway status`), the demo and the tests."""

from __future__ import annotations

import aiosqlite

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
