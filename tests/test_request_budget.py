"""Issue 18 items 2 and 3: uploads several at once, and a request budget never exceeded.

The budget's arithmetic is tested alone with a shrunk "minute"; the promises through the
path the data takes: a real Mosquitto, the running gateway, the sandbox cloud answering
100 ms late, its request log timestamped as the cloud handled each request.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config import Settings
from gateway.models import Batch, Point, StreamKey
from gateway.testing.broker import MosquittoBroker
from gateway.testing.process import daemon_config
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from gateway.uplink.budget import RequestBudget
from gateway.uplink.cloud import BlynkCloud
from harness import InProcessGateway, publish, ts_payload, wait_until

DEVICES = 20
FIRST_DEVICE = 300


def topic(index: int) -> str:
    return f"site/sensor{index}/temperature"


ROUTES = [
    {"topic": topic(i), "device_id": FIRST_DEVICE + i, "datastream_id": 1} for i in range(DEVICES)
]


def most_in_any_window(times: list[float], window_s: float) -> int:
    """The largest number of `times` that fall in one window of `window_s`."""
    times = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


# --------------------------------------------------------------------------- the budget


def test_a_slot_is_busy_from_the_start_until_a_window_after_the_answer() -> None:
    clock = [100.0]
    budget = RequestBudget(2, clock=lambda: clock[0])
    assert budget.free() == 2
    asyncio.run(budget.acquire())
    asyncio.run(budget.acquire())
    assert budget.free() == 0 and budget.next_free_in_s() == 60.0  # both still in flight
    clock[0] = 101.0
    budget.release()  # answered at 101: busy until 161
    clock[0] = 160.9
    assert budget.free() == 0 and budget.next_free_in_s() == pytest.approx(0.1)
    clock[0] = 161.0
    assert budget.free() == 1
    assert budget.requests_last_minute() == 0  # both started at 100, a minute ago


def test_batching_plans_for_half_the_budget() -> None:
    budget = RequestBudget(1000)
    assert budget.stream_interval_s(20) == pytest.approx(2.4)  # 20 streams x 60 s / 500
    assert budget.requests_per_s() == pytest.approx(500 / 60)
    budget.reconfigure(60)
    assert budget.stream_interval_s(20) == pytest.approx(40.0)


async def test_never_more_than_the_budget_in_any_window_even_with_requests_waiting() -> None:
    """12 requests of 50 ms, all wanting to go at once, 3 per (shrunk) 0.4 s window: the
    starts never crowd a window, and neither would the cloud's view of them, because a
    slot frees a whole window after its answer."""
    budget = RequestBudget(3, window_s=0.4)
    starts: list[float] = []
    answers: list[float] = []

    async def request() -> None:
        async with budget.slot():
            starts.append(time.monotonic())
            await asyncio.sleep(0.05)
            answers.append(time.monotonic())

    async with asyncio.TaskGroup() as tasks:
        for _ in range(12):
            tasks.create_task(request())
    assert len(starts) == 12
    assert most_in_any_window(starts, 0.4) <= 3
    assert most_in_any_window(answers, 0.4) <= 3
    assert budget.waits >= 9  # the budget, not luck, spaced them


async def test_every_request_of_the_cloud_client_takes_a_slot_tokens_included(
    sandbox: SandboxCloud,
) -> None:
    budget = RequestBudget(1000)
    client = BlynkCloud(sandbox.base_url, "sandbox-client", "sandbox-secret", budget=budget)
    try:
        now = int(time.time() * 1000)
        await client.upload(Batch(StreamKey(101, 5), (Point(now, "1.5"),)))
        sandbox.revoke_tokens()
        await client.upload(Batch(StreamKey(101, 5), (Point(now + 1, "1.5"),)))
    finally:
        await client.aclose()
    # token, upload; then a refused upload, a new token, the upload again
    assert budget.requests == 5 == sandbox.token_requests + len(sandbox.requests)


async def test_concurrent_uploads_share_one_token_request(sandbox: SandboxCloud) -> None:
    client = BlynkCloud(sandbox.base_url, "sandbox-client", "sandbox-secret")
    now = int(time.time() * 1000)
    try:
        async with asyncio.TaskGroup() as tasks:
            for i in range(4):
                batch = Batch(StreamKey(101, 5), (Point(now + i, "1.5"),))
                tasks.create_task(client.upload(batch))
    finally:
        await client.aclose()
    assert sandbox.token_requests == 1 and len(sandbox.accepted) == 4


# --------------------------------------------------------------------------- the daemon


@pytest.fixture
async def far_cloud() -> AsyncIterator[SandboxCloud]:
    """20 devices with one datastream each, answering 100 ms late."""
    cloud = SandboxCloud(
        {FIRST_DEVICE + i: {1: "double"} for i in range(DEVICES)}, daily_points_limit=100_000
    )
    cloud.set_latency(100.0)
    await cloud.start()
    yield cloud
    await cloud.stop()


def settings_for(
    broker: MosquittoBroker, cloud: SandboxCloud, tmp_path: Path, **cloud_section: int
) -> Settings:
    config = daemon_config(
        broker.port,
        cloud.base_url,
        tmp_path / "buffer.db",
        ROUTES,
        cloud={"daily_points_limit": 100_000, **cloud_section},
        log={"level": "warning"},
    )
    return Settings(**config)


async def test_uploads_of_different_streams_overlap_and_each_stream_keeps_its_order(
    broker: MosquittoBroker,
    far_cloud: SandboxCloud,
    publisher: AckedPublisher,
    tmp_path: Path,
) -> None:
    """A backlog of 20 streams with the cloud 100 ms away: up to 4 requests in flight at
    once (the default), never two for one stream, each stream's points in order."""
    settings = settings_for(broker, far_cloud, tmp_path)
    first_ts = int(time.time() * 1000) - 600_000
    messages = [
        (topic(i % DEVICES), ts_payload(float(i), first_ts + i)) for i in range(DEVICES * 150)
    ]
    async with InProcessGateway(settings) as gateway:
        assert gateway.flush is not None
        assert await publish(publisher, messages) == len(messages)
        await wait_until(lambda: far_cloud.accepted_count() == len(messages), 30, "all delivered")
        most = gateway.flush.inflight.most
    assert 2 <= most <= settings.cloud.max_concurrent_requests
    per_stream: dict[int, list[int]] = defaultdict(list)
    for point in far_cloud.accepted:
        per_stream[point.device_id].append(point.ts)
    assert all(ts == sorted(ts) for ts in per_stream.values())


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_sixty_requests_a_minute_under_500_readings_a_second_nothing_lost(
    broker: MosquittoBroker,
    far_cloud: SandboxCloud,
    publisher: AckedPublisher,
    tmp_path: Path,
) -> None:
    """Done-when of issue 18: `cloud.max_requests_per_minute = 60` and 500 readings/s over
    20 datastreams for 75 s: the cloud's request log (timestamped as it handled each) never
    holds more than 60 in any 60 s, and every reading arrives."""
    settings = settings_for(broker, far_cloud, tmp_path, max_requests_per_minute=60)
    first_ts = int(time.time() * 1000) - 600_000
    per_second, seconds = 500, 75
    sent = 0
    async with InProcessGateway(settings):
        started = time.monotonic()
        for second in range(seconds):
            batch = [
                (topic(i % DEVICES), ts_payload(float(i % 100), first_ts + i))
                for i in range(sent, sent + per_second)
            ]
            sent += await publish(publisher, batch)
            await asyncio.sleep(max(0.0, started + second + 1 - time.monotonic()))
        await wait_until(lambda: far_cloud.accepted_count() == sent, 120, f"all {sent} delivered")
    times = [record.at_s for record in far_cloud.requests]
    print(f"\n{len(times)} requests, at most {most_in_any_window(times, 60.0)} in 60 s")
    assert most_in_any_window(times, 60.0) <= 60
    assert sent == per_second * seconds
    assert len({(p.device_id, p.ts) for p in far_cloud.accepted}) == sent
