"""SIGHUP reloads the config file in the running daemon, through a real Mosquitto.

A new route's readings arrive, a removed route's stop (its filter is unsubscribed from the
session), an invalid file changes nothing, buffered data and the MQTT session survive, and
parked streams are retried.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from typing import Any

from gateway.testing.broker import MosquittoBroker
from gateway.testing.process import GatewayProcess, write_config
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import settings_dict, wait_until

OLD_ROUTE = {"topic": "old/temp", "device_id": 101, "datastream_id": 5}
NEW_ROUTE = {
    "topic": "zigbee2mqtt/{device}",
    "fields": {"temperature": 6},
    "timestamp": "last_seen",
}


def recent_ms(seconds_ago: float = 60) -> int:
    return int((time.time() - seconds_ago) * 1000)


def rewrite(
    process: GatewayProcess,
    broker: MosquittoBroker,
    sandbox: SandboxCloud,
    routes: list[dict[str, Any]],
    **sections: Any,
) -> None:
    db = process.config_path.parent / "buffer.db"
    config = settings_dict(broker.port, sandbox.base_url, db, routes, **sections)
    write_config(process.config_path, config)


async def published(publisher: AckedPublisher, messages: list[tuple[str, str]]) -> int:
    return await asyncio.to_thread(publisher.publish_many, messages)


async def delivered(
    publisher: AckedPublisher, sandbox: SandboxCloud, topic: str, payload: str, points: int
) -> None:
    """Publish until the cloud holds `points`: the first publish may beat the daemon's
    SUBACK (the broker drops what no one is subscribed to yet). The payload carries its own
    time, so a repeat is the same point, never a second one."""
    for _ in range(20):
        assert await published(publisher, [(topic, payload)]) == 1
        try:
            await wait_until(lambda: len(sandbox.accepted) >= points, 1.0)
        except AssertionError:
            continue
        assert len(sandbox.accepted) == points
        return
    raise AssertionError(f"{topic} never reached the cloud")


async def test_reload_swaps_routes_and_devices_on_the_same_session(
    make_gateway_process: Callable[..., GatewayProcess],
    broker: MosquittoBroker,
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
) -> None:
    process = make_gateway_process([OLD_ROUTE])
    process.start()
    await asyncio.to_thread(process.wait_for_event, "mqtt_connected")
    await delivered(publisher, sandbox, "old/temp", json.dumps({"value": 1, "ts": recent_ms()}), 1)

    rewrite(process, broker, sandbox, [NEW_ROUTE], devices={"living_room": 101})
    mark = process.event_count()
    process.send_signal(signal.SIGHUP)
    reloaded = await asyncio.to_thread(process.wait_for_event, "config_reloaded", after=mark)
    assert reloaded["subscribed"] == ["zigbee2mqtt/+"] and reloaded["unsubscribed"] == ["old/temp"]
    assert reloaded["devices"] == 1 and reloaded.get("needs_restart") is None

    payload = json.dumps({"temperature": 21.5, "linkquality": 80, "last_seen": recent_ms()})
    await delivered(publisher, sandbox, "zigbee2mqtt/living_room", payload, 2)
    assert {(p.device_id, p.datastream_id, p.value) for p in sandbox.accepted} == {
        (101, 5, 1),
        (101, 6, 21.5),
    }
    # The removed filter is gone from the session: the broker does not even send it.
    received_before = process.event_count()
    assert await published(publisher, [("old/temp", "2")]) == 1
    await asyncio.sleep(1.0)
    assert len(sandbox.accepted) == 2
    assert not [e for e in process.events()[received_before:] if e["event"] == "payload_rejected"]
    assert process.running
    # One MQTT session throughout: connected once, never disconnected.
    assert len([e for e in process.events() if e["event"] == "mqtt_connected"]) == 1
    assert await asyncio.to_thread(process.stop) == 0


async def test_invalid_file_changes_nothing(
    make_gateway_process: Callable[..., GatewayProcess],
    broker: MosquittoBroker,
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
) -> None:
    process = make_gateway_process([OLD_ROUTE])
    process.start()
    await asyncio.to_thread(process.wait_for_event, "mqtt_connected")
    text = process.config_path.read_text()
    assert '"datastream_id" = 5' in text
    process.config_path.write_text(text.replace('"datastream_id" = 5', '"datastream_idd" = 5'))
    mark = process.event_count()
    process.send_signal(signal.SIGHUP)
    refused = await asyncio.to_thread(process.wait_for_event, "reload_refused", after=mark)
    assert "datastream_idd: unknown key" in refused["reason"]
    assert "stays in force" in refused["action"]
    await delivered(publisher, sandbox, "old/temp", json.dumps({"value": 7, "ts": recent_ms()}), 1)
    assert process.running
    assert await asyncio.to_thread(process.stop) == 0


async def test_reload_retries_parked_streams_and_names_what_needs_a_restart(
    make_gateway_process: Callable[..., GatewayProcess],
    broker: MosquittoBroker,
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
) -> None:
    """A datastream the cloud does not know parks its stream (data kept); once the cloud
    knows it, a reload retries at once instead of after parked_retry_s (60 s here)."""
    route = {"topic": "t", "device_id": 101, "datastream_id": 99}
    process = make_gateway_process([route])
    process.start()
    await asyncio.to_thread(process.wait_for_event, "mqtt_connected")
    await asyncio.sleep(0.5)  # the first publish may beat the SUBACK: see delivered()
    assert await published(publisher, [("t", json.dumps({"value": 3, "ts": recent_ms()}))]) == 1
    await asyncio.to_thread(process.wait_for_event, "stream_parked")
    sandbox.add_device(101, {5: "double", 6: "double", 7: "string", 99: "double"})  # fixed
    rewrite(process, broker, sandbox, [route], mqtt={"keepalive_s": 30})
    mark = process.event_count()
    process.send_signal(signal.SIGHUP)
    reloaded = await asyncio.to_thread(process.wait_for_event, "config_reloaded", after=mark)
    assert reloaded["needs_restart"] == ["mqtt"]
    await wait_until(lambda: len(sandbox.accepted) == 1, 20, "the parked point delivered")
    assert await asyncio.to_thread(process.stop) == 0
