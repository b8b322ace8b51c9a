"""Publishers' messages through a real Mosquitto, the running gateway and the sandbox cloud.

The routing table is tested row by row in test_publishers.py; here each promise is kept on
the path a user's data takes: published over MQTT while the daemon runs, committed,
uploaded, and counted by the cloud.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from gateway.config import Settings
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import AcceptedPoint, SandboxCloud
from harness import InProcessGateway, events, publish, wait_until

DEVICES = {
    101: {5: "double", 6: "double", 7: "double", 8: "double"},
    102: {5: "double", 6: "double"},
}
Z2M_ROUTE = {
    "topic": "zigbee2mqtt/{device}",
    "fields": {"temperature": 5, "humidity": 6, "battery": 7, "state": 8},
    "timestamp": "last_seen",
}
TASMOTA_ROUTE = {
    "topic": "tele/{device}/SENSOR",
    "fields": {"AM2301.Temperature": 5, "AM2301.Humidity": 6},
    "timestamp": "Time",
    "timezone": "Europe/Berlin",
}
ESPHOME_ROUTE = {"topic": "{device}/sensor/{stream}/state", "streams": {"temperature": 5}}
NAMES = {"0x00158d0001a2b3c4": 101, "tasmota_ABC123": 102, "living_room": 101}


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxCloud]:
    """This module's cloud knows the datastreams its routes feed."""
    cloud = SandboxCloud(DEVICES)
    await cloud.start()
    try:
        yield cloud
    finally:
        await cloud.stop()


def recent_ms(minutes_ago: float = 60) -> int:
    return int((time.time() - minutes_ago * 60) * 1000)


async def test_zigbee2mqtt_message_with_four_mapped_fields_makes_four_points(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    last_seen_ms = recent_ms()
    payload = {
        "temperature": 22.75,
        "humidity": 55.43,
        "battery": 86,
        "state": "ON",
        "linkquality": 97,
        "voltage": 3005,
        "last_seen": last_seen_ms,
    }
    settings = make_settings(routes=[Z2M_ROUTE], devices=NAMES)
    async with InProcessGateway(settings) as gateway:
        assert gateway.ingest is not None
        topic = "zigbee2mqtt/0x00158d0001a2b3c4"
        assert await publish(publisher, [(topic, json.dumps(payload))]) == 1
        await wait_until(lambda: len(sandbox.accepted) >= 4, 20, "4 points in the cloud")
        assert gateway.ingest.stats.received == 1
    assert set(sandbox.accepted) == {
        AcceptedPoint(101, 5, last_seen_ms, 22.75),
        AcceptedPoint(101, 6, last_seen_ms, 55.43),
        AcceptedPoint(101, 7, last_seen_ms, 86),
        AcceptedPoint(101, 8, last_seen_ms, 1),
    }


async def test_tasmota_naive_local_time_becomes_the_right_epoch(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    # Tasmota writes its local wall-clock time without an offset, to the second.
    moment = datetime.now(ZoneInfo("Europe/Berlin")).replace(microsecond=0) - timedelta(hours=2)
    payload = {
        "Time": moment.replace(tzinfo=None).isoformat(),
        "AM2301": {"Temperature": 21.4, "Humidity": 47.0, "DewPoint": 9.8},
        "TempUnit": "C",
    }
    expected_ms = int(moment.timestamp() * 1000)
    settings = make_settings(routes=[TASMOTA_ROUTE], devices=NAMES)
    async with InProcessGateway(settings):
        topic = "tele/tasmota_ABC123/SENSOR"
        assert await publish(publisher, [(topic, json.dumps(payload))]) == 1
        await wait_until(lambda: len(sandbox.accepted) >= 2, 20, "2 points in the cloud")
    assert set(sandbox.accepted) == {
        AcceptedPoint(102, 5, expected_ms, 21.4),
        AcceptedPoint(102, 6, expected_ms, 47.0),
    }


async def test_retained_replay_is_skipped_and_live_values_flow(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    """The broker replays a retained value on subscribe (retain flag set): it is skipped
    and counted; the same topic's live messages are stored."""
    topic = "living_room/sensor/temperature/state"
    await asyncio.to_thread(publisher.publish, topic, "19.5", retain=True)
    await wait_until(lambda: publisher.acked_count == 1, 10, "the retained message acked")
    settings = make_settings(routes=[ESPHOME_ROUTE], devices=NAMES)
    async with InProcessGateway(settings) as gateway:
        ingest = gateway.ingest
        assert ingest is not None
        await wait_until(lambda: ingest.stats.retained_skipped == 1, 20, "the replay skipped")
        assert await publish(publisher, [(topic, "20.5"), (topic, "nan"), (topic, "21.0")]) == 3
        await wait_until(lambda: len(sandbox.accepted) >= 2, 20, "2 live points")
        assert ingest.stats.no_reading == 1
    assert sorted(point.value for point in sandbox.accepted) == [20.5, 21.0]  # type: ignore[type-var]


async def test_unknown_device_is_named_once_with_a_hint_and_valid_readings_flow(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    settings = make_settings(routes=[Z2M_ROUTE], devices=NAMES)
    unknown = [("zigbee2mqtt/0xdeadbeef", json.dumps({"temperature": i})) for i in range(50)]
    known = [
        ("zigbee2mqtt/0x00158d0001a2b3c4", json.dumps({"battery": i, "last_seen": recent_ms(i)}))
        for i in range(10)
    ]
    junk = [("zigbee2mqtt/0x00158d0001a2b3c4", "{not json")] * 5
    async with InProcessGateway(settings) as gateway:
        ingest = gateway.ingest
        assert ingest is not None
        assert await publish(publisher, unknown + junk + known) == 65
        await wait_until(lambda: len(sandbox.accepted) >= 10, 20, "the known device's points")
        assert ingest.stats.unmapped_devices == {"0xdeadbeef": 50}
        assert ingest.stats.rejected_by_route["zigbee2mqtt/{device}"] == {
            "device_unmapped": 50,
            "not_json": 5,
        }
    assert sorted(point.value for point in sandbox.accepted) == list(range(10))  # type: ignore[type-var]
    [line] = events(log_output, "device_unmapped")
    assert line["name"] == "0xdeadbeef" and "[devices]" in line["hint"]
    assert line["route"] == "zigbee2mqtt/{device}"
    [rejected] = events(log_output, "payload_rejected")
    assert rejected["reason"] == "not_json" and rejected["excerpt"] == "{not json"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_a_big_untimed_array_never_runs_ahead_of_its_arrival(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    """An array without times used to be stamped arrival + 1 ms per element, and the
    stream's next reading after its last element: here 5 s in the future. Now the array
    ends at its arrival (the gateway PUBACKs after the commit, so before `array_acked`),
    and the next reading is stamped when it arrives."""
    count = 5000
    array_route = {"topic": "arr/{device}", "format": "array", "datastream_id": 7}
    plain_route = {"topic": "plain/{device}", "datastream_id": 7}
    settings = make_settings(
        routes=[array_route, plain_route], devices=NAMES, mqtt={"max_payload_bytes": 1 << 20}
    )
    array = json.dumps([{"value": i} for i in range(count)])
    async with InProcessGateway(settings):
        array_sent = now_ms()
        assert await publish(publisher, [("arr/living_room", array)]) == 1
        array_acked = next_sent = now_ms()
        assert await publish(publisher, [("plain/living_room", "-1")]) == 1
        next_acked = now_ms()
        await wait_until(lambda: len(sandbox.accepted) >= count + 1, 30, "every point uploaded")
    stream = [point for point in sandbox.accepted if point.datastream_id == 7]
    assert {point.device_id for point in stream} == {101} and len(stream) == count + 1
    [next_reading] = [point for point in stream if point.value == -1]
    assert next_sent <= next_reading.ts <= next_acked
    ts_by_value = {point.value: point.ts for point in stream}
    stamps = [ts_by_value[i] for i in range(count)]
    assert stamps == sorted(set(stamps))  # the elements' order, unique stamps
    assert array_sent - count < stamps[0] and stamps[-1] <= array_acked


async def test_daemon_start_warns_once_about_a_route_on_every_topic(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    """The warning `check-config` prints is also the daemon's, one line at start; the route
    still runs (it is valid MQTT), and another application's retained value shows why."""
    await asyncio.to_thread(publisher.publish, "homeassistant/status", "online", retain=True)
    catch_all = {"topic": "#", "device_id": 101, "datastream_id": 5}
    settings = make_settings(routes=[ESPHOME_ROUTE, catch_all], devices=NAMES)
    async with InProcessGateway(settings) as gateway:
        ingest = gateway.ingest
        assert ingest is not None
        await wait_until(lambda: ingest.stats.received >= 1, 20, "the junk replayed")
        # Home Assistant's retained status became a dead letter of this gateway.
        assert ingest.stats.rejected_by_route == {"#": {"not_json": 1}}
    [line] = events(log_output, "route_catches_all")
    assert line["level"] == "warning" and line["route"] == "#"
    assert "every topic on the broker" in line["problem"] and '"sensors/#"' in line["problem"]
