"""Pass-through only while it costs ingest nothing: offer a group for upload, or write it.

Pass-through holds a group's PUBACKs until the cloud answers (and while the group gathers,
`store.staging.hold_s`). The broker lets only `mqtt.inflight_window` messages be
unacknowledged, so while a group waits it can send at most the rest of the window: with a
backlog queued (a replayed session, a burst, a publisher uploading its own history) ingest
would take ~20 messages per round trip, 200 a second with the cloud 100 ms away. The
gateway cannot see the broker's queue, but it sees the window fill. So ingest writes first
(one commit, PUBACKs at once, as without pass-through) when (reason `window`):

* a group reaches `commit_max` (80 % of the window) before its gathering time is up, or
  the window fills while a group waits for the cloud, and the cloud's round trip (the
  median of the last uploads, `staging.round_trip_s`) is longer than `FAST_ANSWER_S` (the
  waiting group is then written unless it is being uploaded: that one waits for its
  answer);

and (reason `budget`) when a group reaches `commit_max` before a gathering time the request
budget asked for (`staging.hold_s`: pass-through would need more requests than the budget's
share), or the flush loop declines a group because no request slot is free now. A cloud
that answers within milliseconds (a server on site, the sandbox) keeps pass-through on
through a backlog of one stream: nothing waits, and nothing is written.

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
# A cloud that answers within this (a sandbox, a server on site) costs the window nothing
# worth a write: a real cloud is 30-300 ms away, a commit takes milliseconds.
FAST_ANSWER_S = 0.025
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

    @staticmethod
    def fast(round_trip_s: float | None) -> bool:
        """Does the cloud answer fast enough for pass-through to cost the window nothing?
        (Unknown: assume so; the first wait tells.)"""
        return round_trip_s is None or round_trip_s <= FAST_ANSWER_S

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
