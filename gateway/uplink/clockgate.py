"""The flush loop's question before each pass: can the clock be uploaded by?

An upload is charged to a quota day and a batch is trimmed by the age rule, both read off
the wall clock. While the clock is not trusted (gateway/clock.py) neither can be right:
nothing is uploaded and nothing expires, the buffer waits (readings without a time of
their own are held apart anyway, store/provisional.py). `clock_unsynchronized` has
already told the operator why.

After a step of the clock (noticed by comparing its step count once per pass) quota day
and age are simply read off the corrected clock from then on. What was charged on the
stale side before the step is fixed where it can be known: a quota day after today can
only come from a clock that ran ahead, and the cloud counted those points today, so the
ledger's later days (and the accepted batches not yet acknowledged) move to today. Without
that, a step back of an hour across midnight would count the last hour's points twice:
on the cloud's day and again on the gateway's next one.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.clock import Clock
from gateway.log import get_logger
from gateway.store import Store
from gateway.uplink.quota import DailyQuota

log = get_logger("flush")


class ClockGate:
    def __init__(self, clock: Clock, store: Store) -> None:
        self._clock = clock
        self._store = store
        self._steps_seen = clock.steps

    @property
    def open(self) -> bool:
        """As of the clock's last look (pass-through asks this without a check)."""
        return self._clock.trusted

    async def allows(self, quota: DailyQuota, rebase_held: Callable[[str], None]) -> bool:
        """May this pass upload? After a step, first moves stale charges to today
        (`rebase_held`: the accepted batches not deleted yet, uplink/acks.py)."""
        clock = self._clock
        if not clock.check():
            return False
        if clock.steps != self._steps_seen:
            self._steps_seen = clock.steps
            today = quota.day_of(clock.now_ms())
            rebase_held(today)
            moved = await self._store.rebase_quota_days(today)
            if moved:
                log.warning(
                    "quota_days_rebased",
                    day=today,
                    points=moved,
                    step_s=round(clock.last_step_ms / 1000, 3),
                    reason="charged on days after today by a clock that ran ahead",
                )
        return True
