"""The flush loop's side of pass-through: upload staged readings at once, write nothing.

Ingest offers a group through `store.staging` while the flush loop keeps it open (cloud
reachable, nothing buffered). Each stream's readings in the group become one request, under
the same rules as buffered ones: too old for the cloud, or more than the quota leaves →
not sent here (ingest writes them, and the buffered path decides); the quota is counted
before the request (`Store.reserve_quota`), in the day the cloud accepts it. On any cloud
error the group's unsent readings and every queued group go back to be written, and the
error is left for the buffered path to meet and handle (backoff, park, dead letter), so
pass-through has no failure handling of its own to get wrong.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.errors import CloudError
from gateway.log import get_logger
from gateway.models import Batch, Point, StreamKey
from gateway.store import Store
from gateway.store.staging import StagedGroup
from gateway.uplink.quota import DailyQuota

log = get_logger("flush")


@dataclass
class PassThroughStats:
    requests: int = 0
    delivered: int = 0
    declined: int = 0  # readings left to be written: too old, over quota, cloud failed


class PassThrough:
    def __init__(
        self,
        store: Store,
        *,
        upload: Callable[[Batch], Awaitable[None]],
        quota: Callable[[], DailyQuota],
        clock_ms: Callable[[], int],
        cutoff_ms: Callable[[int], int],
    ) -> None:
        self._store = store
        self._staging = store.staging
        self._upload = upload
        self._quota = quota
        self._clock_ms = clock_ms
        self._cutoff_ms = cutoff_ms
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
                self._staging.finish(group)
                self.stats.declined += len(group.undelivered())
            if error is not None:
                self.close()
                return error
        return None

    async def _send(self, group: StagedGroup) -> CloudError | None:
        # Plain tuple keys: a StreamKey per reading cost more than the grouping itself.
        readings = group.readings
        by_stream: dict[tuple[int, int], list[int]] = {}
        for index, reading in enumerate(readings):
            by_stream.setdefault((reading.device_id, reading.datastream_id), []).append(index)
        for (device_id, datastream_id), indices in by_stream.items():
            stream = StreamKey(device_id, datastream_id)
            points = tuple(Point(readings[i].ts_ms, readings[i].value_json) for i in indices)
            now_ms = self._clock_ms()
            if min(point.ts_ms for point in points) < self._cutoff_ms(now_ms):
                continue  # the buffered path expires them, with its log line
            quota = self._quota()
            day = quota.day_of(now_ms)
            if not await self._store.reserve_quota(device_id, day, len(points), quota.limit):
                continue  # the buffered path meets the limit and says so
            self.stats.requests += 1
            try:
                await self._upload(Batch(stream, points))
            except CloudError as exc:
                return exc
            accepted_day = quota.day_of(self._clock_ms())
            if accepted_day != day:  # midnight passed: it counts in the day it was accepted
                await self._store.reserve_quota(device_id, accepted_day, len(points), quota.limit)
                self._store.use_reserved_quota(device_id, accepted_day, len(points))
            else:
                self._store.use_reserved_quota(device_id, day, len(points))
            for index in indices:
                group.delivered[index] = True
            self.stats.delivered += len(points)
        return None
