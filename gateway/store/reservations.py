"""Quota taken ahead for pass-through uploads, written to the ledger in chunks.

The ledger must count a point before the cloud can accept it, or a crash right after an
upload would forget it and the next day's arithmetic would overshoot the quota. Writing the
ledger before every pass-through request would cost a transaction per request (the wear
pass-through avoids), so points are reserved in chunks: one ledger write per
`RESERVE_CHUNK` points. A clean shutdown gives back what was reserved and not used; after
a crash it stays counted, which can only make the gateway send less than the quota, never
more.
"""

from __future__ import annotations

import aiosqlite

from gateway.store import ledger

# Points reserved per ledger write (capped by what is left of the day's quota).
RESERVE_CHUNK = 500


class QuotaReservations:
    """Reserved-but-unused points per (device, day), kept in memory by the owner."""

    def __init__(self, chunk: int = RESERVE_CHUNK) -> None:
        self.chunk = chunk
        self._left: dict[tuple[int, str], int] = {}
        self.writes = 0  # ledger writes made for reservations (SD wear, for benchmarks)

    @property
    def outstanding(self) -> bool:
        return any(self._left.values())

    def for_day(self, day: str) -> dict[int, int]:
        """Per device, the points reserved on `day` and not used yet."""
        return {device: left for (device, d), left in self._left.items() if d == day and left}

    def left(self, device_id: int, day: str) -> int:
        return self._left.get((device_id, day), 0)

    async def reserve(
        self, db: aiosqlite.Connection, device_id: int, day: str, points: int, limit: int
    ) -> int | None:
        """Inside a transaction: write a reservation covering `points`; returns the points
        written (0 if enough were reserved already), or None if the quota cannot cover them.
        Memory changes only in `granted`, once the transaction has committed."""
        left = self.left(device_id, day)
        if left >= points:
            return 0
        counted, exhausted = await ledger.points_sent(db, device_id, day)
        room = limit - counted
        grant = min(max(self.chunk, points - left), room)
        if exhausted or left + grant < points:
            return None
        await ledger.count_delivered(db, device_id, day, grant)
        return grant

    def granted(self, device_id: int, day: str, points: int) -> None:
        self._left[(device_id, day)] = self.left(device_id, day) + points
        self.writes += 1

    def use(self, device_id: int, day: str, points: int) -> None:
        """The cloud accepted `points` that were reserved."""
        key = (device_id, day)
        self._left[key] = max(0, self._left.get(key, 0) - points)

    def rebase(self, today: str) -> None:
        """Reservations on days after `today` (a clock that ran ahead) become today's, as
        the ledger rows they were written to did (`ledger.rebase_days`)."""
        for (device_id, day), left in list(self._left.items()):
            if day > today:
                del self._left[(device_id, day)]
                self._left[(device_id, today)] = self.left(device_id, today) + left

    async def give_back(self, db: aiosqlite.Connection) -> None:
        """Inside a transaction (clean shutdown): uncount what was reserved and not used."""
        for (device_id, day), left in self._left.items():
            if left:
                await ledger.count_delivered(db, device_id, day, -left)
        self._left.clear()
