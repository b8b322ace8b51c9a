"""Topic → (device, datastream) mapping and payload decoding.

Decoding runs once per MQTT message, so the common cases are the fast ones: an exact topic
is a dict hit, and a plain number payload is parsed without the JSON decoder. A payload
that cannot become a valid point raises `PayloadError` with a stable code (the key for log
throttling, counters and the dead-letter reason) and the offending value as its detail; the
value is validated here, at ingest, so a bad point never poisons an upload later.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.config import RouteSettings
from gateway.errors import PayloadError
from gateway.models import Reading

MAX_STRING_BYTES = 1024
# Blynk's Integer datastream is 32-bit, but a Double takes any finite number; refuse only
# integers no JSON consumer can represent exactly.
MAX_SAFE_INTEGER = 2**53
# Timestamps before 2001-09 or after 2286 are almost certainly seconds or µs, not ms.
MIN_TS_MS = 1_000_000_000_000
MAX_TS_MS = 9_999_999_999_999


@dataclass(frozen=True, slots=True)
class Route:
    topic_filter: str
    device_id: int
    datastream_id: int
    value_type: str | None = None


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (`+` one level, `#` the rest); `$` topics never match wildcards."""
    if topic_filter == topic:
        return True
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


class RouteTable:
    """Finds the route for a topic; remembers the answer because topics repeat forever."""

    def __init__(self, routes: Sequence[RouteSettings], max_payload_bytes: int = 16_384) -> None:
        self.routes = tuple(Route(r.topic, r.device_id, r.datastream_id, r.type) for r in routes)
        self.max_payload_bytes = max_payload_bytes
        self._by_topic: dict[str, Route | None] = {}
        self._last_stamp: dict[tuple[int, int], int] = {}

    @property
    def subscriptions(self) -> list[str]:
        return list(dict.fromkeys(route.topic_filter for route in self.routes))

    def match(self, topic: str) -> Route | None:
        try:
            return self._by_topic[topic]
        except KeyError:
            pass
        found = next((r for r in self.routes if topic_matches(r.topic_filter, topic)), None)
        if len(self._by_topic) < 100_000:
            self._by_topic[topic] = found
        return found

    def decode(self, route: Route, payload: bytes, received_ms: int) -> Reading:
        if len(payload) > self.max_payload_bytes:
            raise PayloadError(
                "payload_too_large",
                f"{len(payload)} bytes exceeds max_payload_bytes={self.max_payload_bytes}",
            )
        value_json, own_ts_ms = decode_value(payload)
        if route.value_type is not None:
            value_json = conform_to_type(route.value_type, value_json)
        if own_ts_ms is None:
            own_ts_ms = self._receive_stamp(route, received_ms)
        return Reading(route.device_id, route.datastream_id, own_ts_ms, value_json)

    def _receive_stamp(self, route: Route, received_ms: int) -> int:
        """Receive time, made strictly increasing per datastream.

        Two readings without their own `ts` that arrive in the same millisecond (a burst, or
        the broker draining its queue after an outage) are still two readings: equal stamps
        would make them one point, both here (the buffer keeps one row per stream, ts and
        value) and in the cloud. Each later one is moved forward by a millisecond instead.
        """
        key = (route.device_id, route.datastream_id)
        stamp = max(received_ms, self._last_stamp.get(key, 0) + 1)
        self._last_stamp[key] = stamp
        return stamp


def decode_value(payload: bytes) -> tuple[str, int | None]:
    """(value as JSON text, the payload's own ts in epoch ms or None)."""
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise PayloadError("not_utf8", f"invalid byte at {exc.start}") from exc
    if not text:
        raise PayloadError("empty")
    first = text[0]
    if first.isdigit() or first in "-.":
        return _plain_number(text), None
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise PayloadError("not_json", f"neither a number nor JSON: {_preview(text)}") from exc
    except ValueError as exc:  # e.g. an integer beyond Python's 4300-digit conversion limit
        raise PayloadError("value_out_of_range", f"unreadable number: {exc}") from exc
    if isinstance(document, dict):
        return _from_object(document)
    return encode_value(document), None


def _plain_number(text: str) -> str:
    try:
        number: int | float = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError as exc:
            raise PayloadError("not_a_number", _preview(text)) from exc
    return encode_value(number)


def _from_object(document: dict[str, Any]) -> tuple[str, int | None]:
    if "value" not in document:
        raise PayloadError("no_value_key", f"keys: {_preview(str(sorted(document)[:8]))}")
    ts_ms = None
    if "ts" in document and document["ts"] is not None:
        ts_ms = validate_ts_ms(document["ts"])
    return encode_value(document["value"]), ts_ms


def validate_ts_ms(raw_ts: Any) -> int:
    if isinstance(raw_ts, bool) or not isinstance(raw_ts, int | float):
        raise PayloadError("ts_not_ms", f"'ts' must be epoch milliseconds, got {raw_ts!r}")
    if isinstance(raw_ts, float) and not math.isfinite(raw_ts):
        raise PayloadError("ts_not_ms", f"'ts' must be finite, got {raw_ts!r}")
    ts_ms = int(raw_ts)
    if not MIN_TS_MS <= ts_ms <= MAX_TS_MS:
        raise PayloadError("ts_not_ms", f"'ts' {ts_ms} is not epoch milliseconds (seconds or µs?)")
    return ts_ms


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def conform_to_type(value_type: str, value_json: str) -> str:
    """Check a value against the datastream type the route declares.

    Blynk ignores values of the wrong type and crops out-of-range ones without telling
    anyone; refusing them here gives the operator a reason in the dead-letter table.
    An integral number on an integer datastream (`21.0`) is accepted as `21`.
    """
    value = json.loads(value_json)
    if value_type in ("integer", "enum"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise PayloadError(
                "type_mismatch", f"{_preview(value_json)} does not fit an {value_type} datastream"
            )
        if not INT32_MIN <= value <= INT32_MAX:
            raise PayloadError(
                "value_out_of_range",
                f"{value} is outside the 32-bit range of an {value_type} datastream",
            )
        return str(value)
    if not _FITS_TYPE[value_type](value):
        raise PayloadError(
            "type_mismatch", f"{_preview(value_json)} does not fit a {value_type} datastream"
        )
    return value_json


_FITS_TYPE: dict[str, Callable[[Any], bool]] = {
    "double": lambda value: _is_number(value),
    "string": lambda value: isinstance(value, str),
    "boolean": lambda value: isinstance(value, bool),
    "location": lambda value: isinstance(value, list),
}


def encode_value(value: Any) -> str:
    """Validate a value against what Blynk datastreams accept and return its JSON text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise PayloadError("value_out_of_range", f"integer {value} is beyond ±2**53")
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PayloadError("value_not_finite", repr(value))
        return repr(value)
    if isinstance(value, str):
        try:
            encoded = value.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON can spell a lone surrogate ("\ud800")
            raise PayloadError("not_utf8", f"string value {_preview(repr(value))}") from exc
        if len(encoded) > MAX_STRING_BYTES:
            raise PayloadError(
                "string_too_long", f"{len(encoded)} bytes, more than {MAX_STRING_BYTES}"
            )
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list) and len(value) == 2 and all(_is_number(part) for part in value):
        lon, lat = value
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise PayloadError(
                "value_out_of_range", f"location {value} is outside [lon, lat] range"
            )
        return f"[{encode_value(lon)},{encode_value(lat)}]"
    raise PayloadError("unsupported_type", f"{type(value).__name__}: {_preview(repr(value))}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def has_own_timestamp(payload: bytes) -> bool:
    """Does the payload name its own `ts` (cheap test, no parsing)?"""
    return b'"ts"' in payload
