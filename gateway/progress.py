"""How a long-running loop shows it is alive: a heartbeat it beats, or progress seen from
outside. The loops (flush, ingest) report here; the systemd watchdog (ops/systemd.py) reads
it. Kept apart from both so the upload side does not depend on systemd.
"""

from __future__ import annotations

import time
from collections.abc import Callable

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
