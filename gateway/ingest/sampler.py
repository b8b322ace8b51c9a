"""Sampling at ingest (issue 19): the deadband, late readings, and windows kept open.

Two moments of a message's life. When it is admitted, each reading's rule is looked up
by the route that produced it and told to the store (`SamplingState.want`: the flush loop
cuts windows by it), and a windowed reading marks its window as "a reading arrived just
now", so the window stays open for its grace. When its group is about to be committed
(before pass-through uploads anything), in arrival order:

- a reading of a deadband stream is kept or suppressed against the last reading its
  stream kept: the store's committed memory, overlaid by the readings kept earlier in the
  same group. Suppressed readings are acknowledged with their message, neither stored nor
  dead-lettered. The readings kept become the group's `kept` memory, written by the same
  transaction that commits them (or, uploaded by pass-through, that acknowledges them).
  Deciding here and not on arrival means a message left out of the commit (the broker
  resends it) never moved the memory, and a held group decides nothing twice;
- a reading for a window already closed is dead-lettered as `late_for_window`; one that
  is not a number where the window's aggregate needs numbers, as `type_mismatch`.

It also counts, per device, readings arriving and points they will become (a window's
first reading counts one point), which `status` turns into points per day.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from gateway.ingest.admission import RefusalLog, reading_dead_letter
from gateway.ingest.routes import CompiledRoute, RouteTable
from gateway.ingest.stats import IngestStats
from gateway.models import ProvisionalReading, Reading, StreamKey
from gateway.sampling import (
    NUMERIC_AGGREGATES,
    DeadbandRule,
    FitRule,
    Rule,
    WindowRule,
    as_number,
    deadband_keeps,
    format_duration_ms,
)
from gateway.store import RejectedPayload, Store

# Devices whose arrival and point rates are counted (names of unlisted devices are not
# devices: a publisher inventing ids cannot grow this beyond it).
MAX_COUNTED_DEVICES = 1000
LATE_REASON = "late_for_window"


class SampledMessage(Protocol):
    """What the sampler reads and changes of one of ingest's messages."""

    topic: str
    payload: bytes
    readings: Sequence[Reading]
    rejected: Sequence[RejectedPayload]
    sampled: bool
    kept: dict[StreamKey, tuple[int, str]]


class Sampler:
    def __init__(self, store: Store, stats: IngestStats, refusals: RefusalLog) -> None:
        self._state = store.sampling
        self._stats = stats
        self._refusals = refusals
        # the newest window start seen per windowed stream: a later one is a new point
        self._last_window: dict[StreamKey, int] = {}
        # streams whose window `fit` chose (for `status`)
        self._fitted: set[StreamKey] = set()

    # ------------------------------------------------------------------ on arrival

    def note(
        self,
        routes: RouteTable,
        route: CompiledRoute | None,
        readings: Sequence[Reading],
        now_ms: int,
    ) -> None:
        """Admission: count the readings, tell the store their rules, keep windows open."""
        arriving = self._stats.arriving_by_device
        wanted = self._state.wanted
        sampled = route is not None and (route.samples or route.default_sample is not None)
        for reading in readings:
            if reading.device_id in arriving or len(arriving) < MAX_COUNTED_DEVICES:
                arriving[reading.device_id] += 1
            if not sampled and not wanted:
                continue
            key = StreamKey(reading.device_id, reading.datastream_id)
            rule = None
            if sampled:
                assert route is not None
                rule = routes.rule_for(route, reading.device_id, reading.datastream_id)
            if rule is None:
                if wanted.get(key) is not None:
                    self._state.want(key, None)  # the configuration dropped its rule
                continue
            if wanted.get(key) != rule:
                self._state.want(key, rule)
                self._note_fit(route, key)
            if len(self._stats.sampled_devices) < MAX_COUNTED_DEVICES:
                self._stats.sampled_devices.add(reading.device_id)
            if isinstance(rule, WindowRule) and type(reading) is not ProvisionalReading:
                self._state.note_arrival(key, rule, reading.ts_ms, now_ms)

    def _note_fit(self, route: CompiledRoute | None, key: StreamKey) -> None:
        spec = None
        if route is not None:
            spec = route.samples.get(key.datastream_id, route.default_sample)
        if isinstance(spec, FitRule):
            self._fitted.add(key)
        else:
            self._fitted.discard(key)

    def in_force(self) -> dict[StreamKey, tuple[Rule, bool]]:
        """Each sampled stream's rule as its readings last met it, and whether `fit`
        chose its window."""
        return {
            key: (rule, key in self._fitted)
            for key, rule in self._state.wanted.items()
            if rule is not None
        }

    # ------------------------------------------------------------------ before the commit

    def thin(self, messages: Sequence[SampledMessage]) -> None:
        """Apply the rules to the messages not yet sampled, in order (see the module's
        docstring); messages sampled before (a held group) only carry their memory."""
        overlay: dict[StreamKey, tuple[int, str]] = {}
        for message in messages:
            if message.sampled:
                overlay.update(message.kept)
                continue
            message.sampled = True
            if message.readings:
                self._thin_message(message, overlay)

    def _thin_message(
        self, message: SampledMessage, overlay: dict[StreamKey, tuple[int, str]]
    ) -> None:
        state, stats = self._state, self._stats
        sending = stats.sending_by_device
        if not state.wanted:  # nothing sampled: every reading is a point
            for reading in message.readings:
                device_id = reading.device_id
                if device_id in sending or len(sending) < MAX_COUNTED_DEVICES:
                    sending[device_id] += 1
            return
        kept: list[Reading] = []
        dead: list[RejectedPayload] = []
        for reading in message.readings:
            device_id = reading.device_id
            if type(reading) is ProvisionalReading:
                # Its ts_ms is boot time until the clock synchronizes (issue 20): no deadband
                # or window can judge it now; the store holds it apart, unsampled.
                kept.append(reading)
                continue
            key = StreamKey(device_id, reading.datastream_id)
            rule = state.wanted.get(key)
            if isinstance(rule, DeadbandRule):
                last = overlay.get(key) or state.kept.get(key)
                if not deadband_keeps(rule, last, reading.ts_ms, reading.value_json):
                    stats.suppressed += 1
                    continue
                overlay[key] = message.kept[key] = (reading.ts_ms, reading.value_json)
            elif isinstance(rule, WindowRule):
                problem = self._window_problem(key, rule, reading)
                if problem is not None:
                    dead.append(self._refuse(message, reading, *problem))
                    continue
                start = rule.start_of(reading.ts_ms)
                if start <= self._last_window.get(key, -1):
                    kept.append(reading)
                    continue
                self._last_window[key] = start
            kept.append(reading)
            if device_id in sending or len(sending) < MAX_COUNTED_DEVICES:
                sending[device_id] += 1
        if len(kept) != len(message.readings):
            message.readings = kept
        if dead:
            message.rejected = [*message.rejected, *dead]

    def _window_problem(
        self, key: StreamKey, rule: WindowRule, reading: Reading
    ) -> tuple[str, str] | None:
        closed_ms = self._state.closed_before(key)
        if reading.ts_ms < closed_ms:
            return LATE_REASON, (
                f"ts {reading.ts_ms} is before {_iso(closed_ms)}, the end of the "
                f"{format_duration_ms(rule.window_ms)} windows already closed"
            )
        if rule.aggregate in NUMERIC_AGGREGATES and as_number(reading.value_json) is None:
            return "type_mismatch", (
                f"{reading.value_json[:60]} is not a number, and {rule.aggregate} of "
                f"{format_duration_ms(rule.window_ms)} windows needs numbers"
            )
        return None

    def _refuse(
        self, message: SampledMessage, reading: Reading, code: str, detail: str
    ) -> RejectedPayload:
        stats = self._stats
        if code == LATE_REASON:
            stats.late += 1
        else:
            stats.rejected += 1
            stats.rejected_by_reason[code] += 1
        self._refusals.refused(
            "payload_rejected",
            code,
            detail=detail,
            topic=message.topic,
            device_id=reading.device_id,
            datastream_id=reading.datastream_id,
        )
        return reading_dead_letter(code, message.topic, message.payload, reading, detail)

    # ------------------------------------------------------------------ pass-through

    def stored_only(self, reading: Reading) -> bool:
        """A windowed reading must be written (its window is made from the buffer): never
        uploaded by pass-through."""
        rules = self._state.rules
        if not rules and not self._state.wanted:
            return False
        return (
            self._state.window_rule(StreamKey(reading.device_id, reading.datastream_id)) is not None
        )


def kept_of(messages: Sequence[SampledMessage]) -> dict[StreamKey, tuple[int, str]]:
    """The last reading each deadband stream kept in these messages (the commit's memory)."""
    kept: dict[StreamKey, tuple[int, str]] = {}
    for message in messages:
        if message.kept:
            kept.update(message.kept)
    return kept


def _iso(epoch_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_ms / 1000))
