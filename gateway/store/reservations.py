"""Quota taken ahead for pass-through uploads, written to the ledger a minute at a time.

The ledger must count a point before the cloud can accept it, or a crash right after an
upload would forget it and the day's arithmetic would overshoot the quota. Writing the
ledger before every pass-through request would cost a transaction per request, the wear
pass-through exists to avoid (5.2 KB written per small fsynced transaction here: at one
reading a second that is as much as writing the reading). So each device reserves ahead
about `RESERVE_HORIZON_S` of its observed pass-through traffic at a time (at least the
round's need, at least `RESERVE_MIN`, at most `RESERVE_MAX`): one ledger write a minute
per busy device, all devices of a round in one transaction.

A clean shutdown gives back what was reserved and not used, and so does the next
transaction that deletes delivered rows once pass-through has closed (no write of its
own). After a `kill -9` or a watchdog restart, the next start gives back what the RAM
journal says was unused (quota_journal.py): nothing is stranded. After a power cut the
journal is gone and the unused part stays counted: the gateway can then only send less
than the quota, never more, by at most a minute of each device's pass-through traffic
(`RESERVE_MAX` at most; 60 points at one reading a second).

Every transaction that changes the reservations bumps `reservation_epoch` in `meta`, so
a journal written before that commit is never mistaken for a current one.
"""

from __future__ import annotations

import aiosqlite

from gateway.store import ledger
from gateway.store.quota_journal import JournalEntry, QuotaJournal, Unused
from gateway.store.sql import fetch_one

# A reservation covers about this long of a device's pass-through traffic...
RESERVE_HORIZON_S = 60.0
# ...but never more than this (what a crash can strand per device and day)...
RESERVE_MAX = 500
# ...nor less than this (a device just started has no observed rate yet).
RESERVE_MIN = 60


def reservation_size(points_last_minute: int, need: int) -> int:
    """How many points to reserve for a device that sent `points_last_minute` through
    pass-through in the last `RESERVE_HORIZON_S` and needs `need` now."""
    return max(need, min(RESERVE_MAX, max(RESERVE_MIN, points_last_minute)))


class QuotaReservations:
    """Reserved-but-unused points per (device, day), kept in memory by the owner."""

    def __init__(self, journal: QuotaJournal | None = None) -> None:
        self._left: Unused = {}
        self._journal = journal
        self._epoch = 0  # of the last commit that changed reservations (meta table)
        self._used_since_journal = False
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
        self, db: aiosqlite.Connection, device_id: int, day: str, need: int, size: int, limit: int
    ) -> int | None:
        """Inside a transaction: top the device's reservation up to `size` (at least
        `need`, at most what the quota leaves); returns the points written (0: none were
        needed or none are left), or None if the quota cannot cover `need`. Memory changes
        only in `granted`, once the transaction has committed."""
        left = self.left(device_id, day)
        if left >= max(size, need):
            return 0
        counted, exhausted = await ledger.points_sent(db, device_id, day)
        grant = max(0, min(max(size, need) - left, limit - counted))
        if exhausted or left + grant < need:
            return None
        if grant:
            await ledger.count_delivered(db, device_id, day, grant)
        return grant

    def granted(self, device_id: int, day: str, points: int) -> None:
        self._left[(device_id, day)] = self.left(device_id, day) + points

    def use(self, device_id: int, day: str, points: int) -> None:
        """The cloud accepted `points` that were reserved; `journal_use` records it."""
        key = (device_id, day)
        self._left[key] = max(0, self._left.get(key, 0) - points)
        self._used_since_journal = True

    def journal_use(self) -> None:
        """Record the uses so far, right before their readings are acknowledged: a crash
        after a PUBACK must not give back quota the cloud took. Before this, a crash gives
        those points back, and the broker sends their readings again (counted then)."""
        if self._used_since_journal:
            self._journal_now()

    async def bump_epoch(self, db: aiosqlite.Connection) -> int:
        """Inside a transaction that changes reservations: the epoch it commits; pass it
        to `committed` once the transaction has."""
        (epoch,) = await fetch_one(
            db,
            "INSERT INTO meta (key, value) VALUES ('reservation_epoch', 1) "
            "ON CONFLICT (key) DO UPDATE SET value = value + 1 RETURNING value",
        )
        return int(epoch)

    def committed(self, epoch: int) -> None:
        self._epoch = epoch
        self._journal_now()

    def _journal_now(self) -> None:
        self._used_since_journal = False
        if self._journal is not None:
            self._journal.write(self._epoch, {k: v for k, v in self._left.items() if v})

    def journal_left_behind(self) -> JournalEntry | None:
        """At the owner's start: the journal a previous process left, if any (a clean
        shutdown removes it)."""
        return self._journal.read() if self._journal is not None else None

    async def recover(
        self, db: aiosqlite.Connection, entry: JournalEntry
    ) -> tuple[int | None, str | None]:
        """Inside a transaction: uncount what `entry` says was reserved and not used, if
        it is certainly current. Returns (the epoch for `committed`, or None and why
        nothing was given back)."""
        assert self._journal is not None
        rows = await db.execute_fetchall("SELECT value FROM meta WHERE key = 'reservation_epoch'")
        epoch = next((int(value) for (value,) in rows), 0)
        why_not = self._journal.trusted(entry, epoch)
        if why_not is not None:
            return None, why_not
        for (device_id, day), left in entry.unused.items():
            await ledger.uncount(db, device_id, day, left)
        return await self.bump_epoch(db), None

    def close(self) -> None:
        """At a clean shutdown, once everything unused was given back."""
        if self._journal is not None and not self.outstanding:
            self._journal.remove()

    def rebase(self, today: str) -> None:
        """Reservations on days after `today` (a clock that ran ahead) become today's, as
        the ledger rows they were written to did (`ledger.rebase_days`)."""
        for (device_id, day), left in list(self._left.items()):
            if day > today:
                del self._left[(device_id, day)]
                self._left[(device_id, today)] = self.left(device_id, today) + left

    async def give_back(self, db: aiosqlite.Connection) -> tuple[Unused, int]:
        """Inside a transaction: uncount what was reserved and not used. Returns what was
        given back and the epoch, for `given_back` once the transaction has committed."""
        returned = {key: left for key, left in self._left.items() if left}
        for (device_id, day), left in returned.items():
            await ledger.count_delivered(db, device_id, day, -left)
        return returned, await self.bump_epoch(db)

    def given_back(self, returned: Unused, epoch: int) -> None:
        for key, points in returned.items():
            self._left[key] = max(0, self._left.get(key, 0) - points)
        self._left = {key: left for key, left in self._left.items() if left}
        self.committed(epoch)
