"""The quota ledger: points the cloud accepted per device per day, and days it refused more.

The day is the quota day in the configured zone (an ISO date, `DailyQuota.day_of`). The
flush loop only asks about today, so only the newest QUOTA_DAYS_KEPT days are kept.
Pass-through uploads count their points ahead, about a minute of each device's traffic at
a time (reservations.py); what the ledger reports as sent leaves out what is reserved and
not used yet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import aiosqlite

from gateway.errors import StoreError
from gateway.log import get_logger
from gateway.store.parts import StoreParts
from gateway.store.sql import changes, fetch_one

log = get_logger("store")

# Distinct days kept: today and a margin for clock steps and zone changes.
QUOTA_DAYS_KEPT = 7


async def count_delivered(db: aiosqlite.Connection, device_id: int, day: str, points: int) -> None:
    await db.execute(
        "INSERT INTO quota_days (device_id, day, points) VALUES (?, ?, ?) "
        "ON CONFLICT (device_id, day) DO UPDATE SET points = points + excluded.points",
        (device_id, day, points),
    )


async def uncount(db: aiosqlite.Connection, device_id: int, day: str, points: int) -> None:
    """Take back points counted ahead and never used (never below zero, no new row)."""
    await db.execute(
        "UPDATE quota_days SET points = max(0, points - ?) WHERE device_id = ? AND day = ?",
        (points, device_id, day),
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


async def rebase_days(db: aiosqlite.Connection, today: str) -> int:
    """Move every day after `today` into `today` (points added, exhausted kept): a clock
    that ran ahead charged them, and the cloud counted them today. Points moved."""
    (moved,) = await fetch_one(
        db, "SELECT coalesce(sum(points), 0) FROM quota_days WHERE day > ?", (today,)
    )
    await db.execute(
        "INSERT INTO quota_days (device_id, day, points, exhausted) "
        "SELECT device_id, ?, sum(points), max(exhausted) FROM quota_days WHERE day > ? "
        "GROUP BY device_id ON CONFLICT (device_id, day) DO UPDATE SET "
        "points = points + excluded.points, exhausted = max(exhausted, excluded.exhausted)",
        (today, today),
    )
    await db.execute("DELETE FROM quota_days WHERE day > ?", (today,))
    return int(moved)


async def prune_days(db: aiosqlite.Connection, keep: int = QUOTA_DAYS_KEPT) -> int:
    """Forget all but the newest `keep` days on record (by day, not by the clock: a clock
    that jumps ahead for a moment costs one kept day, not today's count)."""
    return await changes(
        db,
        "DELETE FROM quota_days WHERE day < (SELECT day FROM "
        "(SELECT DISTINCT day FROM quota_days ORDER BY day DESC LIMIT 1 OFFSET ?))",
        (keep - 1,),
    )


class QuotaLedger(StoreParts):
    """The store's quota methods, mixed into `Store` (kept here so buffer.py stays about
    moving rows); they run under the store's lock like every read and write."""

    async def points_sent(self, device_id: int, day: str) -> tuple[int, bool]:
        """(points the cloud accepted for the device on `day`, whether it refused more)."""
        counted, exhausted = await self._read(lambda: points_sent(self._db, device_id, day))
        return counted - self.reserved_quota(device_id, day), exhausted

    async def mark_exhausted(self, device_id: int, day: str) -> None:
        """The cloud refused the device for its daily limit: do not try again that day."""
        await self._write(lambda: mark_exhausted(self._db, device_id, day))

    async def reserve_quota(
        self, day: str, needs: Mapping[int, int], sizes: Mapping[int, int], limit: int
    ) -> set[int]:
        """Count ahead what a round of pass-through uploads needs on `day`: `needs[d]`
        points of device d, topping its reservation up to `sizes[d]` when it runs short
        (reservations.py). One transaction at most, none while the reservations cover the
        round; other devices of `sizes` that are below half of theirs are topped up in the
        same transaction (one write a minute for all devices, not one each). Returns the
        devices whose need is covered; the quota cannot cover the rest."""
        reservations = self._reservations
        short = {device: n for device, n in needs.items() if reservations.left(device, day) < n}
        covered = set(needs) - set(short)
        if not short:
            return covered
        for device, size in sizes.items():
            if device not in needs and reservations.left(device, day) < size // 2:
                short[device] = 0  # rides along

        async def work() -> tuple[set[int], Callable[[], None] | None]:
            grants: dict[int, int] = {}
            for device, need in short.items():
                size = sizes.get(device, need)
                grant = await reservations.reserve(self._db, device, day, need, size, limit)
                if grant:
                    grants[device] = grant
            epoch = await reservations.bump_epoch(self._db) if grants else 0

            def on_commit() -> None:
                for device, grant in grants.items():
                    reservations.granted(device, day, grant)
                reservations.writes += 1
                reservations.committed(epoch)

            return {d for d in grants if d in needs}, on_commit if grants else None

        return covered | await self._in_transaction(work)

    async def rebase_quota_days(self, today: str) -> int:
        """The clock stepped back: charges counted on days after `today` move to today
        (ledger and reservations); how many points moved."""

        reservations = self._reservations

        async def work() -> tuple[int, Callable[[], None]]:
            moved = await rebase_days(self._db, today)
            epoch = await reservations.bump_epoch(self._db)

            def on_commit() -> None:
                reservations.rebase(today)
                reservations.committed(epoch)

            return moved, on_commit

        return await self._in_transaction(work)

    async def recover_reservations(self) -> None:
        """At the owner's start: give back the quota a crashed predecessor reserved and
        did not use, as its RAM journal says (quota_journal.py). No journal, no write."""
        reservations = self._reservations
        entry = reservations.journal_left_behind()
        if entry is None:
            return

        async def work() -> tuple[str | None, Callable[[], None] | None]:
            epoch, why_not = await reservations.recover(self._db, entry)
            if epoch is None:
                return why_not, None
            return why_not, lambda: reservations.committed(epoch)

        try:
            why_not = await self._in_transaction(work)
        except StoreError as exc:  # a full disk at start: the gateway starts all the same
            why_not = f"not written: {exc}"
        if why_not is None:
            log.info(
                "quota_reservations_recovered",
                points=sum(entry.unused.values()),
                devices=len({device for device, _ in entry.unused}),
            )
        else:
            log.info("quota_reservations_kept", reason=why_not)

    def reserved_quota(self, device_id: int, day: str) -> int:
        return self._reservations.left(device_id, day)

    def reserved_quota_day(self, day: str) -> dict[int, int]:
        """Per device, the points counted ahead on `day` that no upload used yet: another
        process reading the ledger (`blynk-gateway status`) subtracts them."""
        return self._reservations.for_day(day)

    def use_reserved_quota(self, device_id: int, day: str, points: int) -> None:
        """The cloud accepted `points` sent through pass-through."""
        self._reservations.use(device_id, day, points)

    def journal_reserved_use(self) -> None:
        """The readings of the uses so far are about to be acknowledged (quota_journal.py)."""
        self._reservations.journal_use()

    async def _give_back_reservations(self) -> None:
        """At close, with the store's lock held: uncount reserved quota no upload used."""
        if not self._reservations.outstanding:
            return
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            returned, epoch = await self._reservations.give_back(self._db)
        except BaseException:
            await self._db.rollback()
            raise
        await self._db.commit()
        self._reservations.given_back(returned, epoch)
