"""End to end, in-process: real Mosquitto → gateway → SQLite → sandbox cloud over HTTP."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from typing import Any

from gateway.config import Settings
from gateway.testing.broker import MosquittoBroker
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import (
    InProcessGateway,
    accepted_set,
    log_events,
    publish,
    ts_payload,
    wait_for_passes,
    wait_until,
)

BASE_TS = int(time.time() * 1000) - 3_600_000


def two_route_readings(count: int, offset: int = 0) -> tuple[list[tuple[str, str]], set[Any]]:
    """`count` readings alternating over the two default routes, each with its own ts."""
    messages = []
    expected = set()
    for index in range(offset, offset + count):
        ts_ms = BASE_TS + index
        if index % 2 == 0:
            value: float = round(20 + index / 1000, 3)
            messages.append(("sensors/boiler/temperature", ts_payload(value, ts_ms)))
            expected.add((101, 5, ts_ms, value))
        else:
            value = float(index)
            messages.append(("sensors/kitchen/humidity", ts_payload(value, ts_ms)))
            expected.add((102, 1, ts_ms, value))
    return messages, expected


async def test_thousand_readings_on_two_routes_arrive_exactly(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    messages, expected = two_route_readings(1000)
    async with InProcessGateway(make_settings()) as gateway:
        assert await publish(publisher, messages) == 1000
        await wait_until(lambda: len(sandbox.accepted) >= 1000, message="1000 points accepted")
        await wait_for_passes(gateway)  # anything extra (a duplicate) would go out now
        assert gateway.ingest is not None and gateway.ingest.stats.stored == 1000
    assert len(sandbox.accepted) == 1000
    assert accepted_set(sandbox) == expected
    # Every request carried one stream and used the documented endpoint successfully.
    assert all(record.status == 204 for record in sandbox.requests)


async def test_plain_number_payload_is_stamped_with_receive_time(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    # The gateway's clock stands still at `received_ms`: every reading arrives "then", and
    # the stamps must be that instant, made strictly increasing in arrival order.
    received_ms = sandbox.now_ms() - 60_000
    async with InProcessGateway(make_settings(), clock_ms=lambda: received_ms):
        await publish(
            publisher, [("sensors/boiler/temperature", f"{20 + i / 10}") for i in range(50)]
        )
        await wait_until(lambda: len(sandbox.accepted) >= 50)
    by_ts = sorted(sandbox.accepted, key=lambda point: point.ts)
    assert [point.ts for point in by_ts] == [received_ms + i for i in range(50)]
    assert [point.value for point in by_ts] == [20 + i / 10 for i in range(50)]


async def test_outage_buffers_everything_and_delivers_after_return(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    messages, expected = two_route_readings(2000)
    async with InProcessGateway(make_settings()) as gateway:
        assert gateway.store is not None
        await sandbox.set_fault("down")
        assert await publish(publisher, messages) == 2000
        await wait_until(lambda: gateway.store is not None and gateway.store.pending_points == 2000)
        flush = gateway.flush
        assert flush is not None
        failures = flush.uplink.stats.failures
        await wait_until(lambda: flush.uplink.stats.failures >= failures + 2, 20, "more attempts")
        assert sandbox.accepted == []
        await sandbox.set_fault("none")
        await wait_until(lambda: len(sandbox.accepted) >= 2000, message="backlog delivered")
        await wait_until(lambda: gateway.store is not None and gateway.store.pending_points == 0)
    assert accepted_set(sandbox) == expected
    assert len(sandbox.accepted) == 2000
    events = [event["event"] for event in log_events(log_output)]
    assert events.count("went_offline") == 1
    assert events.count("back_online") == 1
    assert events.count("backlog_drained") == 1
    back = next(event for event in log_events(log_output) if event["event"] == "back_online")
    assert back["backlog"] > 0


async def test_broker_restart_reconnects_and_loses_nothing(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    broker: MosquittoBroker,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    first, expected_first = two_route_readings(300)
    second, expected_second = two_route_readings(300, offset=300)
    async with InProcessGateway(make_settings()) as gateway:
        assert gateway.ingest is not None
        assert await publish(publisher, first) == 300
        await asyncio.to_thread(broker.restart)
        await wait_until(lambda: gateway.ingest is not None and gateway.ingest.connected.is_set())
        await asyncio.to_thread(publisher.wait_connected, 20)
        assert await publish(publisher, second) == 300
        await wait_until(lambda: len(sandbox.accepted) >= 600, message="600 points")
    assert accepted_set(sandbox) == expected_first | expected_second
    assert len(sandbox.accepted) == 600
    events = [event["event"] for event in log_events(log_output)]
    assert events.count("mqtt_disconnected") == 1
    assert events.count("mqtt_connected") == 2


async def test_retryable_cloud_errors_are_retried_until_delivered(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    messages, expected = two_route_readings(200)
    async with InProcessGateway(make_settings(cloud={"timeout_s": 0.5})) as gateway:
        assert gateway.flush is not None
        await sandbox.set_fault("error500", count=3)
        await publish(publisher, messages[:50])
        await wait_until(lambda: sandbox.fault == "none" and len(sandbox.accepted) >= 50)
        await sandbox.set_fault("rate_limit", count=1, retry_after_s=1)
        started = time.monotonic()
        await publish(publisher, messages[50:100])
        await wait_until(lambda: len(sandbox.accepted) >= 100)
        assert time.monotonic() - started >= 0.9, "Retry-After: 1 was not honoured"
        await sandbox.set_fault("reset", count=2)
        await publish(publisher, messages[100:150])
        await wait_until(lambda: len(sandbox.accepted) >= 150)
        # A timeout: the sandbox still stores the slow request, so one batch may repeat.
        await sandbox.set_fault("slow", count=1, delay_s=1.0)
        await publish(publisher, messages[150:])
        await wait_until(lambda: accepted_set(sandbox) == expected, message="all delivered")
        # At least one failure per fault; the two routes' requests go up together, and two
        # that fail together are one failure (one backoff).
        assert gateway.flush.uplink.stats.failures >= 4
    statuses = [record.status for record in sandbox.requests]
    assert statuses.count(500) == 3 and statuses.count(429) == 1
    duplicates = len(sandbox.accepted) - len(expected)
    assert 0 <= duplicates <= 50


async def test_expired_token_is_renewed_once(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    messages, expected = two_route_readings(100)
    async with InProcessGateway(make_settings()):
        await publish(publisher, messages[:50])
        await wait_until(lambda: len(sandbox.accepted) >= 50)
        assert sandbox.tokens_issued == 1
        sandbox.revoke_tokens()
        await publish(publisher, messages[50:])
        await wait_until(lambda: len(sandbox.accepted) >= 100)
    assert accepted_set(sandbox) == expected
    assert sandbox.tokens_issued == 2  # renewed once, however many requests met the 401
    # One 401 per request in flight with the revoked token: the two routes' streams are
    # uploaded at once (cloud.max_concurrent_requests), so one or two.
    assert 1 <= [r.status for r in sandbox.requests].count(401) <= 2


async def test_unknown_device_is_parked_and_others_keep_flowing(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    routes = [
        {"topic": "sensors/known", "device_id": 101, "datastream_id": 5},
        {"topic": "sensors/unknown", "device_id": 999, "datastream_id": 1},
    ]
    settings = make_settings(routes=routes, flush={"parked_retry_s": 600.0})
    # The gateway shares the sandbox's clock: "ten minutes later" is time travel.
    async with InProcessGateway(settings, clock_ms=sandbox.now_ms) as gateway:
        assert gateway.store is not None
        now = sandbox.now_ms()
        await publish(publisher, [("sensors/unknown", ts_payload(i, now + i)) for i in range(20)])
        await publish(publisher, [("sensors/known", ts_payload(i, now + i)) for i in range(30)])
        await wait_until(lambda: sandbox.accepted_count(101) == 30, message="known device")
        await wait_for_passes(gateway)  # a retry loop would hammer the cloud now
        counts = await gateway.store.counts()
        assert counts["buffered"] == 20 and counts["parked_streams"] == 1
        assert len([r for r in sandbox.requests if r.status == 404]) == 1
        parked = [e for e in log_events(log_output) if e["event"] == "stream_parked"]
        assert len(parked) == 1
        assert parked[0]["device_id"] == 999 and "not found" in parked[0]["reason"]
        # The device is created in the console: the next slow retry delivers the kept data.
        sandbox.add_device(999, {1: "double"})
        await wait_for_passes(gateway)
        assert sandbox.accepted_count(999) == 0, "parked: not retried before parked_retry_s"
        sandbox.advance_clock(600)
        await wait_until(lambda: sandbox.accepted_count(999) == 20, message="parked data sent")
        await wait_for_passes(gateway)  # the unpark follows the accepted upload
        assert (await gateway.store.counts())["parked_streams"] == 0
    assert len([r for r in sandbox.requests if r.status == 404]) == 1


async def test_bad_payloads_are_rejected_counted_and_do_not_stop_valid_ones(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    topic = "sensors/boiler/temperature"
    bad = [
        (topic, "not-a-number"),
        (topic, "{broken json"),
        (topic, "NaN"),  # ESPHome's "no reading now": skipped and counted, not an error
        (topic, '{"value": "x" , "ts": 1702656423}'),  # ts in seconds
        (topic, "9" * 20_000),  # oversized
        (topic, b"\xff\xfe\x00"),
        (topic, '{"temperature": 21}'),  # no value key
        (topic, "[1, 2, 3]"),
        (topic, "1e400"),  # infinite
        (topic, "123456789012345678901234"),  # integer out of range
        (topic, '{"value": {"nested": 1}}'),  # unsupported type
    ]
    good = [(topic, ts_payload(i, BASE_TS + i)) for i in range(40)]
    interleaved: list[tuple[str, str | bytes]] = []
    for index, message in enumerate(good):
        interleaved.append(message)
        if index < len(bad):
            interleaved.append(bad[index])
    async with InProcessGateway(make_settings()) as gateway:
        assert gateway.ingest is not None and gateway.store is not None
        assert await asyncio.to_thread(publisher.publish_many, interleaved) == len(interleaved)
        await wait_until(lambda: len(sandbox.accepted) >= 40)
        assert gateway.ingest.stats.rejected == len(bad) - 1
        assert gateway.ingest.stats.no_reading == 1
        letters = await gateway.store.dead_letters(limit=100)
    assert {(p.ts, p.value) for p in sandbox.accepted} == {(BASE_TS + i, i) for i in range(40)}
    assert len(letters) == len(bad) - 1
    assert sorted(letter.reason for letter in letters) == sorted(
        [
            "not_json",
            "not_json",
            "ts_not_ms",
            "payload_too_large",
            "not_utf8",
            "no_value_key",
            "unsupported_type",
            "value_not_finite",
            "value_out_of_range",
            "unsupported_type",
        ]
    )
    assert all(letter.topic == topic and letter.detail is not None for letter in letters)
    assert gateway.ingest.stats.rejected_by_reason["unsupported_type"] == 2
    rejected = [e for e in log_events(log_output) if e["event"] == "payload_rejected"]
    assert rejected and all(event["topic"] == topic for event in rejected)
    [too_large] = [event for event in rejected if event["reason"] == "payload_too_large"]
    assert "max_payload_bytes" in too_large["detail"]


async def test_graceful_stop_keeps_undelivered_readings_for_next_start(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    messages, expected = two_route_readings(400)
    settings = make_settings(flush={"shutdown_flush_s": 0.0})
    async with InProcessGateway(settings) as gateway:
        await sandbox.set_fault("down")
        assert await publish(publisher, messages) == 400
        await wait_until(lambda: gateway.store is not None and gateway.store.pending_points == 400)
    await sandbox.set_fault("none")
    assert sandbox.accepted == []
    async with InProcessGateway(settings):
        await wait_until(lambda: len(sandbox.accepted) >= 400, message="delivered after restart")
    assert accepted_set(sandbox) == expected


async def test_readings_published_while_gateway_is_stopped_are_queued_by_broker(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    messages, expected = two_route_readings(500)
    settings = make_settings()
    async with InProcessGateway(settings):
        await publish(publisher, messages[:100])
    # The gateway is down; the broker keeps the rest for its persistent session.
    assert await publish(publisher, messages[100:]) == 400
    async with InProcessGateway(settings):
        await wait_until(lambda: accepted_set(sandbox) == expected, message="all 500 delivered")
    assert len(sandbox.accepted) == 500


async def test_identical_plain_readings_drained_in_a_burst_stay_distinct(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    """A sensor that repeats `21.5` while the gateway is down must not collapse to one point."""
    settings = make_settings()
    async with InProcessGateway(settings):
        pass  # creates the persistent session and its subscriptions
    topic = "sensors/boiler/temperature"
    assert await publish(publisher, [(topic, "21.5")] * 500) == 500
    async with InProcessGateway(settings) as gateway:
        await wait_until(lambda: len(sandbox.accepted) >= 500, message="500 identical readings")
        await wait_for_passes(gateway)
    assert len(sandbox.accepted) == 500
    assert len({point.ts for point in sandbox.accepted}) == 500
    assert {point.value for point in sandbox.accepted} == {21.5}


async def test_a_trickle_of_readings_is_uploaded_in_few_requests(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    """linger_s gathers a trickle into one request (and one delete transaction)."""
    messages, _ = two_route_readings(20)
    boiler = [m for m in messages if m[0] == "sensors/boiler/temperature"]
    async with InProcessGateway(make_settings(flush={"linger_s": 1.5})):
        for message in boiler:
            await publish(publisher, [message])
            await asyncio.sleep(0.05)
        await wait_until(lambda: len(sandbox.accepted) == len(boiler), message="the trickle")
    assert len(sandbox.requests) <= 2


async def test_a_burst_does_not_wait_out_the_linger(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    """The linger ends once a full batch is buffered: a burst arriving over MQTT while the
    daemon runs goes out at once, however long linger_s is (it once waited it out)."""
    first_ts = int(time.time() * 1000) - 3_600_000
    burst = [("sensors/boiler/temperature", ts_payload(i, first_ts + i)) for i in range(1_500)]
    settings = make_settings(flush={"linger_s": 120.0, "interval_s": 120.0, "batch_size": 1000})
    async with InProcessGateway(settings):
        assert await publish(publisher, burst) == 1_500
        await wait_until(lambda: len(sandbox.accepted) >= 1_000, 30, "a full batch sent")


async def test_unwritable_buffer_during_an_upload_does_not_stop_the_gateway_or_resend(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    messages, expected = two_route_readings(40)
    boiler = [m for m in messages if m[0] == "sensors/boiler/temperature"]
    expected_boiler = {point for point in expected if point[0] == 101}
    async with InProcessGateway(make_settings()) as gateway:
        assert gateway.store is not None
        await sandbox.set_fault("slow", count=1, delay_s=0.5)
        await publish(publisher, boiler)
        await wait_until(lambda: sandbox.delayed_imports > 0, message="an upload in flight")
        await gateway.store.inject_fault("read-only")
        await wait_until(
            lambda: any(e["event"] == "flush_store_unavailable" for e in log_events(log_output)),
            message="the failed acknowledgement noticed",
        )
        accepted_while_failing = len(sandbox.accepted)
        await wait_for_passes(gateway, 2)  # retries of the acknowledgement, not of the upload
        assert len(sandbox.accepted) == accepted_while_failing
        await gateway.store.inject_fault("none")
        await wait_until(lambda: gateway.store is not None and gateway.store.pending_points == 0)
        # The pass that deleted the rows logs the recovery when it returns, just after.
        await wait_until(
            lambda: any(e["event"] == "flush_store_recovered" for e in log_events(log_output)),
            message="flush_store_recovered",
        )
    assert accepted_while_failing > 0
    # The accepted batch was acknowledged locally once the store recovered, not sent again.
    assert accepted_set(sandbox) == expected_boiler
    assert len(sandbox.accepted) == len(boiler)
