"""Issue 16: no message may stop the gateway. Poison payloads through a real Mosquitto.

The proof runs the daemon as a subprocess (its PID must not change): every payload the
review found (numeric names beyond 64 bits, `{"id": 10**30}`, times of 400 and 5,000
digits, SenML bt/t of NaN and 1e308, `[[<400 digits>, 1]]`), 60 KB topic levels, and a
bounded batch of random bytes and JSON generated with hypothesis; then valid readings,
which must all arrive at the sandbox cloud. Beside it, the two safety nets on their own:
a commit that meets a value SQLite cannot hold, and a message handler that raises.
The routing of each payload is tested row by row in test_input_bounds.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gateway.config import MqttSettings, Settings
from gateway.ingest import MqttConnection, RouteTable
from gateway.ingest import ingest as ingest_module
from gateway.testing.broker import MosquittoBroker
from gateway.testing.process import GatewayProcess
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import InProcessGateway, events, publish, ts_payload, wait_until

DEVICES = {101: {5: "double", 7: "double"}}
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
    {"topic": "byid/+", "device_field": "id", "fields": {"temperature": 5}},
]
# The issue's `[devices] kitchen = 101`, with numeric names as ids (the old default): the
# harshest case, since then a 30-digit name reaches the id conversion.
NAMES = {"kitchen": 101, "+": "numeric-id"}
NINES_400 = "9" * 400
Z2M_TIMES = [
    json.dumps({"temperature": 1, "last_seen": NINES_400}),
    '{"temperature":1,"last_seen":' + NINES_400 + "}",
    json.dumps({"temperature": 1, "last_seen": "9" * 5000}),
]
SENML = [
    '[{"bt":NaN,"n":"temp","v":1}]',
    '[{"bt":1e308,"n":"temp","v":1}]',
    '[{"t":1e308,"n":"temp","v":1}]',
]
# (topic, payload): every payload of the "What was found" items 1 and 2.
POISON: list[tuple[str, str]] = [
    ("plain/12345678901234567890", "21.5"),
    ("plain/123456789012345678901234567890", "21.5"),
    ("byid/sensor", json.dumps({"id": 10**30, "temperature": 1})),
    *[("z2m/kitchen", payload) for payload in Z2M_TIMES],
    *[("z2m-strict/kitchen", payload) for payload in Z2M_TIMES],
    ("z2m/kitchen", '{"temperature":1,"last_seen":' + "9" * 5000 + "}"),
    *[("senml/kitchen", payload) for payload in SENML],
    ("arr/kitchen", "[[" + NINES_400 + ",1]]"),
]
# What each must become: dead letters by code, and points stamped with the receive time
# (the z2m and SenML times were replaced: route default `bad_timestamp = "replace"`).
POISON_DEAD_LETTERS = {"id_out_of_range": 3, "bad_timestamp": 3, "value_out_of_range": 1}
LONG_NAMES = 100  # item 3: `plain/<60 KB name>`, each one unique
RSS_GROWTH_LIMIT_BYTES = 20 * 1024 * 1024
RANDOM_MESSAGES = 400


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxCloud]:
    cloud = SandboxCloud(DEVICES)
    await cloud.start()
    try:
        yield cloud
    finally:
        await cloud.stop()


# --------------------------------------------------------------------------- random input


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from([NINES_400, "1e308", "NaN", "2024-02-30T25:61:00", "ON", "nan"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["temperature", "last_seen", "value", "ts", "id", "bt", "t", "n", "v"]),
            children,
            max_size=5,
        )
    ),
    max_leaves=10,
)
_TOPICS = st.sampled_from(
    ["plain/kitchen", "z2m/kitchen", "z2m-strict/kitchen", "arr/kitchen", "senml/kitchen", "byid/x"]
) | st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="+#/"),
    min_size=1,
    max_size=12,
).map(lambda name: f"plain/n-{name}")
_PAYLOADS = st.binary(max_size=300) | _JSON.map(lambda doc: json.dumps(doc).encode())


def random_messages(count: int) -> list[tuple[str, bytes]]:
    """`count` (topic, payload) pairs drawn by hypothesis, the same ones every run."""
    drawn: list[tuple[str, bytes]] = []

    @settings(
        max_examples=count,
        database=None,
        derandomize=True,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(topic=_TOPICS, payload=_PAYLOADS)
    def draw(topic: str, payload: bytes) -> None:
        drawn.append((topic, payload))

    draw()
    return drawn


def valid_readings(start: int, count: int, base_ts: int) -> list[tuple[str, str]]:
    """Readings on plain/kitchen (device 101, datastream 7), told apart by value and ts
    (values end in .25: never the 1 that the poison's replaced-time readings carry)."""
    return [
        ("plain/kitchen", ts_payload(start + i + 0.25, base_ts + start + i)) for i in range(count)
    ]


def arrived(sandbox: SandboxCloud, start: int, count: int, base_ts: int) -> bool:
    wanted = {(101, 7, base_ts + start + i, start + i + 0.25) for i in range(count)}
    got = {(p.device_id, p.datastream_id, p.ts, p.value) for p in sandbox.accepted}
    return wanted <= got


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def status_report(config: Path) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "status",
        "--config",
        str(config),
        "--json",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    assert process.returncode == 0
    report: dict[str, Any] = json.loads(out)
    return report


# --------------------------------------------------------------------------- the daemon


async def test_poison_messages_leave_the_daemon_running_and_readings_flowing(
    make_gateway_process: Callable[..., GatewayProcess],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
) -> None:
    gateway = make_gateway_process(routes=ROUTES, devices=NAMES)
    gateway.start()
    await asyncio.to_thread(gateway.wait_for_event, "mqtt_connected")
    pid = gateway.pid
    base_ts = int(time.time() * 1000) - 3_600_000
    # Warm-up: the floor RSS is the daemon's after it has stored and uploaded readings.
    assert await publish(publisher, valid_readings(0, 50, base_ts)) == 50
    await wait_until(lambda: arrived(sandbox, 0, 50, base_ts), 30, "the warm-up readings")
    floor = rss_bytes(pid)

    long_names = [(f"plain/{'L' * 60_000}{i}", "21.5") for i in range(LONG_NAMES)]
    assert await publish(publisher, [*POISON, *long_names]) == len(POISON) + LONG_NAMES
    assert await publish(publisher, valid_readings(1000, 50, base_ts)) == 50
    await wait_until(lambda: arrived(sandbox, 1000, 50, base_ts), 30, "readings after poison")
    report = await status_report(gateway.config_path)
    assert report["daemon"]["pid"] == pid
    by_reason = report["dead_letters"]["by_reason"]
    assert by_reason == {**POISON_DEAD_LETTERS, "name_too_long": LONG_NAMES}
    # The replaced times became readings stamped on receipt: 3 z2m + 3 SenML on
    # datastream 5, the array's on 7; none carries an absurd time.
    await wait_until(
        lambda: sum(1 for p in sandbox.accepted if p.value == 1) >= 7,
        30,
        "the readings with replaced times",
    )
    ones = Counter((p.datastream_id, p.value) for p in sandbox.accepted if p.value == 1)
    assert ones == {(5, 1): 6, (7, 1): 1}
    assert all(abs(p.ts - time.time() * 1000) < 600_000 for p in sandbox.accepted if p.value == 1)

    fuzz = random_messages(RANDOM_MESSAGES)
    assert await publish(publisher, fuzz) == len(fuzz)
    assert await publish(publisher, valid_readings(2000, 50, base_ts)) == 50
    await wait_until(lambda: arrived(sandbox, 2000, 50, base_ts), 30, "readings after fuzz")

    report = await status_report(gateway.config_path)
    total = 50 + len(POISON) + LONG_NAMES + 50 + len(fuzz) + 50
    assert report["ingest"]["readings"]["received"] == total
    assert "internal_error" not in report["dead_letters"]["by_reason"]
    assert gateway.running and gateway.pid == pid and gateway.starts == 1
    growth = rss_bytes(pid) - floor
    assert growth < RSS_GROWTH_LIMIT_BYTES, f"RSS grew {growth / 2**20:.1f} MiB"
    names = [event["event"] for event in gateway.events()]
    assert names.count("mqtt_connected") == 1, "a reconnect: a message cost the connection"
    assert "mqtt_read_failed" not in names and "mqtt_message_failed" not in names
    log_text = gateway.tail(10**6)
    assert "Traceback" not in log_text
    assert not [e for e in gateway.events() if "exception" in e]
    assert max(len(line) for line in log_text.splitlines()) < 2000
    assert await asyncio.to_thread(gateway.terminate) == 0


# --------------------------------------------------------------------------- the safety nets


async def test_a_reading_sqlite_cannot_hold_is_dead_lettered_and_the_rest_committed(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    tmp_path: Path,
) -> None:
    """Routing refuses ids beyond 64 bits; this is the net beneath it. A table built
    without the config's validation maps a name to 2**64: before, the OverflowError
    escaped the commit loop and ended the daemon, on every start."""
    settings = make_settings(routes=[ROUTES[0]])
    async with InProcessGateway(settings) as gateway:
        ingest, store = gateway.ingest, gateway.store
        assert ingest is not None and store is not None
        ingest.replace_routes(RouteTable(settings.routes, devices={"big": 2**64, "kitchen": 101}))
        base_ts = int(time.time() * 1000) - 60_000
        messages = [
            ("plain/kitchen", ts_payload(1.0, base_ts)),
            ("plain/big", "21.5"),
            ("plain/kitchen", ts_payload(2.0, base_ts + 1)),
        ]
        assert await publish(publisher, messages) == 3
        await wait_until(lambda: len(sandbox.accepted) == 2, 20, "the storable readings")
        assert {(p.ts, p.value) for p in sandbox.accepted} == {(base_ts, 1.0), (base_ts + 1, 2.0)}
        assert ingest.stats.rejected_by_reason == {"unstorable": 1}
        letters = await store.dead_letters()
        assert [(d.reason, d.device_id, d.topic) for d in letters] == [
            ("unstorable", None, "plain/big")
        ]
        assert letters[0].detail is not None and "64-bit" in letters[0].detail
        more = [("plain/kitchen", ts_payload(3.0, base_ts + 2))]
        assert await publish(publisher, more) == 1
        await wait_until(lambda: len(sandbox.accepted) == 3, 20, "a reading after it")


async def test_a_handler_that_raises_costs_its_message_not_the_connection(
    broker: MosquittoBroker, publisher: AckedPublisher, log_output: io.StringIO
) -> None:
    """Before, the exception ended the read callback (`mqtt_read_failed`), the connection
    was dropped, and the broker sent the message again on the next one: forever."""
    settings = MqttSettings(host=broker.host, port=broker.port, client_id="poison-sub")
    received: list[str] = []
    connection: MqttConnection | None = None

    def on_message(message: mqtt.MQTTMessage, generation: int) -> None:
        if message.topic == "t/poison":
            raise OverflowError("a bug")
        received.append(message.payload.decode())
        assert connection is not None
        connection.acknowledge(message.mid, message.qos, generation)

    connection = MqttConnection(
        settings, ["t/#"], on_message=on_message, on_session_lost=lambda: None
    )
    task = asyncio.create_task(connection.run())
    try:
        await asyncio.wait_for(connection.connected.wait(), 10)
        await asyncio.sleep(0.2)  # the SUBACK
        publisher.publish("t/poison", "x")
        publisher.publish("t/poison", "y")
        await asyncio.sleep(0.1)
        for index in range(20):
            publisher.publish("t/ok", str(index))
        await wait_until(lambda: len(received) == 20, 10, "the messages after the poison")
        await asyncio.sleep(0.5)  # time for a reconnect, if there were one
        assert connection.generation == 1 and connection.is_up()
        assert received == [str(index) for index in range(20)]
        [line] = events(log_output, "mqtt_message_failed")
        assert line["error"] == "OverflowError: a bug" and line["topic"] == "t/poison"
        assert not events(log_output, "mqtt_read_failed")
    finally:
        await connection.close()
        await asyncio.wait_for(task, 10)


async def test_a_failure_the_checks_do_not_explain_costs_only_its_message(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last resort: when the check cannot name the culprit (simulated by blinding it),
    the group is committed in halves down to the one message, which is kept as a bare
    `internal_error` dead letter; every other reading of the group is stored."""
    monkeypatch.setattr(ingest_module, "reading_problem", lambda reading: None)
    settings = make_settings(routes=[ROUTES[0]], store={"commit_interval_ms": 2000})
    async with InProcessGateway(settings) as gateway:
        ingest, store = gateway.ingest, gateway.store
        assert ingest is not None and store is not None
        ingest.replace_routes(RouteTable(settings.routes, devices={"big": 2**64, "kitchen": 101}))
        base_ts = int(time.time() * 1000) - 60_000
        messages = [("plain/kitchen", ts_payload(float(i), base_ts + i)) for i in range(7)]
        messages.insert(4, ("plain/big", "21.5"))
        assert await publish(publisher, messages) == 8  # acknowledged: one commit group
        await wait_until(lambda: len(sandbox.accepted) == 7, 20, "the other seven readings")
        assert ingest.stats.commits == 1
        letters = await store.dead_letters()
        assert [(d.reason, d.topic) for d in letters] == [("internal_error", "plain/big")]
        assert letters[0].detail is not None and "UnstorableValue" in letters[0].detail
        assert ingest.stats.rejected_by_reason == {"internal_error": 1}
