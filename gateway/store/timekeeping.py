"""Keeping the readings held for the clock in step with it (a named task of the daemon).

Once a second it asks the clock (gateway/clock.py). When the clock becomes trusted (or
steps while trusted) this boot's offset (wall - boottime) is known: the store gives held
readings that arrive from then on their wall time at once, this boot's held readings move
into the buffer in chunks (provisional.py), and one `clock_synchronized` line says how
many and by how much. While the clock stays trusted, its moment is recorded every
TRUSTED_RECORD_INTERVAL_S, so that a later boot that never synchronizes can be estimated.
At start, before ingest, the held readings of earlier boots are settled by
`[clock] unsynced_boot`.

`[clock] trust = "always"`: no task, no record; only held readings left from another
setting are settled once at start.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from gateway.clock import Clock, ClockSettings
from gateway.errors import StoreError
from gateway.log import get_logger
from gateway.store.buffer import Store
from gateway.store.provisional import TRUSTED_RECORD_INTERVAL_S, Correction, EarlierBoot

log = get_logger("clock")

TICK_S = 1.0


class TimeKeeper:
    """Corrects held readings when the clock synchronizes; records trusted moments."""

    def __init__(
        self,
        clock: Clock,
        store: Store,
        settings: ClockSettings,
        *,
        tick_s: float = TICK_S,
        record_every_s: float = TRUSTED_RECORD_INTERVAL_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._store = store
        self._settings = settings
        self._tick_s = tick_s
        self._record_every_s = record_every_s
        self._monotonic = monotonic
        self._steps_seen = clock.steps
        self._recorded_at: float | None = None
        self._record_now = False
        self._waiting_since: float | None = None  # the clock is not trusted (monotonic)
        self._failing = False
        # For `status`: the last correction (this boot's or an earlier one's).
        self.last_correction: Correction | None = None

    async def start(self) -> None:
        """Before ingest starts: earlier boots' held readings, then a first look at the
        clock (a restart after a crash finds this boot's held readings and a trusted clock)."""
        try:
            for boot in await self._store.earlier_boots():
                await self._settle(boot)
            self.last_correction = await self._store.last_correction()
        except StoreError as exc:
            log.error("provisional_settle_failed", error=str(exc), action="retried at next start")
        await self.tick()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            await self.tick()

    async def _settle(self, boot: EarlierBoot) -> None:
        keep = self._settings.unsynced_boot == "keep" and boot.offset_ms is not None
        moved = await self._store.settle_earlier_boot(boot, keep=keep)
        log.warning(
            "provisional_earlier_boot",
            boot_id=boot.boot_id,
            readings=moved,
            policy=self._settings.unsynced_boot,
            action="kept with an estimated time" if keep else "dead-lettered as clock_unknown",
            estimated_from=boot.estimated_from,
            offset_s=None if boot.offset_ms is None else round(boot.offset_ms / 1000, 3),
            reason="that boot ended before its clock synchronized",
        )

    async def tick(self) -> None:
        """One look at the clock, and what follows from it."""
        clock, store = self._clock, self._store
        if not clock.check():
            store.boot_offset_ms = None  # held readings wait for the next sync
            if self._waiting_since is None:
                self._waiting_since = self._monotonic()
            return
        offset_ms = store.boot_offset_ms
        if offset_ms is None or clock.steps != self._steps_seen:
            self._steps_seen = clock.steps
            store.boot_offset_ms = offset_ms = clock.offset_ms()
            self._record_now = True
        try:
            await self._record_if_due()
            corrected = 0
            if store.provisional_points:
                corrected = await store.correct_provisional(offset_ms)
        except StoreError as exc:
            self._failed(exc)
            return
        self._recovered()
        if corrected:
            self.last_correction = await store.last_correction()
        if corrected or self._waiting_since is not None:
            self._synchronized(corrected, offset_ms)

    def _synchronized(self, corrected: int, offset_ms: int) -> None:
        waited = self._waiting_since
        self._waiting_since = None
        log.info(
            "clock_synchronized",
            corrected=corrected,
            offset_s=round(offset_ms / 1000, 3),
            boot_id=self._clock.boot_id,
            source=self._clock.source.name,
            waited_s=None if waited is None else round(self._monotonic() - waited, 1),
        )

    async def _record_if_due(self) -> None:
        """The trusted moment, at each sync or step and every `record_every_s` (not with
        `trust = "always"`: nothing is ever held there, so nothing needs an estimate)."""
        if self._clock.always:
            return
        now = self._monotonic()
        due = self._recorded_at is None or now - self._recorded_at >= self._record_every_s
        if not (self._record_now or due):
            return
        boottime = self._clock.boottime_ms()
        await self._store.record_trusted(self._clock.now_ms(), boottime)
        self._recorded_at = now
        self._record_now = False

    def _failed(self, exc: StoreError) -> None:
        if not self._failing:
            self._failing = True
            log.error(
                "clock_correction_failed",
                error=str(exc),
                action="held readings stay held; retried every second",
            )

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("clock_correction_recovered")

    def report(self) -> dict[str, Any]:
        """The `clock` object of `status` and the metrics (JSON-ready)."""
        clock, last = self._clock, self.last_correction
        return {
            "synchronized": clock.trusted,
            "source": clock.source.name,
            "problem": clock.problem,
            "boot_id": clock.boot_id,
            "provisional": self._store.provisional_points,
            "steps": clock.steps,
            "last_correction": None if last is None else correction_json(last),
        }


def correction_json(last: Correction) -> dict[str, Any]:
    return {
        "boot_id": last.boot_id,
        "at_ms": last.at_ms,
        "corrected": last.corrected,
        "dead_lettered": last.dead_lettered,
        "offset_s": None if last.offset_ms is None else round(last.offset_ms / 1000, 3),
        "estimated": last.estimated,
    }
