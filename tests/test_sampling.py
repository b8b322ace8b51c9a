"""gateway/sampling.py on its own: durations, the `sample` settings, window arithmetic,
aggregates, the deadband rule and the fit ladder (issue 19). The paths through the running
daemon are tests/test_sampling_e2e.py."""

from __future__ import annotations

import json
import statistics
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.config import RouteSettings, Settings, describe_validation_error
from gateway.ingest.routes import RouteTable
from gateway.sampling import (
    DEFAULT_GRACE_MS,
    Aggregator,
    DeadbandRule,
    SampleSettings,
    WindowRule,
    aggregate_windows,
    deadband_keeps,
    deadband_verdict,
    fit_window_ms,
    format_duration_ms,
    parse_duration_ms,
    window_start,
)

CLOUD = {"client_id": "c", "client_secret": "s"}


# --------------------------------------------------------------------------- durations
@pytest.mark.parametrize(
    ("written", "ms"),
    [
        ("500ms", 500),
        ("10s", 10_000),
        ("15m", 900_000),
        ("1h", 3_600_000),
        ("1d", 86_400_000),
        ("1.5s", 1_500),
        ("2min", 120_000),
        (30, 30_000),
        (0.25, 250),
        ("45", 45_000),
    ],
)
def test_durations(written: Any, ms: int) -> None:
    assert parse_duration_ms(written) == ms


@pytest.mark.parametrize("written", ["10x", "", "s", "-5s", True, -1, float("nan"), [10]])
def test_bad_durations_say_what_a_duration_is(written: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration_ms(written)


@pytest.mark.parametrize(("ms", "text"), [(60_000, "1m"), (1_500, "1500ms"), (3_600_000, "1h")])
def test_durations_are_shown_as_written(ms: int, text: str) -> None:
    assert format_duration_ms(ms) == text
    assert parse_duration_ms(text) == ms


# --------------------------------------------------------------------------- configuration
def settings(routes: list[dict[str, Any]], **extra: Any) -> Settings:
    return Settings(cloud=CLOUD | extra.pop("cloud", {}), routes=routes, **extra)


def config_error(routes: list[dict[str, Any]], **extra: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        settings(routes, **extra)
    return describe_validation_error(caught.value)


ISSUE_ROUTES: list[dict[str, Any]] = [
    {
        "topic": "zigbee2mqtt/{device}",
        "fields": {
            "temperature": 5,
            "humidity": 6,
            "battery": {"datastream": 7, "sample": {"deadband": 1, "heartbeat": "6h"}},
        },
        "timestamp": "last_seen",
        "sample": {"every": "60s", "aggregate": "mean"},
    },
    {
        "topic": "shellies/{device}/relay/0/power",
        "datastream_id": 9,
        "sample": {"deadband": 0.5, "heartbeat": "15m"},
    },
    {
        "topic": "{device}/sensor/{stream}/state",
        "streams": {"temperature": 5, "humidity": 6},
        "sample": "fit",
    },
]


def test_the_issue_configuration_is_accepted_as_pinned() -> None:
    config = settings(ISSUE_ROUTES, devices={"living_room": 101})
    zigbee, shelly, esphome = config.routes
    assert zigbee.sample == SampleSettings(every="60s", aggregate="mean")
    assert zigbee.field_map()["battery"].sample == SampleSettings(deadband=1, heartbeat="6h")
    assert shelly.sample == SampleSettings(deadband=0.5, heartbeat="15m")
    assert esphome.sample == SampleSettings(fit=True)


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        ("fot", "routes[0].sample: Value error, must be a table"),
        ({"every": "10x"}, "routes[0].sample.every: Value error, a duration"),
        ({"every": 0}, "routes[0].sample.every: Value error, must be more than 0"),
        (
            {"every": "2d"},
            "routes[0].sample.every: Value error, must be more than 0 and at most 1d",
        ),
        ({"every": "10s", "aggregate": "median"}, "routes[0].sample.aggregate: Input should be"),
        ({"every": "10s", "grace": "2h"}, "routes[0].sample.grace: Value error, must be at most"),
        ({"deadband": -1}, "routes[0].sample.deadband: Input should be greater than or equal"),
        ({"deadband": 1, "heartbeat": 0}, "routes[0].sample.heartbeat: Value error, must be more"),
        ({"heartbeat": "1h"}, "heartbeat needs deadband"),
        ({"every": "10s", "deadband": 1}, "every and deadband do not combine"),
        ({"deadband": 1, "aggregate": "max"}, "aggregate applies to windows"),
        ({}, "say how to sample"),
        ({"every": "1m", "colour": "red"}, "routes[0].sample.colour: unknown key"),
    ],
)
def test_sample_errors_name_the_key(sample: Any, message: str) -> None:
    route = {"topic": "t", "device_id": 1, "datastream_id": 2, "sample": sample}
    assert message in config_error([route])


def test_numeric_aggregates_need_a_numeric_datastream() -> None:
    field_own = {
        "topic": "t",
        "device_id": 1,
        "fields": {"action": {"datastream": 3, "type": "string", "sample": {"every": "1m"}}},
    }
    assert settings([field_own]).routes[0].field_map()["action"].sample is not None  # last
    field_own["fields"]["action"]["sample"] = {"every": "1m", "aggregate": "mean"}  # type: ignore[index]
    assert 'fields.action.sample: aggregate = "mean" needs a numeric datastream' in config_error(
        [field_own]
    )
    route_default = {
        "topic": "t",
        "device_id": 1,
        "fields": {"mode": {"datastream": 4, "type": "enum"}, "t": 5},
        "sample": {"every": "1m", "aggregate": "max"},
    }
    assert "sample (the route's, for fields.mode)" in config_error([route_default])
    single = {"topic": "t", "device_id": 1, "datastream_id": 2, "type": "location"}
    assert "sample: deadband = 0.5 needs a numeric datastream" in config_error(
        [single | {"sample": {"deadband": 0.5}}]
    )
    settings([single | {"sample": {"deadband": 0}}])  # any change: fine for any type


def test_fit_needs_countable_datastreams_and_a_window_that_fits() -> None:
    open_route = {"topic": "x/{device}/{stream}"}
    fit = {"topic": "f/{device}", "fields": {"a": 1}, "sample": "fit"}
    assert "can feed any datastream id: list them in its streams" in config_error([fit, open_route])
    many = {"topic": "m", "device_id": 1, "fields": {f"f{i}": i for i in range(1, 400)}}
    assert "do not fit daily_points_limit = 10000 even at 1h" in config_error(
        [many | {"sample": "fit"}]
    )
    settings([many | {"sample": "fit"}], cloud={"daily_points_limit": 100_000})


def test_a_field_can_opt_out_of_its_routes_rule() -> None:
    route = RouteSettings(
        topic="z/{device}",
        fields={"t": 5, "state": {"datastream": 8, "sample": "raw"}},
        sample={"every": "1m"},
    )
    table = RouteTable([route], devices={"d": 1})
    compiled = table.routes[0]
    assert table.rule_for(compiled, 1, 5) == WindowRule(60_000, "mean", DEFAULT_GRACE_MS)
    assert table.rule_for(compiled, 1, 8) is None


# --------------------------------------------------------------------------- windows
def test_windows_are_aligned_to_the_epoch_in_reading_time() -> None:
    assert window_start(1_700_000_012_345, 10_000) == 1_700_000_010_000
    assert window_start(1_700_000_010_000, 10_000) == 1_700_000_010_000
    assert window_start(1_700_000_009_999, 10_000) == 1_700_000_000_000
    assert window_start(1_700_000_012_345, 3_600_000) == 1_699_999_200_000


@given(ts=st.integers(1_577_836_800_000, 4_102_444_800_000), every=st.integers(1, 86_400_000))
def test_every_reading_falls_in_exactly_its_window(ts: int, every: int) -> None:
    start = window_start(ts, every)
    assert start <= ts < start + every and start % every == 0


def test_aggregate_windows_one_point_per_window_stamped_with_its_start() -> None:
    base = 1_700_000_000_000  # a multiple of 10 s
    rows = [(base + i * 200, repr(float(i))) for i in range(300)]  # 60 s, 200 ms apart
    points = aggregate_windows(rows, WindowRule(10_000, "mean"))
    assert [start for start, _, _ in points] == [base + k * 10_000 for k in range(6)]
    for k, (_, value, folded) in enumerate(points):
        assert folded == 50
        assert json.loads(value) == pytest.approx(statistics.fmean(range(k * 50, k * 50 + 50)))


@pytest.mark.parametrize(
    ("kind", "values", "expected"),
    [
        ("mean", ["1", "2", "4"], "2.3333333333333335"),
        ("mean", ["2", "4"], "3"),  # integers whose mean is whole stay integers
        ("mean", ["0.1"] * 10, "0.1"),  # compensated: not 0.09999999999999999
        ("min", ["3", "-1.5", "2"], "-1.5"),
        ("max", ["3", "10", "2"], "10"),
        ("max", ["21", "21.0"], "21"),  # the first of equals, as it was written
        ("first", ['"a"', '"b"'], '"a"'),
        ("last", ['"a"', '"b"'], '"b"'),
        ("sum", ["1", "2", "3"], "6"),
        ("sum", ["0.1", "0.2"], "0.30000000000000004"),
        ("count", ['"x"', '"y"', '"z"'], "3"),
        ("mean", ['"oops"', "4", "6"], "5"),  # text skipped by a numeric aggregate
        ("mean", ['"a"', '"b"'], '"b"'),  # no number at all: the last value
        ("last", ["[1.5,2.5]", "[3,4]"], "[3,4]"),
    ],
)
def test_aggregates(kind: str, values: list[str], expected: str) -> None:
    aggregator = Aggregator(kind)
    for value in values:
        aggregator.add(value)
    assert aggregator.result() == expected


def test_a_mean_for_an_integer_datastream_is_rounded() -> None:
    aggregator = Aggregator("mean", whole=True)
    for value in ("1", "2", "2"):
        aggregator.add(value)
    assert aggregator.result() == "2"
    half = Aggregator("mean", whole=True)
    for value in ("1", "2"):
        half.add(value)
    assert half.result() == "2"


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200))
def test_mean_matches_the_exact_mean(values: list[float]) -> None:
    aggregator = Aggregator("mean")
    for value in values:
        aggregator.add(repr(value))
    assert json.loads(aggregator.result()) == pytest.approx(statistics.fmean(values), abs=1e-6)


# --------------------------------------------------------------------------- deadband
def kept(rule: DeadbandRule, readings: list[tuple[int, str]]) -> list[tuple[int, str]]:
    last: tuple[int, str] | None = None
    out = []
    for ts, value in readings:
        if deadband_keeps(rule, last, ts, value):
            out.append((ts, value))
            last = (ts, value)
    return out


def test_deadband_keeps_the_first_big_moves_and_heartbeats() -> None:
    rule = DeadbandRule(0.5, heartbeat_ms=900_000)
    minute = 60_000
    readings = [
        (0, "20.0"),  # first: kept
        (1 * minute, "20.3"),  # 0.3 from 20.0: suppressed
        (2 * minute, "20.5"),  # 0.5 is not more than 0.5: suppressed
        (3 * minute, "20.6"),  # 0.6: kept
        (4 * minute, "20.2"),  # 0.4 from 20.6 (the last KEPT value): suppressed
        (5 * minute, "20.0"),  # 0.6 from 20.6: kept
        (19 * minute, "20.1"),  # 14 min after the last kept: suppressed
        (20 * minute, "20.1"),  # 15 min: the heartbeat keeps it
        (21 * minute, "20.1"),  # suppressed again
    ]
    assert kept(rule, readings) == [readings[i] for i in (0, 3, 5, 7)]


def test_deadband_zero_keeps_every_change_and_text_compares_as_text() -> None:
    rule = DeadbandRule(0)
    assert kept(rule, [(1, "1"), (2, "1"), (3, "2"), (4, "2.0"), (5, "1")]) == [
        (1, "1"),
        (3, "2"),
        (5, "1"),
    ]
    assert kept(rule, [(1, '"on"'), (2, '"on"'), (3, '"off"')]) == [(1, '"on"'), (3, '"off"')]


def test_deadband_uses_reading_times_so_a_replay_is_thinned_as_live() -> None:
    """Heartbeats count reading time: a day of backlog replayed in a second keeps one
    reading per heartbeat, as it would have live."""
    rule = DeadbandRule(1.0, heartbeat_ms=3_600_000)
    day = [(i * 60_000, "5") for i in range(1440)]
    assert [ts for ts, _ in kept(rule, day)] == [h * 3_600_000 for h in range(24)]


# --------------------------------------------------------------------------- fit
@pytest.mark.parametrize(
    ("streams", "limit", "window_s"),
    [
        (2, 8640, 30),  # the issue's example: 2 x 2,880 = 5,760 <= 7,776; 20 s would be 8,640
        (1, 10_000, 10),  # 8,640 <= 9,000
        (4, 10_000, 60),  # zigbee2mqtt Aqara: 4 x 1,440 = 5,760
        (10, 10_000, 120),  # ESPHome node with 10 sensors
        (3, 10_000, 30),
        (375, 10_000, 3600),
        (376, 10_000, None),
        (1, 1_000_000, 1),
    ],
)
def test_fit_ladder(streams: int, limit: int, window_s: int | None) -> None:
    window = fit_window_ms(streams, limit)
    assert window == (None if window_s is None else window_s * 1000)
    if window is not None:
        assert 86_400_000 / window * streams <= 0.9 * limit


def test_fit_counts_every_datastream_any_route_can_send_the_device() -> None:
    routes = [
        RouteSettings(topic="esp/{device}/{stream}", streams={"t": 5, "h": 6}, sample="fit"),
        RouteSettings(topic="z/{device}", fields={"t": 5, "b": 7}),  # 5 again: counted once
        RouteSettings(topic="own", device_id=101, datastream_id=9),
        RouteSettings(topic="other", device_id=202, datastream_id=1),
    ]
    table = RouteTable(routes, devices={"node": 101, "x": 103}, daily_points_limit=8640)
    plan = table.sampling
    assert plan.datastreams_of(101) == {5, 6, 7, 9}  # S = 4
    assert plan.datastreams_of(103) == {5, 6, 7}  # S = 3
    assert plan.fit_window_ms(101) == 60_000  # 4 x 1,440 = 5,760 <= 7,776
    assert plan.fit_window_ms(103) == 60_000  # 3 x 2,880 = 8,640 > 7,776 at 30 s
    esp = table.routes[0]
    assert table.rule_for(esp, 101, 5) == WindowRule(60_000, "mean", DEFAULT_GRACE_MS)
    device = plan.device(101)
    assert device.sampled and device.rules[9] is None
    assert device.rules[5] == WindowRule(60_000, "mean", DEFAULT_GRACE_MS)


def test_fit_is_replanned_for_a_new_limit() -> None:
    routes = [RouteSettings(topic="s/{device}/{stream}", streams={"a": 1, "b": 2}, sample="fit")]
    assert (
        RouteTable(routes, devices={"d": 7}, daily_points_limit=8640).sampling.fit_window_ms(7)
        == 30_000
    )
    assert (
        RouteTable(routes, devices={"d": 7}, daily_points_limit=100_000).sampling.fit_window_ms(7)
        == 2_000
    )


def test_the_example_configs_samples_are_what_its_comments_say() -> None:
    import tomllib
    from pathlib import Path

    example = tomllib.loads((Path(__file__).parent.parent / "config.example.toml").read_text())
    config = Settings(**{**example, "cloud": {"client_id": "c", "client_secret": "s"}})
    table = RouteTable(config.routes, devices=config.devices, daily_points_limit=10_000)
    by_topic = {route.name: route for route in table.routes}
    zigbee = by_topic["zigbee2mqtt/{device}"]
    minute_mean = WindowRule(60_000, "mean", DEFAULT_GRACE_MS)
    assert table.rule_for(zigbee, 102, 5) == minute_mean
    assert table.rule_for(zigbee, 102, 7) == DeadbandRule(1, 21_600_000)
    assert table.rule_for(zigbee, 102, 8) is None  # the relay state: "raw"
    esphome = by_topic["{device}/sensor/{stream}/state"]
    assert table.sampling.datastreams_of(101) == {5, 6, 7, 8, 9, 10, 11}
    assert table.rule_for(esphome, 101, 5) == WindowRule(120_000, "mean", DEFAULT_GRACE_MS)
    shelly = by_topic["shellies/shelly1-AB12CD/relay/0/power"]
    assert table.rule_for(shelly, 106, 9) == DeadbandRule(0.5, 900_000)
    gen2 = by_topic["+/events/rpc"]
    assert table.rule_for(gen2, 104, 9) == minute_mean


@given(
    deadband=st.floats(0, 5),
    last=st.none() | st.tuples(st.integers(0, 10_000), st.sampled_from(["1", "2.5", '"a"'])),
    ts=st.integers(0, 20_000),
    value=st.sampled_from(["1", "1.4", "2.5", "4", '"a"', '"b"']),
)
def test_the_verdict_routes_test_prints_is_the_rules_decision(
    deadband: float, last: tuple[int, str] | None, ts: int, value: str
) -> None:
    rule = DeadbandRule(deadband, heartbeat_ms=5_000)
    keep, reason = deadband_verdict(rule, last, ts, value)
    assert keep == deadband_keeps(rule, last, ts, value)
    assert reason.startswith("kept: " if keep else "suppressed: ")
