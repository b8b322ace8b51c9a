"""Long store work that keeps telling its owner it still moves: salvage, migration, checks.

Salvaging a damaged file, upgrading an old one, counting a big backlog after a crash or
checking a whole file's integrity can take longer than a service manager waits (systemd's
`WatchdogSec=`, `TimeoutStartSec=`, `TimeoutStopSec=`). Killed half-way, the next start
begins the same work again: a restart loop on exactly the box that needs the work done.
So such work reports its progress to a `LongWorkObserver` the owner passes to
`Store.open`; the daemon's is its sd_notify sender (`gateway.ops.systemd.ServiceNotifier`),
which turns the reports into `EXTEND_TIMEOUT_USEC=`, `WATCHDOG=1` and `STATUS=`. The
store knows nothing of systemd.

Progress is what is reported, not a timer: the reports come from the thread doing the
work (from SQLite's progress handler inside a long statement, or per row or page), so
work that hangs stops reporting and the service manager's timeouts still catch it.
Work that ends within `QUIET_S` reports nothing at all: a healthy start says nothing.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Protocol

from gateway.log import get_logger

log = get_logger("store")

# Work shorter than this is not reported (an ordinary start-up touches a few pages).
QUIET_S = 0.2
# At most one report per this interval: the observer decides what to send, and when.
REPORT_EVERY_S = 0.05
# SQLite calls the progress handler every this many virtual machine steps (a few ms).
VM_STEPS = 5000


class LongWorkObserver(Protocol):
    """Told, from the thread doing the work, that long store work still moves.

    Both methods must be cheap, thread-safe and must not raise.
    """

    def long_work(self, status: str, *, holds_store: bool) -> None:
        """Still moving; `status` says what and how far, for a person. `holds_store`: the
        store's users (ingest, flush) wait for this work to end (a salvage, an upgrade),
        rather than carry on beside it (the full check reads a snapshot of its own)."""

    def long_work_done(self) -> None:
        """The work that was reported has ended (finished or failed)."""


class WorkProgress:
    """One long job's progress, reported at most every REPORT_EVERY_S after QUIET_S.

    Use as a context manager around the job (its end is reported if anything was), and
    call :meth:`step` per unit of work or let SQLite call :meth:`tick` (:meth:`watch`).
    Without an observer every call is a cheap no-op.
    """

    def __init__(
        self,
        observer: LongWorkObserver | None,
        activity: str,
        *,
        holds_store: bool,
        unit: str = "",
        total: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.activity = activity
        self.holds_store = holds_store
        self.unit = unit
        self.total = total
        self.count = 0
        self._observer = observer
        self._clock = clock
        self._started = clock()
        self._next_report = self._started + QUIET_S
        self._reported = False

    def step(self, count: int = 1) -> None:
        """`count` more units done (rows, pages)."""
        self.count += count
        self.tick()

    def tick(self) -> int:
        """Report if it is time; 0 (SQLite's "go on") so it can be a progress handler."""
        if self._observer is None:
            return 0
        now = self._clock()
        if now < self._next_report:
            return 0
        self._next_report = now + REPORT_EVERY_S
        if not self._reported:
            self._reported = True
            log.info("store_long_work", activity=self.activity)
        try:
            self._observer.long_work(self.status(now), holds_store=self.holds_store)
        except Exception as exc:  # a report must never fail the work itself
            log.warning("long_work_report_failed", error=f"{type(exc).__name__}: {exc}")
            self._observer = None
        return 0

    def status(self, now: float | None = None) -> str:
        """`salvaging the buffer: 1,234 of 5,678 pages read`, or the time spent so far."""
        if self.unit:
            of = f" of {self.total:,}" if self.total is not None else ""
            return f"{self.activity}: {self.count:,}{of} {self.unit}"
        elapsed = (self._clock() if now is None else now) - self._started
        return f"{self.activity} ({elapsed:.0f} s so far)"

    def watch(self, connection: sqlite3.Connection) -> None:
        """Have SQLite report progress from inside every statement on `connection`."""
        if self._observer is not None:
            connection.set_progress_handler(self.tick, VM_STEPS)

    def __enter__(self) -> WorkProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *details: object) -> None:
        if not self._reported or self._observer is None:
            return
        log.info(
            "store_long_work_done",
            activity=self.activity,
            duration_s=round(self._clock() - self._started, 1),
            failed=exc_type is not None,
        )
        try:
            self._observer.long_work_done()
        except Exception as exc:  # the work's own outcome matters more
            log.warning("long_work_report_failed", error=f"{type(exc).__name__}: {exc}")
