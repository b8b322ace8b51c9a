"""Small asyncio helpers shared by the long-running loops, and how such a loop shows it is
alive: a `Heartbeat` it beats, or a `ProgressWatch` that sees its progress from outside.
The loops (flush, ingest) report there; the systemd watchdog (ops/systemd.py) reads it,
so the upload side does not depend on systemd."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_any(*events: asyncio.Event, timeout_s: float | None) -> bool:
    """Wait until any event is set or the timeout passes; True if an event was set.

    Waiter tasks are always cancelled and awaited, so no task outlives the call.
    """
    if any(event.is_set() for event in events):
        return True
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        done, _ = await asyncio.wait(
            waiters,
            timeout=None if timeout_s is None else max(0.0, timeout_s),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        for waiter in waiters:
            waiter.cancel()
        for waiter in waiters:
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
    return bool(done)


class Notifier:
    """One producer, any number of listeners, each with a flag of its own.

    The store announces changes (new rows, space freed) without anyone else being able to
    set or clear its state: a listener clears only its own flag, so two consumers cannot
    swallow each other's wake-ups.
    """

    def __init__(self) -> None:
        self._listeners: list[asyncio.Event] = []

    def listen(self) -> asyncio.Event:
        """A new flag, set by every later `notify()`; the caller clears it when it has looked."""
        flag = asyncio.Event()
        self._listeners.append(flag)
        return flag

    def notify(self) -> None:
        for flag in self._listeners:
            flag.set()


async def uncancelled(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` to its end even if the caller is cancelled meanwhile, then re-raise that.

    Like `asyncio.shield`, but the caller also waits for the work before it goes: the store
    lock stays held, so nothing sees the state half-way.
    """
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled():
            task.exception()  # the caller is going away; a failure is its to drop
        raise asyncio.CancelledError
    return task.result()


Clock = Callable[[], float]


class Heartbeat:
    """A loop's sign of life for the watchdog.

    The loop calls :meth:`beat` on every iteration and before every wait, naming the wait's
    bound; `budget_s` covers the work between two beats (a request, a store call). A loop
    whose next beat is overdue by more than that is stalled. A wait whose length only
    another object knows (a backoff, a Retry-After) is declared with :meth:`beat_while`.
    """

    def __init__(self, budget_s: float, *, clock: Clock = time.monotonic) -> None:
        self.budget_s = budget_s
        self.beats = 0
        self._clock = clock
        self._due = clock() + budget_s
        self._waiting_while: Callable[[], bool] | None = None

    def beat(self, then_wait_s: float = 0.0) -> None:
        """Alive now; the next beat comes within `then_wait_s` plus the budget."""
        self.beats += 1
        self._waiting_while = None
        self._due = self._clock() + max(0.0, then_wait_s) + self.budget_s

    def beat_while(self, waiting: Callable[[], bool]) -> None:
        """Alive now, and excused while `waiting()` is true; the budget runs after that."""
        self.beat()
        self._waiting_while = waiting

    def stalled_s(self) -> float:
        """How long the next beat is overdue; 0.0 while the loop is alive."""
        now = self._clock()
        if self._waiting_while is not None and self._waiting_while():
            self._due = now + self.budget_s
        return max(0.0, now - self._due)


class ProgressWatch:
    """Liveness seen from outside a loop that may idle indefinitely (ingest without messages).

    Stalled when work has been waiting (`busy()`) and `progress()` has not moved for longer
    than `budget_s`. Idle is not stalled: a gateway whose sensors are quiet stays up.
    """

    def __init__(
        self,
        busy: Callable[[], bool],
        progress: Callable[[], int],
        budget_s: float,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self._busy = busy
        self._progress = progress
        self.budget_s = budget_s
        self._clock = clock
        self._last = progress()
        self._since = clock()

    def stalled_s(self) -> float:
        now = self._clock()
        current = self._progress()
        if current != self._last or not self._busy():
            self._last = current
            self._since = now
            return 0.0
        return max(0.0, now - self._since - self.budget_s)
