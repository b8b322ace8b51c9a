"""Issue 16, unit level: each input that used to raise out of routing (and so stopped the
daemon, or made it reconnect forever) now ends as a stable code, and what comes from
outside is bounded (ids, names, the topic cache, dead letters, log fields).

The same payloads go through the running daemon in test_poison.py.
"""

from __future__ import annotations

import io
import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway import log as gateway_log
from gateway.cli import main
from gateway.config import RouteSettings, Settings
from gateway.errors import PayloadError, UnstorableValue
from gateway.ingest import Admission, IngestStats, RefusalLog
from gateway.ingest.routes import Outcome, RouteTable, TimestampReader
from gateway.ingest.routes import table as table_module
from gateway.ingest.stats import MAX_UNMAPPED_NAMES
from gateway.models import MAX_BLYNK_ID, Reading
from gateway.store import Store
from gateway.store.bindable import reading_problem
from gateway.testing.process import daemon_config, write_config
from harness import events

NOW_MS = 1_702_656_423_136
NINES_400 = "9" * 400
ROUTES: list[dict[str, Any]] = [
    {"topic": "plain/{device}", "datastream_id": 7},
    {"topic": "z2m/{device}", "fields": {"temperature": 5}, "timestamp": "last_seen"},
    {
        "topic": "z2m-strict/{device}",
        "fields": {"temperature": 5},
        "timestamp": "last_seen",
        "bad_timestamp": "reject",
    },
    {"topic": "arr/{device}", "format": "array", "datastream_id": 7},
    {"topic": "senml/{device}", "format": "senml", "fields": {"temp": 5}},
    {"topic": "by-field", "device_field": "id", "fields": {"temperature": 5}},
    {"topic": "esp/{device}/{stream}"},  # {stream} without streams: names are ids
]


def table(*, numeric_ids: bool = False) -> RouteTable:
    return RouteTable(
        [RouteSettings(**route) for route in ROUTES],
        devices={"kitchen": 101},
        numeric_ids=numeric_ids,
    )


def route(topic: str, payload: str | bytes, *, numeric_ids: bool = False) -> Outcome:
    raw = payload.encode() if isinstance(payload, str) else payload
    return table(numeric_ids=numeric_ids).route(topic, raw, NOW_MS)


def codes(outcome: Outcome) -> list[str]:
    return [refusal.code for refusal in outcome.refusals]


# --------------------------------------------------------------------------- times


@pytest.mark.parametrize(
    "raw",
    [
        NINES_400,  # a string of 400 digits: int() works, the float division overflowed
        int(NINES_400),  # the same as a JSON integer
        "9" * 5000,  # beyond Python's 4,300-digit int() limit: ValueError
        "9" * 50 + ".5",
        math.nan,
        math.inf,
        1e308,
        -1e308,
        10**30,
    ],
    ids=lambda raw: f"{type(raw).__name__}:{str(raw)[:12]}",
)
def test_a_time_nobody_can_mean_is_a_bad_timestamp(raw: Any) -> None:
    with pytest.raises(PayloadError) as info:
        TimestampReader().to_ms(raw)
    assert info.value.code == "bad_timestamp"
    assert len(info.value.detail) < 120


@pytest.mark.parametrize(
    "payload",
    [
        json.dumps({"temperature": 1, "last_seen": NINES_400}),
        '{"temperature": 1, "last_seen": ' + NINES_400 + "}",
        json.dumps({"temperature": 1, "last_seen": "9" * 5000}),
        json.dumps({"temperature": 1, "last_seen": "0001-01-01T00:00:00"}),
    ],
    ids=["400-digit-string", "400-digit-int", "5000-digit-string", "year-1-naive"],
)
def test_an_absurd_payload_time_follows_the_routes_bad_timestamp(payload: str) -> None:
    replaced = route("z2m/kitchen", payload)
    assert codes(replaced) == [] and replaced.ts_replaced == 1
    assert [(r.device_id, r.ts_ms, r.value_json) for r in replaced.readings] == [(101, NOW_MS, "1")]
    refused = route("z2m-strict/kitchen", payload)
    assert codes(refused) == ["bad_timestamp"] and not refused.readings


@pytest.mark.parametrize(
    "payload",
    [
        '[{"bt":NaN,"n":"temp","v":1}]',
        '[{"bt":1e308,"n":"temp","v":1}]',
        '[{"t":1e308,"n":"temp","v":1}]',
        '[{"bt":1e308,"t":1e308,"n":"temp","v":1}]',
        '[{"bt":-1e308,"t":-1e308,"n":"temp","v":1}]',
        '[{"bt":' + NINES_400 + ',"n":"temp","v":1}]',
        '[{"bt":Infinity,"n":"temp","v":1}]',
    ],
)
def test_senml_base_time_that_is_no_time_is_replaced_not_raised(payload: str) -> None:
    outcome = route("senml/kitchen", payload)
    assert codes(outcome) == [] and outcome.ts_replaced == 1
    assert [(r.device_id, r.datastream_id, r.ts_ms) for r in outcome.readings] == [(101, 5, NOW_MS)]


@pytest.mark.parametrize(
    "payload",
    [
        "[[" + NINES_400 + ",1]]",
        '[{"value":1,"ts":' + NINES_400 + "}]",
        '[{"value":1,"ts":1e308}]',
        '[["' + "9" * 5000 + '",1]]',
    ],
)
def test_array_times_beyond_any_epoch_are_replaced(payload: str) -> None:
    outcome = route("arr/kitchen", payload)
    assert codes(outcome) == [] and outcome.ts_replaced == 1
    assert [(r.device_id, r.ts_ms) for r in outcome.readings] == [(101, NOW_MS)]


def test_a_legacy_ts_of_400_digits_is_refused_with_a_short_detail() -> None:
    outcome = route("plain/kitchen", '{"value": 1, "ts": ' + NINES_400 + "}")
    [refusal] = outcome.refusals
    assert refusal.code == "ts_not_ms" and refusal.detail is not None
    assert len(refusal.detail) < 150


# --------------------------------------------------------------------------- ids and names


@pytest.mark.parametrize("name", ["12345", "123456789012345678901234567890"])
def test_an_unlisted_numeric_name_is_unmapped_by_default(name: str) -> None:
    outcome = route(f"plain/{name}", "21.5")
    assert outcome.unmapped == "device_unmapped" and outcome.unknown_device == name
    assert not outcome.readings and not outcome.refusals


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("12345", 12345),
        (str(MAX_BLYNK_ID), MAX_BLYNK_ID),
        ("12345678901234567890", None),  # a 20-digit serial number: beyond 64 bits
        ("123456789012345678901234567890", None),
        (str(MAX_BLYNK_ID + 1), None),
        ("0", None),  # Blynk ids are positive
    ],
)
def test_with_numeric_ids_a_name_is_an_id_only_within_64_bits(
    name: str, expected: int | None
) -> None:
    outcome = route(f"plain/{name}", "21.5", numeric_ids=True)
    if expected is None:
        assert codes(outcome) == ["id_out_of_range"] and not outcome.readings
        [refusal] = outcome.refusals
        assert refusal.device_id is None and refusal.datastream_id == 7
    else:
        assert [r.device_id for r in outcome.readings] == [expected]


def test_a_listed_name_wins_over_the_numeric_rule() -> None:
    huge = "9" * 30
    outcome = RouteTable([RouteSettings(**ROUTES[0])], devices={huge: 5}, numeric_ids=True).route(
        f"plain/{huge}", b"1", NOW_MS
    )
    assert [r.device_id for r in outcome.readings] == [5]


@pytest.mark.parametrize("numeric_ids", [False, True])
def test_a_payload_device_id_beyond_64_bits_never_becomes_a_reading(numeric_ids: bool) -> None:
    outcome = route(
        "by-field", json.dumps({"id": 10**30, "temperature": 1}), numeric_ids=numeric_ids
    )
    assert not outcome.readings
    if numeric_ids:
        assert codes(outcome) == ["id_out_of_range"]
    else:
        assert outcome.unmapped == "device_unmapped"
    assert route("by-field", '{"id": 55, "temperature": 1}', numeric_ids=True).readings


def test_a_numeric_stream_name_beyond_64_bits_is_out_of_range() -> None:
    outcome = route(f"esp/kitchen/{'9' * 25}", "1")
    assert codes(outcome) == ["id_out_of_range"]
    assert [(r.device_id, r.datastream_id) for r in route("esp/kitchen/12", "1").readings] == [
        (101, 12)
    ]


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("plain/" + "x" * 129, "1"),
        ("plain/" + "é" * 65, "1"),  # 130 bytes in 65 characters
        ("esp/kitchen/" + "s" * 200, "1"),
        ("by-field", json.dumps({"id": "d" * 300, "temperature": 1})),
        ("plain/" + "1" * 60_000, "1"),
    ],
    ids=["ascii", "utf8", "stream", "device-field", "60k-digits"],
)
def test_a_name_longer_than_128_bytes_is_name_too_long(topic: str, payload: str) -> None:
    outcome = route(topic, payload, numeric_ids=True)
    assert codes(outcome) == ["name_too_long"] and not outcome.readings
    detail = outcome.refusals[0].detail
    assert detail is not None and len(detail) < 120
    assert outcome.unknown_device is None


def test_a_name_of_exactly_128_bytes_is_still_a_name() -> None:
    outcome = route("plain/" + "n" * 128, "1")
    assert outcome.unmapped == "device_unmapped" and not outcome.refusals


# --------------------------------------------------------------------------- safety nets


class _BuggyTable(RouteTable):
    """A routing bug nobody has found yet: every JSON document raises."""

    def _items(self, *args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug")


def test_an_exception_in_routing_refuses_that_message_as_internal_error() -> None:
    buggy = _BuggyTable([RouteSettings(**ROUTES[1])], devices={"kitchen": 101})
    outcome = buggy.route("z2m/kitchen", b'{"temperature": 1}', NOW_MS)
    assert codes(outcome) == ["internal_error"]
    assert outcome.refusals[0].detail == "ZeroDivisionError: 'a bug'"
    assert outcome.route is not None and outcome.route.name == "z2m/{device}"


def test_admission_turns_any_exception_into_one_dead_letter(log_output: io.StringIO) -> None:
    class Exploding(RouteTable):
        def route(self, *args: Any, **kwargs: Any) -> Outcome:
            raise RecursionError("deep")

    stats = IngestStats()
    admission = Admission(
        Exploding([RouteSettings(**ROUTES[0])]),
        stats,
        oldest_sendable_ms=lambda now: 0,
        clock_ms=lambda: NOW_MS,
    )
    readings, dead = admission.admit("plain/kitchen", b"x" * 5000, False)
    assert readings == []
    [letter] = dead
    assert (letter.reason, letter.detail, len(letter.payload)) == (
        "internal_error",
        "RecursionError: 'deep'",
        1024,
    )
    assert stats.rejected_by_reason == {"internal_error": 1}
    [line] = events(log_output, "payload_rejected")
    assert line["reason"] == "internal_error" and "RecursionError" in line["detail"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    topic=st.sampled_from(
        [
            "plain/kitchen",
            "z2m/kitchen",
            "arr/kitchen",
            "senml/kitchen",
            "by-field",
            "esp/kitchen/3",
            "plain/123",
        ]
    ),
    document=st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(10**400), max_value=10**400)
        | st.floats()
        | st.text(max_size=30)
        | st.sampled_from(["9" * 400, "1e308", "NaN", "2023-12-15T17:06:58+01:00"]),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    ["temperature", "last_seen", "value", "ts", "id", "bt", "t", "n", "v", "bn"]
                ),
                children,
                max_size=5,
            )
        ),
        max_leaves=12,
    ),
)
def test_routing_random_json_never_raises_and_yields_only_storable_readings(
    topic: str, document: Any
) -> None:
    payload = json.dumps(document).encode()
    for numeric_ids in (False, True):
        outcome = table(numeric_ids=numeric_ids).route(topic, payload, NOW_MS)
        assert "internal_error" not in codes(outcome), outcome.refusals
        for reading in outcome.readings:
            assert reading_problem(reading) is None
            assert 0 < reading.device_id <= MAX_BLYNK_ID


# --------------------------------------------------------------------------- memory bounds


def test_the_topic_cache_is_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table_module, "MATCH_CACHE_MAX_BYTES", 64 * 1024)
    routes = table()
    for index in range(2000):
        routes.route(f"plain/{'n' * 100}{index}", b"1", NOW_MS)
    count, used = routes.cached_topics
    assert used <= 64 * 1024 and 0 < count < 2000
    long_topic = "plain/" + "x" * 600
    before = routes.cached_topics
    routes.route(long_topic, b"1", NOW_MS)
    assert routes.cached_topics == before  # never cached, whatever room is left


def test_unmapped_names_list_holds_only_short_names(log_output: io.StringIO) -> None:
    stats = IngestStats()
    admission = Admission(table(), stats, oldest_sendable_ms=lambda now: 0, clock_ms=lambda: NOW_MS)
    for index in range(MAX_UNMAPPED_NAMES + 500):
        admission.admit(f"plain/{'u' * 120}{index:06d}", b"1", False)
    for index in range(100):
        admission.admit(f"plain/{'L' * 60_000}{index}", b"1", False)
    assert len(stats.unmapped_devices) == MAX_UNMAPPED_NAMES
    assert max(len(name.encode()) for name in stats.unmapped_devices) <= 128
    assert stats.rejected_by_reason["name_too_long"] == 100


def test_dead_letters_keep_a_bounded_topic_and_detail() -> None:
    stats = IngestStats()
    admission = Admission(table(), stats, oldest_sendable_ms=lambda now: 0, clock_ms=lambda: NOW_MS)
    _, dead = admission.admit("plain/" + "y" * 65_000, b"1" * 20_000, False)
    [letter] = dead
    assert letter.reason == "name_too_long"
    assert len(letter.topic) <= 513 and len(letter.payload) == 1024
    assert letter.detail is not None and len(letter.detail) <= 513


def test_log_fields_with_outside_text_are_cut_with_a_marker() -> None:
    stream = io.StringIO()
    gateway_log.configure("info", "json", stream=stream)
    try:
        refusals = RefusalLog()
        topic = "plain/" + "z" * 60_000
        refusals.refused(
            "device_unmapped",
            "device_unmapped",
            "plain/{device}",
            name="n" * 60_000,
            topic=topic,
            hint="h" * 5000,
            excerpt="e" * 500,
            detail="d" * 500,
        )
    finally:
        gateway_log.configure("info", "json")
    [line] = stream.getvalue().splitlines()
    assert len(line) < 1200
    event = json.loads(line)
    assert event["topic"] == topic[: 120 - 14] + "…[60006 chars]"
    for key in ("name", "hint", "excerpt", "detail"):
        assert len(event[key]) <= 120 and event[key].endswith(" chars]")
        assert event[key].startswith(key[0] * 100)


# --------------------------------------------------------------------------- config


def _settings(devices: dict[str, Any]) -> Settings:
    return Settings(
        cloud={"client_id": "c", "client_secret": "s"},
        routes=[ROUTES[0]],
        devices=devices,
    )


def test_numeric_ids_is_a_devices_entry_off_by_default() -> None:
    assert _settings({"kitchen": 101}).devices.numeric_ids is False  # type: ignore[attr-defined]
    on = _settings({"kitchen": 101, "+": "numeric-id"}).devices
    assert dict(on) == {"kitchen": 101} and on.numeric_ids  # type: ignore[attr-defined]
    assert RouteTable([RouteSettings(**ROUTES[0])], devices=on).numeric_ids


@pytest.mark.parametrize("value", ["yes", True, 1])
def test_an_unknown_unlisted_policy_names_the_key(value: Any) -> None:
    with pytest.raises(ValidationError) as info:
        _settings({"+": value})
    text = str(info.value)
    assert '"+"' in text and "numeric-id" in text


def test_configured_ids_beyond_64_bits_are_refused_at_start() -> None:
    with pytest.raises(ValidationError, match=r"devices\.big"):
        _settings({"big": 2**64})


# --------------------------------------------------------------------------- the store


async def test_an_append_with_a_value_sqlite_cannot_hold_raises_unstorable_value(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path / "buffer.db", owner=True)
    try:
        good = Reading(101, 5, NOW_MS, "1")
        with pytest.raises(UnstorableValue, match="OverflowError"):
            await store.append([good, Reading(2**64, 5, NOW_MS, "2")])
        assert store.pending_points == 0  # nothing of the group was written
        assert reading_problem(Reading(2**64, 5, NOW_MS, "2")) is not None
        assert reading_problem(Reading(1, 5, NOW_MS, '"\ud800"')) is not None
        await store.append([good])
        assert store.pending_points == 1
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "buffer.db") as db:
        assert db.execute("SELECT count(*) FROM readings").fetchone() == (1,)


# --------------------------------------------------------------------------- routes test


@pytest.mark.parametrize(
    ("devices", "topic", "code"),
    [
        (
            {"kitchen": 101, "+": "numeric-id"},
            "plain/123456789012345678901234567890",
            "id_out_of_range",
        ),
        ({"kitchen": 101}, "plain/123456789012345678901234567890", "device_unmapped"),
        ({"kitchen": 101}, "plain/" + "x" * 200, "name_too_long"),
    ],
)
def test_routes_test_reports_the_daemons_code(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    devices: dict[str, Any],
    topic: str,
    code: str,
) -> None:
    """Before, `routes test` accepted the 30-digit name (exit 0) that crashed the daemon."""
    config = daemon_config(1883, "http://127.0.0.1:9", tmp_path / "b.db", ROUTES, devices=devices)
    path = write_config(tmp_path / "config.toml", config)
    exit_code = main(["routes", "test", "--config", str(path), topic, "21.5", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert exit_code == 1 and report["readings"] == []
    assert report["rejected"].startswith(f"{code}: ")
    if code == "device_unmapped":
        assert '"+" = "numeric-id"' in report["rejected"]
