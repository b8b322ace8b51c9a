"""The quota ledger: points the cloud accepted per device per day, and days it refused more.

The day is the quota day in the configured zone (an ISO date, `DailyQuota.day_of`). The
flush loop only asks about today, so only the newest QUOTA_DAYS_KEPT days are kept.
"""

from __future__ import annotations

import aiosqlite

from gateway.store.sql import changes

# Distinct days kept: today and a margin for clock steps and zone changes.
QUOTA_DAYS_KEPT = 7


async def count_delivered(db: aiosqlite.Connection, device_id: int, day: str, points: int) -> None:
    await db.execute(
        "INSERT INTO quota_days (device_id, day, points) VALUES (?, ?, ?) "
        "ON CONFLICT (device_id, day) DO UPDATE SET points = points + excluded.points",
        (device_id, day, points),
    )


async def points_sent(db: aiosqlite.Connection, device_id: int, day: str) -> tuple[int, bool]:
    rows = await db.execute_fetchall(
        "SELECT points, exhausted FROM quota_days WHERE device_id = ? AND day = ?",
        (device_id, day),
    )
    for points, exhausted in rows:
        return int(points), bool(exhausted)
    return 0, False


async def mark_exhausted(db: aiosqlite.Connection, device_id: int, day: str) -> None:
    await db.execute(
        "INSERT INTO quota_days (device_id, day, exhausted) VALUES (?, ?, 1) "
        "ON CONFLICT (device_id, day) DO UPDATE SET exhausted = 1",
        (device_id, day),
    )


async def prune_days(db: aiosqlite.Connection, keep: int = QUOTA_DAYS_KEPT) -> int:
    """Forget all but the newest `keep` days on record (by day, not by the clock: a clock
    that jumps ahead for a moment costs one kept day, not today's count)."""
    return await changes(
        db,
        "DELETE FROM quota_days WHERE day < (SELECT day FROM "
        "(SELECT DISTINCT day FROM quota_days ORDER BY day DESC LIMIT 1 OFFSET ?))",
        (keep - 1,),
    )
