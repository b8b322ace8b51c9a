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
from harness import InProcessGateway, events, publish, wait_for_passes, wait_until

DAY_MS = 86_400_000
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
