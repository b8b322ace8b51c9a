"""What one MQTT message becomes: readings, dead letters with a reason code, or nothing.

Refusals can come by the thousand (a sensor sending seconds instead of milliseconds), so
they are logged by route and stable code, not by the value: the first of each (route, code)
in an interval gets a line of its own, with the topic and a short excerpt; the rest are
counted and summed up once per interval. An unknown device name gets its own line (once
per name per interval) saying how to map it.

One message can only ever cost itself: whatever routing raises for it (it should raise
nothing, see routes/table.py) refuses that message as `internal_error`, with the
exception's type in the detail, and ingest goes on.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from gateway.clock import Clock
from gateway.ingest.routes import CompiledRoute, Outcome, RouteTable
from gateway.ingest.routes.table import MAX_NAME_BYTES, describe_exception
from gateway.ingest.stats import MAX_UNMAPPED_NAMES, IngestStats
from gateway.log import Throttle, get_logger
from gateway.models import ProvisionalReading, Reading
from gateway.store import RejectedPayload

log = get_logger("ingest")

REFUSAL_LOG_INTERVAL_S = 60.0
# Dead letters keep at most this much of the payload, of the topic (MQTT allows 64 KiB)
# and of the detail.
KEPT_PAYLOAD_BYTES = 1024
KEPT_TOPIC_CHARS = 512
KEPT_DETAIL_CHARS = 512


class RefusalLog:
    """One line per (route, reason) per interval; what it held back is summed up separately."""

    def __init__(
        self,
        interval_s: float = REFUSAL_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self._throttle = Throttle(interval_s, clock=clock)
        self._held_back: Counter[tuple[str, str]] = Counter()

    def refused(
        self, event: str, code: str, route: str = "", *, subject: str = "", **fields: Any
    ) -> None:
        """Log the first of each (route, code[, subject]) per interval; count the rest."""
        allowed, _ = self._throttle.allow(f"{route}\0{code}\0{subject}")
        if allowed:
            if route:
                fields["route"] = route
            log.warning(event, reason=code, **fields)
        else:
            self._held_back[route, code] += 1

    def summarise(self) -> None:
        """One line for everything held back since the last summary, if anything was."""
        if not self._held_back:
            return
        by_reason: Counter[str] = Counter()
        by_route: dict[str, dict[str, int]] = {}
        for (route, code), count in self._held_back.items():
            by_reason[code] += count
            if route:
                by_route.setdefault(route, {})[code] = count
        log.warning(
            "payload_rejected_summary",
            held_back=sum(self._held_back.values()),
            by_reason=dict(by_reason),
            by_route=by_route,
            interval_s=self.interval_s,
        )
        self._held_back.clear()


class Admission:
    """Routes and decodes a message, and refuses what the cloud could never take."""

    def __init__(
        self,
        routes: RouteTable,
        stats: IngestStats,
        *,
        oldest_sendable_ms: Callable[[int], int],
        clock_ms: Callable[[], int],
        refusals: RefusalLog | None = None,
        clock: Clock | None = None,
    ) -> None:
        """`clock`: whether the wall clock is trusted and this boot's time (None: it always
        is, `[clock] trust = "always"`); `clock_ms` is its wall clock."""
        self.routes = routes
        self._stats = stats
        self._oldest_sendable_ms = oldest_sendable_ms
        self._clock_ms = clock_ms
        self.refusals = refusals or RefusalLog()
        # Told of every message's readings with the route that made them (ingest/sampler.py).
        self.noted: Callable[[RouteTable, CompiledRoute | None, list[Reading], int], None] | None
        self.noted = None
        self._clock = clock
        self._steps_seen = 0

    def admit(
        self, topic: str, payload: bytes, retained: bool
    ) -> tuple[list[Reading], list[RejectedPayload]]:
        """The readings a message holds, and the dead letters for what it holds wrongly.

        Never raises: an exception refuses this message alone (`internal_error`).
        """
        try:
            return self._admit(topic, payload, retained)
        except Exception as exc:  # free in CPython 3.11 while nothing raises
            return [], [self.internal_error(topic, payload, exc)]

    def internal_error(self, topic: str, payload: bytes, exc: BaseException) -> RejectedPayload:
        """Count, log (throttled) and dead-letter a message whose handling raised `exc`."""
        stats = self._stats
        stats.rejected += 1
        stats.rejected_by_reason["internal_error"] += 1
        detail = describe_exception(exc)
        self.refusals.refused(
            "payload_rejected",
            "internal_error",
            detail=detail,
            topic=topic,
            excerpt=_excerpt(payload),
            payload_bytes=len(payload),
            rejected_total=stats.rejected + stats.unmapped,
        )
        return RejectedPayload(
            "internal_error", kept_topic(topic), payload[:KEPT_PAYLOAD_BYTES], detail=detail
        )

    def _admit(
        self, topic: str, payload: bytes, retained: bool
    ) -> tuple[list[Reading], list[RejectedPayload]]:
        stats = self._stats
        clock = self._clock
        if clock is not None and clock.steps != self._steps_seen:
            self._steps_seen = clock.steps
            self.routes.forget_receive_stamps()
        now_ms = self._clock_ms()
        outcome = self.routes.route(topic, payload, now_ms, retained=retained)
        route_name = outcome.route.name if outcome.route is not None else ""
        if outcome.unmapped is not None:
            self._unmapped(outcome, route_name, topic, payload)
        stats.no_reading += outcome.no_reading
        if outcome.retained_skipped:
            stats.retained_skipped += outcome.retained_skipped
        if outcome.ts_replaced:
            stats.ts_replaced += outcome.ts_replaced
            self.refusals.refused(
                "timestamp_replaced",
                "ts_replaced",
                route_name,
                detail=outcome.ts_problem,
                action="stamped with the receive time",
                topic=topic,
                ts_replaced_total=stats.ts_replaced,
            )
        dead: list[RejectedPayload] = []
        kept_payload = payload[:KEPT_PAYLOAD_BYTES]
        for refusal in outcome.refusals:
            stats.rejected += 1
            stats.rejected_by_reason[refusal.code] += 1
            stats.rejected_by_route.setdefault(route_name, Counter())[refusal.code] += 1
            self.refusals.refused(
                "payload_rejected",
                refusal.code,
                route_name,
                detail=refusal.detail,
                topic=topic,
                excerpt=_excerpt(payload),
                payload_bytes=len(payload),
                rejected_total=stats.rejected + stats.unmapped,
            )
            detail = refusal.detail
            if detail is not None and len(detail) > KEPT_DETAIL_CHARS:
                detail = detail[:KEPT_DETAIL_CHARS] + "…"
            dead.append(
                RejectedPayload(
                    refusal.code,
                    kept_topic(topic),
                    kept_payload,
                    refusal.device_id,
                    refusal.datastream_id,
                    detail,
                )
            )
        if not outcome.readings:
            return outcome.readings, dead
        if clock is not None and not clock.trusted:
            readings = self._held_for_the_clock(outcome, clock, now_ms)
        else:
            readings, dead = self._unexpired(
                outcome.readings, dead, topic, kept_payload, route_name, now_ms
            )
        if self.noted is not None:
            self.noted(self.routes, outcome.route, readings, now_ms)
        return readings, dead

    def _held_for_the_clock(self, outcome: Outcome, clock: Clock, now_ms: int) -> list[Reading]:
        """The wall clock is not trusted: a receive stamp is no time yet. Those readings
        become this boot's boottime (`ProvisionalReading`: the store holds them until the
        clock synchronizes). No age rule either, against a clock that may be days off: the
        flush loop applies it once the clock is right."""
        readings = outcome.readings
        if outcome.received:
            to_boottime = clock.boottime_ms() - now_ms
            for index in outcome.received:
                reading = readings[index]
                readings[index] = ProvisionalReading(
                    reading.device_id,
                    reading.datastream_id,
                    reading.ts_ms + to_boottime,
                    reading.value_json,
                )
            self._stats.provisional += len(outcome.received)
        return readings

    def _unexpired(
        self,
        readings: list[Reading],
        dead: list[RejectedPayload],
        topic: str,
        kept_payload: bytes,
        route_name: str,
        now_ms: int,
    ) -> tuple[list[Reading], list[RejectedPayload]]:
        """The cloud would refuse too-old readings: they must not cost a row in the buffer."""
        cutoff_ms = self._oldest_sendable_ms(now_ms)
        for reading in readings:  # a loop, not all(<genexpr>): this runs per message
            if reading.ts_ms < cutoff_ms:
                break
        else:
            return readings, dead
        stats = self._stats
        fresh = []
        for reading in readings:
            if reading.ts_ms >= cutoff_ms:
                fresh.append(reading)
                continue
            stats.expired += 1
            detail = f"ts={reading.ts_ms} older than cutoff {cutoff_ms}"
            self.refusals.refused(
                "reading_expired",
                "expired",
                route_name,
                detail=detail,
                topic=topic,
                device_id=reading.device_id,
                datastream_id=reading.datastream_id,
                expired_total=stats.expired,
            )
            dead.append(reading_dead_letter("expired", topic, kept_payload, reading, detail))
        return fresh, dead

    def _unmapped(self, outcome: Outcome, route_name: str, topic: str, payload: bytes) -> None:
        """Nothing in the message maps to a datastream: counted and logged, not stored."""
        stats = self._stats
        stats.unmapped += 1
        code = outcome.unmapped or "unmapped_topic"
        if route_name:
            stats.rejected_by_route.setdefault(route_name, Counter())[code] += 1
        name = outcome.unknown_device
        if name is not None:
            unknown = stats.unmapped_devices
            # Names are at most MAX_NAME_BYTES (longer ones are refused as name_too_long),
            # so this list holds at most MAX_UNMAPPED_NAMES * MAX_NAME_BYTES of text.
            tracked = name in unknown or (
                len(unknown) < MAX_UNMAPPED_NAMES and len(name) <= MAX_NAME_BYTES
            )
            if tracked:
                unknown[name] += 1
            self.refusals.refused(
                "device_unmapped",
                code,
                route_name,
                subject=name if tracked else "",  # one line per name, for a bounded set
                name=name,
                topic=topic,
                hint=unmapped_hint(name),
                seen=unknown.get(name, 0),
            )
            return
        self.refusals.refused(
            "payload_rejected",
            code,
            route_name,
            detail=outcome.unmapped_detail,
            topic=topic,
            payload_bytes=len(payload),
            excerpt=_excerpt(payload),
            rejected_total=stats.rejected + stats.unmapped,
        )


def unmapped_hint(name: str) -> str:
    """How to map an unknown name; a name of digits may be meant as the id itself."""
    hint = f'add it to [devices]: "{name}" = <Blynk device id>'
    if name.isascii() and name.isdigit():
        hint += ', or "+" = "numeric-id" if the name is the id'
    return hint


def reading_dead_letter(
    code: str, topic: str, payload: bytes, reading: Reading, detail: str
) -> RejectedPayload:
    """A dead letter for one reading of a message: the message as kept (topic and payload
    cut to size), the reading's ids, time and value, and why."""
    return RejectedPayload(
        code,
        kept_topic(topic),
        payload[:KEPT_PAYLOAD_BYTES],
        reading.device_id,
        reading.datastream_id,
        detail,
        ts_ms=reading.ts_ms,
        value_json=reading.value_json,
    )


def kept_topic(topic: str) -> str:
    """The topic as a dead letter keeps it: MQTT allows 64 KiB, a row need not."""
    return topic if len(topic) <= KEPT_TOPIC_CHARS else topic[:KEPT_TOPIC_CHARS] + "…"


def _excerpt(payload: bytes, limit: int = 80) -> str:
    """The start of a payload for a log line: enough to recognise it, never a flood."""
    text = payload[: limit * 4].decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + "…"
