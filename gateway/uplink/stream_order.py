"""Which buffered streams a flush pass serves, in what order, and how fast it tries the rest.

A stream the cloud has accepted a batch of before is *proven*: its device and datastream
exist. Every pass serves the proven streams first, in rotation, one batch each. Any other
stream with buffered readings is a *trial*: new streams nobody has tried yet, and parked
streams whose retry time has come. Each trial costs one try from an allowance of
`flush.new_stream_tries_per_min` (a minute's worth at once, then refilled evenly), and a
try the cloud does not refuse is given back. So a config with thousands of wrong ids (or
thousands of junk topic names taken for ids) costs at most that many refused requests a
minute, however many streams it buffers, and never stands between a proven device and the
cloud; a real new device costs nothing, unless it queues behind refused ones (then it waits
its turn). The allowance lives in memory only: each start begins with a minute's worth.

Trials go in this order: parked streams that were proven before (a device deleted and
re-created, a clock problem), new streams of a device that has a proven stream (a new
datastream), other new streams (oldest first), and last the parked streams never proven,
the longest-waiting first.

The proven set lives in memory (one entry per real stream: only the cloud's acceptance adds
one) and in the buffer's `accepted_streams` table, written once per newly proven stream.
A `kill -9` between the cloud's acceptance and that write costs only this: after the
restart the stream is a trial until its first batch is accepted again (at once, unless
refused trials are queued ahead of it).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import StoreError
from gateway.log import get_logger
from gateway.models import StreamKey
from gateway.store import Store, StreamState

log = get_logger("flush")

# Parked and unparked streams are reported once per this interval: the first one in full,
# the others counted in one summary line when the interval ends.
STREAM_EVENTS_INTERVAL_S = 60.0
SUMMARY_EXAMPLES = 3


class TryAllowance:
    """A token bucket: `per_minute` tries, a minute's worth at once, refilled evenly.

    `give_back` returns a try that taught nothing bad (the cloud accepted the batch, or
    the request never got an answer about the stream), so only refusals use it up.
    """

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.per_minute = per_minute
        self._tokens = float(per_minute)
        self._updated = clock()

    def reconfigure(self, per_minute: int) -> None:
        self._refill()
        self.per_minute = per_minute
        self._tokens = min(self._tokens, float(per_minute))

    def _refill(self) -> None:
        now = self._clock()
        elapsed_s = max(0.0, now - self._updated)
        self._updated = now
        self._tokens = min(float(self.per_minute), self._tokens + elapsed_s * self.per_minute / 60)

    def take(self) -> bool:
        self._refill()
        if self._tokens < 1.0 - 1e-9:  # refilled in float steps: 0.99999... is a whole try
            return False
        self._tokens -= 1.0
        return True

    def give_back(self) -> None:
        self._tokens = min(float(self.per_minute), self._tokens + 1.0)


@dataclass
class Plan:
    """One pass's streams: the proven ones (served), then the trials in order."""

    served: list[StreamState]
    trials: list[StreamState]
    untried: int  # new streams among the trials (never refused)

    def rotated(self, rotation: int) -> list[StreamState]:
        """The served streams starting at `rotation`: no stream is always first."""
        if not self.served:
            return []
        start = rotation % len(self.served)
        return self.served[start:] + self.served[:start]


class StreamOrder:
    """The proven streams, and the plan of each pass (see the module docstring)."""

    def __init__(
        self, tries_per_minute: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.allowance = TryAllowance(tries_per_minute, clock=clock)
        self.proven: set[StreamKey] = set()
        self.loaded = False
        # Proven in memory, not yet in the buffer (the store was busy or failing).
        self.unsaved: set[StreamKey] = set()

    def load(self, stored: set[StreamKey]) -> None:
        self.proven |= stored
        self.loaded = True

    def accepted(self, key: StreamKey) -> None:
        """The cloud accepted a batch of `key` (buffered or pass-through)."""
        if key not in self.proven:
            self.proven.add(key)
            self.unsaved.add(key)

    async def remember(self, store: Store) -> None:
        """Load the proven streams once; write the newly proven ones (one transaction).

        The flush loop calls this after its acks. A failed write keeps them for the next
        call: it is only a hint, and whatever failed fails the pass's own store calls too,
        which report it.
        """
        if not self.loaded:
            self.load(await store.accepted_streams())
        unsaved = set(self.unsaved)
        if not unsaved:
            return
        with contextlib.suppress(StoreError):
            await store.mark_accepted(unsaved)
            self.unsaved -= unsaved

    def plan(self, streams: list[StreamState], now_ms: int) -> Plan:
        served: list[StreamState] = []
        proven_parked: list[StreamState] = []
        new_of_known_device: list[StreamState] = []
        new: list[StreamState] = []
        refused: list[StreamState] = []
        known_devices = {key.device_id for key in self.proven}
        for stream in streams:
            proven = stream.key in self.proven
            if stream.parked_reason is not None:
                if stream.parked_until_ms is not None and stream.parked_until_ms > now_ms:
                    continue  # parked, not due
                (proven_parked if proven else refused).append(stream)
            elif proven:
                served.append(stream)
            elif stream.key.device_id in known_devices:
                new_of_known_device.append(stream)
            else:
                new.append(stream)
        refused.sort(key=lambda s: s.parked_until_ms or 0)
        untried = len(new_of_known_device) + len(new)
        return Plan(served, proven_parked + new_of_known_device + new + refused, untried)


@dataclass
class _Window:
    started: float
    count: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)  # of the last one counted


class StreamEvents:
    """`stream_parked` (or `stream_unparked`) for many streams without a line per stream.

    The first in a quiet interval is logged in full at once; the others in that interval
    are counted and logged as one `streams_parked count=N reasons={...}` line when the
    interval ends (checked by `flush`, which the flush loop calls every pass).
    """

    def __init__(
        self,
        event: str,
        summary_event: str,
        level: str,
        *,
        interval_s: float = STREAM_EVENTS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._event = event
        self._summary_event = summary_event
        self._level = level
        self._interval_s = interval_s
        self._clock = clock
        self._window: _Window | None = None

    def note(self, key: StreamKey, reason: str | None = None, **fields: Any) -> None:
        self.flush()
        if self._window is None:
            self._window = _Window(self._clock())
            ids = {"device_id": key.device_id, "datastream_id": key.datastream_id}
            extra = {} if reason is None else {"reason": reason}
            getattr(log, self._level)(self._event, **ids, **extra, **fields)
            return
        window = self._window
        window.count += 1
        if reason is not None:
            window.reasons[reason.split(":", 1)[0]] += 1
        if len(window.examples) < SUMMARY_EXAMPLES:
            window.examples.append(f"{key.device_id}/{key.datastream_id}")
        window.fields = fields

    def flush(self, *, force: bool = False, **context: Any) -> None:
        """End the interval if it is over (or `force`): the summary line, if any."""
        window = self._window
        if window is None or (not force and self._clock() - window.started < self._interval_s):
            return
        self._window = None
        if not window.count:
            return
        getattr(log, self._level)(
            self._summary_event,
            count=window.count,
            reasons=dict(window.reasons) or None,
            examples=window.examples,
            interval_s=round(self._clock() - window.started, 1),
            **context,
            **window.fields,
        )
