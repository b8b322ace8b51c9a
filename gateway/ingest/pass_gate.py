"""Pass-through only while it costs ingest nothing: offer a group for upload, or write it.

Pass-through holds a group's PUBACKs until the cloud answers (and while the group gathers,
`store.staging.hold_s`). The broker lets only `mqtt.inflight_window` messages be
unacknowledged, so while a group waits it can send at most the rest of the window: with a
backlog queued (a replayed session, a burst, a publisher uploading its own history) ingest
would take ~20 messages per round trip, 200 a second with the cloud 100 ms away. The
gateway cannot see the broker's queue, but it sees the window fill. So ingest writes first
(one commit, PUBACKs at once, as without pass-through) when:

* a group reaches `commit_max` (80 % of the window) before its gathering time is up;
* the window fills while a group waits for the cloud (it is then written as soon as it is
  not in flight any more; a group already being uploaded waits for its answer);
* the flush loop declines a group because the request budget has no slot for it now
  (every reading would wait for one with its PUBACK held).

It stays write-first until the trickle returns: `RESUME_AFTER_S` without any of that, at
a rate at which a gathered group would fill at most half of `commit_max` (pause at full,
resume at half: the hysteresis), and then only once the buffer is empty (the flush loop
uploads it without lingering when `staging.paused` turns False). A publisher that sends
20 readings at once every minute therefore costs one commit a minute, not a stall.

A `kill -9` costs nothing here in either mode: the broker resends whatever was not
acknowledged, and what was acknowledged is in the cloud or committed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from gateway.log import get_logger

log = get_logger("ingest")

# Quiet this long (no full group, no filled window, no budget refusal) before resuming.
RESUME_AFTER_S = 5.0
# The arrival rate is measured over this window.
RATE_WINDOW_S = 5.0


class PassGate:
    """Whether pass-through may take the next group (ingest's side of the decision)."""

    def __init__(
        self, commit_max: int, window: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.commit_max = commit_max
        self.window = window
        self._clock = clock
        self.paused = False
        self.reason: str | None = None
        self._paused_at = 0.0
        self._pressure_at = float("-inf")
        self._received: deque[tuple[float, int]] = deque()  # (time, messages received)
        self.pauses = 0

    def sample(self, received: int) -> None:
        """The receive counter now (at every group): what the arrival rate is taken from."""
        now = self._clock()
        self._received.append((now, received))
        while len(self._received) > 2 and self._received[1][0] <= now - RATE_WINDOW_S:
            self._received.popleft()

    def rate_per_s(self) -> float:
        if len(self._received) < 2:
            return 0.0
        (t0, first), (t1, last) = self._received[0], self._received[-1]
        return (last - first) / max(t1 - t0, 0.2)

    def pressure(self, reason: str, held: int) -> None:
        """The window filled (or the budget refused): write first from now on."""
        now = self._pressure_at = self._clock()
        if self.paused:
            return
        self.paused, self.reason, self._paused_at = True, reason, now
        self.pauses += 1
        log.info(
            "pass_through_paused",
            reason=reason,
            held=held,
            window=self.window,
            rate_per_s=round(self.rate_per_s(), 1),
            action="writing first, acknowledging at commit, until the trickle returns",
        )

    def allows(self, gather_s: float) -> bool:
        """May the next group be offered? Resumes after a quiet `RESUME_AFTER_S` at a rate
        that would fill at most half of `commit_max` in `gather_s`."""
        if not self.paused:
            return True
        now = self._clock()
        if now - self._pressure_at < RESUME_AFTER_S:
            return False
        rate = self.rate_per_s()
        if rate * gather_s > self.commit_max / 2:
            return False
        log.info(
            "pass_through_resumed",
            paused_s=round(now - self._paused_at, 1),
            reason_was=self.reason,
            rate_per_s=round(rate, 1),
        )
        self.paused, self.reason = False, None
        return True
