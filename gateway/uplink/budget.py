"""The organization's request budget: never more than `cloud.max_requests_per_minute`.

Blynk answers 429 above 10,000 requests a minute per organization, and every gateway of a
fleet shares that budget, so each gateway has a cap of its own (default 1,000) that every
HTTP request it makes counts against: uploads from the buffer, pass-through uploads, the
retry after a 401, token requests.

A sliding window, not a token bucket: a bucket that starts full and refills N a minute lets
2N requests through in the minute after a quiet one, and the promise is N in *any* 60 s.
Each request holds a slot from the moment it starts until 60 s after its answer. The cloud
receives a request somewhere between the two, so however the network delays it, no 60 s
of the cloud's clock sees more than N of ours. The cost: a slot is busy one round trip
longer than it strictly needs to be (100 ms in a minute).

The budget is also what batching aims at: `stream_interval_s` spaces the requests of each
stream so that all active streams together use `BATCHING_SHARE` of it. The rest absorbs
bursts, retries and new streams, so in a steady state the cap is a ceiling nobody hits;
when the load does hit it, uploads wait for a slot and their batches grow meanwhile.
A `kill -9` costs nothing here: the window lives in memory, and a restart begins with the
whole budget, which can put up to 2N requests in the minute around a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

WINDOW_S = 60.0
# The share of the budget that batching plans for (the limiter itself enforces all of it).
BATCHING_SHARE = 0.5


class RequestBudget:
    """At most `per_minute` requests in any `WINDOW_S`; lives on the event loop."""

    def __init__(
        self,
        per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        window_s: float = WINDOW_S,  # tests shrink "a minute"
    ) -> None:
        if per_minute < 1:
            raise ValueError(f"per_minute must be at least 1, not {per_minute}")
        self.per_minute = per_minute
        self._clock = clock
        self._window_s = window_s
        self._in_flight = 0
        # When the slots of answered requests free up (answer + WINDOW_S), oldest first.
        self._frees_at: deque[float] = deque()
        # Start times within the last WINDOW_S: the rate `status` and `/metrics` show.
        self._started: deque[float] = deque()
        self._answered = asyncio.Event()
        self.requests = 0  # since start
        self.waits = 0  # requests that had to wait for a slot
        self.waited_s = 0.0

    def reconfigure(self, per_minute: int) -> None:
        """A reload: the new cap counts the requests already in the window."""
        if per_minute < 1:
            raise ValueError(f"per_minute must be at least 1, not {per_minute}")
        self.per_minute = per_minute
        self._answered.set()  # waiters look again

    def _prune(self, now: float) -> None:
        while self._frees_at and self._frees_at[0] <= now:
            self._frees_at.popleft()
        while self._started and self._started[0] <= now - self._window_s:
            self._started.popleft()

    def used(self) -> int:
        """Slots taken now: requests in flight and those answered within the last minute."""
        self._prune(self._clock())
        return self._in_flight + len(self._frees_at)

    def free(self) -> int:
        return max(0, self.per_minute - self.used())

    def requests_last_minute(self) -> int:
        """Requests started in the last 60 s (what `status` shows as requests per minute)."""
        self._prune(self._clock())
        return len(self._started)

    def next_free_in_s(self) -> float:
        """0 if a slot is free now; else when the oldest busy slot frees (a minute at most
        once every slot in flight has been answered)."""
        if self.free() > 0:
            return 0.0
        if self._frees_at:
            return max(0.0, self._frees_at[0] - self._clock())
        return self._window_s

    async def acquire(self) -> None:
        """Wait for a free slot and take it; `release` must follow (see `slot`)."""
        started_wait: float | None = None
        while self.free() <= 0:
            if started_wait is None:
                started_wait = self._clock()
                self.waits += 1
            self._answered.clear()
            timeout_s = self._frees_at[0] - self._clock() if self._frees_at else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._answered.wait()
        now = self._clock()
        if started_wait is not None:
            self.waited_s += now - started_wait
        self._in_flight += 1
        self._started.append(now)
        self.requests += 1

    def release(self) -> None:
        """The request was answered (or failed, or was cancelled): its slot stays busy for
        `WINDOW_S` more."""
        self._in_flight -= 1
        self._frees_at.append(self._clock() + self._window_s)
        self._answered.set()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One request: waits for a slot, holds it while the request is in flight."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    def stream_interval_s(self, streams: int) -> float:
        """How far apart each of `streams` active streams should send, so that together
        they use `BATCHING_SHARE` of the budget."""
        return max(1, streams) * self._window_s / (self.per_minute * BATCHING_SHARE)

    def requests_per_s(self) -> float:
        """The request rate batching aims at (`BATCHING_SHARE` of the cap)."""
        return self.per_minute * BATCHING_SHARE / self._window_s
