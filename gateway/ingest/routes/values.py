"""Values: what a payload's value may be, and the JSON text Blynk will be sent.

A value that cannot become a valid point raises `PayloadError` with a stable code (the key
for log throttling, counters and the dead-letter reason) and the offending value as its
detail; it is validated here, at ingest, so a bad point never poisons an upload later.
Publishers spell the same reading many ways (`"100.00"`, `ON`, `nan`, `unavailable`):
`field_value_json` turns each into a number, a kept string, or "no reading this time".
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from gateway.errors import PayloadError

MAX_STRING_BYTES = 1024
# Blynk's Integer datastream is 32-bit, but a Double takes any finite number; refuse only
# integers no JSON consumer can represent exactly.
MAX_SAFE_INTEGER = 2**53
# Timestamps before 2001-09 or after 2286 are almost certainly seconds or µs, not ms.
MIN_TS_MS = 1_000_000_000_000
MAX_TS_MS = 9_999_999_999_999


def payload_text(payload: bytes) -> str:
    """The payload as stripped UTF-8 text, never empty; raises `PayloadError` otherwise."""
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise PayloadError("not_utf8", f"invalid byte at {exc.start}") from exc
    if not text:
        raise PayloadError("empty")
    return text


def decode_value(payload: bytes) -> tuple[str, int | None]:
    """(value as JSON text, the payload's own ts in epoch ms or None)."""
    text = payload_text(payload)
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
    return encode_value(plain_number(text))


def plain_number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError as exc:
            raise PayloadError("not_a_number", _preview(text)) from exc


def _from_object(document: dict[str, Any]) -> tuple[str, int | None]:
    if "value" not in document:
        raise PayloadError("no_value_key", f"keys: {_preview(str(sorted(document)[:8]))}")
    ts_ms = None
    if "ts" in document and document["ts"] is not None:
        ts_ms = validate_ts_ms(document["ts"])
    return encode_value(document["value"]), ts_ms


def validate_ts_ms(raw_ts: Any) -> int:
    if isinstance(raw_ts, bool) or not isinstance(raw_ts, int | float):
        raise PayloadError(
            "ts_not_ms", f"'ts' must be epoch milliseconds, got {_preview(repr(raw_ts))}"
        )
    if isinstance(raw_ts, float) and not math.isfinite(raw_ts):
        raise PayloadError("ts_not_ms", f"'ts' must be finite, got {raw_ts!r}")
    if not MIN_TS_MS <= raw_ts <= MAX_TS_MS:  # compared before int(): 1e308 is no time
        raise PayloadError(
            "ts_not_ms",
            f"'ts' {_preview(repr(raw_ts))} is not epoch milliseconds (seconds or µs?)",
        )
    return int(raw_ts)


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


# Publishers' ways of saying "no reading now" (ESPHome `nan`, Home Assistant `unavailable`).
_NO_READING = frozenset({"", "nan", "none", "null", "unavailable", "unknown", "n/a"})
_SWITCH = {"on": 1, "off": 0, "true": 1, "false": 0}
_NUMERIC_TYPES = (None, "double", "integer", "enum")


def field_value_json(raw: Any, value_type: str | None) -> str | None:
    """The JSON text of one published value, or None when it says "no reading".

    Numeric strings are numbers and `true`/`ON`/`on` are 1 (`false`/`OFF` 0) unless the
    datastream is declared `string` (text kept) or `boolean` (true/false): most Blynk
    datastreams are numeric, and a switch's state is charted as 0/1.
    """
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return None
    if isinstance(raw, str):
        text = raw.strip()
        lowered = text.lower()
        if lowered in _NO_READING:
            return None
        if value_type == "string":
            return encode_value(raw)
        if lowered in _SWITCH:
            raw = _SWITCH[lowered] if value_type != "boolean" else bool(_SWITCH[lowered])
        else:
            raw = _number_or_text(text)
    elif isinstance(raw, bool) and value_type in _NUMERIC_TYPES:
        raw = int(raw)
    value_json = encode_value(raw)
    if value_type is not None:
        value_json = conform_to_type(value_type, value_json)
    return value_json


def _number_or_text(text: str) -> int | float | str:
    first = text[:1]
    if first.isdigit() or (first in "-+." and len(text) > 1):
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                return text
            if math.isfinite(number):
                return number
            return text
    return text


def bare_payload_value(payload: bytes) -> tuple[Any, bool]:
    """A payload that is one value: (the value, parsed as JSON?); raises `PayloadError`.

    Plain numbers skip the JSON decoder (the common case on the hot path); a bare word
    (`ON`, `nan`, `unavailable`) is taken as text for `field_value_json` to judge.
    """
    text = payload_text(payload)
    first = text[0]
    if first.isdigit() or first in "-.":
        return plain_number(text), False
    if first in '{["' or text in ("true", "false", "null"):
        return parse_json(text), True
    if text.lower() in _NO_READING or text.lower() in _SWITCH:
        return text, False
    raise PayloadError("not_json", f"neither a number nor JSON: {_preview(text)}")


def parse_json(payload: str | bytes) -> Any:
    """A JSON document from UTF-8 text (never guessed as UTF-16/32, as json.loads would)."""
    try:
        text = payload if isinstance(payload, str) else payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError("not_utf8", f"invalid byte at {exc.start}") from exc
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise PayloadError("not_json", f"not JSON: {_preview(text)}") from exc
    except ValueError as exc:  # e.g. an integer beyond Python's 4300-digit conversion limit
        raise PayloadError("value_out_of_range", f"unreadable number: {exc}") from exc


def preview(text: str, limit: int = 60) -> str:
    """A short, quoted excerpt of what was received, for logs and dead-letter details."""
    return _preview(text, limit)
