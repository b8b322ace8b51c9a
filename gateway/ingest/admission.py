"""What one MQTT message becomes: readings, dead letters with a reason code, or nothing.

Refusals can come by the thousand (a sensor sending seconds instead of milliseconds), so
they are logged by route and stable code, not by the value: the first of each (route, code)
in an interval gets a line of its own, with the topic and a short excerpt; the rest are
counted and summed up once per interval. An unknown device name gets its own line (once
per name per interval) saying how to map it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from gateway.ingest.routes import Outcome, RouteTable
from gateway.ingest.stats import MAX_UNMAPPED_NAMES, IngestStats
from gateway.log import Throttle, get_logger
from gateway.models import Reading
from gateway.store import RejectedPayload

log = get_logger("ingest")

REFUSAL_LOG_INTERVAL_S = 60.0
# Dead letters keep at most this much of the payload.
KEPT_PAYLOAD_BYTES = 1024


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
    ) -> None:
        self.routes = routes
        self._stats = stats
        self._oldest_sendable_ms = oldest_sendable_ms
        self._clock_ms = clock_ms
        self.refusals = refusals or RefusalLog()

    def admit(
        self, topic: str, payload: bytes, retained: bool
    ) -> tuple[list[Reading], list[RejectedPayload]]:
        """The readings a message holds, and the dead letters for what it holds wrongly."""
        stats = self._stats
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
            dead.append(
                RejectedPayload(
                    refusal.code,
                    topic,
                    kept_payload,
                    refusal.device_id,
                    refusal.datastream_id,
                    refusal.detail,
                )
            )
        if not outcome.readings:
            return outcome.readings, dead
        return self._unexpired(outcome.readings, dead, topic, kept_payload, route_name, now_ms)

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
            dead.append(
                RejectedPayload(
                    "expired",
                    topic,
                    kept_payload,
                    reading.device_id,
                    reading.datastream_id,
                    detail,
                    ts_ms=reading.ts_ms,
                    value_json=reading.value_json,
                )
            )
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
            tracked = name in unknown or len(unknown) < MAX_UNMAPPED_NAMES
            if tracked:
                unknown[name] += 1
            self.refusals.refused(
                "device_unmapped",
                code,
                route_name,
                subject=name if tracked else "",  # one line per name, for a bounded set
                name=name,
                topic=topic,
                hint=f'add it to [devices]: "{name}" = <Blynk device id>',
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


def _excerpt(payload: bytes, limit: int = 80) -> str:
    """The start of a payload for a log line: enough to recognise it, never a flood."""
    text = payload[: limit * 4].decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + "…"
