"""Readings held for the clock (README "Data safety").

A reading stamped while the wall clock was not trusted has no wall time yet, only (boot,
CLOCK_BOOTTIME). It is committed before its PUBACK like any other, but into `provisional`,
where no upload, quota or age rule looks. When the clock synchronizes, the offset of this
boot is known (wall - boottime) and the boot's readings move into `readings` with wall =
boottime + offset, PROVISIONAL_CHUNK rows per transaction, so ingest commits between two
chunks. A boot that ended before its clock ever synchronized (the power went) cannot be
corrected: its readings get an estimate from the last trusted moment recorded before it
ended, and `[clock] unsynced_boot` decides: keep them (moved, estimated, flagged) or
dead-letter them (`clock_unknown`).

`boots` records each boot's last trusted moment (wall ms, boottime ms): when the clock
becomes trusted, after a step, and every TRUSTED_RECORD_INTERVAL_S while it stays trusted
(a one-row update in a transaction of its own: at most 144 a day, a page or two each).
It also keeps each boot's last correction, which `status` shows.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import aiosqlite

from gateway.log import get_logger
from gateway.store.parts import StoreParts
from gateway.store.sql import changes, changes_many, fetch_one

log = get_logger("store")

# (stream id, boottime ms, value JSON): a held reading as one boot's rows key it.
HeldRow = tuple[int, int, str]

# Rows moved (or dead-lettered) per transaction: ingest commits between two chunks.
PROVISIONAL_CHUNK = 2000
# While the clock stays trusted, its moment is recorded this often (plus at every sync and
# step): what an estimate for a later boot that never synchronizes can be off by, beyond
# the time the box was off.
TRUSTED_RECORD_INTERVAL_S = 600.0
DEAD_LETTER_REASON = "clock_unknown"


@dataclass(frozen=True, slots=True)
class Correction:
    """The last time a boot's held readings got their wall time (or were dead-lettered)."""

    boot_id: str
    at_ms: int
    corrected: int  # moved into the buffer with their wall time
    dead_lettered: int
    offset_ms: int | None  # wall - boottime used; None: no estimate was possible
    estimated: bool  # from an earlier trusted moment, not from a sync of that boot


@dataclass(frozen=True, slots=True)
class EarlierBoot:
    """A boot other than this one that left held readings, and how its time is estimated."""

    boot_id: str
    readings: int
    offset_ms: int | None
    # "own": its own last trusted moment (exact unless the clock stepped after it);
    # "previous": an earlier boot's last one (a lower bound: the off time is unknown)
    estimated_from: Literal["own", "previous"] | None


# --------------------------------------------------------------------------- SQL
async def boot_row(db: aiosqlite.Connection, boot_id: str) -> int:
    """The boot's row id, registering it (inside the caller's transaction)."""
    (row_id,) = await fetch_one(
        db,
        "INSERT INTO boots (boot_id) VALUES (?) ON CONFLICT (boot_id) "
        "DO UPDATE SET boot_id = excluded.boot_id RETURNING id",
        (boot_id,),
    )
    return int(row_id)


async def count(db: aiosqlite.Connection) -> int:
    (held,) = await fetch_one(db, "SELECT count(*) FROM provisional")
    return int(held)


async def insert(db: aiosqlite.Connection, boot: int, rows: Sequence[HeldRow]) -> int:
    """Store held rows, skipping those already stored (broker redeliveries); how many new."""
    return await changes_many(
        db,
        "INSERT OR IGNORE INTO provisional (boot, stream_id, boottime_ms, value) "
        "VALUES (?, ?, ?, ?)",
        [(boot, *row) for row in rows],
    )


async def _first_rows(db: aiosqlite.Connection, boot: int, limit: int) -> list[HeldRow]:
    rows = await db.execute_fetchall(
        "SELECT stream_id, boottime_ms, value FROM provisional WHERE boot = ? "
        "ORDER BY stream_id, boottime_ms, value LIMIT ?",
        (boot, limit),
    )
    return [(int(row[0]), int(row[1]), str(row[2])) for row in rows]


async def _delete_through(db: aiosqlite.Connection, boot: int, rows: list[HeldRow]) -> int:
    """Delete the boot's rows up to the last of `rows` (which are its first, in key order)."""
    return await changes(
        db,
        "DELETE FROM provisional WHERE boot = ? AND (stream_id, boottime_ms, value) <= (?, ?, ?)",
        (boot, *rows[-1]),
    )


async def move_chunk(
    db: aiosqlite.Connection, boot: int, offset_ms: int, limit: int
) -> tuple[int, int]:
    """Move up to `limit` of the boot's rows into `readings` at boottime + offset:
    (rows taken, rows new in `readings`: the rest were there already)."""
    rows = await _first_rows(db, boot, limit)
    if not rows:
        return 0, 0
    inserted = await changes_many(
        db,
        "INSERT OR IGNORE INTO readings (stream_id, ts_ms, value) VALUES (?, ?, ?)",
        [(stream_id, boottime + offset_ms, value) for stream_id, boottime, value in rows],
    )
    return await _delete_through(db, boot, rows), inserted


async def dead_letter_chunk(
    db: aiosqlite.Connection,
    boot: int,
    offset_ms: int | None,
    limit: int,
    now_ms: int,
    detail: str,
) -> int:
    """Dead-letter up to `limit` of the boot's rows (`clock_unknown`, the estimated time
    as their ts, None if there is none); how many."""
    rows = await _first_rows(db, boot, limit)
    if not rows:
        return 0
    await db.executemany(
        "INSERT INTO dead_letters (dead_at_ms, reason, device_id, datastream_id, ts_ms, "
        "value, detail) SELECT ?, ?, device_id, datastream_id, ?, ?, ? FROM streams "
        "WHERE id = ?",
        [
            (
                now_ms,
                DEAD_LETTER_REASON,
                None if offset_ms is None else boottime + offset_ms,
                value,
                detail,
                stream_id,
            )
            for stream_id, boottime, value in rows
        ],
    )
    return await _delete_through(db, boot, rows)


async def record_trusted(
    db: aiosqlite.Connection, boot: int, wall_ms: int, boottime_ms: int
) -> None:
    await db.execute(
        "UPDATE boots SET trusted_wall_ms = ?, trusted_boottime_ms = ? WHERE id = ?",
        (wall_ms, boottime_ms, boot),
    )


async def note_correction(
    db: aiosqlite.Connection,
    boot: int,
    *,
    at_ms: int,
    corrected: int,
    dead_lettered: int,
    offset_ms: int | None,
    estimated: bool,
) -> None:
    await db.execute(
        "UPDATE boots SET corrected = corrected + ?, dead_lettered = dead_lettered + ?, "
        "corrected_at_ms = ?, offset_ms = ?, estimated = ? WHERE id = ?",
        (corrected, dead_lettered, at_ms, offset_ms, int(estimated), boot),
    )


async def boots_holding(db: aiosqlite.Connection) -> list[tuple[int, str, int]]:
    """(row id, boot id, held readings) of every boot with held readings, oldest first."""
    rows = await db.execute_fetchall(
        "SELECT b.id, b.boot_id, (SELECT count(*) FROM provisional p WHERE p.boot = b.id) "
        "AS held FROM boots b WHERE held > 0 ORDER BY b.id"
    )
    return [(int(row[0]), str(row[1]), int(row[2])) for row in rows]


async def estimate_offset(
    db: aiosqlite.Connection, boot: int
) -> tuple[int | None, Literal["own", "previous"] | None]:
    """wall - boottime for a boot that never synchronized: from its own last trusted moment
    if it had one, else from the last one of an earlier boot (this boot started after it:
    wall >= that wall + boottime, a lower bound); (None, None) if nothing was ever trusted."""
    (wall, boottime) = await fetch_one(
        db, "SELECT trusted_wall_ms, trusted_boottime_ms FROM boots WHERE id = ?", (boot,)
    )
    if wall is not None and boottime is not None:
        return int(wall) - int(boottime), "own"
    rows = await db.execute_fetchall(
        "SELECT trusted_wall_ms FROM boots WHERE id < ? AND trusted_wall_ms IS NOT NULL "
        "ORDER BY id DESC LIMIT 1",
        (boot,),
    )
    for (earlier_wall,) in rows:
        return int(earlier_wall), "previous"
    return None, None


async def last_correction(db: aiosqlite.Connection) -> Correction | None:
    rows = await db.execute_fetchall(
        "SELECT boot_id, corrected_at_ms, corrected, dead_lettered, offset_ms, estimated "
        "FROM boots WHERE corrected_at_ms IS NOT NULL ORDER BY corrected_at_ms DESC LIMIT 1"
    )
    for row in rows:
        return Correction(
            boot_id=str(row[0]),
            at_ms=int(row[1]),
            corrected=int(row[2]),
            dead_lettered=int(row[3]),
            offset_ms=None if row[4] is None else int(row[4]),
            estimated=bool(row[5]),
        )
    return None


def salvage(source: sqlite3.Connection, fresh: sqlite3.Connection) -> None:
    """Copy what can be read of `boots` and `provisional` from a damaged file into the
    salvaged one (recovery.py), inside its transaction; a file without them has none."""
    for table, columns in (
        (
            "boots",
            "id, boot_id, trusted_wall_ms, trusted_boottime_ms, corrected, "
            "corrected_at_ms, offset_ms, estimated, dead_lettered",
        ),
        ("provisional", "boot, stream_id, boottime_ms, value"),
    ):
        try:
            rows = source.execute(f"SELECT {columns} FROM {table}").fetchall()
        except sqlite3.Error:
            continue
        marks = ", ".join("?" * len(columns.split(",")))
        try:
            fresh.executemany(f"INSERT OR IGNORE INTO {table} ({columns}) VALUES ({marks})", rows)
        except sqlite3.Error:
            continue


# --------------------------------------------------------------------------- Store's side
class ProvisionalOps(StoreParts):
    """The store's methods for held readings, mixed into `Store` (buffer.py keeps moving
    rows in general; this is the clock's part). They run under the store's lock."""

    # Readings held for the clock, all boots (`status`; capacity counts them too).
    provisional_points: int
    # This boot (the kernel's id) and its row in `boots` once registered.
    boot_id: str
    _boot_row: int | None
    # wall - boottime once this boot's clock is trusted: held readings that reach the
    # store after that are given their wall time at once (None: hold them).
    boot_offset_ms: int | None

    async def _hold(self, rows: Sequence[HeldRow]) -> tuple[int, int]:
        """Inside an append: store this boot's held rows; (how many new, the boot's row)."""
        boot = await self._this_boot()
        return await insert(self._db, boot, rows), boot

    async def _this_boot(self) -> int:
        """Inside a transaction: this boot's row id (the caller remembers it on commit)."""
        if self._boot_row is not None:
            return self._boot_row
        return await boot_row(self._db, self.boot_id)

    def _remember_boot(self, boot: int) -> None:
        self._boot_row = boot

    async def record_trusted(self, wall_ms: int, boottime_ms: int) -> None:
        """The clock is trusted now: remember the moment (for estimates after a reboot)."""

        async def work() -> tuple[None, Callable[[], None]]:
            boot = await self._this_boot()
            await record_trusted(self._db, boot, wall_ms, boottime_ms)
            return None, lambda: self._remember_boot(boot)

        await self._in_transaction(work)

    async def correct_provisional(self, offset_ms: int, chunk: int = PROVISIONAL_CHUNK) -> int:
        """Give this boot's held readings their wall time (boottime + `offset_ms`) and move
        them into the buffer, `chunk` rows per transaction; how many moved."""
        moved = await self._move_boot(self.boot_id, offset_ms, chunk, estimated=False)
        return moved

    async def _move_boot(self, boot_id: str, offset_ms: int, chunk: int, *, estimated: bool) -> int:
        total = 0
        while True:

            async def work() -> tuple[tuple[int, int], Callable[[], None]]:
                boot = await boot_row(self._db, boot_id)
                taken, inserted = await move_chunk(self._db, boot, offset_ms, chunk)
                if taken:
                    await note_correction(
                        self._db,
                        boot,
                        at_ms=self._clock_ms(),
                        corrected=taken,
                        dead_lettered=0,
                        offset_ms=offset_ms,
                        estimated=estimated,
                    )
                return (taken, inserted), lambda: self._moved(taken, inserted)

            taken, _ = await self._in_transaction(work)
            total += taken
            if taken < chunk:
                return total
            await asyncio.sleep(0)  # ingest's commit goes between two chunks

    def _moved(self, taken: int, inserted: int) -> None:
        self.provisional_points -= taken
        self.pending_points += inserted
        if inserted:
            self.new_rows.notify()

    async def earlier_boots(self) -> list[EarlierBoot]:
        """Boots other than this one that left held readings, with their estimates."""

        async def read() -> list[EarlierBoot]:
            found = []
            for boot, boot_id, held in await boots_holding(self._db):
                if boot_id == self.boot_id:
                    continue
                offset_ms, source = await estimate_offset(self._db, boot)
                found.append(EarlierBoot(boot_id, held, offset_ms, source))
            return found

        return await self._read(read)

    async def settle_earlier_boot(
        self, boot: EarlierBoot, *, keep: bool, chunk: int = PROVISIONAL_CHUNK
    ) -> int:
        """Keep (moved with the estimate) or dead-letter (`clock_unknown`) an earlier
        boot's held readings; without an estimate they can only be dead-lettered."""
        if keep and boot.offset_ms is not None:
            return await self._move_boot(boot.boot_id, boot.offset_ms, chunk, estimated=True)
        detail = _estimate_detail(boot)
        total = 0
        while True:

            async def work() -> tuple[int, Callable[[], None]]:
                row = await boot_row(self._db, boot.boot_id)
                moved = await dead_letter_chunk(
                    self._db, row, boot.offset_ms, chunk, self._clock_ms(), detail
                )
                if moved:
                    await note_correction(
                        self._db,
                        row,
                        at_ms=self._clock_ms(),
                        corrected=0,
                        dead_lettered=moved,
                        offset_ms=boot.offset_ms,
                        estimated=True,
                    )
                    await self._prune_dead_letters()
                return moved, lambda: self._dead_lettered(moved)

            moved = await self._in_transaction(work)
            total += moved
            if moved < chunk:
                return total
            await asyncio.sleep(0)

    def _dead_lettered(self, moved: int) -> None:
        self.provisional_points -= moved

    async def last_correction(self) -> Correction | None:
        return await self._read(lambda: last_correction(self._db))


def _estimate_detail(boot: EarlierBoot) -> str:
    """A `clock_unknown` dead letter's detail: what its ts is, if anything."""
    if boot.offset_ms is None:
        return f"boot {boot.boot_id} never had a trusted clock, nor any boot before it: no time"
    if boot.estimated_from == "own":
        return (
            f"time estimated: boot {boot.boot_id} ended before its clock synchronized "
            "again; from its last trusted moment"
        )
    return (
        f"time estimated (a lower bound): boot {boot.boot_id} never had a trusted clock; "
        "from the last trusted moment of the boot before it"
    )
