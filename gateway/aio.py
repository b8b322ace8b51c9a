"""Small asyncio helpers shared by the long-running loops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
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
