"""The flush loop's side of pass-through: upload staged readings at once, write nothing.

Ingest offers a group through `store.staging` while the flush loop keeps it open (cloud
reachable, nothing buffered). Each stream's readings in the group become one request,
sent concurrently with the group's other streams (`cloud.max_concurrent_requests`,
inflight.py), under the same rules as buffered ones: too old for the cloud, or more than
the quota leaves → not sent here (ingest writes them, and the buffered path decides); the
quota is counted before the requests, one ledger write for the whole round when some
device's reservation runs short (`Store.reserve_quota`, reservations.py), in the day the
cloud accepts them. A group whose requests the request budget cannot take right now is
declined whole (`declined = "budget"`): ingest writes it and stops offering for a while
rather than hold PUBACKs for a slot. On any cloud error the group's unsent readings and
every queued group go back to be written, and the error is left for the buffered path to
meet and handle (backoff, park, dead letter), so pass-through has no failure handling of
its own to get wrong.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.errors import CloudError, UnknownTarget
from gateway.log import get_logger
from gateway.models import Batch, Point, StreamKey
from gateway.store import Store
from gateway.store.reservations import RESERVE_HORIZON_S, reservation_size
from gateway.store.staging import StagedGroup
from gateway.uplink.inflight import InFlight, run_round
from gateway.uplink.pacing import Pacing
from gateway.uplink.quota import DailyQuota
from gateway.uplink.stream_order import StreamOrder

log = get_logger("flush")


@dataclass
class PassThroughStats:
    requests: int = 0
    delivered: int = 0
    declined: int = 0  # readings left to be written: too old, over quota, cloud failed
    declined_for_budget: int = 0  # groups given back because no request slot was free


@dataclass(frozen=True)
class _Request:
    stream: StreamKey
    indices: list[int]  # of the group's readings
    points: tuple[Point, ...]


class PassThrough:
    def __init__(
        self,
        store: Store,
        *,
        upload: Callable[[Batch], Awaitable[None]],
        quota: Callable[[], DailyQuota],
        clock_ms: Callable[[], int],
        cutoff_ms: Callable[[int], int],
        inflight: InFlight,
        pacing: Pacing,
        trials: StreamOrder | None = None,
    ) -> None:
        self._store = store
        self._staging = store.staging
        self._upload = upload
        self._quota = quota
        self._clock_ms = clock_ms
        self._cutoff_ms = cutoff_ms
        self._inflight = inflight
        self._pacing = pacing
        # Streams the cloud never accepted cost a try each, as on the buffered path.
        self._trials = trials
        self._recent: deque[tuple[float, int, int]] = deque()  # (when, device, points)
        self._first_sent_at: float | None = None
        self.stats = PassThroughStats()

    def open(self) -> None:
        self._staging.open = True

    def close(self) -> None:
        """Stop taking groups; queued ones go back to ingest to be written."""
        if self._staging.open or self._staging.queued:
            self._staging.give_back_all()

    async def send_queued(self) -> CloudError | None:
        """Upload every queued group; the first cloud error closes pass-through and is
        returned (nothing else is raised for the cloud's sake)."""
        while (group := self._staging.take()) is not None:
            try:
                error = await self._send(group)
            finally:
                self._store.journal_reserved_use()  # before ingest acknowledges the group
                self._staging.finish(group)
                self.stats.declined += len(group.undelivered())
            if error is not None:
                self.close()
                return error
        return None

    def _requests(self, group: StagedGroup, now_ms: int) -> list[_Request]:
        """One request per stream, in the group's order; too-old readings are left out (the
        buffered path expires them, with its log line)."""
        # Plain tuple keys: a StreamKey per reading cost more than the grouping itself.
        readings = group.readings
        by_stream: dict[tuple[int, int], list[int]] = {}
        for index, reading in enumerate(readings):
            by_stream.setdefault((reading.device_id, reading.datastream_id), []).append(index)
        cutoff_ms = self._cutoff_ms(now_ms)
        requests = []
        for (device_id, datastream_id), indices in by_stream.items():
            points = tuple(Point(readings[i].ts_ms, readings[i].value_json) for i in indices)
            if min(point.ts_ms for point in points) >= cutoff_ms:
                requests.append(_Request(StreamKey(device_id, datastream_id), indices, points))
        return requests

    async def _send(self, group: StagedGroup) -> CloudError | None:
        now_ms = self._clock_ms()
        requests = self._requests(group, now_ms)
        if not requests:
            return None
        if self._pacing.budget.free() < len(requests):
            group.declined = "budget"
            self.stats.declined_for_budget += 1
            return None
        quota = self._quota()
        day = quota.day_of(now_ms)
        needs: Counter[int] = Counter()
        for request in requests:
            needs[request.stream.device_id] += len(request.points)
        covered = await self._store.reserve_quota(day, needs, self._sizes(needs), quota.limit)
        errors: list[CloudError] = []

        async def send(request: _Request) -> None:
            error = await self._send_one(group, request, day)
            if error is not None:
                errors.append(error)
            refused = isinstance(error, UnknownTarget)
            if self._trials is not None and request.stream in tried and not refused:
                self._trials.allowance.give_back()  # not refused: the try cost nothing

        tried: set[StreamKey] = set()
        await run_round(
            self._inflight,
            [r for r in requests if r.stream.device_id in covered and self._may_try(r, tried)],
            send,
            stream_of=lambda request: request.stream,
            may_start=lambda _request: not group.hurry,
            finished=lambda _request, _result: not errors,
        )
        self._pacing.passed([request.stream for request in requests], len(group.readings))
        return errors[0] if errors else None

    async def _send_one(self, group: StagedGroup, request: _Request, day: str) -> CloudError | None:
        device_id, count = request.stream.device_id, len(request.points)
        self.stats.requests += 1
        try:
            await self._upload(Batch(request.stream, request.points))
        except CloudError as exc:
            return exc
        quota = self._quota()
        accepted_day = quota.day_of(self._clock_ms())
        if accepted_day != day:  # midnight passed: it counts in the day it was accepted
            need = {device_id: count}
            await self._store.reserve_quota(accepted_day, need, need, quota.limit)
        self._store.use_reserved_quota(device_id, accepted_day, count)
        now = time.monotonic()
        self._recent.append((now, device_id, count))
        if self._first_sent_at is None:
            self._first_sent_at = now
        for index in request.indices:
            group.delivered[index] = True
        self.stats.delivered += count
        return None

    def _may_try(self, request: _Request, tried: set[StreamKey]) -> bool:
        """A stream the cloud accepted before goes; another takes a try from the buffered
        path's allowance (stream_order.py) or is written, so junk topics cost no more
        refused requests through pass-through than through the buffer."""
        if self._trials is None or request.stream in self._trials.proven:
            return True
        if not self._trials.allowance.take():
            return False
        tried.add(request.stream)
        return True

    def _sizes(self, needs: Counter[int]) -> dict[int, int]:
        """Per device (of this round, and every other that sent in the last minute), a
        reservation of about a minute of its pass-through traffic (in the first minute,
        what it sent so far scaled to a minute)."""
        now = time.monotonic()
        cutoff = now - RESERVE_HORIZON_S
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()
        last_minute: Counter[int] = Counter()
        for _, device_id, points in self._recent:
            last_minute[device_id] += points
        span_s = RESERVE_HORIZON_S
        if self._first_sent_at is not None:
            span_s = min(RESERVE_HORIZON_S, max(5.0, now - self._first_sent_at))
        scale = RESERVE_HORIZON_S / span_s
        return {
            device: reservation_size(round(last_minute[device] * scale), needs.get(device, 0))
            for device in last_minute.keys() | needs.keys()
        }
