"""Real publishers' messages through the routes of config.example.toml's kind.

Payloads are taken from each publisher's documentation (zigbee2mqtt device pages, Tasmota
`tele/.../SENSOR`, Shelly Gen1 topics and Gen2 `NotifyStatus`, ESPHome state topics, RFC
8428 SenML, OpenMQTTGateway BLE); each row asserts the exact (device, datastream, ts, value)
that would be stored.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.config import RouteSettings, Settings
from gateway.ingest.routes import Outcome, RouteTable
from gateway.models import Reading

NOW_MS = 1_702_656_423_136  # 2023-12-15T16:07:03.136Z
NOW_S = NOW_MS / 1000

DEVICES = {
    "living_room": 101,
    "0x00158d0001a2b3c4": 102,
    "tasmota_ABC123": 103,
    "shellyplus1pm-a8032ab12345": 104,
    "A4:C1:38:AA:BB:CC": 105,
    "urn:dev:ow:10e2073a01080063": 106,
}

ROUTES: list[dict[str, Any]] = [
    {
        "topic": "zigbee2mqtt/{device}",
        "fields": {
            "temperature": 5,
            "humidity": 6,
            "battery": 7,
            "state": 8,
            "contact": {"datastream": 9, "type": "integer"},
            "action": {"datastream": 10, "type": "string"},
        },
        "timestamp": "last_seen",
    },
    {
        "topic": "tele/{device}/SENSOR",
        "fields": {
            "AM2301.Temperature": 5,
            "AM2301.Humidity": 6,
            "DS18B20-2.Temperature": 7,
            "ENERGY.Power": 8,
        },
        "timestamp": "Time",
        "timezone": "Europe/Berlin",
    },
    {"topic": "stat/{device}/POWER", "datastream_id": 20},
    {"topic": "{device}/sensor/{stream}/state", "streams": {"temperature": 5, "humidity": 6}},
    {"topic": "{device}/binary_sensor/{stream}/state", "streams": {"motion": 11}},
    {"topic": "shellies/shelly1-AB12CD/sensor/temperature", "device_id": 107, "datastream_id": 5},
    {"topic": "shellies/shelly1-AB12CD/relay/0", "device_id": 107, "datastream_id": 12},
    {
        "topic": "+/events/rpc",
        "device_field": "src",
        "fields": {"params.switch:0.apower": 8, "params.switch:0.voltage": 13},
        "timestamp": "params.ts",
    },
    {"topic": "senml/{device}", "format": "senml", "fields": {"temp": 5, "hum": 6}},
    {"topic": "senml-bn", "format": "senml", "device_field": "bn", "fields": {"temp": 5}},
    {
        "topic": "home/OpenMQTTGateway/BTtoMQTT/+",
        "device_field": "id",
        "fields": {"tempc": 5, "hum": 6, "batt": 7},
    },
    {"topic": "custom/{device}/batch", "format": "array", "datastream_id": 30},
    {"topic": "sensors/{device}/temp", "datastream_id": 5},
]


def table(routes: list[dict[str, Any]] | None = None) -> RouteTable:
    settings = [RouteSettings(**route) for route in routes or ROUTES]
    return RouteTable(settings, devices=DEVICES)


def iso_ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def route(topic: str, payload: str | bytes, *, retained: bool = False, **kw: Any) -> Outcome:
    raw = payload.encode() if isinstance(payload, str) else payload
    return table(**kw).route(topic, raw, NOW_MS, retained=retained)


def readings(topic: str, payload: str | bytes, **kw: Any) -> set[tuple[int, int, int, Any]]:
    outcome = route(topic, payload, **kw)
    assert not outcome.refusals and outcome.unmapped is None, outcome
    return {
        (r.device_id, r.datastream_id, r.ts_ms, json.loads(r.value_json)) for r in outcome.readings
    }


Z2M = "zigbee2mqtt/0x00158d0001a2b3c4"
LAST_SEEN = "2023-12-15T17:06:58+01:00"
TASMOTA_TIME = "2023-12-15T17:07:03"  # naive, Europe/Berlin (CET, +01:00 in December)


@pytest.mark.parametrize(
    ("topic", "payload", "expected"),
    [
        pytest.param(
            Z2M,
            json.dumps(
                {
                    "temperature": 22.75,
                    "humidity": 55.43,
                    "battery": 86,
                    "linkquality": 97,
                    "voltage": 3005,
                    "last_seen": LAST_SEEN,
                }
            ),
            {
                (102, 5, iso_ms(LAST_SEEN), 22.75),
                (102, 6, iso_ms(LAST_SEEN), 55.43),
                (102, 7, iso_ms(LAST_SEEN), 86),
            },
            id="zigbee2mqtt-aqara-sensor",
        ),
        pytest.param(
            Z2M,
            '{"battery":"100.00","linkquality":40}',
            {(102, 7, NOW_MS, 100.0)},
            id="zigbee2mqtt-partial-update-numeric-string-no-last_seen",
        ),
        pytest.param(
            Z2M,
            json.dumps({"state": "ON", "contact": False, "last_seen": 1702656418000}),
            {(102, 8, 1702656418000, 1), (102, 9, 1702656418000, 0)},
            id="zigbee2mqtt-switch-and-contact-epoch-ms-last_seen",
        ),
        pytest.param(
            Z2M,
            '{"action":"single","battery":null,"temperature":"unavailable"}',
            {(102, 10, NOW_MS, "single")},
            id="zigbee2mqtt-string-datastream-and-no-reading-values",
        ),
        pytest.param(
            "tele/tasmota_ABC123/SENSOR",
            json.dumps(
                {
                    "Time": TASMOTA_TIME,
                    "AM2301": {"Temperature": 22.8, "Humidity": 48.2, "DewPoint": 11.2},
                    "TempUnit": "C",
                }
            ),
            {
                (103, 5, iso_ms("2023-12-15T16:07:03+00:00"), 22.8),
                (103, 6, iso_ms("2023-12-15T16:07:03+00:00"), 48.2),
            },
            id="tasmota-am2301-naive-local-time",
        ),
        pytest.param(
            "tele/tasmota_ABC123/SENSOR",
            json.dumps(
                {
                    "Time": "2023-07-15T17:07:03",  # summer: CEST, +02:00
                    "DS18B20-1": {"Id": "01191ED79876", "Temperature": 21.1},
                    "DS18B20-2": {"Id": "0119208A4C5F", "Temperature": 22.2},
                    "ENERGY": {"Power": 42, "Voltage": 229},
                }
            ),
            {
                (103, 7, iso_ms("2023-07-15T15:07:03+00:00"), 22.2),
                (103, 8, iso_ms("2023-07-15T15:07:03+00:00"), 42),
            },
            id="tasmota-ds18b20-dash-key-and-dst",
        ),
        pytest.param(
            "stat/tasmota_ABC123/POWER", "OFF", {(103, 20, NOW_MS, 0)}, id="tasmota-power"
        ),
        pytest.param(
            "living_room/sensor/temperature/state",
            "22.50",
            {(101, 5, NOW_MS, 22.5)},
            id="esphome-sensor",
        ),
        pytest.param(
            "living_room/binary_sensor/motion/state",
            "ON",
            {(101, 11, NOW_MS, 1)},
            id="esphome-binary-sensor",
        ),
        pytest.param(
            "shellies/shelly1-AB12CD/sensor/temperature",
            "21.88",
            {(107, 5, NOW_MS, 21.88)},
            id="shelly-gen1-sensor",
        ),
        pytest.param(
            "shellies/shelly1-AB12CD/relay/0", "on", {(107, 12, NOW_MS, 1)}, id="shelly-gen1-relay"
        ),
        pytest.param(
            "shellyplus1pm-a8032ab12345/events/rpc",
            json.dumps(
                {
                    "src": "shellyplus1pm-a8032ab12345",
                    "dst": "shellyplus1pm-a8032ab12345/events",
                    "method": "NotifyStatus",
                    "params": {
                        "ts": 1702656420.52,
                        "switch:0": {"id": 0, "apower": 12.5, "voltage": 230.1},
                    },
                }
            ),
            {(104, 8, 1702656420520, 12.5), (104, 13, 1702656420520, 230.1)},
            id="shelly-gen2-notifystatus-device-from-src-ts-seconds",
        ),
        pytest.param(
            "senml/living_room",
            json.dumps(
                [
                    {
                        "bn": "urn:dev:ow:10e2073a01080063:",
                        "bt": 1.70265642e9,
                        "n": "temp",
                        "u": "Cel",
                        "v": 23.1,
                    },
                    {"n": "hum", "u": "%RH", "v": 48.2, "t": 2},
                    {"n": "voltage", "u": "V", "v": 3.0},
                ]
            ),
            {(101, 5, 1702656420000, 23.1), (101, 6, 1702656422000, 48.2)},
            id="senml-pack-bt-plus-t",
        ),
        pytest.param(
            "senml/living_room",
            '[{"n":"temp","v":21.5},{"n":"hum","v":40,"t":-5}]',
            {(101, 5, NOW_MS, 21.5), (101, 6, NOW_MS - 5000, 40)},
            id="senml-relative-times",
        ),
        pytest.param(
            "senml-bn",
            '[{"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","v":20.5}]',
            {(106, 5, NOW_MS, 20.5)},
            id="senml-device-from-base-name",
        ),
        pytest.param(
            "home/OpenMQTTGateway/BTtoMQTT/A4C138AABBCC",
            '{"id":"A4:C1:38:AA:BB:CC","name":"LYWSD03MMC","tempc":22.4,"hum":45,"batt":90,"volt":3.01}',
            {(105, 5, NOW_MS, 22.4), (105, 6, NOW_MS, 45), (105, 7, NOW_MS, 90)},
            id="openmqttgateway-ble-device-from-id",
        ),
        pytest.param(
            "custom/living_room/batch",
            '[{"value":1.5,"ts":1702656400000},{"value":2.5,"ts":1702656410}]',
            {(101, 30, 1702656400000, 1.5), (101, 30, 1702656410000, 2.5)},
            id="array-of-value-ts-ms-and-seconds",
        ),
        pytest.param(
            "custom/living_room/batch",
            '[[1702656400000, 7], ["2023-12-15T16:06:50Z", 8]]',
            {(101, 30, 1702656400000, 7), (101, 30, 1702656410000, 8)},
            id="array-of-ts-value-pairs",
        ),
    ],
)
def test_publisher_payloads(
    topic: str, payload: str, expected: set[tuple[int, int, int, Any]]
) -> None:
    assert readings(topic, payload) == expected


def test_numeric_device_name_is_the_id_only_when_devices_says_so() -> None:
    """`"+" = "numeric-id"` in [devices]; by default (issue 16) such a name is unmapped."""
    settings = [RouteSettings(**route) for route in ROUTES]
    numeric = RouteTable(settings, devices=DEVICES, numeric_ids=True)
    [reading] = numeric.route("sensors/12345/temp", b"19", NOW_MS).readings
    assert reading == Reading(12345, 5, NOW_MS, "19")
    outcome = route("sensors/12345/temp", "19")
    assert outcome.unmapped == "device_unmapped" and outcome.unknown_device == "12345"


# --------------------------------------------------------------------------- what maps to nothing
def test_unknown_device_name_is_reported_with_the_name() -> None:
    outcome = route("zigbee2mqtt/0xdeadbeef", '{"temperature": 20}')
    assert outcome.unmapped == "device_unmapped" and outcome.unknown_device == "0xdeadbeef"
    assert not outcome.readings and not outcome.refusals


def test_message_with_none_of_the_listed_fields_maps_to_nothing() -> None:
    outcome = route(Z2M, '{"linkquality": 97}')
    assert outcome.unmapped == "no_mapped_fields"
    assert not outcome.readings and not outcome.refusals


def test_unlisted_stream_maps_to_nothing() -> None:
    outcome = route("living_room/sensor/wifi_signal/state", "-60")
    assert outcome.unmapped == "stream_unmapped" and not outcome.readings


def test_esphome_nan_is_no_reading() -> None:
    outcome = route("living_room/sensor/temperature/state", "nan")
    assert outcome.no_reading == 1 and not outcome.readings and not outcome.refusals


def test_missing_device_field_maps_to_nothing() -> None:
    outcome = route("x/events/rpc", '{"params": {"switch:0": {"apower": 1}}}')
    assert outcome.unmapped == "no_device_field"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ('{"temperature": "warm"}', None),  # a string on an undeclared datastream is kept
        ('{"contact": "maybe"}', "type_mismatch"),
        ('{"temperature": 1e400}', "value_not_finite"),
        ("not json", "not_json"),
        ("[1, 2]", "not_an_object"),
        (b"\xff\xfe", "not_utf8"),
    ],
)
def test_one_bad_field_is_refused_alone(payload: str | bytes, code: str | None) -> None:
    raw = payload if isinstance(payload, bytes) else payload.encode()
    if raw.startswith(b"{"):
        raw = raw[:-1] + b', "battery": 50}'
    outcome = route(Z2M, raw)
    assert [r.code for r in outcome.refusals] == ([code] if code else [])
    if raw.startswith(b"{"):
        assert (102, 7, NOW_MS, "50") in {
            (r.device_id, r.datastream_id, r.ts_ms, r.value_json) for r in outcome.readings
        }
    for refusal in outcome.refusals:
        assert refusal.device_id == 102 and refusal.detail


# --------------------------------------------------------------------------- timestamps
def ts_route(**extra: Any) -> list[dict[str, Any]]:
    return [{"topic": "t", "device_id": 1, "fields": {"v": 2}, "timestamp": "ts", **extra}]


@pytest.mark.parametrize(
    ("raw_ts", "expected_ms"),
    [
        (1702656420, 1702656420000),  # seconds
        (1702656420.25, 1702656420250),
        (1702656420123, 1702656420123),  # ms
        (1702656420123456, 1702656420123),  # µs
        (1702656420123456789, 1702656420123),  # ns
        ("1702656420", 1702656420000),
        ("1702656420123", 1702656420123),
        ("1702656420.5", 1702656420500),
        ("2023-12-15T16:07:00Z", 1702656420000),
        ("2023-12-15T16:07:00.250Z", 1702656420250),
        ("2023-12-15T17:07:00+01:00", 1702656420000),
        ("2023-12-15T16:07:00.123456+00:00", 1702656420123),
    ],
)
def test_timestamp_forms(raw_ts: Any, expected_ms: int) -> None:
    payload = json.dumps({"v": 1, "ts": raw_ts})
    assert readings("t", payload, routes=ts_route()) == {(1, 2, expected_ms, 1)}


@pytest.mark.parametrize(
    ("zone", "naive", "expected_utc"),
    [
        ("+01:00", "2023-07-15T17:07:00", "2023-07-15T16:07:00+00:00"),  # stock Tasmota: no DST
        ("Europe/Berlin", "2023-07-15T17:07:00", "2023-07-15T15:07:00+00:00"),
        ("-05:30", "2023-12-15 10:37:00", "2023-12-15T16:07:00+00:00"),
        ("UTC", "2023-12-15T16:07:00", "2023-12-15T16:07:00+00:00"),
    ],
)
def test_naive_times_are_read_in_the_route_timezone(
    zone: str, naive: str, expected_utc: str
) -> None:
    payload = json.dumps({"v": 1, "ts": naive})
    assert readings("t", payload, routes=ts_route(timezone=zone)) == {
        (1, 2, iso_ms(expected_utc), 1)
    }


@pytest.mark.parametrize(
    "raw_ts",
    [
        NOW_MS + 301_000,  # beyond max_future_s = 300
        1_500_000_000_000,  # 2017: before 2020, a clock never set
        0,
        "yesterday",
        True,
    ],
)
def test_untrusted_times_get_the_receive_time_and_are_counted(raw_ts: Any) -> None:
    outcome = route("t", json.dumps({"v": 1, "ts": raw_ts}), routes=ts_route())
    assert [r.ts_ms for r in outcome.readings] == [NOW_MS]
    assert outcome.ts_replaced == 1 and outcome.ts_problem


def test_untrusted_times_can_be_refused_instead() -> None:
    outcome = route(
        "t", json.dumps({"v": 1, "ts": NOW_MS + 3_600_000}), routes=ts_route(bad_timestamp="reject")
    )
    assert not outcome.readings
    [refusal] = outcome.refusals
    assert refusal.code == "bad_timestamp" and "ahead" in (refusal.detail or "")


def test_slightly_future_time_is_kept() -> None:
    payload = json.dumps({"v": 1, "ts": NOW_MS + 299_000})
    assert readings("t", payload, routes=ts_route()) == {(1, 2, NOW_MS + 299_000, 1)}


# --------------------------------------------------------------------------- retained
def test_retained_without_payload_time_is_skipped_by_default() -> None:
    outcome = route("living_room/sensor/temperature/state", "22.5", retained=True)
    assert not outcome.readings and outcome.retained_skipped == 1


def test_retained_with_payload_time_is_taken() -> None:
    payload = json.dumps({"temperature": 22.75, "last_seen": LAST_SEEN})
    outcome = route(Z2M, payload, retained=True)
    assert [(r.datastream_id, r.ts_ms) for r in outcome.readings] == [(5, iso_ms(LAST_SEEN))]


def test_retained_accept_stamps_receive_time() -> None:
    routes = [{"topic": "r", "device_id": 1, "datastream_id": 2, "retained": "accept"}]
    outcome = route("r", "5", retained=True, routes=routes)
    assert [(r.ts_ms, r.value_json) for r in outcome.readings] == [(NOW_MS, "5")]


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("route_config", "message"),
    [
        ({"topic": "a/{device}", "device_id": 1, "datastream_id": 2}, "exactly one device source"),
        ({"topic": "a/b", "datastream_id": 2}, "exactly one device source"),
        ({"topic": "a/b", "device_id": 1}, "exactly one datastream source"),
        ({"topic": "a/{stream}", "device_id": 1, "fields": {"x": 1}}, "exactly one datastream"),
        ({"topic": "a/b", "device_id": 1, "streams": {"x": 1}}, "streams needs a {stream}"),
        ({"topic": "a/{dev}", "device_id": 1, "datastream_id": 1}, "a template must be a whole"),
        ({"topic": "a/x{device}", "device_id": 1, "datastream_id": 1}, "a template must be"),
        ({"topic": "{device}/{device}", "datastream_id": 1}, "more than once"),
        ({"topic": "a", "device_id": 1, "fields": {}}, "fields is empty"),
        ({"topic": "a", "device_id": 1, "format": "senml", "datastream_id": 1}, "needs fields"),
        ({"topic": "a", "device_id": 1, "fields": {"x": 1}, "timezone": "Mars/Base"}, "timezone"),
        ({"topic": "a", "device_id": 1, "fields": {"x": 1}, "timezone": "+25:00"}, "offset"),
        ({"topic": "a", "device_id": 1, "fields": {"x": 1}, "type": "double"}, "give each field"),
        ({"topic": "a", "device_id": 1, "fields": {"x": {"datastream": 1, "type": "f"}}}, "type"),
    ],
)
def test_route_config_errors_name_the_problem(route_config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("{", r"\{").replace("}", r"\}")):
        RouteSettings(**route_config)


def test_devices_section_and_issue_example_config_are_accepted() -> None:
    settings = Settings(
        cloud={"client_id": "c", "client_secret": "s"},
        devices={"living_room": 101, "0x00158d0001a2b3c4": 102},
        routes=ROUTES,
    )
    assert settings.devices["living_room"] == 101
    assert len(settings.routes) == len(ROUTES)


def test_subscriptions_replace_templates_with_plus() -> None:
    assert table().subscriptions[:4] == [
        "zigbee2mqtt/+",
        "tele/+/SENSOR",
        "stat/+/POWER",
        "+/sensor/+/state",
    ]


# --------------------------------------------------------------------------- never raises
TOPIC_LEVELS = st.sampled_from(
    [
        "zigbee2mqtt",
        "tele",
        "SENSOR",
        "living_room",
        "sensor",
        "state",
        "senml",
        "custom",
        "batch",
        "x",
        "",
        "$SYS",
        "0x00158d0001a2b3c4",
        "temperature",
        "events",
        "rpc",
    ]
)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "temperature",
                    "value",
                    "ts",
                    "last_seen",
                    "n",
                    "v",
                    "bn",
                    "t",
                    "src",
                    "params",
                    "Time",
                    "AM2301",
                    "x",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(
    levels=st.lists(TOPIC_LEVELS, min_size=1, max_size=5),
    payload=st.one_of(st.binary(max_size=200), JSONISH.map(lambda doc: json.dumps(doc).encode())),
    retained=st.booleans(),
)
def test_routing_never_raises_and_accounts_for_every_message(
    levels: list[str], payload: bytes, retained: bool
) -> None:
    outcome = ROUTING_TABLE.route("/".join(levels), payload, NOW_MS, retained=retained)
    accounted = (
        len(outcome.readings)
        + len(outcome.refusals)
        + outcome.no_reading
        + outcome.retained_skipped
        + (outcome.unmapped is not None)
    )
    assert accounted >= 1, outcome
    for reading in outcome.readings:
        assert isinstance(reading, Reading) and json.loads(reading.value_json) is not None
    for refusal in outcome.refusals:
        assert refusal.code and refusal.code.islower()


ROUTING_TABLE = table()


# --------------------------------------------------------------------------- the example
EXAMPLE_MESSAGES = [
    (
        "zigbee2mqtt/0x00158d0001a2b3c4",
        '{"temperature":22.75,"humidity":55.43,"battery":86,'
        '"linkquality":97,"last_seen":"2023-12-15T17:06:58+01:00"}',
        3,
    ),
    (
        "tele/tasmota_ABC123/SENSOR",
        '{"Time":"2023-12-15T17:07:03","AM2301":{"Temperature":22.8,'
        '"Humidity":48.2},"DS18B20-2":{"Temperature":21.1},"TempUnit":"C"}',
        3,
    ),
    ("stat/tasmota_ABC123/POWER", "ON", 1),
    ("living_room/sensor/temperature/state", "22.50", 1),
    ("shellies/shelly1-AB12CD/relay/0/power", "12.5", 1),
    (
        "shellyplus1pm-a8032ab12345/events/rpc",
        '{"src":"shellyplus1pm-a8032ab12345",'
        '"method":"NotifyStatus","params":{"ts":1702656420.52,"switch:0":{"apower":12.5}}}',
        1,
    ),
    (
        "senml/living_room",
        '[{"bn":"urn:dev:ow:10e2073a01080063:","bt":1.70265642e9,"n":"temp",'
        '"u":"Cel","v":23.1},{"n":"hum","u":"%RH","v":48.2,"t":2}]',
        2,
    ),
    (
        "home/OpenMQTTGateway/BTtoMQTT/A4C138AABBCC",
        '{"id":"A4:C1:38:AA:BB:CC","tempc":22.4,"hum":45}',
        2,
    ),
    (
        "greenhouse/esp32-1/data",
        '{"uptime":5123,"env":{"t":21.5,"rh":40.2},"ts":1702656420}',
        2,
    ),
    (
        "custom/living_room/batch",
        '[{"value":21.5,"ts":1702656400000},{"value":21.7,"ts":1702656410}]',
        2,
    ),
    ("sensors/boiler/temperature", "21.5", 1),
]


@pytest.mark.parametrize(("topic", "payload", "count"), EXAMPLE_MESSAGES)
def test_each_example_route_routes_its_documented_message(
    topic: str, payload: str, count: int
) -> None:
    """config.example.toml's sample messages (in its comments) give readings as shown."""
    import tomllib
    from pathlib import Path

    example = tomllib.loads((Path(__file__).parent.parent / "config.example.toml").read_text())
    settings = Settings(**{**example, "cloud": {"client_id": "c", "client_secret": "s"}})
    example_table = RouteTable(settings.routes, devices=settings.devices)
    outcome = example_table.route(topic, payload.encode(), NOW_MS)
    assert len(outcome.readings) == count and not outcome.refusals, outcome
    assert outcome.ts_replaced == 0
