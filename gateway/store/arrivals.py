"""Which streams got new rows, when, and how many: what the flush loop batches by.

The flush loop uploads a stream once it has lingered long enough or holds a full batch
(uplink/pacing.py). It learns both from here instead of asking SQLite: every commit that
adds readings notes, per stream, how many it added (duplicates included: an estimate is
enough to time an upload) and the time of the first since the flush loop last took the
notes. Memory only; after a restart the flush loop treats streams it has no notes for as
a backlog to send at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.models import StreamKey


@dataclass(slots=True)
class Arrival:
    first_at: float  # monotonic
    count: int


class Arrivals:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._notes: dict[StreamKey, Arrival] = {}
        self.last_at = 0.0  # the newest commit that added rows (monotonic)
        # The usual time between two such commits (a moving average): a few ms while a
        # backlog streams in, the commit interval for a trickle. Tells a pause from the end.
        self.gap_s: float | None = None

    def note(self, counts: Mapping[StreamKey, int]) -> None:
        """A commit added `counts` readings per stream."""
        if not counts:
            return
        now = self._clock()
        if self.last_at:
            gap_s = now - self.last_at
            self.gap_s = gap_s if self.gap_s is None else 0.8 * self.gap_s + 0.2 * gap_s
        self.last_at = now
        for key, count in counts.items():
            arrival = self._notes.get(key)
            if arrival is None:
                self._notes[key] = Arrival(now, count)
            else:
                arrival.count += count

    def take(self) -> dict[StreamKey, Arrival]:
        """The notes since the last call (the flush loop's side)."""
        notes, self._notes = self._notes, {}
        return notes
