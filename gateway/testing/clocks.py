"""Fake time for tests of the clock rules: a wall clock that is wrong and steps, a boot clock
that can be moved ahead, and a synchronization switch.

`FakeTime` keeps real time flowing (asyncio's timers, the broker and the sandbox run on
it): boottime is the real monotonic clock plus `advance()`, the true time is real time plus
`advance()` (or `true_ms`, e.g. the sandbox's clock, whose source the test then advances
alongside), and the wall clock the gateway reads is the true time plus `error_ms`: set it
3 days back for a fake-hwclock boot, then `step()` it to zero as NTP's first sync would.

    fake = FakeTime(true_ms=sandbox.now_ms, error_ms=-3 * DAY_MS)
    sync = SyncSwitch()
    clock = fake.clock(sync)      # a gateway.clock.Clock over both
    ...
    fake.step(3 * DAY_MS)         # the clock jumps to the right time
    sync.synchronized = True      # and the kernel says so
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.clock import Clock

__all__ = ["FakeTime", "SyncSwitch"]


def _real_ms() -> int:
    return time.time_ns() // 1_000_000


class SyncSwitch:
    """A sync source the test flips; `problem` makes it fail the way a blocked adjtimex does."""

    name = "test"
    unsynchronized = "the test says so"

    def __init__(self, synchronized: bool = False) -> None:
        self.synchronized = synchronized
        self.problem: str | None = None
        self.reads = 0

    def read(self) -> tuple[bool, str | None]:
        self.reads += 1
        return self.synchronized and self.problem is None, self.problem


class FakeTime:
    """A wall clock `error_ms` off the truth, and a boot clock `uptime_ms` into its boot."""

    def __init__(
        self,
        *,
        true_ms: Callable[[], int] | None = None,
        error_ms: int = 0,
        uptime_ms: int = 3_600_000,
        boot_id: str = "11111111-1111-4111-8111-111111111111",
    ) -> None:
        self._true_ms = true_ms
        self.error_ms = error_ms
        self.boot_id = boot_id
        self._started_ns = time.monotonic_ns()
        self._uptime_ms = uptime_ms
        self.advanced_ms = 0

    def true_ms(self) -> int:
        """What a right clock would say now."""
        if self._true_ms is None:
            return _real_ms() + self.advanced_ms
        return self._true_ms()

    def wall_ms(self) -> int:
        """What the gateway's clock says now."""
        return self.true_ms() + self.error_ms

    def boottime_ms(self) -> int:
        return (
            self._uptime_ms
            + (time.monotonic_ns() - self._started_ns) // 1_000_000
            + (self.advanced_ms)
        )

    def advance(self, ms: int) -> None:
        """Time passes at once: every clock moves (an external `true_ms`: move its source
        by as much, e.g. `sandbox.advance_clock(ms / 1000)`)."""
        self.advanced_ms += ms

    def step(self, ms: int) -> None:
        """The wall clock jumps by `ms` (positive: ahead); the truth does not."""
        self.error_ms += ms

    def clock(self, source: SyncSwitch, *, recheck_s: float = 0.0) -> Clock:
        """A `Clock` reading these clocks; rechecked on every ask unless told otherwise."""
        return Clock(
            source,
            wall_ms=self.wall_ms,
            boottime_ms=self.boottime_ms,
            boot_id=self.boot_id,
            recheck_s=recheck_s,
        )
