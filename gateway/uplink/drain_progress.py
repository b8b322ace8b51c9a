"""`draining backlog=… rate_per_s=… eta=…`: how fast a large backlog shrinks (the flush
loop updates it after every pass)."""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.log import format_duration, get_logger

log = get_logger("flush")

# `draining` lines: at most one per interval, only for a backlog of more than a few batches.
DRAIN_LOG_INTERVAL_S = 30.0
DRAIN_MIN_BATCHES = 5


class DrainProgress:
    """`draining backlog=… rate_per_s=… eta=…` while a large backlog shrinks.

    Quiet for small backlogs (a few batches drain before anyone reads the line) and while
    nothing is delivered (offline or over quota: those states have lines of their own).
    """

    def __init__(
        self,
        min_backlog: int,
        interval_s: float = DRAIN_LOG_INTERVAL_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_backlog = min_backlog
        self.interval_s = interval_s
        self._clock = clock
        self._window_start: float | None = None
        self._delivered_at_start = 0

    def update(self, backlog: int, delivered_total: int) -> None:
        now = self._clock()
        if backlog <= self.min_backlog:
            self._window_start = None
            return
        if self._window_start is None:
            self._window_start, self._delivered_at_start = now, delivered_total
            return
        elapsed_s = now - self._window_start
        if elapsed_s < self.interval_s:
            return
        delivered = delivered_total - self._delivered_at_start
        self._window_start, self._delivered_at_start = now, delivered_total
        if delivered <= 0:
            return
        rate_per_s = delivered / elapsed_s
        eta_s = backlog / rate_per_s
        log.info(
            "draining",
            backlog=backlog,
            rate_per_s=round(rate_per_s, 1),
            eta=format_duration(eta_s),
            eta_s=round(eta_s),
        )
