"""What one MQTT message becomes: a reading, a dead letter with a reason code, or nothing.

Refusals can come by the thousand (a sensor sending seconds instead of milliseconds), so
they are logged by their stable code, not by the value: the first of each code in an
interval gets a line of its own, the rest are counted and summed up once per interval.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from gateway.errors import PayloadError
from gateway.ingest.routes import RouteTable, has_own_timestamp
from gateway.ingest.stats import IngestStats
from gateway.log import Throttle, get_logger
from gateway.models import Reading
from gateway.store import RejectedPayload

log = get_logger("ingest")

REFUSAL_LOG_INTERVAL_S = 60.0
# Dead letters keep at most this much of the payload.
KEPT_PAYLOAD_BYTES = 1024


class RefusalLog:
    """One line per reason code per interval; what it held back is summed up separately."""

    def __init__(
        self,
        interval_s: float = REFUSAL_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self._throttle = Throttle(interval_s, clock=clock)
        self._held_back: Counter[str] = Counter()

    def refused(self, event: str, code: str, **fields: Any) -> None:
        allowed, _ = self._throttle.allow(code)  # what it held back is in the summary
        if allowed:
            log.warning(event, reason=code, **fields)
        else:
            self._held_back[code] += 1

    def summarise(self) -> None:
        """One line for everything held back since the last summary, if anything was."""
        if not self._held_back:
            return
        log.warning(
            "payload_rejected_summary",
            held_back=sum(self._held_back.values()),
            by_reason=dict(self._held_back),
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
        self._routes = routes
        self._stats = stats
        self._oldest_sendable_ms = oldest_sendable_ms
        self._clock_ms = clock_ms
        self.refusals = refusals or RefusalLog()

    def admit(
        self, topic: str, payload: bytes, retained: bool
    ) -> tuple[Reading | None, RejectedPayload | None]:
        """The reading a message becomes, or why it is kept as a dead letter, or neither."""
        stats = self._stats
        route = self._routes.match(topic)
        if route is None:
            stats.unmapped += 1
            self.refusals.refused(
                "payload_rejected",
                "unmapped_topic",
                detail="no route matches this topic",
                topic=topic,
                payload_bytes=len(payload),
                rejected_total=stats.rejected + stats.unmapped,
            )
            return None, None
        now_ms = self._clock_ms()
        try:
            reading = self._routes.decode(route, payload, now_ms)
        except PayloadError as exc:
            stats.rejected += 1
            stats.rejected_by_reason[exc.code] += 1
            self.refusals.refused(
                "payload_rejected",
                exc.code,
                detail=exc.detail,
                topic=topic,
                payload_bytes=len(payload),
                rejected_total=stats.rejected + stats.unmapped,
            )
            return None, RejectedPayload(
                exc.code,
                topic,
                payload[:KEPT_PAYLOAD_BYTES],
                route.device_id,
                route.datastream_id,
                exc.detail,
            )
        if retained and not has_own_timestamp(payload):
            # A retained value was published at an unknown time; stamping it "now" would lie.
            stats.retained_skipped += 1
            return None, None
        cutoff_ms = self._oldest_sendable_ms(now_ms)
        if reading.ts_ms < cutoff_ms:
            # The cloud would refuse it for age: it must not cost a row in the buffer.
            stats.expired += 1
            detail = f"ts={reading.ts_ms} older than cutoff {cutoff_ms}"
            self.refusals.refused(
                "reading_expired",
                "expired",
                detail=detail,
                topic=topic,
                device_id=route.device_id,
                datastream_id=route.datastream_id,
                expired_total=stats.expired,
            )
            return None, RejectedPayload(
                "expired",
                topic,
                payload[:KEPT_PAYLOAD_BYTES],
                route.device_id,
                route.datastream_id,
                detail,
                ts_ms=reading.ts_ms,
                value_json=reading.value_json,
            )
        return reading, None
