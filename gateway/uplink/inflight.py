"""Uploads under way: several at once, never two for one stream, quota counted meanwhile.

A cloud 100 ms away allows ten requests a second one after another; with
`cloud.max_concurrent_requests` (8) of them in flight the round trip is shared. Order
within a stream stays what it was, because a stream never has two requests in flight:
its next batch is leased only after the cloud answered the previous one. The points a
device has in flight count against its quota before the cloud answers, so two streams of
one device uploading at once can never take it past its limit together
(`device_lock` keeps the check and the count one step).

Everything lives in memory: a `kill -9` forgets it, and nothing of it needs remembering
(a request that was in flight is retried from the buffer, or redelivered by the broker).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from gateway.aio import wait_any
from gateway.models import StreamKey

T = TypeVar("T")
R = TypeVar("R")


class InFlight:
    """At most `limit` requests at once, one per stream, and each device's points in them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._streams: set[StreamKey] = set()
        self._points: Counter[int] = Counter()
        self._device_locks: dict[int, asyncio.Lock] = {}
        self._finished = asyncio.Event()
        self.most = 0  # the most requests ever in flight at once (tests, benchmarks)

    def reconfigure(self, limit: int) -> None:
        """A reload: requests under way finish; new ones respect the new limit."""
        self.limit = limit
        self._finished.set()

    @property
    def count(self) -> int:
        return len(self._streams)

    def busy(self, stream: StreamKey) -> bool:
        return stream in self._streams

    def points(self, device_id: int) -> int:
        """Points of the device in requests the cloud has not answered yet."""
        return self._points[device_id]

    async def room(self, beat: Callable[[float], None] | None = None) -> None:
        """Until fewer than `limit` requests are in flight (`beat` hears each wait's bound)."""
        while len(self._streams) >= self.limit:
            self._finished.clear()
            if beat is not None:
                beat(60.0)
            await wait_any(self._finished, timeout_s=60.0)

    async def idle(self) -> None:
        """Until no request is in flight."""
        while self._streams:
            self._finished.clear()
            await wait_any(self._finished, timeout_s=60.0)

    def start(self, stream: StreamKey) -> None:
        """A request for `stream` begins (the caller made room and checked `busy`)."""
        if stream in self._streams:
            raise RuntimeError(f"a request for {stream} is already in flight")
        self._streams.add(stream)
        self.most = max(self.most, len(self._streams))

    def finish(self, stream: StreamKey) -> None:
        self._streams.discard(stream)
        self._finished.set()

    def hold_points(self, device_id: int, points: int) -> None:
        """Count `points` (negative: uncount) of the device as in flight."""
        self._points[device_id] += points
        if self._points[device_id] <= 0:
            del self._points[device_id]

    def device_lock(self, device_id: int) -> asyncio.Lock:
        """Held while a device's quota is read and its next request's points counted."""
        lock = self._device_locks.get(device_id)
        if lock is None:
            if len(self._device_locks) > 4 * max(16, len(self._streams)):
                self._device_locks = {
                    d: held for d, held in self._device_locks.items() if held.locked()
                }
            lock = self._device_locks[device_id] = asyncio.Lock()
        return lock


async def run_round(
    inflight: InFlight,
    items: Iterable[T],
    send: Callable[[T], Awaitable[R]],
    *,
    stream_of: Callable[[T], StreamKey],
    may_start: Callable[[T], bool] = lambda _: True,
    finished: Callable[[T, R], bool] = lambda _item, _result: True,
    beat: Callable[[float], None] | None = None,
) -> list[R]:
    """Send `items` (one request each, in order of start), at most `inflight.limit` at once.

    `may_start` is asked right before an item starts (False: stop starting more);
    `finished` hears each result as it comes (False: stop starting more, e.g. the cloud
    is failing); requests already under way always finish. The first exception a `send`
    raises stops the round and is raised once every request under way has ended (never
    wrapped in an ExceptionGroup).
    """
    results: list[R] = []
    errors: list[BaseException] = []
    stopped = False

    async def one(item: T, stream: StreamKey) -> None:
        nonlocal stopped
        try:
            result = await send(item)
        except Exception as exc:  # re-raised below, after the others finished
            errors.append(exc)
            stopped = True
            return
        finally:
            inflight.finish(stream)
        results.append(result)
        if not finished(item, result):
            stopped = True

    async with asyncio.TaskGroup() as tasks:
        for item in items:
            await inflight.room(beat)
            if stopped or errors or not may_start(item):
                break
            stream = stream_of(item)
            inflight.start(stream)
            tasks.create_task(
                one(item, stream), name=f"upload-{stream.device_id}-{stream.datastream_id}"
            )
    if errors:
        raise errors[0]
    return results
