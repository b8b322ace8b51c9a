"""Topic → datastream routing and payload decoding (the ingest hot path)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.config import RouteSettings
from gateway.errors import PayloadError
from gateway.ingest.routes import (
    MAX_SAFE_INTEGER,
    Outcome,
    RouteTable,
    decode_value,
    encode_value,
    has_own_timestamp,
    topic_matches,
)
from gateway.models import Reading

RECEIVED_MS = 1_702_656_400_000
TS_MS = 1_702_656_423_136


def decode(payload: bytes | str) -> tuple[object, int]:
    """(value, ts), the value JSON parsed back so tests compare Python values; a payload
    without its own ts gets RECEIVED_MS."""
    raw = payload.encode("utf-8") if isinstance(payload, str) else payload
    value_json, ts_ms = decode_value(raw)
    return json.loads(value_json), RECEIVED_MS if ts_ms is None else ts_ms


def rejected(payload: bytes | str) -> PayloadError:
    raw = payload.encode("utf-8") if isinstance(payload, str) else payload
    with pytest.raises(PayloadError) as info:
        decode_value(raw)
    return info.value


# --------------------------------------------------------------------------- plain numbers
@pytest.mark.parametrize(
    ("payload", "value"),
    [
        ("21.5", 21.5),
        ("0", 0),
        ("42", 42),
        ("-3", -3),
        ("-0.25", -0.25),
        (".5", 0.5),
        ("1e3", 1000.0),
        ("2.5E-3", 0.0025),
        ("-1.5e2", -150.0),
        ("  17 \n", 17),
        (str(MAX_SAFE_INTEGER), MAX_SAFE_INTEGER),
        (str(-MAX_SAFE_INTEGER), -MAX_SAFE_INTEGER),
    ],
)
def test_plain_numbers(payload: str, value: float) -> None:
    decoded, ts_ms = decode(payload)
    assert decoded == value
    assert type(decoded) is type(value)
    assert ts_ms == RECEIVED_MS


def test_plain_int_stays_an_int_in_json() -> None:
    assert decode_value(b"42") == ("42", None)
    assert decode_value(b"-7") == ("-7", None)


@pytest.mark.parametrize(
    "payload",
    ["NaN", "nan", "-nan", "Infinity", "-Infinity", "inf", "-inf", "1e400", "-1e400"],
)
def test_non_finite_numbers_refused(payload: str) -> None:
    assert rejected(payload).code in {"value_not_finite", "not_json"}


@pytest.mark.parametrize(
    "payload",
    ['{"value": NaN}', '{"value": Infinity}', '{"value": -Infinity}', '{"value": 1e400}'],
)
def test_non_finite_json_values_refused(payload: str) -> None:
    assert rejected(payload).code == "value_not_finite"


@pytest.mark.parametrize(
    "payload",
    [
        str(MAX_SAFE_INTEGER + 1),
        str(-(MAX_SAFE_INTEGER + 1)),
        str(2**63),
        f'{{"value": {MAX_SAFE_INTEGER + 1}}}',
    ],
)
def test_integers_beyond_2_53_refused(payload: str) -> None:
    error = rejected(payload)
    assert error.code == "value_out_of_range" and "2**53" in error.detail


def test_absurdly_long_integers_refused_as_payload_errors() -> None:
    """A 5000-digit integer (well under max_payload_bytes) must be a PayloadError.

    Python refuses int conversion of >4300 digits with a plain ValueError; it must not escape
    the decoder, or ingest's `except PayloadError` misses it and the message poisons the
    MQTT read loop.
    """
    digits = "9" * 5000
    assert rejected(digits).code == "value_not_finite"  # as a float it is inf
    assert rejected(f'{{"value": {digits}}}').code == "value_out_of_range"
    assert rejected(f'{{"value": 1, "ts": {digits}}}').code == "value_out_of_range"


# --------------------------------------------------------------------------- JSON objects
def test_json_value_and_ts() -> None:
    assert decode('{"value": 21.5, "ts": 1702656423136}') == (21.5, TS_MS)


def test_json_without_ts_uses_received_time() -> None:
    assert decode('{"value": 3}') == (3, RECEIVED_MS)
    assert decode('{"value": 3, "ts": null}') == (3, RECEIVED_MS)


def test_json_float_ts_in_ms_is_truncated_to_int() -> None:
    assert decode('{"value": 1, "ts": 1702656423136.7}') == (1, TS_MS)


@pytest.mark.parametrize(
    "ts",
    [
        "1702656423",  # seconds
        "1702656423136000",  # microseconds
        "0",
        "-1702656423136",
    ],
)
def test_ts_not_in_milliseconds_refused(ts: str) -> None:
    error = rejected(f'{{"value": 1, "ts": {ts}}}')
    assert error.code == "ts_not_ms"
    assert "not epoch milliseconds" in error.detail and str(int(ts)) in error.detail


@pytest.mark.parametrize("ts", ['"1702656423136"', "true", "[1702656423136]", "NaN"])
def test_ts_of_wrong_type_refused(ts: str) -> None:
    error = rejected(f'{{"value": 1, "ts": {ts}}}')
    assert error.code == "ts_not_ms" and "'ts'" in error.detail


def test_json_object_without_value_refused() -> None:
    error = rejected('{"temperature": 21.5}')
    assert error.code == "no_value_key" and "temperature" in error.detail


@pytest.mark.parametrize(
    "payload",
    [
        '{"value": {"nested": 1}}',
        '{"value": null}',
        '{"value": [1, 2, 3]}',
        '{"value": [1]}',
        '{"value": []}',
        '{"value": ["a", "b"]}',
        '{"value": [true, false]}',
        '{"value": [[1, 2], [3, 4]]}',
        "[1, 2, 3]",
        "null",
    ],
)
def test_unsupported_value_types_refused(payload: str) -> None:
    assert rejected(payload).code == "unsupported_type"


# --------------------------------------------------------------------------- strings
@pytest.mark.parametrize(
    "text",
    [
        "a" * 1024,
        "é" * 512,  # 2 bytes each: exactly 1024
        "€" * 341 + "a",  # 3 * 341 + 1 = 1024
        "😀" * 256,  # 4 bytes each: 1024
        "",
        'say "hi" \\ back\nslash',
    ],
)
def test_strings_up_to_1024_bytes_accepted(text: str) -> None:
    assert decode(json.dumps({"value": text, "ts": TS_MS})) == (text, TS_MS)
    assert json.loads(encode_value(text)) == text


@pytest.mark.parametrize(
    "text",
    ["a" * 1025, "é" * 512 + "a", "€" * 342, "😀" * 256 + "x", "é" * 1000],
)
def test_strings_over_1024_bytes_refused(text: str) -> None:
    assert len(text.encode("utf-8")) > 1024
    error = rejected(json.dumps({"value": text}, ensure_ascii=False))
    assert error.code == "string_too_long" and "1024" in error.detail
    with pytest.raises(PayloadError):
        encode_value(text)


def test_bare_json_string_payload() -> None:
    assert decode('"open"') == ("open", RECEIVED_MS)


def test_string_value_json_is_utf8_text_not_escapes() -> None:
    value_json, _ = decode_value('{"value": "Zürich ✓"}'.encode())
    assert value_json == '"Zürich ✓"'


def test_lone_surrogate_string_refused_as_payload_error() -> None:
    """JSON may spell an unpaired surrogate ("\\ud800"); it is not encodable UTF-8 text.

    It must become a PayloadError, not a UnicodeEncodeError escaping the decoder.
    """
    assert rejected(b'{"value": "\\ud800"}').code == "not_utf8"
    assert rejected(b'"abc\\udc00"').code == "not_utf8"


# --------------------------------------------------------------------------- booleans, location
@pytest.mark.parametrize(
    ("payload", "value"),
    [("true", True), ("false", False), ('{"value": true}', True), ('{"value": false}', False)],
)
def test_booleans(payload: str, value: bool) -> None:
    value_json, _ = decode_value(payload.encode())
    assert value_json == ("true" if value else "false")
    assert json.loads(value_json) is value


@pytest.mark.parametrize(
    "location",
    [[24.1052, 56.9496], [-180, -90], [180, 90], [0, 0], [-0.5, 89.999]],
)
def test_location_accepted(location: list[float]) -> None:
    assert decode(json.dumps({"value": location, "ts": TS_MS})) == (location, TS_MS)
    assert decode(json.dumps(location)) == (location, RECEIVED_MS)


@pytest.mark.parametrize(
    "location",
    [[181, 0], [-180.01, 0], [0, 90.5], [0, -91], [1000, 1000]],
)
def test_location_out_of_range_refused(location: list[float]) -> None:
    error = rejected(json.dumps({"value": location}))
    assert error.code == "value_out_of_range" and "outside [lon, lat] range" in error.detail


# --------------------------------------------------------------------------- not a payload
@pytest.mark.parametrize("payload", [b"\xff\xfe\x00", b"21.5\xc3", "Zürich".encode("latin-1")])
def test_non_utf8_refused(payload: bytes) -> None:
    assert rejected(payload).code == "not_utf8"


@pytest.mark.parametrize("payload", [b"", b"   ", b"\n\t"])
def test_empty_refused(payload: bytes) -> None:
    error = rejected(payload)
    assert error.code == "empty" and str(error) == "empty"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ("hello", "not_json"),
        ("{broken", "not_json"),
        ("21.5 C", "not_a_number"),
        ("-", "not_a_number"),
        (".", "not_a_number"),
        ("1.2.3", "not_a_number"),
        ("0x1A", "not_a_number"),
    ],
)
def test_garbage_refused(payload: str, code: str) -> None:
    error = rejected(payload)
    assert error.code == code
    assert payload in error.detail  # the value goes in the detail, never in the code


def test_deeply_nested_json_refused() -> None:
    assert rejected("[" * 100_000).code == "not_json"


# --------------------------------------------------------------------------- topic matching
@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("sensors/boiler/temperature", "sensors/boiler/temperature", True),
        ("sensors/boiler/temperature", "sensors/boiler/humidity", False),
        ("sensors/+/humidity", "sensors/kitchen/humidity", True),
        ("sensors/+/humidity", "sensors/kitchen/x/humidity", False),
        ("sensors/+/humidity", "sensors/humidity", False),
        ("sensors/+", "sensors/", True),  # an empty level is a level
        ("sensors/+", "sensors", False),
        ("+", "sensors", True),
        ("+", "sensors/x", False),
        ("+/+", "/x", True),
        ("sensors/#", "sensors", True),  # '#' also matches the parent level
        ("sensors/#", "sensors/a/b/c", True),
        ("sensors/#", "other/a", False),
        ("#", "a/b/c", True),
        ("#", "/leading/slash", True),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
        ("A/b", "a/b", False),  # case-sensitive
        # $ topics are never matched by a wildcard in the first level...
        ("#", "$SYS/broker/load", False),
        ("+/broker/load", "$SYS/broker/load", False),
        ("+", "$SYS", False),
        # ...but an explicit $ filter matches them.
        ("$SYS/#", "$SYS/broker/load", True),
        ("$SYS/+/load", "$SYS/broker/load", True),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


def route_settings(*routes: tuple[str, int, int]) -> list[RouteSettings]:
    return [RouteSettings(topic=t, device_id=d, datastream_id=s) for t, d, s in routes]


TABLE = route_settings(
    ("sensors/boiler/temperature", 101, 5),
    ("sensors/+/humidity", 102, 1),
    ("sensors/#", 103, 1),
    ("#", 104, 9),
    ("sensors/boiler/temperature", 999, 999),  # shadowed by the first route
)


@pytest.mark.parametrize(
    ("topic", "target"),
    [
        ("sensors/boiler/temperature", (101, 5)),
        ("sensors/kitchen/humidity", (102, 1)),
        ("sensors/boiler/humidity", (102, 1)),
        ("sensors/kitchen/co2", (103, 1)),
        ("sensors", (103, 1)),
        ("garden/soil", (104, 9)),
        ("$SYS/broker/uptime", None),
    ],
)
def test_first_matching_route_wins(topic: str, target: tuple[int, int] | None) -> None:
    table = RouteTable(TABLE)
    readings = table.route(topic, b"1", RECEIVED_MS).readings
    found = (readings[0].device_id, readings[0].datastream_id) if readings else None
    assert found == target
    # The cached answer is the same as the computed one.
    assert table.match(topic) == table.match(topic)


def test_no_route() -> None:
    table = RouteTable(route_settings(("a/b", 1, 1)))
    assert table.match("a/c") is None
    assert table.match("a/b/c") is None
    outcome = table.route("a/c", b"1", RECEIVED_MS)
    assert outcome.unmapped == "unmapped_topic" and not outcome.readings


def test_subscriptions_are_unique_and_ordered() -> None:
    assert RouteTable(TABLE).subscriptions == [
        "sensors/boiler/temperature",
        "sensors/+/humidity",
        "sensors/#",
        "#",
    ]


def one_reading(outcome: Outcome) -> Reading:
    assert not outcome.refusals and outcome.unmapped is None, outcome
    [reading] = outcome.readings
    return reading


def refusal_of(outcome: Outcome) -> tuple[str, str | None]:
    assert not outcome.readings, outcome
    [refusal] = outcome.refusals
    return refusal.code, refusal.detail


def test_decode_builds_reading_for_route() -> None:
    table = RouteTable(TABLE)
    topic = "sensors/kitchen/humidity"
    outcome = table.route(topic, b'{"value": 48.5, "ts": 1702656423136}', RECEIVED_MS)
    assert one_reading(outcome) == Reading(102, 1, TS_MS, "48.5")
    assert one_reading(table.route(topic, b"7", RECEIVED_MS)) == Reading(102, 1, RECEIVED_MS, "7")


def test_decode_refuses_oversized_payload() -> None:
    table = RouteTable(route_settings(("x", 1, 2)), max_payload_bytes=16)
    assert one_reading(table.route("x", b"1" + b" " * 15, RECEIVED_MS)).value_json == "1"
    code, detail = refusal_of(table.route("x", b"1" + b" " * 16, RECEIVED_MS))
    assert code == "payload_too_large" and detail == "17 bytes exceeds max_payload_bytes=16"


def test_decode_default_limit_is_16k() -> None:
    table = RouteTable(route_settings(("x", 1, 2)))
    big = json.dumps({"value": "a", "pad": "x" * 16_400}).encode()
    code, detail = refusal_of(table.route("x", big, RECEIVED_MS))
    assert code == "payload_too_large" and "max_payload_bytes=16384" in (detail or "")


# --------------------------------------------------------------------------- properties
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_any_finite_float_round_trips(value: float) -> None:
    assert json.loads(encode_value(value)) == value


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_any_finite_float_payload_round_trips(value: float) -> None:
    for payload in (repr(value), json.dumps({"value": value, "ts": TS_MS})):
        decoded, _ = decode(payload)
        assert decoded == value


@given(st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER))
def test_safe_integers_round_trip(value: int) -> None:
    assert json.loads(encode_value(value)) == value
    assert decode(str(value)) == (value, RECEIVED_MS)


@given(st.integers(min_value=MAX_SAFE_INTEGER + 1, max_value=10**300), st.booleans())
def test_unsafe_integers_refused(magnitude: int, negative: bool) -> None:
    with pytest.raises(PayloadError):
        encode_value(-magnitude if negative else magnitude)


@given(st.text(max_size=256))  # at most 4 bytes a character: always <= 1024 bytes
def test_text_round_trips(value: str) -> None:
    assert json.loads(encode_value(value)) == value
    assert decode(json.dumps({"value": value, "ts": TS_MS})) == (value, TS_MS)


@given(
    st.floats(min_value=-180, max_value=180),
    st.floats(min_value=-90, max_value=90),
)
def test_locations_round_trip(lon: float, lat: float) -> None:
    assert json.loads(encode_value([lon, lat])) == [lon, lat]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, [math.nan, 0.0], [0.0, math.inf]])
def test_non_finite_values_refused_by_encode_value(value: object) -> None:
    with pytest.raises(PayloadError):
        encode_value(value)


def test_receive_stamps_are_strictly_increasing_per_datastream() -> None:
    table = RouteTable(
        [
            RouteSettings(topic="a", device_id=1, datastream_id=1),
            RouteSettings(topic="b", device_id=1, datastream_id=2),
        ]
    )

    def stamp(topic: str, payload: bytes, received_ms: int) -> int:
        return one_reading(table.route(topic, payload, received_ms)).ts_ms

    stamps = [stamp("a", b"21.5", 1_700_000_000_000) for _ in range(3)]
    assert stamps == [1_700_000_000_000, 1_700_000_000_001, 1_700_000_000_002]
    # Another datastream has its own sequence; a payload's own ts is never moved.
    assert stamp("b", b"1", 1_700_000_000_000) == 1_700_000_000_000
    own = b'{"value": 1, "ts": 1700000000000}'
    assert stamp("a", own, 1_700_000_000_000) == 1_700_000_000_000
    # Time moving on is used as is.
    assert stamp("a", b"2", 1_700_000_000_500) == 1_700_000_000_500


@pytest.mark.parametrize(
    ("value_type", "payload", "expected_json"),
    [
        ("double", b"21.5", "21.5"),
        ("double", b"21", "21"),
        ("double", b'"21.5"', "21.5"),  # a numeric string is a number
        ("double", b"true", "1"),  # a switch on a numeric datastream is 0/1
        ("double", b"ON", "1"),
        ("integer", b"21.0", "21"),
        ("integer", b"-2147483648", "-2147483648"),
        ("enum", b"3", "3"),
        ("string", b'"on"', '"on"'),
        ("boolean", b"true", "true"),
        ("boolean", b"OFF", "false"),
        ("location", b"[24.75, 59.43]", "[24.75,59.43]"),
    ],
)
def test_declared_datastream_type_accepts_fitting_values(
    value_type: str, payload: bytes, expected_json: str
) -> None:
    table = RouteTable([RouteSettings(topic="t", device_id=1, datastream_id=1, type=value_type)])
    assert one_reading(table.route("t", payload, 1_700_000_000_000)).value_json == expected_json


@pytest.mark.parametrize(
    ("value_type", "payload", "code", "detail"),
    [
        ("double", b'"warm"', "type_mismatch", "does not fit a double"),
        ("integer", b"21.5", "type_mismatch", "does not fit an integer"),
        ("integer", b"2147483648", "value_out_of_range", "outside the 32-bit range"),
        ("enum", b'"x"', "type_mismatch", "does not fit an enum"),
        ("string", b"21", "type_mismatch", "does not fit a string"),
        ("boolean", b"1", "type_mismatch", "does not fit a boolean"),
        ("location", b"21", "type_mismatch", "does not fit a location"),
    ],
)
def test_declared_datastream_type_refuses_values_the_cloud_would_drop(
    value_type: str, payload: bytes, code: str, detail: str
) -> None:
    table = RouteTable([RouteSettings(topic="t", device_id=1, datastream_id=1, type=value_type)])
    found_code, found_detail = refusal_of(table.route("t", payload, 1_700_000_000_000))
    assert found_code == code and detail in (found_detail or "")


def test_unknown_datastream_type_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match="type"):
        RouteSettings(topic="t", device_id=1, datastream_id=1, type="float")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"value": 1, "ts": 1702656423136}', True),
        (b"21.5", False),
        (b'{"value": 1}', False),
    ],
)
def test_has_own_timestamp(payload: bytes, expected: bool) -> None:
    assert has_own_timestamp(payload) is expected


@given(st.integers(min_value=1_000_000_000, max_value=1_999_999_999))
def test_codes_are_stable_whatever_the_value(ts_s: int) -> None:
    """The code is a key for logs and counters: it never carries the offending value."""
    error = rejected(f'{{"value": 1, "ts": {ts_s}}}')
    assert error.code == "ts_not_ms"
    assert str(ts_s) in error.detail and str(ts_s) not in error.code
