"""Time on a box without a real-time clock (issue 20), through the real path: readings
published over MQTT to the running gateway, a real SQLite file, the sandbox cloud. The
in-process gateways run on fake clocks and a fake synchronization source
(gateway/testing/clocks.py); the daemon killed with SIGKILL runs on this machine's own
clocks and boot id, and trusts its clock by a file the test creates."""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_systemd import NotifyListener

from gateway.app import Gateway
from gateway.config import Settings
from gateway.ops.metrics import families
from gateway.ops.systemd import status_line
from gateway.testing.broker import MosquittoBroker
from gateway.testing.clocks import FakeTime, SyncSwitch
from gateway.testing.process import GatewayProcess, write_config
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from gateway.uplink.quota import DailyQuota
from harness import (
    InProcessGateway,
    cli,
    events,
    publish,
    settings_dict,
    status_json,
    ts_payload,
    wait_for_passes,
    wait_until,
)

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
TOPIC = "sensors/boiler/temperature"  # device 101, datastream 5
BOOT_A = "aaaaaaaa-0000-4000-8000-00000000000a"
BOOT_B = "bbbbbbbb-0000-4000-8000-00000000000b"
BOOT_C = "cccccccc-0000-4000-8000-00000000000c"


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
        assert await clock_metrics(gateway) == {"clock_synchronized": 0.0, "provisional": 500.0}
        fake.step(3 * DAY_MS)  # NTP's first sync
        sync.synchronized = True
        await wait_until(lambda: len(sandbox.accepted) == 500, message="all 500 uploaded")
        today, stale_day = day_of(fake.true_ms()), day_of(fake.true_ms() - 3 * DAY_MS)
        # The ledger counts a batch when its rows are deleted (held up to 1 s, uplink/acks.py).
        await wait_until(lambda: store.pending_points == 0, message="the batches deleted")
        assert await store.points_sent(101, today) == (500, False)
        assert await store.points_sent(101, stale_day) == (0, False)
        assert gateway.flush is not None and gateway.flush.stats.expired == 0
        assert await store.dead_letter_counts() == {}
        assert store.provisional_points == 0
        assert await clock_metrics(gateway) == {"clock_synchronized": 1.0, "provisional": 0.0}
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
    assert (rebased["day"], rebased["points"]) == (today, 100)
    assert abs(rebased["step_s"] + 3600) < 0.01  # the two clocks are read a moment apart


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


@pytest.mark.slow
async def test_a_kill_between_arrival_and_sync_loses_nothing_and_times_stay_true(
    make_gateway_process: Callable[..., GatewayProcess],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    tmp_path: Path,
) -> None:
    """The daemon as a process, on this machine's real clocks and boot id, trusting the
    clock by a file (as with systemd-timesyncd): SIGKILL while readings wait for the clock,
    a restart in the same boot, then the sync. `status` says what waits and why."""
    flag = tmp_path / "synchronized"
    daemon = make_gateway_process(clock={"trust": "file", "synchronized_file": str(flag)})
    daemon.start()
    await asyncio.to_thread(daemon.wait_for_event, "mqtt_connected")
    before = int(time.time() * 1000)
    assert await publish(publisher, [(TOPIC, str(i)) for i in range(200)]) == 200
    after = int(time.time() * 1000)
    await wait_until_status(daemon.config_path, lambda r: r["clock"]["provisional"] == 200)
    report = await status_json(daemon.config_path)
    assert (
        report["clock"] | {"synchronized": False, "source": "file", "provisional": 200}
        == (report["clock"])
    )
    assert report["backlog"]["readings"] == 0  # nothing the flush loop could send
    await asyncio.to_thread(daemon.kill)

    seen = daemon.event_count()
    listener = NotifyListener(f"@blynk-test-{uuid.uuid4().hex}")
    daemon.env["NOTIFY_SOCKET"] = listener.address
    daemon.start()
    started = await asyncio.to_thread(daemon.wait_for_event, "gateway_started", after=seen)
    assert (started["held_for_clock"], started["clock_synchronized"]) == (200, False)
    try:
        ready = await asyncio.to_thread(listener.wait_for, lambda fields: "READY" in fields)
    finally:
        listener.close()
    assert "waiting for the clock (200 readings held)" in ready["STATUS"]
    await asyncio.to_thread(daemon.wait_for_event, "mqtt_connected", after=seen)
    table = await asyncio.to_thread(cli, "status", "--config", str(daemon.config_path))
    assert "NOT SYNCHRONIZED (file): uploads wait for it, 200 readings held" in table.stdout
    await asyncio.sleep(1.0)  # flush passes come and go: the cloud is up, nothing is sent
    assert sandbox.accepted == []

    flag.touch()  # the clock synchronizes
    synced = await asyncio.to_thread(daemon.wait_for_event, "clock_synchronized")
    assert synced["corrected"] == 200 and synced["source"] == "file"
    await wait_until(lambda: len(sandbox.accepted) == 200, message="all 200 uploaded")
    assert sorted(int(p.value) for p in sandbox.accepted) == list(range(200))  # type: ignore[call-overload]
    assert all(before - 1000 <= p.ts <= after + 1000 for p in sandbox.accepted)
    assert sandbox.quota_used(101) == 200
    report = await status_json(daemon.config_path)
    assert report["quota"]["day"] == day_of(int(time.time() * 1000))
    assert [(d["device_id"], d["used"]) for d in report["quota"]["devices"]] == [(101, 200)]
    assert report["clock"]["synchronized"] is True and report["clock"]["provisional"] == 0
    assert report["clock"]["last_correction"]["corrected"] == 200
    assert report["dead_letters"]["total"] == 0
    assert daemon.terminate() == 0


def test_systemd_status_says_what_waits_for_the_clock() -> None:
    line = status_line(cloud_online=True, mqtt_connected=True, backlog=0, held_for_clock=1234)
    assert line == "online, waiting for the clock (1,234 readings held), backlog 0"


async def clock_metrics(gateway: Gateway) -> dict[str, float]:
    """The two clock gauges `/metrics` exports, from the daemon's own snapshot."""
    assert gateway.observer is not None
    found = {}
    for family in families(await gateway.observer.snapshot()):
        if family.name in (
            "blynk_gateway_clock_synchronized",
            "blynk_gateway_provisional_readings",
        ):
            found[family.name.removeprefix("blynk_gateway_").removesuffix("_readings")] = (
                family.samples[0].value
            )
    return found


async def wait_until_status(
    config: Path, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate(await status_json(config)):
        assert time.monotonic() < deadline, "status never said so"
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("policy", ["keep", "dead-letter"])
async def test_a_reboot_before_any_sync_follows_unsynced_boot(
    policy: str,
    broker: MosquittoBroker,
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    tmp_path: Path,
    log_output: io.StringIO,
) -> None:
    """Boot A syncs (its trusted moment is recorded); the box is off for an hour; boot B
    comes up at the fake-hwclock time, offline, and loses power before any sync; boot C
    syncs. B's readings get an estimate (a lower bound: A's last trusted moment plus B's
    uptime) and follow `[clock] unsynced_boot`, flagged in `status` and `dead-letters`."""
    config = settings_dict(
        broker.port, sandbox.base_url, tmp_path / "buffer.db", clock={"unsynced_boot": policy}
    )
    settings = Settings(**config)
    boot_a = FakeTime(true_ms=sandbox.now_ms, boot_id=BOOT_A)
    synced_at = boot_a.true_ms()
    async with InProcessGateway(settings, clock=boot_a.clock(SyncSwitch(True))):
        pass
    sandbox.advance_clock(3600)
    await sandbox.set_fault("down")
    boot_b = FakeTime(
        true_ms=sandbox.now_ms, error_ms=-3 * DAY_MS, uptime_ms=20_000, boot_id=BOOT_B
    )
    async with InProcessGateway(settings, clock=boot_b.clock(SyncSwitch())) as gateway:
        assert gateway.ingest is not None and gateway.store is not None
        before = boot_b.true_ms()
        assert await publish(publisher, [(TOPIC, str(i)) for i in range(30)]) == 30
        await wait_until(lambda: gateway.store.provisional_points == 30, message="30 held")  # type: ignore[union-attr]
        after = boot_b.true_ms()
    await sandbox.set_fault("none")
    boot_c = FakeTime(true_ms=sandbox.now_ms, uptime_ms=20_000, boot_id=BOOT_C)
    async with InProcessGateway(settings, clock=boot_c.clock(SyncSwitch(True))) as gateway:
        report = gateway.clock_report()
        assert report is not None and report["provisional"] == 0
        last = report["last_correction"]
        assert (last["boot_id"], last["estimated"]) == (BOOT_B, True)
        if policy == "keep":
            assert last["corrected"] == 30
            await wait_until(lambda: len(sandbox.accepted) == 30, message="B's readings sent")
        else:
            assert last["dead_lettered"] == 30
            await wait_for_passes(gateway, 3)
            assert sandbox.accepted == []
    [settled] = events(log_output, "provisional_earlier_boot")
    assert settled | {"boot_id": BOOT_B, "readings": 30, "estimated_from": "previous"} == settled
    # The estimate: A's last trusted moment plus B's uptime, never after the true time.
    if policy == "keep":
        stamps = [p.ts for p in sorted(sandbox.accepted, key=lambda p: int(p.value))]  # type: ignore[call-overload]
    else:
        path = tmp_path / "gateway.toml"
        write_config(path, config)
        listing = await asyncio.to_thread(
            cli,
            "dead-letters",
            "list",
            "--config",
            str(path),
            "--reason",
            "clock_unknown",
            "--json",
        )
        assert listing.returncode == 0, listing.stderr
        letters = [json.loads(line) for line in listing.stdout.splitlines()]
        assert len(letters) == 30
        assert all("estimated" in letter["detail"] for letter in letters)
        stamps = [letter["ts"] for letter in sorted(letters, key=lambda x: int(x["value"]))]
    assert stamps == sorted(stamps)
    assert synced_at + 20_000 <= stamps[0] and stamps[-1] <= after
    assert stamps[0] <= before  # a lower bound: the hour the box was off is unknown
