"""Will a device's backlog reach the cloud before it is too old? Pure arithmetic, no I/O.

The cloud takes `daily_points_limit` points per device per day and nothing older than the
age limit, so a backlog larger than a few days' quota loses its oldest readings whatever
the gateway does. `blynk-gateway status` runs this on a histogram of buffered timestamps
(one bucket per hour and stream) to say how many readings will expire before they can be
sent, while there is still time to raise the quota or purge on purpose.

The model follows the flush loop: today's remaining allowance is sent now, then a full
day's quota at each reset; within a device the streams share the quota equally (the loop's
round robin), each stream oldest first (or newest first, as `flush.order` says); at every
send time, readings past the age limit are dead-lettered instead. Readings that arrive
later are not counted (they queue behind the backlog, or ahead of it with "newest"). The
model assumes the cloud is reachable; an outage only makes it worse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DAY_MS = 86_400_000
# A backlog is resolved within the age limit plus a day; this only bounds a bad input.
MAX_SLOTS = 100_000


@dataclass(frozen=True, slots=True)
class Forecast:
    """What will become of one device's current backlog."""

    backlog: int
    will_send: int
    will_expire: int
    # When the last of the backlog is sent or expired (None: nothing buffered).
    clears_at_ms: int | None
    # Quota days needed, counting today's remainder as one (0: nothing buffered).
    days: int


@dataclass(slots=True)
class _Bucket:
    """Readings spread evenly over [start_ms, end_ms); partly sent or expired buckets shrink."""

    start_ms: float
    end_ms: float
    count: float

    def cut(self, at_ms: float) -> float:
        """Remove the part older than `at_ms`; how many readings that was."""
        share = (at_ms - self.start_ms) / (self.end_ms - self.start_ms)
        part = self.count * min(1.0, max(0.0, share))
        self.count -= part
        self.start_ms = max(self.start_ms, at_ms)
        return part


def forecast_device(
    streams: Sequence[Sequence[tuple[int, int]]],
    *,
    bucket_ms: int,
    now_ms: int,
    allowance_today: int,
    daily_limit: int,
    next_reset_ms: int,
    max_age_ms: int,
    newest_first: bool = False,
) -> Forecast:
    """Forecast one device from its streams' histograms.

    `streams`: per stream, (bucket start ms, readings) with timestamps in
    [start, start + bucket_ms), in ascending order. `max_age_ms`: readings older than
    `send time - max_age_ms` are refused (the cloud's limit less the gateway's margin).
    Readings are assumed spread evenly inside a bucket.
    """
    queues = [
        [_Bucket(start, start + bucket_ms, float(count)) for start, count in stream if count > 0]
        for stream in streams
    ]
    queues = [queue for queue in queues if queue]
    backlog = sum(round(sum(b.count for b in queue)) for queue in queues)
    if not queues:
        return Forecast(0, 0, 0, None, 0)
    sent = 0.0
    slot_ms, capacity = now_ms, float(max(0, allowance_today))
    for slot in range(MAX_SLOTS):
        cutoff_ms = slot_ms - max_age_ms
        for queue in queues:
            _expire(queue, cutoff_ms)
        queues = [queue for queue in queues if queue]
        if queues:
            sent += _share(queues, capacity, newest_first)
            queues = [queue for queue in queues if queue]
        if not queues:
            return Forecast(
                backlog=backlog,
                will_send=round(sent),
                will_expire=backlog - round(sent),
                clears_at_ms=slot_ms,
                days=slot + 1,
            )
        slot_ms = next_reset_ms + slot * DAY_MS
        capacity = float(daily_limit)
    raise ValueError("forecast did not converge: check daily_limit and max_age_ms")


def _expire(queue: list[_Bucket], cutoff_ms: int) -> float:
    """Drop what is older than `cutoff_ms` from the old end of a stream's queue."""
    gone = 0.0
    while queue and queue[0].start_ms < cutoff_ms:
        gone += queue[0].cut(cutoff_ms)
        if queue[0].count > 1e-9:
            break
        queue.pop(0)
    return gone


def _share(queues: list[list[_Bucket]], capacity: float, newest_first: bool) -> float:
    """Round robin as water-filling: equal shares, a stream that needs less gives the rest
    to the others. Returns what was sent."""
    totals = sorted(((sum(b.count for b in q), i) for i, q in enumerate(queues)))
    remaining = capacity
    sent = 0.0
    for position, (total, index) in enumerate(totals):
        take = min(total, remaining / (len(totals) - position))
        _take(queues[index], take, newest_first)
        remaining -= take
        sent += take
    return sent


def _take(queue: list[_Bucket], amount: float, newest_first: bool) -> None:
    """Send `amount` readings from the stream's old end (or new end, newest first)."""
    end = -1 if newest_first else 0
    while queue and amount > 1e-9:
        bucket = queue[end]
        if bucket.count <= amount + 1e-9:
            amount -= bucket.count
            queue.pop(end)
            continue
        width = (bucket.end_ms - bucket.start_ms) * amount / bucket.count
        if newest_first:
            bucket.end_ms -= width
        else:
            bucket.start_ms += width
        bucket.count -= amount
        amount = 0.0


def drain_eta_s(backlog: int, out_per_s: float, in_per_s: float = 0.0) -> float | None:
    """Seconds until a backlog is gone at the observed rates; None if it is not shrinking."""
    if backlog <= 0:
        return 0.0
    net = out_per_s - in_per_s
    if net <= 0:
        return None
    return backlog / net
