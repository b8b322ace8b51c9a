"""Pass-through: readings offered for upload before anything is written.

A reading the broker has not had a PUBACK for is still the broker's: if the gateway dies,
the broker sends it again. So while the cloud is reachable and nothing is buffered, ingest
offers each group here first, the flush loop uploads it, and ingest acknowledges what the
cloud accepted without writing it at all; whatever is not accepted in time is committed to
the buffer as usual (and follows the usual rules from there: park, dead letter, retry).
Writing nothing for a reading the cloud takes a second later is what saves the SD card.

A group is claimed by exactly one side: the flush loop (`take`, while it is queued) or
ingest (`reclaim`, when its wait runs out). Everything runs on the event loop, so plain
attributes are enough; `settled` wakes the ingest side.

Two more facts cross here, one each way: `hold_s`, how long ingest should gather a group
before offering it (the flush loop sizes it from the request budget, uplink/pacing.py), and
`paused`, ingest writing first because pass-through would hold the broker's in-flight
window (ingest/pass_gate.py); the flush loop then stops lingering when it turns False, so
the buffer empties and pass-through can reopen.
"""

from __future__ import annotations

import asyncio
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.aio import Notifier
from gateway.models import Reading


@dataclass(eq=False)
class StagedGroup:
    """Readings of one ingest group, waiting for (or in) an upload."""

    readings: Sequence[Reading]
    delivered: list[bool] = field(init=False)
    sending: bool = False
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    claimed_by_ingest: bool = False
    # Why the flush loop gave it back unsent ("budget": no request slot free), if it did.
    declined: str | None = None
    # Set by ingest while it is being uploaded: start no more of its requests (the rest of
    # it is written instead, the broker's window being full).
    hurry: bool = False

    def __post_init__(self) -> None:
        self.delivered = [False] * len(self.readings)

    def undelivered(self) -> list[Reading]:
        return [r for r, done in zip(self.readings, self.delivered, strict=True) if not done]


class Staging:
    """The hand-over between ingest and the flush loop for pass-through uploads."""

    def __init__(self) -> None:
        self._queued: deque[StagedGroup] = deque()
        self.offered = Notifier()  # the flush loop listens: a group waits for it
        # Set by the flush loop while it can upload at once (online, nothing buffered).
        self.open = False
        # Set by the flush loop: how long ingest gathers a group before offering it.
        self.hold_s = 0.0
        # Set by ingest while it writes first to keep the broker's window free.
        self.paused = False
        # The cloud's recent upload round trips (seconds), noted by the flush loop: ingest
        # tells a near cloud from a far one by their median (`round_trip_s`).
        self._round_trips: deque[float] = deque(maxlen=8)
        self.passed = 0  # readings delivered without being written
        self.returned = 0  # readings handed back to be written

    def note_round_trip(self, seconds: float) -> None:
        self._round_trips.append(seconds)

    @property
    def round_trip_s(self) -> float | None:
        """The median of the last few uploads' round trips; None before the first."""
        return statistics.median(self._round_trips) if self._round_trips else None

    def offer(self, readings: Sequence[Reading]) -> StagedGroup | None:
        """Queue readings for upload; None when pass-through is closed (write them)."""
        if not self.open or not readings:
            return None
        group = StagedGroup(readings)
        self._queued.append(group)
        self.offered.notify()
        return group

    def take(self) -> StagedGroup | None:
        """The oldest queued group, now being sent (flush loop side)."""
        while self._queued:
            group = self._queued.popleft()
            if not group.claimed_by_ingest:
                group.sending = True
                return group
        return None

    def finish(self, group: StagedGroup) -> None:
        """The flush loop is done with the group: what it did not deliver goes back."""
        group.sending = False
        passed = sum(group.delivered)
        self.passed += passed
        self.returned += len(group.readings) - passed
        group.settled.set()

    def give_back_all(self) -> None:
        """Pass-through closes (offline, shutting down): every queued group goes back."""
        self.open = False
        while self._queued:
            group = self._queued.popleft()
            if not group.claimed_by_ingest:
                self.returned += len(group.readings)
                group.settled.set()

    def reclaim(self, group: StagedGroup) -> bool:
        """Ingest's wait ran out: take the group back unless an upload is under way."""
        if group.sending:
            return False
        if not group.settled.is_set():
            group.claimed_by_ingest = True
            self.returned += len(group.readings)
            group.settled.set()
        return True

    @property
    def queued(self) -> int:
        return len(self._queued)
