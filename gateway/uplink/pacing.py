"""When buffered readings go up, and how long pass-through gathers: batching by time.

Requests per reading must not follow the round trip (one request per stream per commit
group when the cloud answers at once, fewer when it is far away) but the request budget:
all active streams together aim at `BATCHING_SHARE` of `cloud.max_requests_per_minute`
(uplink/budget.py). So each stream with buffered readings lingers, from its first new
reading, for

    linger = max(flush.linger_s, active streams x 60 s / (budget x share))

and is uploaded when that has passed (streams due within a quarter of it go along, one
round and one delete transaction instead of several), or at once when it holds a full
batch, or when ingest has been quiet for a while (three of its usual gaps between commits,
0.05-0.5 s) while the budget has room (a burst ended: what it left goes now, not a linger
later). Streams this process has no notes for
(a backlog from before a restart, rows another process added) are due at once. With
the defaults, 100 readings/s over 20 datastreams lingers 2.4 s per stream: ~12 readings
a request.

Pass-through gathers the same way, within the broker's in-flight window: ingest holds a
group `pass_through_hold_s` (set through `store.staging`) before offering it, so while the
readings arrive faster than the budget's share allows one request each, a request
carries several of a stream. If the window fills before that, ingest writes instead
(gateway/ingest/pass_gate.py).

A `kill -9` loses only these timings: after a restart everything buffered is due at once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gateway.models import StreamKey
from gateway.store.arrivals import Arrival
from gateway.store.streams import StreamState
from gateway.uplink.budget import BATCHING_SHARE, RequestBudget

# Ingest has added nothing for SETTLE_GAPS times its usual gap between commits (at least
# SETTLE_MIN_S, at most SETTLE_S): a burst is over. A steady trickle never pauses that long.
SETTLE_S = 0.5
SETTLE_MIN_S = 0.05
SETTLE_GAPS = 3.0
# Streams and readings seen within this window make up the load batching plans for.
ACTIVE_WINDOW_S = 60.0
# Streams due within this share of their linger go in the same round as one that is due.
ROUND_TOLERANCE = 0.25
# Pass-through never holds a group longer than this (the window usually decides first).
MAX_HOLD_S = 5.0


@dataclass(frozen=True)
class Due:
    """The streams to upload now, and why (for tests and the log)."""

    streams: frozenset[StreamKey]
    reason: str  # "" when none


class Pacing:
    def __init__(
        self, budget: RequestBudget, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.budget = budget
        self._clock = clock
        # Streams with readings buffered since they were last leased in full.
        self._waiting: dict[StreamKey, Arrival] = {}
        # Streams uploaded within ACTIVE_WINDOW_S (-> when): the streams batching plans for.
        # Streams that only wait (parked, refused, over quota) use no requests, so a flood
        # of junk topics does not stretch every stream's linger.
        self._seen: dict[StreamKey, float] = {}
        self._readings: deque[tuple[float, int]] = deque()
        self._readings_sum = 0  # of the counts in `_readings`
        self._since = clock()
        self.last_rows_at = 0.0
        self.settle_s = SETTLE_S
        self._leased_now: set[StreamKey] = set()  # leased since the last `unsent`
        # Due, not sent, lingering again: settling does not hurry them (new rows do).
        self._deferred: set[StreamKey] = set()
        # Set by the flush loop: send everything now (shutdown, reopening pass-through).
        self.drain = False

    # ------------------------------------------------------------------ what arrives

    def absorb(
        self, notes: dict[StreamKey, Arrival], last_rows_at: float, gap_s: float | None = None
    ) -> None:
        """New rows, per stream (`store.arrivals.take()`), the newest commit's time and the
        usual gap between commits (`store.arrivals.gap_s`)."""
        self.last_rows_at = max(self.last_rows_at, last_rows_at)
        if gap_s is not None:
            self.settle_s = min(SETTLE_S, max(SETTLE_MIN_S, SETTLE_GAPS * gap_s))
        self._deferred -= notes.keys()
        for key, arrival in notes.items():
            waiting = self._waiting.get(key)
            if waiting is None:
                self._waiting[key] = Arrival(arrival.first_at, arrival.count)
            else:
                waiting.count += arrival.count
        if notes:
            self._count_readings(last_rows_at, sum(a.count for a in notes.values()))

    def passed(self, keys: Iterable[StreamKey], readings: int) -> None:
        """Readings that went up through pass-through (never buffered)."""
        now = self._clock()
        for key in keys:
            self._seen[key] = now
        self._count_readings(now, readings)

    def _count_readings(self, at: float, count: int) -> None:
        self._readings.append((at, count))
        self._readings_sum += count

    def leased(self, key: StreamKey, count: int, wanted: int) -> None:
        """A lease asked for `wanted` readings of the stream and got `count`: all it had,
        unless it got as many as it asked."""
        self._leased_now.add(key)
        self._deferred.discard(key)
        if count:
            self._seen[key] = self._clock()
        if count < wanted:
            self._waiting.pop(key, None)
            return
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.count = max(0, waiting.count - count)

    def unsent(self, due: Iterable[StreamKey]) -> None:
        """After a pass: streams that were due and not leased (parked, over quota, the
        pass stopped) linger again from now, instead of being due at every wake-up (their
        count too: a full batch that cannot go is no reason to hurry)."""
        now = self._clock()
        for key in due:
            if key not in self._leased_now:
                self._waiting[key] = Arrival(now, 0)
                self._deferred.add(key)
        self._leased_now.clear()

    def forget(self, keys: Iterable[StreamKey]) -> None:
        """Streams with nothing buffered any more."""
        for key in keys:
            self._waiting.pop(key, None)
            self._deferred.discard(key)

    def _prune(self, now: float) -> None:
        cutoff = now - ACTIVE_WINDOW_S
        if any(seen < cutoff for seen in self._seen.values()):
            self._seen = {key: seen for key, seen in self._seen.items() if seen >= cutoff}
        while self._readings and self._readings[0][0] < cutoff:
            self._readings_sum -= self._readings.popleft()[1]

    # ------------------------------------------------------------------ the load

    def active_streams(self) -> int:
        self._prune(self._clock())
        return len(self._seen)

    def readings_per_s(self) -> float:
        now = self._clock()
        self._prune(now)
        span_s = min(ACTIVE_WINDOW_S, max(1.0, now - self._since))
        return self._readings_sum / span_s

    def linger_s(self, floor_s: float) -> float:
        return max(floor_s, self.budget.stream_interval_s(self.active_streams()))

    def pass_through_hold_s(self) -> float:
        """How long ingest gathers a pass-through group: 0 (its commit interval) while one
        request per reading fits the budget's share, else long enough for several."""
        if self.readings_per_s() <= self.budget.requests_per_s():
            return 0.0
        return min(MAX_HOLD_S, self.budget.stream_interval_s(self.active_streams()))

    # ------------------------------------------------------------------ what is due

    def due(
        self, pending: Sequence[StreamState], listed_at: float, batch_size: int, floor_s: float
    ) -> Due:
        """Which of `pending` (the streams with buffered readings, as listed at `listed_at`)
        to upload now. Waiting streams the list left out had their rows removed otherwise
        (expired, dead-lettered, evicted): forgotten."""
        now = self._clock()
        listed = {s.key for s in pending}
        gone = [k for k, w in self._waiting.items() if k not in listed and w.first_at < listed_at]
        self.forget(gone)
        if self.drain:
            return Due(frozenset(s.key for s in pending), "drain")
        linger_s = self.linger_s(floor_s)
        due: set[StreamKey] = set()
        reason = ""
        for stream in pending:
            waiting = self._waiting.get(stream.key)
            if waiting is None:
                due.add(stream.key)  # rows from before this process, or another process's
                reason = reason or "backlog"
            elif waiting.count >= batch_size:
                due.add(stream.key)
                reason = reason or "full_batch"
            elif now - waiting.first_at >= linger_s:
                due.add(stream.key)
                reason = reason or "linger"
        if due or not pending:
            early = now - linger_s * (1 - ROUND_TOLERANCE)
            due |= {
                s.key
                for s in pending
                if (w := self._waiting.get(s.key)) is not None and w.first_at <= early
            }
            return Due(frozenset(due), reason)
        room = self.budget_room()
        if now - self.last_rows_at >= self.settle_s and room > 0:
            settled = sorted(
                (s for s in pending if self._settling(s.key)),
                key=lambda s: self._waiting[s.key].first_at,
            )
            return Due(frozenset(s.key for s in settled[:room]), "settled")
        return Due(frozenset(), "")

    def _settling(self, key: StreamKey) -> bool:
        """Waiting since before ingest's last rows, and not just put back by `unsent`."""
        waiting = self._waiting.get(key)
        return (
            waiting is not None
            and waiting.first_at <= self.last_rows_at
            and key not in self._deferred
        )

    def budget_room(self) -> int:
        """Requests batching may still plan for this minute."""
        planned = int(self.budget.per_minute * BATCHING_SHARE)
        return planned - self.budget.requests_last_minute()

    def next_due_in_s(self, batch_size: int, floor_s: float) -> float | None:
        """Seconds until a waiting stream is due (`due`'s rules, as far as they can be told
        without listing the streams); None when nothing waits."""
        if not self._waiting:
            return None
        if self.drain or any(a.count >= batch_size for a in self._waiting.values()):
            return 0.0
        now = self._clock()
        oldest = min(arrival.first_at for arrival in self._waiting.values())
        due_in_s = max(0.0, oldest + self.linger_s(floor_s) - now)
        settling = any(self._settling(key) for key in self._waiting)
        if settling and self.budget_room() > 0:
            due_in_s = min(due_in_s, max(0.0, self.last_rows_at + self.settle_s - now))
        return due_in_s
