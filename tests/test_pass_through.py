"""Pass-through (the daemon's default): upload before write while the cloud is reachable.

Each promise on the path readings really take, published over a real Mosquitto while the
gateway runs: online readings reach the cloud without a row written; what the cloud does
not take in time is buffered and delivered later; a SIGKILL in the middle loses nothing the
broker accepted; the quota is never exceeded and the ledger counts exactly what the cloud
took; a reading never overtakes an older one of its stream that waits in the buffer.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from gateway.config import Settings
from gateway.ingest.pass_gate import RESUME_AFTER_S
from gateway.testing.process import GatewayProcess
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from gateway.uplink.quota import DailyQuota
from harness import InProcessGateway, publish, trickle, ts_payload, wait_until

TOPIC = "sensors/boiler/temperature"  # device 101 / datastream 5
ON: dict[str, Any] = {"pass_through": True}


def base_ts() -> int:
    return int(time.time() * 1000) - 3_600_000


def messages(first_ts: int, count: int, offset: int = 0) -> list[tuple[str, str]]:
    return [(TOPIC, ts_payload(float(offset + i), first_ts + offset + i)) for i in range(count)]


def delivered(sandbox: SandboxCloud) -> Counter[tuple[int, float]]:
    return Counter((p.ts, p.value) for p in sandbox.accepted)  # type: ignore[misc]


async def test_online_readings_reach_the_cloud_without_a_row_written(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    first = base_ts()
    settings = make_settings(flush=ON)
    async with InProcessGateway(settings) as gateway:
        ingest, store = gateway.ingest, gateway.store
        assert ingest is not None and store is not None
        assert await trickle(publisher, messages(first, 300)) == 300
        await wait_until(lambda: len(sandbox.accepted) == 300, 30, "300 points in the cloud")
        # Ingest counts them when it wakes from the upload's answer, just after the cloud.
        await wait_until(lambda: ingest.stats.passed_through == 300, 10, "counted as passed")
        assert ingest.stats.stored == 0
        assert store.pending_points == 0
        day = DailyQuota(10_000).day_of(int(time.time() * 1000))
        # The ledger counts what the cloud took (reserved-ahead points are not "used").
        assert await store.points_sent(101, day) == (300, False)
        # On disk the ledger is ahead by the unused reservation (a crash keeps it counted).
        assert store.reserved_quota(101, day) > 0
    assert delivered(sandbox) == Counter({(first + i, float(i)): 1 for i in range(300)})
    # A clean stop gave the unused reservation back: the file says exactly 300.
    with sqlite3.connect(settings.store.path) as db:
        assert db.execute("SELECT points FROM quota_days").fetchall() == [(300,)]


async def test_what_the_cloud_does_not_take_is_buffered_and_delivered_later(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    first = base_ts()
    async with InProcessGateway(make_settings(flush=ON)) as gateway:
        ingest, store = gateway.ingest, gateway.store
        assert ingest is not None and store is not None
        assert await trickle(publisher, messages(first, 50)) == 50
        await wait_until(lambda: len(sandbox.accepted) == 50, 30, "the first 50 online")
        await sandbox.set_fault("error500")
        assert await publish(publisher, messages(first, 100, offset=50)) == 100
        await wait_until(lambda: ingest.stats.stored == 100, 30, "the rest buffered")
        await sandbox.set_fault("none")
        await wait_until(lambda: len(sandbox.accepted) == 150, 30, "the buffer drained")
        await wait_until(lambda: store.pending_points == 0, 10, "the delivered rows deleted")
        # The 100 came as a burst, which pauses pass-through (it would hold the broker's
        # in-flight window); online again, with an empty buffer and a trickle, it resumes.
        await asyncio.sleep(RESUME_AFTER_S)
        assert await trickle(publisher, messages(first, 20, offset=150)) == 20
        await wait_until(lambda: len(sandbox.accepted) == 170, 30, "the last 20 online")
        # Ingest counts them when it wakes from the upload's answer, just after the cloud.
        await wait_until(lambda: ingest.stats.passed_through == 70, 10, "counted as passed")
        assert ingest.stats.stored == 100
    assert delivered(sandbox) == Counter({(first + i, float(i)): 1 for i in range(170)})


async def test_the_quota_is_never_exceeded_and_the_rest_waits(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    sandbox.daily_points_limit = 40
    settings = make_settings(flush=ON, cloud={"daily_points_limit": 40})
    first = base_ts()
    async with InProcessGateway(settings) as gateway:
        store = gateway.store
        assert store is not None
        assert await publish(publisher, messages(first, 25)) == 25
        await wait_until(lambda: len(sandbox.accepted) == 25, 30, "25 online")
        assert await publish(publisher, messages(first, 35, offset=25)) == 35
        await wait_until(lambda: store.pending_points == 20, 30, "20 over the quota buffered")
        await asyncio.sleep(1.0)
        assert len(sandbox.accepted) == 40
        day = DailyQuota(40).day_of(int(time.time() * 1000))
        assert await store.points_sent(101, day) == (40, False)
    # The cloud never had to refuse a request for the quota.
    assert all(r.status == 204 for r in sandbox.requests)


async def test_a_reading_never_overtakes_an_older_one_waiting_in_the_buffer(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    first = base_ts()
    settings = make_settings(flush={**ON, "batch_size": 10, "interval_s": 0.5})
    async with InProcessGateway(settings) as gateway:
        store = gateway.store
        assert store is not None
        await sandbox.set_fault("down")
        assert await publish(publisher, messages(first, 200)) == 200
        await wait_until(lambda: store.pending_points == 200, 30, "a backlog")
        await sandbox.set_fault("none")
        assert await publish(publisher, messages(first, 50, offset=200)) == 50
        await wait_until(lambda: len(sandbox.accepted) == 250, 60, "everything")
    order = [p.ts for p in sandbox.accepted]
    assert order == sorted(order)  # one stream: oldest first, new ones after the backlog


async def test_sigkill_during_pass_through_loses_nothing_the_broker_accepted(
    make_gateway_process: Callable[..., GatewayProcess],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
) -> None:
    """Readings in flight (offered, uploading, accepted but not yet PUBACKed) when the
    daemon dies are the broker's: it sends them again, and they arrive at least once."""
    first = base_ts()
    count = 600
    process = make_gateway_process(flush={**ON, "pass_through_wait_s": 5.0})
    process.start()
    await asyncio.to_thread(process.wait_for_event, "mqtt_connected")
    await sandbox.set_fault("slow", delay_s=0.3)  # keep uploads in flight
    batch = messages(first, count)
    for index in range(0, count, 100):
        assert await asyncio.to_thread(publisher.publish_many, batch[index : index + 100]) == 100
        if index == 300:
            await asyncio.to_thread(process.kill)
            await sandbox.set_fault("none")
            process.start()
    await wait_until(
        lambda: {p.ts for p in sandbox.accepted} >= {first + i for i in range(count)},
        60,
        f"all {count} readings delivered after the kill",
    )
    assert await asyncio.to_thread(process.terminate) == 0
    assert set(delivered(sandbox)) == {(first + i, float(i)) for i in range(count)}


async def test_off_writes_every_reading_first(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    async with InProcessGateway(make_settings(flush={"pass_through": False})) as gateway:
        ingest = gateway.ingest
        assert ingest is not None
        assert await publish(publisher, messages(base_ts(), 30)) == 30
        await wait_until(lambda: len(sandbox.accepted) == 30, 30, "30 delivered")
        assert ingest.stats.stored == 30 and ingest.stats.passed_through == 0


# --------------------------------------------------------------------------- the hand-over
def test_a_group_is_claimed_by_exactly_one_side() -> None:
    from gateway.models import Reading
    from gateway.store.staging import Staging

    staging = Staging()
    readings = [Reading(1, 2, 1_700_000_000_000 + i, "1") for i in range(3)]
    assert staging.offer(readings) is None  # closed: write them
    staging.open = True
    uploading = staging.offer(readings)
    waiting = staging.offer(readings)
    assert uploading is not None and waiting is not None
    assert staging.take() is uploading
    assert not staging.reclaim(uploading)  # an upload is under way: its answer decides
    uploading.delivered[0] = True
    staging.finish(uploading)
    assert uploading.settled.is_set() and len(uploading.undelivered()) == 2
    assert staging.reclaim(waiting)  # ingest's wait ran out first: it writes them
    assert staging.take() is None  # ... and the flush loop never sends them
    assert (staging.passed, staging.returned) == (1, 5)
