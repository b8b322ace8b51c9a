"""The cloud's age rule, applied by the flush loop at the moment of sending.

The cloud refuses readings older than `cloud.max_age_days` (less `cloud.age_margin_hours`
of margin, config's `oldest_sendable_ms`), and a refused request is a request spent for
nothing. So no request may carry a point that is too old by then: the store expires such
points as it leases a batch, and the batch is checked again just before it goes out (a
half of a bisected batch, or a batch sent after a slow pass, may have aged past the cutoff
since its lease). What is too old is dead-lettered as `expired`, never sent. Streams no
pass leases (parked, or over today's quota) are swept once a minute instead. Each pass's
and each sweep's expiries are reported in one `readings_expired` line.

If the cloud still refuses points for age, its clock differs from ours: bisecting would
cost one request per point, so the rule is applied on the cloud's clock instead (its
`Date` header) and only the rest is sent; if the cloud's clock implies nothing, the flush
loop parks the stream (data kept, retried slowly). The first such refusal is logged as
`clock_skew_suspected`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from gateway.config import CloudSettings
from gateway.errors import TooOld
from gateway.log import get_logger
from gateway.models import Batch
from gateway.store import Store

log = get_logger("flush")

EXPIRY_SWEEP_INTERVAL_S = 60.0


class ExpiredCount(Protocol):
    """Where the points expired are counted (the flush loop's stats)."""

    expired: int


class AgeRule:
    def __init__(
        self,
        store: Store,
        cloud_settings: CloudSettings,
        *,
        clock_ms: Callable[[], int],
        stats: ExpiredCount,
    ) -> None:
        self._store = store
        self._cloud_settings = cloud_settings
        self._clock_ms = clock_ms
        self._stats = stats
        self._skew_logged = False  # `clock_skew_suspected`: once
        self._next_expiry_sweep = 0.0
        self._pass_expired = 0

    def reconfigure(self, cloud_settings: CloudSettings) -> None:
        self._cloud_settings = cloud_settings

    def cutoff_ms(self, now_ms: int | None = None) -> int:
        """Points older than this are not sent: the cloud would refuse them for age."""
        return self._cloud_settings.oldest_sendable_ms(
            self._clock_ms() if now_ms is None else now_ms
        )

    def start_pass(self) -> None:
        self._pass_expired = 0

    def end_pass(self) -> None:
        """One `readings_expired` line for what this pass expired, if anything."""
        self._log_expired(self._pass_expired, "send")

    def count_expired(self, count: int) -> None:
        self._pass_expired += count
        self._stats.expired += count

    async def without_expired(self, batch: Batch) -> Batch:
        """Apply the age rule now, at send time: a half of a bisected batch, or a batch sent
        after a slow pass, may hold points that aged past the cutoff since the lease."""
        cutoff_ms = self.cutoff_ms()
        if batch.points[0].ts_ms >= cutoff_ms and batch.points[-1].ts_ms >= cutoff_ms:
            return batch  # leased in time order: the ends bound the rest
        expired = tuple(p for p in batch.points if p.ts_ms < cutoff_ms)
        if not expired:
            return batch
        await self._store.dead_letter(
            batch.with_points(expired), "expired", f"older than the cutoff {cutoff_ms}"
        )
        self.count_expired(len(expired))
        return batch.with_points(tuple(p for p in batch.points if p.ts_ms >= cutoff_ms))

    async def refused_for_age(self, batch: Batch, exc: TooOld) -> Batch | None:
        """The cloud refused points our clock finds young enough: its clock differs.

        Bisecting would cost one request per point. Instead, dead-letter what the rule
        implies on the cloud's clock (its `Date` header) and return the rest, to be sent
        (no points: nothing is left); None if the cloud's clock implies nothing: the
        caller parks the stream (data kept, retried slowly).
        """
        now_ms = self._clock_ms()
        cutoff_ms = self.cutoff_ms(exc.cloud_now_ms) if exc.cloud_now_ms is not None else None
        self._log_clock_skew(exc, now_ms)
        if cutoff_ms is not None and cutoff_ms > self.cutoff_ms(now_ms):
            too_old = tuple(p for p in batch.points if p.ts_ms < cutoff_ms)
            if too_old:
                await self._store.dead_letter(
                    batch.with_points(too_old),
                    "expired",
                    f"refused for age by the cloud (its Date: {exc.cloud_date}): {exc.message}",
                )
                self.count_expired(len(too_old))
                return batch.with_points(tuple(p for p in batch.points if p.ts_ms >= cutoff_ms))
        return None

    def _log_clock_skew(self, exc: TooOld, now_ms: int) -> None:
        if self._skew_logged:
            return
        self._skew_logged = True
        skew_s = None if exc.cloud_now_ms is None else round((exc.cloud_now_ms - now_ms) / 1000)
        log.warning(
            "clock_skew_suspected",
            gateway_time=_iso(now_ms),
            cloud_date=exc.cloud_date,
            cloud_ahead_s=skew_s,
            cloud_message=exc.message,
            max_age_days=self._cloud_settings.max_age_days,
            action="points the cloud's clock finds too old are dead-lettered as expired; "
            "check the gateway's NTP sync, or cloud.max_age_days if the clocks agree",
        )

    async def expire_if_due(self) -> None:
        """The periodic sweep, for streams no pass leases (parked, or over today's quota)."""
        now = time.monotonic()
        if now < self._next_expiry_sweep:
            return
        self._next_expiry_sweep = now + EXPIRY_SWEEP_INTERVAL_S
        moved = await self._store.expire(self.cutoff_ms())
        self._stats.expired += moved
        self._log_expired(moved, "sweep")

    def _log_expired(self, count: int, found_by: str) -> None:
        if count:
            log.warning(
                "readings_expired",
                count=count,
                found_by=found_by,
                cutoff=_iso(self.cutoff_ms()),
                max_age_days=self._cloud_settings.max_age_days,
                age_margin_hours=self._cloud_settings.age_margin_hours,
            )


def _iso(epoch_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_ms / 1000))
