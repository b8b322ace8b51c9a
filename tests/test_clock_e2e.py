"""Time on a box without a real-time clock (issue 20), through the real path: readings
published over MQTT to the running gateway, a real SQLite file, the sandbox cloud; only the
clocks and the synchronization source are fakes (gateway/testing/clocks.py)."""

from __future__ import annotations

import io
from collections.abc import Callable

from gateway.config import Settings
from gateway.testing.clocks import FakeTime, SyncSwitch
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from gateway.uplink.quota import DailyQuota
from harness import InProcessGateway, events, publish, ts_payload, wait_for_passes, wait_until

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
TOPIC = "sensors/boiler/temperature"  # device 101, datastream 5


def day_of(epoch_ms: int) -> str:
    return DailyQuota(10_000).day_of(epoch_ms)


async def test_a_fake_hwclock_boot_gets_every_reading_its_true_time_at_the_sync(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    """Boot 3 days behind, offline; 500 readings without a time of their own over 10
    minutes; the clock syncs (+3 days): true times, nothing sent before the sync, nothing
    expired, the quota charged to the true day."""
    fake = FakeTime(true_ms=sandbox.now_ms, error_ms=-3 * DAY_MS)
    sync = SyncSwitch()
    await sandbox.set_fault("down")
    arrived: dict[int, tuple[int, int]] = {}  # batch -> true time before and after it
    async with InProcessGateway(make_settings(), clock=fake.clock(sync)) as gateway:
        store, ingest = gateway.store, gateway.ingest
        assert store is not None and ingest is not None
        for batch in range(50):
            before = fake.true_ms()
            values = [(TOPIC, str(batch * 10 + i)) for i in range(10)]
            assert await publish(publisher, values) == 10
            stored = 10 * (batch + 1)
            await wait_until(lambda n=stored: ingest.stats.stored == n, message=f"{stored} stored")
            arrived[batch] = (before, fake.true_ms())
            fake.advance(12_000)  # 10 readings every 12 s: 10 minutes in all
            sandbox.advance_clock(12)
        assert (store.provisional_points, store.pending_points) == (500, 0)
        # The cloud is back before the clock: still nothing can go (no wall time yet).
        await sandbox.set_fault("none")
        await wait_for_passes(gateway, 3)
        assert sandbox.accepted == []
        fake.step(3 * DAY_MS)  # NTP's first sync
        sync.synchronized = True
        await wait_until(lambda: len(sandbox.accepted) == 500, message="all 500 uploaded")
        today, stale_day = day_of(fake.true_ms()), day_of(fake.true_ms() - 3 * DAY_MS)
        assert await store.points_sent(101, today) == (500, False)
        assert await store.points_sent(101, stale_day) == (0, False)
        assert gateway.flush is not None and gateway.flush.stats.expired == 0
        assert await store.dead_letter_counts() == {}
        assert store.provisional_points == 0
    assert sandbox.quota_used(101) == 500
    for point in sandbox.accepted:
        before, after = arrived[int(point.value) // 10]  # type: ignore[call-overload]
        assert before - 1000 <= point.ts <= after + 1000, (point, before, after)
    [synced] = events(log_output, "clock_synchronized")
    assert synced["corrected"] == 500 and synced["boot_id"] == fake.boot_id
    assert abs(synced["offset_s"] * 1000 - (fake.wall_ms() - fake.boottime_ms())) < 1000


async def test_a_step_back_of_an_hour_while_synchronized_expires_nothing_and_counts_once(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    """The clock ran an hour ahead, past midnight, and said it was synchronized; NTP steps it
    back. What was charged to the stale day moves to the day the cloud counted it in, later
    readings are stamped by the corrected clock, and nothing expires or counts twice."""
    midnight = (sandbox.now_ms() // DAY_MS + 1) * DAY_MS
    sandbox.set_clock(midnight - 50 * 60_000)  # 23:10 UTC for the cloud (the truth)
    fake = FakeTime(true_ms=sandbox.now_ms, error_ms=HOUR_MS)  # 00:10 the next day
    today, tomorrow = day_of(sandbox.now_ms()), day_of(midnight)
    async with InProcessGateway(make_settings(), clock=fake.clock(SyncSwitch(True))) as gateway:
        store, clock = gateway.store, gateway.clock
        assert store is not None
        assert await publish(publisher, [(TOPIC, str(i)) for i in range(100)]) == 100
        await wait_until(lambda: len(sandbox.accepted) == 100, message="100 uploaded")
        assert await store.points_sent(101, tomorrow) == (100, False)  # the stale day
        fake.step(-HOUR_MS)
        await wait_until(lambda: clock.steps == 1, message="the step seen")
        before = fake.true_ms()
        assert await publish(publisher, [(TOPIC, str(i)) for i in range(100, 200)]) == 100
        await wait_until(lambda: len(sandbox.accepted) == 200, message="200 uploaded")
        after = fake.true_ms()
        await wait_for_passes(gateway, 3)
        assert await store.points_sent(101, today) == (200, False)
        assert await store.points_sent(101, tomorrow) == (0, False)
        assert gateway.flush is not None and gateway.flush.stats.expired == 0
        assert await store.dead_letter_counts() == {}
    assert sandbox.quota_used(101) == 200
    assert sorted(int(p.value) for p in sandbox.accepted) == list(range(200))  # type: ignore[call-overload]
    later = [p.ts for p in sandbox.accepted if int(p.value) >= 100]  # type: ignore[call-overload]
    assert all(before - 1000 <= ts <= after + 1000 for ts in later), (before, after, later[:3])
    [rebased] = events(log_output, "quota_days_rebased")
    assert (rebased["day"], rebased["points"], rebased["step_s"]) == (today, 100, -3600.0)


async def test_a_payload_time_ahead_of_a_synchronized_clock_keeps_todays_rule(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
) -> None:
    """Beyond max_future_s ahead of a trusted clock: the receive time, counted; not held."""
    fake = FakeTime(true_ms=sandbox.now_ms)
    async with InProcessGateway(make_settings(), clock=fake.clock(SyncSwitch(True))) as gateway:
        ingest = gateway.ingest
        assert ingest is not None
        ahead = fake.wall_ms() + HOUR_MS
        before = fake.true_ms()
        assert await publish(publisher, [(TOPIC, ts_payload(1.5, ahead))]) == 1
        await wait_until(lambda: len(sandbox.accepted) == 1, message="uploaded")
        [point] = sandbox.accepted
        assert before - 1000 <= point.ts <= fake.true_ms() + 1000
        assert (ingest.stats.ts_replaced, ingest.stats.provisional) == (1, 0)
