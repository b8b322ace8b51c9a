"""Ingest against a real Mosquitto: refusals by reason code, readings too old on arrival,
MQTT 5, retained messages, and the resync that fetches deferred messages again."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections import Counter
from collections.abc import Callable

import pytest

from gateway.config import Settings
from gateway.ingest import ingest as ingest_module
from gateway.ingest.admission import RefusalLog
from gateway.testing.broker import MosquittoBroker
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import InProcessGateway, events, publish, ts_payload, wait_until

TOPIC = "sensors/boiler/temperature"
HUMIDITY = "sensors/kitchen/humidity"
DAY_MS = 86_400_000


def recent_ms() -> int:
    return int(time.time() * 1000) - 3_600_000


# --------------------------------------------------------------------------- refusals


def test_refusal_log_keys_on_the_code_and_sums_up_the_rest(log_output: io.StringIO) -> None:
    now = [0.0]
    refusals = RefusalLog(60.0, clock=lambda: now[0])
    for index in range(1000):
        refusals.refused("payload_rejected", "ts_not_ms", detail=f"ts {index}")
        refusals.refused("payload_rejected", "empty", detail="")
    now[0] = 59.9
    refusals.refused("payload_rejected", "empty", detail="")
    refusals.summarise()
    now[0] = 60.0
    refusals.refused("payload_rejected", "empty", detail="")
    refusals.summarise()  # nothing held back since the last summary: no line
    lines = events(log_output, "payload_rejected")
    assert [(line["reason"], line["detail"]) for line in lines] == [
        ("ts_not_ms", "ts 0"),
        ("empty", ""),
        ("empty", ""),
    ]
    [summary] = events(log_output, "payload_rejected_summary")
    assert summary["by_reason"] == {"ts_not_ms": 999, "empty": 1000}
    assert summary["held_back"] == 1999


BAD_PAYLOADS: dict[str, Callable[[int], str]] = {
    "ts_not_ms": lambda i: json.dumps({"value": 1, "ts": 1_700_000_000 + i}),  # seconds
    "not_a_number": lambda i: f"{i}.5 C",
    "no_value_key": lambda i: json.dumps({f"temp{i}": 21.5}),
    "value_out_of_range": lambda i: str(2**53 + 1 + i),
}


async def test_ten_thousand_bad_payloads_make_a_bounded_log_and_dead_letters_by_code(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    """Bug: the throttle key was the reason text up to its first colon, which held the bad
    value, so every distinct value got its own WARNING line, throttle key and counter."""
    codes = list(BAD_PAYLOADS)
    messages = [(TOPIC, BAD_PAYLOADS[codes[i % len(codes)]](i)) for i in range(10_000)]
    assert len({payload for _, payload in messages}) == 10_000
    async with InProcessGateway(make_settings()) as gateway:
        store, ingest = gateway.store, gateway.ingest
        assert store is not None and ingest is not None
        assert await publish(publisher, messages) == 10_000
        await wait_until(lambda: ingest.stats.rejected == 10_000, 60, "10,000 rejected")
        await wait_until(lambda: ingest.held_messages == 0, 30, "the last group committed")
        letters = await store.dead_letters(limit=20_000)
        assert ingest.stats.rejected_by_reason == Counter(dict.fromkeys(codes, 2500))
        assert store.pending_points == 0
    assert Counter(letter.reason for letter in letters) == Counter(dict.fromkeys(codes, 2500))
    assert len({letter.detail for letter in letters}) == 10_000  # each keeps its value
    assert all(letter.topic == TOPIC and letter.device_id == 101 for letter in letters)
    lines = events(log_output, "payload_rejected")
    # At most one line per code per 60 s interval (the test is far shorter than 120 s).
    assert Counter(line["reason"] for line in lines).keys() == set(codes)
    assert all(count <= 2 for count in Counter(line["reason"] for line in lines).values())
    assert all(line["detail"] for line in lines)
    summaries = events(log_output, "payload_rejected_summary")
    assert 1 <= len(summaries) <= 3
    assert len(lines) + sum(summary["held_back"] for summary in summaries) == 10_000


# --------------------------------------------------------------------------- too old on arrival


async def test_readings_too_old_on_arrival_are_dead_lettered_without_a_buffer_row(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    now = int(time.time() * 1000)
    old_base, fresh_base = now - 31 * DAY_MS, now - 3_600_000
    messages: list[tuple[str, str]] = []
    for index in range(100):
        messages.append((TOPIC, ts_payload(float(index), old_base + index)))
        messages.append((HUMIDITY, ts_payload(float(index), fresh_base + index)))
    await sandbox.set_fault("down")  # what is stored stays in the buffer, for inspection
    async with InProcessGateway(make_settings()) as gateway:
        store, ingest = gateway.store, gateway.ingest
        assert store is not None and ingest is not None
        assert await publish(publisher, messages) == 200
        await wait_until(lambda: ingest.stats.received == 200 and ingest.held_messages == 0)
        assert ingest.stats.stored == 100  # the old ones never cost a row
        assert ingest.stats.expired == 100
        buffered = await store.buffered_points()
        letters = await store.dead_letters(limit=1000, reason="expired")
    assert sorted(buffered) == [(102, 1, fresh_base + i, f"{float(i)}") for i in range(100)]
    assert all(
        (letter.device_id, letter.datastream_id, letter.topic) == (101, 5, TOPIC)
        for letter in letters
    )
    # The dead letter reads like one the flush loop expired: the point, and why.
    assert sorted((letter.ts_ms, letter.value_json) for letter in letters) == [
        (old_base + i, f"{float(i)}") for i in range(100)
    ]
    assert all(
        str(letter.detail).startswith(f"ts={letter.ts_ms} older than cutoff ") for letter in letters
    )
    lines = events(log_output, "reading_expired")
    assert 1 <= len(lines) <= 2 and lines[0]["reason"] == "expired"


# --------------------------------------------------------------------------- MQTT 5


async def test_mqtt5_stores_readings_and_acknowledges_only_what_is_committed(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    base = recent_ms()
    messages = [(TOPIC, ts_payload(float(i), base + i)) for i in range(301)]
    settings = make_settings(mqtt={"protocol": "5"})
    await sandbox.set_fault("down")  # what is stored stays in the buffer, for inspection
    async with InProcessGateway(settings) as gateway:
        store, ingest = gateway.store, gateway.ingest
        assert store is not None and ingest is not None
        assert await publish(publisher, messages[:200]) == 200
        await wait_until(lambda: store.pending_points == 200, message="200 committed")
        # The store refuses writes: these arrive, but cannot be committed nor acknowledged.
        await store.inject_fault("read-only")
        assert await publish(publisher, messages[200:300]) == 100
        await wait_until(lambda: ingest.holding and ingest.held_messages > 0, message="held")
        assert store.pending_points == 200
    # The next start resumes the MQTT 5 session: the broker sends what was not acknowledged,
    # and nothing that was (a redelivered copy would be counted as received).
    async with InProcessGateway(settings) as gateway:
        store, ingest = gateway.store, gateway.ingest
        assert store is not None and ingest is not None
        await wait_until(lambda: store.pending_points == 300, message="the held 100 resent")
        assert await publish(publisher, messages[300:]) == 1  # queued behind any resend
        await wait_until(lambda: ingest.stats.stored == 101, message="the marker stored")
        assert ingest.stats.received == 101 and ingest.stats.duplicates == 0
        assert sorted(ts for _, _, ts, _ in await store.buffered_points()) == [
            base + i for i in range(301)
        ]
    connected = events(log_output, "mqtt_connected")
    assert [event["session_present"] for event in connected] == [False, True]


# --------------------------------------------------------------------------- retained


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_retained_values_without_their_own_ts_are_skipped(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    broker: MosquittoBroker,
    protocol: str,
) -> None:
    """A retained `21.5` was published at an unknown time: stamping it "now" would lie.
    A retained payload with its own ts names its time, so it is kept."""
    base = recent_ms()

    def publish_retained() -> None:
        retainer = AckedPublisher(broker.host, broker.port, client_id="retained-publisher")
        retainer.connect()
        try:
            for topic, payload in [(TOPIC, "21.5"), (HUMIDITY, ts_payload(40.0, base))]:
                retainer.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
        finally:
            retainer.close()

    await asyncio.to_thread(publish_retained)
    await sandbox.set_fault("down")
    async with InProcessGateway(make_settings(mqtt={"protocol": protocol})) as gateway:
        store, ingest = gateway.store, gateway.ingest
        assert store is not None and ingest is not None
        await wait_until(lambda: ingest.stats.received == 2 and ingest.held_messages == 0)
        assert ingest.stats.retained_skipped == 1
        assert await publish(publisher, [(TOPIC, "22.5")]) == 1  # live: not retained
        await wait_until(lambda: ingest.stats.stored == 2)
        points = await store.buffered_points()
    assert sorted((device, stream, value) for device, stream, _, value in points) == [
        (101, 5, "22.5"),
        (102, 1, "40.0"),
    ]
    assert (102, 1, base, "40.0") in points


# --------------------------------------------------------------------------- resync


async def test_messages_deferred_while_the_store_is_unavailable_come_back_once(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While commits are held, messages beyond the memory cap are neither kept nor
    acknowledged; after the next successful commit one reconnect (`_resync`) makes the
    broker send them again, and each is stored exactly once."""
    monkeypatch.setattr(ingest_module, "PENDING_MAX_MESSAGES", 5)  # below the window of 20
    base = recent_ms()
    messages = [(TOPIC, ts_payload(float(i), base + i)) for i in range(201)]
    await sandbox.set_fault("down")
    async with InProcessGateway(make_settings()) as gateway:
        store, ingest = gateway.store, gateway.ingest
        assert store is not None and ingest is not None
        await store.inject_fault("read-only")
        assert await publish(publisher, messages[:1]) == 1
        await wait_until(lambda: ingest.holding, message="commits held")
        assert await publish(publisher, messages[1:200]) == 199
        await wait_until(lambda: ingest.stats.deferred > 0, message="messages deferred")
        await store.inject_fault("none")
        await wait_until(lambda: store.pending_points == 200, 30, "all 200 stored")
        assert await publish(publisher, messages[200:]) == 1  # queued behind any resend
        await wait_until(lambda: ingest.stats.stored == 201, message="the marker stored")
        assert ingest.stats.duplicates == 0
        assert sorted(ts for _, _, ts, _ in await store.buffered_points()) == [
            base + i for i in range(201)
        ]
    [resync] = events(log_output, "mqtt_resync")
    assert resync["deferred"] > 0
