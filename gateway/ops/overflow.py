"""`quota_overflow_forecast`: a device without any `sample` rule arrives above its quota.

The gateway uploads at most `daily_points_limit` points per device per day; whatever
arrives beyond that is a backlog that grows every day until it expires. Sampling
(gateway/sampling.py) is the remedy, so when the observed arrival rate of a device that
has no `sample` rule forecasts more than its quota, the operator is told once per quota
day, with the setting to use. Pure apart from the log line: the observer feeds it rates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.log import get_logger
from gateway.sampling import SamplingPlan, format_duration_ms

log = get_logger("observe")

# Rates measured over less than this are not trusted for a forecast (a burst at start).
MIN_OBSERVED_S = 60.0
DAY_S = 86_400
# Devices warned about per day, at most (a bounded set, like every per-device table).
MAX_WARNED = 1000


@dataclass
class OverflowWatch:
    """Remembers which devices were warned about on which quota day."""

    warned: set[tuple[int, str]] = field(default_factory=set)

    def check(
        self,
        arriving_per_s: dict[int, float],
        *,
        observed_s: float,
        plan: SamplingPlan,
        sampled: set[int],
        day: str,
    ) -> list[int]:
        """Log for each device over its quota none of whose readings met a `sample` rule
        (`sampled`: the devices some did), once per day; returns the devices logged now."""
        if observed_s < MIN_OBSERVED_S:
            return []
        self.warned = {entry for entry in self.warned if entry[1] == day}
        logged = []
        limit = plan.daily_limit
        for device_id, rate in sorted(arriving_per_s.items()):
            per_day = rate * DAY_S
            if per_day <= limit or (device_id, day) in self.warned:
                continue
            if len(self.warned) >= MAX_WARNED or device_id in sampled:
                continue
            self.warned.add((device_id, day))
            logged.append(device_id)
            log.warning(
                "quota_overflow_forecast",
                device_id=device_id,
                points_per_day=round(per_day),
                limit=limit,
                observed_s=round(observed_s),
                hint=overflow_hint(plan, device_id),
            )
        return logged


def overflow_hint(plan: SamplingPlan, device_id: int) -> str:
    """What to write in the device's routes: `fit`, and the window it would pick."""
    window_ms = plan.fit_window_ms(device_id)
    streams = len(plan.datastreams_of(device_id)) or 1
    points = DAY_S * 1000 // window_ms * streams
    return (
        f'add sample = "fit" to its routes (one mean per {format_duration_ms(window_ms)} '
        f'per datastream, {points:,} points a day), or sample = {{ every = "..." }} or '
        "{ deadband = ... } per field; the excess otherwise waits in the buffer and "
        'expires (README "Sampling")'
    )
