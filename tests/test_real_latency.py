"""A real cloud is 100 ms away (issue 18): the daemon's defaults, a real Mosquitto, and the
sandbox answering every token and import request 100 ms late.

Both tests failed on the code that issue 18 was filed against (they were marked
``xfail(strict=True)`` until the fixes landed): pass-through now steps aside while the
broker's window is the limit (gateway/ingest/pass_gate.py), uploads run several at once
(gateway/uplink/inflight.py) and batch by time, sized from the request budget
(gateway/uplink/pacing.py).

* A broker backlog must not drain at ~20 messages per round trip. Pass-through uploads each
  commit group before its PUBACK, one request per stream, one request at a time, while the
  broker lets only `inflight_window` (20) messages be unacknowledged.
* A steady 100 readings/s over 20 datastreams must cost at most 0.1 requests per reading
  (Blynk's request budget is per organization, shared by a fleet).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.config import Settings
from gateway.testing.broker import MosquittoBroker
from gateway.testing.process import daemon_config
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import InProcessGateway, publish, ts_payload, wait_until

LATENCY_MS = 100.0
DEVICES = 20
FIRST_DEVICE = 300
BROKER_WINDOW = 20  # Mosquitto's default max_inflight_messages, the daemon's inflight_window


def topic(index: int) -> str:
    return f"site/sensor{index}/temperature"


ROUTES = [
    {"topic": topic(i), "device_id": FIRST_DEVICE + i, "datastream_id": 1} for i in range(DEVICES)
]


@pytest.fixture
async def far_cloud() -> AsyncIterator[SandboxCloud]:
    """20 devices with one datastream each, answering 100 ms late."""
    cloud = SandboxCloud({FIRST_DEVICE + i: {1: "double"} for i in range(DEVICES)})
    cloud.set_latency(LATENCY_MS)
    await cloud.start()
    yield cloud
    await cloud.stop()


@pytest.fixture
def settings(broker: MosquittoBroker, far_cloud: SandboxCloud, tmp_path: Path) -> Settings:
    """The daemon's own defaults (pass-through on, linger, commit interval), this rig."""
    assert broker.max_inflight_messages == BROKER_WINDOW
    config = daemon_config(
        broker.port,
        far_cloud.base_url,
        tmp_path / "buffer.db",
        ROUTES,
        log={"level": "warning"},
    )
    return Settings(**config)


def readings(count: int, first_ts: int) -> list[tuple[str, str]]:
    """`count` messages round-robin over the 20 sensors, each with its own timestamp."""
    return [(topic(i % DEVICES), ts_payload(20 + i % 50 / 10, first_ts + i)) for i in range(count)]


async def test_a_broker_backlog_drains_in_a_few_round_trips_not_one_per_window(
    settings: Settings, far_cloud: SandboxCloud, publisher: AckedPublisher
) -> None:
    """2,000 QoS 1 messages for 20 devices queue at the broker while the gateway is
    stopped; it starts and must have them all in the cloud within a quarter of what ~20
    messages per round trip costs (2,000 / 20 x 100 ms / 4 = 2.5 s).

    Not the issue's ratio against a bare paho client: that client drains 2,000 messages in
    ~0.1 s, less than the two round trips (token, upload) any gateway needs, so a ratio at
    this size measures the latency, not the gateway. The benchmark measures the ratio on
    20,000 (`benchmarks/run.py --only latency`).

    Measured on the code issue 18 was filed against: ~170 of 2,000 in the cloud after 5 s
    (~45 requests, one at a time). Pass-through off (write first, upload from the buffer,
    one request at a time) took 2.5 s: the bound leaves room for requests in parallel, not
    for one round trip per stream.
    """
    backlog = 2_000
    bound_s = backlog / BROKER_WINDOW * LATENCY_MS / 1000 / 4
    async with InProcessGateway(settings):
        pass  # the persistent session and its subscriptions
    first_ts = int(time.time() * 1000) - 3_600_000
    assert await publish(publisher, readings(backlog, first_ts)) == backlog
    started = time.perf_counter()
    async with InProcessGateway(settings):
        # Wait past the bound, so a failure says how far from it the drain was.
        deadline = time.monotonic() + 2 * bound_s
        while far_cloud.accepted_count() < backlog and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        in_cloud = far_cloud.accepted_count()
        requests = len(far_cloud.requests)
    print(
        f"\nbacklog {backlog}: {in_cloud} in the cloud after {elapsed:.2f} s, {requests} requests"
    )
    assert in_cloud == backlog and elapsed <= bound_s, (
        f"{in_cloud} of {backlog} in the cloud after {elapsed:.1f} s "
        f"(bound {bound_s:.1f} s; {requests} requests)"
    )


class SteadyPublisher:
    """`per_second` readings, round-robin over the sensors, in a thread until stopped."""

    def __init__(self, publisher: AckedPublisher, per_second: float, first_ts: int) -> None:
        self.publisher = publisher
        self.period_s = 1.0 / per_second
        self.first_ts = first_ts
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-publisher", daemon=True)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            index = self.sent
            self.publisher.publish(
                topic(index % DEVICES), ts_payload(20 + index % 50 / 10, self.first_ts + index)
            )
            self.sent += 1
            next_at += self.period_s
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> SteadyPublisher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def steady(publisher: AckedPublisher) -> Callable[[float], SteadyPublisher]:
    def make(per_second: float) -> SteadyPublisher:
        return SteadyPublisher(publisher, per_second, int(time.time() * 1000) - 60_000)

    return make


@pytest.mark.parametrize(
    ("latency_ms", "mqtt5_window"),
    [(LATENCY_MS, None), (30.0, None), (LATENCY_MS, 1000)],
    ids=["100ms", "30ms", "100ms-mqtt5-window-1000"],
)
async def test_a_steady_100_readings_per_second_cost_at_most_a_tenth_of_a_request_each(
    settings: Settings,
    far_cloud: SandboxCloud,
    publisher: AckedPublisher,
    steady: Callable[[float], SteadyPublisher],
    latency_ms: float,
    mqtt5_window: int | None,
) -> None:
    """100 readings/s over 20 datastreams for 10 s: over the last 8 s (the first 2 are
    start-up), at most 0.1 import requests per reading delivered, the window's readings
    delivered (give or take one batching delay), and every reading in the cloud within a few
    seconds of the last one published.

    At 100 ms today's code sits near 0.1 once settled only because its requests go one at
    a time: 20 streams x 100 ms is a 2 s cycle, 200 readings a cycle. From a start it
    needs ~5 s to settle (77 requests for ~590 readings in the window, every run here),
    and 30 ms, the near end of a real cloud's 30-300 ms, makes its cycle 0.6 s: ~0.3
    requests per reading. The promise (README, issue 18) holds at any latency.

    With MQTT 5 and a 1,000-message window (the README's advice for a far cloud and an SD
    card) pass-through can hold a paced group. Once one group had been written, the buffer
    never emptied again: each commit added rows faster than the drain's round trips took
    them away, and the drain went on in tiny batches, 0.64 requests per reading. Ingest
    now gathers while the buffer drains, and the drain keeps within the budget's share.
    """
    far_cloud.set_latency(latency_ms)
    if mqtt5_window is not None:
        mqtt = settings.mqtt.model_copy(update={"protocol": "5", "inflight_window": mqtt5_window})
        settings = settings.model_copy(update={"mqtt": mqtt})
    warmup_s, window_s = 2.0, 8.0
    async with InProcessGateway(settings):
        with steady(100.0) as source:
            await asyncio.sleep(warmup_s)
            requests_0, accepted_0 = len(far_cloud.requests), far_cloud.accepted_count()
            await asyncio.sleep(window_s)
            requests_1, accepted_1 = len(far_cloud.requests), far_cloud.accepted_count()
        await asyncio.to_thread(publisher.wait_all_acked, 10)
        sent = source.sent
        requests = requests_1 - requests_0
        delivered = accepted_1 - accepted_0
        per_reading = requests / max(1, delivered)
        print(f"\n{latency_ms:g} ms: {requests} requests, {delivered} delivered: {per_reading:.3f}")
        assert per_reading <= 0.1, (
            f"{requests} requests for {delivered} readings delivered in {window_s:g} s "
            f"({per_reading:.2f} per reading; {sent} published in all)"
        )
        # Batching must not mean falling behind.
        assert delivered >= 0.75 * 100 * window_s, f"only {delivered} delivered in the window"
        await wait_until(lambda: far_cloud.accepted_count() == sent, 10, f"all {sent} delivered")
