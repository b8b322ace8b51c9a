"""Issue 19 through the path the data takes: a real Mosquitto, the running gateway (in
process with an injected clock, or as a subprocess for `kill -9`), its SQLite file and
the sandbox cloud. Each test fails on the gateway before sampling (the `sample` key was
unknown, and every reading went out as a point)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Settings
from gateway.ops.reload import reload_config
from gateway.testing.broker import MosquittoBroker
from gateway.testing.process import GatewayProcess, write_config
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import InProcessGateway, publish, settings_dict, wait_for_passes, wait_until

DEVICES = {"boiler": 101, "kitchen": 102}


class Clock:
    """The gateway's clock: the wall clock plus an offset a test moves forward."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def __call__(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms


def aligned(ms: int, width_ms: int) -> int:
    return ms - ms % width_ms


def points(sandbox: SandboxCloud, device_id: int, datastream_id: int) -> dict[int, Any]:
    found: dict[int, Any] = {}
    for point in sandbox.accepted:
        if (point.device_id, point.datastream_id) == (device_id, datastream_id):
            assert point.ts not in found, f"two points at {point.ts}"
            found[point.ts] = point.value
    return found


def buffered(db: Path) -> int:
    """Readings committed to the daemon's file (read beside it, as `status` does)."""
    connection = sqlite3.connect(db)
    try:
        return int(connection.execute("SELECT count(*) FROM readings").fetchone()[0])
    except sqlite3.Error:
        return -1
    finally:
        connection.close()


def window_means(readings: list[tuple[int, float]], width_ms: int) -> dict[int, float]:
    windows: dict[int, list[float]] = {}
    for ts, value in readings:
        windows.setdefault(aligned(ts, width_ms), []).append(value)
    return {start: statistics.fmean(values) for start, values in windows.items()}


# --------------------------------------------------------------------------- windows
WINDOW_ROUTE = {
    "topic": "z2m/{device}",
    "fields": {"temperature": 5, "humidity": 6},
    "timestamp": "ts",
    "sample": {"every": "10s", "aggregate": "mean"},
}


async def test_readings_200ms_apart_become_one_mean_per_10s_window(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    """300 readings 200 ms apart on two fields, every = "10s", aggregate = "mean": exactly
    6 points per datastream, each the mean of its window, stamped with its start."""
    clock = Clock()
    start = aligned(clock() - 600_000, 10_000)
    readings = [(start + i * 200, 20 + (i % 7) * 0.5, 40 + (i % 11)) for i in range(300)]
    messages = [
        ("z2m/boiler", json.dumps({"temperature": t, "humidity": h, "ts": ts}))
        for ts, t, h in readings
    ]
    settings = make_settings([WINDOW_ROUTE], devices=DEVICES)
    async with InProcessGateway(settings, clock_ms=clock) as gateway:
        assert await publish(publisher, messages) == 300
        ingest = gateway.ingest
        assert ingest is not None
        await wait_until(lambda: ingest.stats.stored == 600, message="600 readings stored raw")
        # Every window is long over, but its readings just arrived: it waits out its grace.
        await wait_for_passes(gateway)
        assert sandbox.accepted == []
        clock.offset_ms += 5_000
        await wait_until(lambda: len(sandbox.accepted) >= 12, message="12 window points")
        await wait_for_passes(gateway)
        assert gateway.store is not None and gateway.store.pending_points == 0
        assert gateway.store.sampling.aggregated == 600
    temperature, humidity = points(sandbox, 101, 5), points(sandbox, 101, 6)
    assert sorted(temperature) == sorted(humidity) == [start + k * 10_000 for k in range(6)]
    expected_t = window_means([(ts, t) for ts, t, _ in readings], 10_000)
    expected_h = window_means([(ts, h) for ts, _, h in readings], 10_000)
    assert temperature == pytest.approx(expected_t)
    assert humidity == pytest.approx(expected_h)
    assert len(sandbox.accepted) == 12


async def test_a_reading_for_a_window_already_sent_is_late(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    clock = Clock()
    start = aligned(clock() - 600_000, 10_000)
    settings = make_settings([WINDOW_ROUTE], devices=DEVICES)
    async with InProcessGateway(settings, clock_ms=clock) as gateway:
        on_time = [
            ("z2m/boiler", json.dumps({"temperature": 20, "ts": start + i})) for i in range(3)
        ]
        await publish(publisher, on_time)
        clock.offset_ms += 5_000
        await wait_until(lambda: len(sandbox.accepted) == 1, message="the window's point")
        late = json.dumps({"temperature": 99, "ts": start + 5_000})
        assert await publish(publisher, [("z2m/boiler", late)]) == 1
        ingest = gateway.ingest
        assert ingest is not None
        await wait_until(lambda: ingest.stats.late == 1, message="the late reading counted")
        assert gateway.store is not None
        [dead] = await gateway.store.dead_letters(reason="late_for_window")
        assert (dead.ts_ms, dead.value_json, dead.topic) == (start + 5_000, "99", "z2m/boiler")
        await wait_for_passes(gateway)
    assert [(p.ts, p.value) for p in sandbox.accepted] == [(start, 20)]


# --------------------------------------------------------------------------- deadband
DEADBAND_ROUTE = {
    "topic": "shellies/boiler/relay/0/power",
    "device_id": 101,
    "datastream_id": 5,
    "sample": {"deadband": 0.5, "heartbeat": "15m"},
}
MINUTE = 60_000


async def test_a_deadband_and_heartbeat_sequence_keeps_exactly_what_the_rule_keeps(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    base = aligned(Clock()() - 3_600_000, MINUTE)
    sequence = [  # (minutes, value, kept?)
        (0, 20.0, True),  # the stream's first
        (1, 20.3, False),  # 0.3 from 20.0
        (2, 20.5, False),  # 0.5 is not MORE than the deadband
        (3, 20.6, True),  # 0.6
        (4, 20.2, False),  # 0.4 from the last KEPT value, 20.6
        (5, 20.0, True),  # 0.6 from 20.6
        (19, 20.1, False),  # 14 minutes after the last kept reading
        (20, 20.1, True),  # 15 minutes: the heartbeat
        (21, 20.4, False),
    ]
    messages = [
        (DEADBAND_ROUTE["topic"], json.dumps({"value": v, "ts": base + m * MINUTE}))
        for m, v, _ in sequence
    ]
    expected = {base + m * MINUTE: v for m, v, kept in sequence if kept}
    settings = make_settings([DEADBAND_ROUTE])
    async with InProcessGateway(settings) as gateway:
        assert await publish(publisher, messages) == len(sequence)
        ingest = gateway.ingest
        assert ingest is not None
        await wait_until(lambda: ingest.stats.suppressed == 5, message="5 suppressed")
        await wait_until(lambda: len(sandbox.accepted) >= len(expected), message="kept points")
        await wait_for_passes(gateway)
        assert gateway.ingest.stats.stored == 4
        assert gateway.store is not None and await gateway.store.dead_letter_counts() == {}
    assert points(sandbox, 101, 5) == expected
    # The last kept reading survives a restart: 20.1 at minute 20.
    after = [
        (DEADBAND_ROUTE["topic"], json.dumps({"value": 20.5, "ts": base + 22 * MINUTE})),  # 0.4
        (DEADBAND_ROUTE["topic"], json.dumps({"value": 19.5, "ts": base + 23 * MINUTE})),  # 0.6
    ]
    async with InProcessGateway(settings) as gateway:
        await publish(publisher, after)
        ingest = gateway.ingest
        assert ingest is not None
        await wait_until(lambda: ingest.stats.suppressed == 1, message="one suppressed")
        await wait_until(lambda: len(sandbox.accepted) > len(expected), message="one more")
        await wait_for_passes(gateway)
    assert points(sandbox, 101, 5) == expected | {base + 23 * MINUTE: 19.5}


async def test_deadband_with_pass_through_remembers_what_it_uploaded(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    """Kept readings uploaded before any write (pass-through) still leave their memory in
    the file: after a restart the next reading is judged against them."""
    base = aligned(Clock()() - 3_600_000, MINUTE)
    settings = make_settings([DEADBAND_ROUTE], flush={"pass_through": True})
    topic = DEADBAND_ROUTE["topic"]
    async with InProcessGateway(settings) as gateway:
        await publish(publisher, [(topic, json.dumps({"value": 10, "ts": base}))])
        await publish(publisher, [(topic, json.dumps({"value": 12, "ts": base + MINUTE}))])
        await wait_until(lambda: len(sandbox.accepted) == 2, message="two kept points")
        assert gateway.ingest is not None and gateway.ingest.stats.passed_through == 2
        assert gateway.ingest.stats.stored == 0
    async with InProcessGateway(settings) as gateway:
        # 10 again: within the deadband of 10 but 2 from the last kept 12: kept.
        await publish(publisher, [(topic, json.dumps({"value": 10, "ts": base + 2 * MINUTE}))])
        await wait_until(lambda: len(sandbox.accepted) == 3, message="the third point")
    assert points(sandbox, 101, 5) == {base: 10, base + MINUTE: 12, base + 2 * MINUTE: 10}


# --------------------------------------------------------------------------- fit
async def test_fit_with_two_datastreams_and_8640_a_day_gives_30s_windows(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    clock = Clock()
    start = aligned(clock() - 600_000, 60_000)
    route = {
        "topic": "{device}/sensor/{stream}/state",
        "streams": {"temperature": 1, "humidity": 2},
        "sample": "fit",
    }
    settings = make_settings([route], devices=DEVICES, cloud={"daily_points_limit": 8640})
    readings = [(start + i * 5_000, float(i)) for i in range(24)]  # 2 minutes, 5 s apart
    messages = [
        (f"kitchen/sensor/{name}/state", json.dumps({"value": v, "ts": ts}))
        for ts, v in readings
        for name in ("temperature", "humidity")
    ]
    async with InProcessGateway(settings, clock_ms=clock) as gateway:
        assert await publish(publisher, messages) == 48
        ingest = gateway.ingest
        assert ingest is not None
        await wait_until(lambda: ingest.stats.stored == 48, message="48 readings stored raw")
        clock.offset_ms += 5_000
        await wait_until(lambda: len(sandbox.accepted) >= 8, message="8 window points")
        await wait_for_passes(gateway)
        assert gateway.ingest is not None
        assert gateway.ingest.routes.sampling.fit_window_ms(102) == 30_000
    expected = window_means(readings, 30_000)
    assert sorted(expected) == [start + k * 30_000 for k in range(4)]
    assert points(sandbox, 102, 1) == pytest.approx(expected)
    assert points(sandbox, 102, 2) == pytest.approx(expected)


# --------------------------------------------------------------------------- kill -9
@pytest.mark.slow
async def test_kill_9_in_the_middle_of_a_window_loses_nothing_and_changes_nothing(
    make_gateway_process: Callable[..., GatewayProcess],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    tmp_path: Path,
) -> None:
    """Window B gets half its readings, the gateway is killed with SIGKILL, restarted, and
    B gets the rest: the points are the same as without the kill, one per window."""
    route = WINDOW_ROUTE | {"sample": {"every": "10s", "aggregate": "mean", "grace": "8s"}}
    process = make_gateway_process([route], devices=DEVICES)
    start = aligned(int(time.time() * 1000) - 600_000, 10_000)
    readings = [(start + i * 200, 20 + (i % 9) * 0.25) for i in range(150)]  # windows A, B, C
    messages = [("z2m/boiler", json.dumps({"temperature": v, "ts": ts})) for ts, v in readings]
    process.start()
    await asyncio.to_thread(process.wait_for_event, "mqtt_connected")
    # A whole, and B's first half, committed (and so acknowledged to the broker); then
    # SIGKILL well within B's grace.
    assert await publish(publisher, messages[:75]) == 75
    db = tmp_path / "buffer.db"
    await wait_until(lambda: buffered(db) == 75, 20, "75 readings committed")
    await asyncio.to_thread(process.kill)
    process.start()
    await asyncio.to_thread(process.wait_for_event, "mqtt_connected")
    assert await publish(publisher, messages[75:]) == 75
    expected = window_means(readings, 10_000)
    await wait_until(lambda: len(sandbox.accepted) >= 3, 40, "three window points")
    await asyncio.sleep(1.0)  # a fourth (a duplicate or a split window) would come now
    assert process.terminate() == 0
    assert points(sandbox, 101, 5) == pytest.approx(expected)
    assert len(sandbox.accepted) == 3


# --------------------------------------------------------------------------- a day's backlog
@pytest.mark.slow
async def test_a_day_of_backlog_goes_out_as_1440_window_points(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    """A 1 reading/s stream with every = "60s", the cloud down for a day: 86,400 readings
    buffered, then 1,440 points (a share of one day's quota) once the cloud is back."""
    clock = Clock()
    start = aligned(clock() - 86_400_000 - 120_000, 60_000)
    route = {
        "topic": "meter/{device}",
        "datastream_id": 1,
        "timestamp": "ts",
        "sample": {"every": "60s"},
    }
    settings = make_settings(
        [route], devices=DEVICES, flush={"batch_size": 1000}, mqtt={"inflight_window": 100}
    )
    messages = [
        ("meter/kitchen", f'{{"value":{i % 600},"ts":{start + i * 1000}}}') for i in range(86_400)
    ]
    await sandbox.set_fault("down")
    async with InProcessGateway(settings, clock_ms=clock) as gateway:
        assert await publish(publisher, messages) == 86_400
        store = gateway.store
        assert store is not None
        await wait_until(lambda: store.pending_points == 86_400, 30, "86,400 readings buffered")
        clock.offset_ms += 5_000
        await sandbox.set_fault("none")
        await wait_until(lambda: len(sandbox.accepted) >= 1440, 60, "1,440 points")
        await wait_for_passes(gateway)
        assert store.pending_points == 0
        assert sandbox.accepted_count(102) == 1440
        assert store.sampling.aggregated == 86_400
    got = points(sandbox, 102, 1)
    assert sorted(got) == [start + k * 60_000 for k in range(1440)]
    expected = window_means([(start + i * 1000, float(i % 600)) for i in range(86_400)], 60_000)
    assert got == pytest.approx(expected)


# --------------------------------------------------------------------------- reload
async def test_a_reload_re_plans_fit_for_a_new_limit(
    make_settings: Callable[..., Settings],
    broker: MosquittoBroker,
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    tmp_path: Path,
) -> None:
    clock = Clock()
    start = aligned(clock() - 600_000, 60_000)
    route = {"topic": "esp/{device}/{stream}", "streams": {"a": 1, "b": 2}, "sample": "fit"}

    def config_file(limit: int) -> Path:
        values = settings_dict(
            broker.port,
            sandbox.base_url,
            tmp_path / "buffer.db",
            [route],
            devices=DEVICES,
            cloud={"daily_points_limit": limit},
        )
        return write_config(tmp_path / "gateway.toml", values)

    settings = make_settings([route], devices=DEVICES, cloud={"daily_points_limit": 8640})
    readings = [(start + i * 1000, float(i)) for i in range(10)]  # 10 s of readings
    first = [("esp/kitchen/a", json.dumps({"value": v, "ts": ts})) for ts, v in readings]
    later = [("esp/kitchen/a", json.dumps({"value": v, "ts": ts + 120_000})) for ts, v in readings]
    path = config_file(8640)
    async with InProcessGateway(settings, clock_ms=clock, config_path=path) as gateway:
        ingest = gateway.ingest
        assert ingest is not None
        await publish(publisher, first)
        await wait_until(lambda: ingest.stats.stored == 10, message="the first 10 stored")
        clock.offset_ms += 5_000
        await wait_until(lambda: len(sandbox.accepted) == 1, message="one 30 s window")
        # At 100,000 points a day there is room for 2 s windows (2 x 43,200 <= 90,000).
        assert await reload_config(gateway, config_file(100_000))
        assert ingest.routes.sampling.fit_window_ms(102) == 2_000
        await publish(publisher, later)
        await wait_until(lambda: ingest.stats.stored == 20, message="10 more stored")
        clock.offset_ms += 5_000
        await wait_until(lambda: len(sandbox.accepted) == 6, message="five 2 s windows")
        await wait_for_passes(gateway)
    got = points(sandbox, 102, 1)
    assert got.pop(start) == pytest.approx(statistics.fmean(v for _, v in readings))
    assert got == pytest.approx(window_means([(ts + 120_000, v) for ts, v in readings], 2_000))
