"""`blynk-gateway routes test|suggest`, run as the operator runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.config import Settings
from gateway.ingest.routes import RouteTable
from gateway.testing.broker import MosquittoBroker
from gateway.testing.process import daemon_config, write_config
from gateway.testing.publisher import AckedPublisher

ROUTES: list[dict[str, Any]] = [
    {
        "topic": "zigbee2mqtt/{device}",
        "fields": {"temperature": 5, "humidity": 6, "battery": 7},
        "timestamp": "last_seen",
    },
    {"topic": "plain/t", "device_id": 9, "datastream_id": 1},
]


def config_file(
    tmp_path: Path, port: int = 1883, routes: list[dict[str, Any]] | None = None
) -> Path:
    config = daemon_config(
        port,
        "http://127.0.0.1:9",
        tmp_path / "buffer.db",
        routes or ROUTES,
        devices={"living_room": 101},
    )
    return write_config(tmp_path / "config.toml", config)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


def test_routes_test_json_lists_each_reading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    last_seen = int(time.time() * 1000) - 60_000
    payload = json.dumps(
        {"temperature": 22.75, "humidity": 55.43, "linkquality": 97, "last_seen": last_seen}
    )
    code, out = run_cli(
        capsys,
        "routes",
        "test",
        "--config",
        str(config_file(tmp_path)),
        "zigbee2mqtt/living_room",
        payload,
        "--json",
    )
    assert code == 0
    report = json.loads(out)
    assert report["readings"] == [
        {"device_id": 101, "datastream_id": 5, "ts": last_seen, "value": 22.75},
        {"device_id": 101, "datastream_id": 6, "ts": last_seen, "value": 55.43},
    ]
    assert report["rejected"] is None and report["route"] == "zigbee2mqtt/{device}"


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("zigbee2mqtt/kitchen", '{"temperature": 20}', "add it to [devices]"),
        ("nobody/listens", "1", "unmapped_topic"),
        ("plain/t", "warm", "not_json"),
        ("zigbee2mqtt/living_room", '{"linkquality": 3}', "no_mapped_fields"),
        ("plain/t", '{"value": 1, "ts": 1700000000000}', "expired"),
    ],
)
def test_routes_test_says_exactly_why_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], topic: str, payload: str, reason: str
) -> None:
    config = str(config_file(tmp_path))
    code, out = run_cli(capsys, "routes", "test", "--config", config, topic, payload, "--json")
    assert code == 1
    report = json.loads(out)
    assert report["readings"] == [] and reason in report["rejected"]
    code, text = run_cli(capsys, "routes", "test", "--config", config, topic, payload)
    assert code == 1 and "no reading:" in text and reason in text


def test_routes_test_text_output_from_the_installed_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "routes",
            "test",
            "--config",
            str(config_file(tmp_path)),
            "plain/t",
            "-",
        ],
        input=b"21.5",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "route: plain/t"
    assert lines[1].startswith("device=9 datastream=1 ts=") and lines[1].endswith("value=21.5")


SAMPLES = {
    "zigbee2mqtt/0x00158d0001a2b3c4": {
        "temperature": 22.75,
        "humidity": 55.43,
        "battery": 86,
        "linkquality": 97,
        "last_seen": "2026-12-01T10:00:00+01:00",
    },
    "zigbee2mqtt/bridge/state": {"state": "online"},
    "tele/tasmota_ABC123/SENSOR": {
        "Time": "2026-12-01T10:00:00",
        "AM2301": {"Temperature": 22.8, "Humidity": 48.2},
        "TempUnit": "C",
    },
    "tele/tasmota_ABC123/LWT": "Online",
    "living_room/sensor/temperature/state": "22.50",
    "living_room/sensor/humidity/state": "48",
    "shellies/shelly1-AB12CD/relay/0/power": "12.5",
    "shellyplus1pm-a8032ab12345/events/rpc": {
        "src": "shellyplus1pm-a8032ab12345",
        "method": "NotifyStatus",
        "params": {"ts": 1764579600.5, "switch:0": {"id": 0, "apower": 12.5}},
    },
    "factory/line1/pressure": "3.2",
}


def test_routes_suggest_proposes_a_config_that_routes_what_it_saw(
    tmp_path: Path,
    broker: MosquittoBroker,
    publisher: AckedPublisher,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for topic, payload in SAMPLES.items():
        text = payload if isinstance(payload, str) else json.dumps(payload)
        publisher.publish(topic, text, retain=True)  # replayed to suggest on subscribe
    deadline = time.monotonic() + 10
    while publisher.acked_count < len(SAMPLES) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert publisher.acked_count == len(SAMPLES)
    config = str(config_file(tmp_path, broker.port))
    code, out = run_cli(capsys, "routes", "suggest", "--config", config, "--seconds", "1.5")
    assert code == 0
    suggested = tomllib.loads(out)
    assert set(suggested["devices"]) == {
        "0x00158d0001a2b3c4",
        "tasmota_ABC123",
        "living_room",
        "shelly1-AB12CD",
        "shellyplus1pm-a8032ab12345",
    }
    topics = [route["topic"] for route in suggested["routes"]]
    assert topics == [
        "zigbee2mqtt/{device}",
        "tele/{device}/SENSOR",
        "{device}/sensor/{stream}/state",
        "shellies/{device}/relay/0/power",
        "+/events/rpc",
        "factory/line1/pressure",
    ]
    # With real ids filled in, the suggestion is a valid config that routes every sample.
    devices = {name: 100 + index for index, name in enumerate(suggested["devices"])}
    settings = Settings(
        cloud={"client_id": "c", "client_secret": "s"},
        devices=devices,
        routes=suggested["routes"],
    )
    table = RouteTable(settings.routes, devices=settings.devices)
    for topic, payload in SAMPLES.items():
        if topic.endswith(("/bridge/state", "/LWT")):
            continue
        text = payload if isinstance(payload, str) else json.dumps(payload)
        outcome = table.route(topic, text.encode(), int(time.time() * 1000))
        assert outcome.readings and not outcome.refusals, (topic, outcome)
    z2m = suggested["routes"][0]
    assert set(z2m["fields"]) == {"temperature", "humidity", "battery", "linkquality"}
    assert z2m["timestamp"] == "last_seen"
