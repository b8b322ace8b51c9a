"""Issue 19 for the operator: `status` per device (rates, quota, rules), `/metrics`
counters, the `quota_overflow_forecast` line, `routes test` and `routes suggest`."""

from __future__ import annotations

import asyncio
import io
import json
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_metrics import scrape, value

from gateway.cli import main
from gateway.cli.status import collect
from gateway.cli.status_table import render
from gateway.config import Settings
from gateway.ingest.routes.suggest import Observed, suggest_config
from gateway.models import StreamKey
from gateway.ops.overflow import OverflowWatch
from gateway.sampling import SamplingPlan
from gateway.store import Store
from gateway.testing.process import daemon_config, write_config
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import InProcessGateway, events, publish, wait_for_passes, wait_until

DEVICES = {"boiler": 101, "kitchen": 102}
FIT_ROUTE = {
    "topic": "esp/{device}/{stream}",
    "streams": {"temperature": 5, "humidity": 6},
    "sample": "fit",
}
RAW_ROUTE = {"topic": "raw/{device}", "datastream_id": 1, "timestamp": "ts"}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_status_shows_each_devices_rates_quota_and_rules(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    settings = make_settings(
        [FIT_ROUTE, RAW_ROUTE], devices=DEVICES, cloud={"daily_points_limit": 12_000}
    )
    base = (now_ms() - 3_600_000) // 30_000 * 30_000
    messages = [("raw/kitchen", json.dumps({"value": i, "ts": base + i})) for i in range(30)]
    messages += [
        ("esp/boiler/temperature", json.dumps({"value": i, "ts": base + i * 1000}))
        for i in range(30)
    ]
    async with InProcessGateway(settings) as gateway:
        observer, ingest = gateway.observer, gateway.ingest
        assert observer is not None and ingest is not None
        observer.sample_rates()  # the start of the measurement
        assert await publish(publisher, messages) == 60
        await wait_until(lambda: ingest.stats.received == 60, message="60 received")
        await wait_until(lambda: sum(ingest.stats.sending_by_device.values()) == 31)
        observer.sample_rates(now=time.monotonic() + 60)  # as if a minute had passed
        report = await collect(settings)
    sampling = report["sampling"]
    assert sampling["limit_per_device"] == 12_000
    by_device = {device["device_id"]: device for device in sampling["devices"]}
    boiler, kitchen = by_device[101], by_device[102]
    # 30 readings in ~60 s: ~43,000 a day arriving; they fill one 30 s window (fit: S = 3,
    # the two streams and the raw route's datastream; 3 x 2,880 <= 0.9 x 12,000).
    assert boiler["arriving_per_day"] == pytest.approx(30 * 1440, rel=0.05)
    assert boiler["points_per_day"] == pytest.approx(1440, rel=0.05)
    assert boiler["fits"] is True and boiler["sampled"] is True
    window = {"window_s": 30.0, "aggregate": "mean", "grace_s": 5.0, "fit": True}
    assert boiler["streams"] == [
        {"datastream_id": 1, "rule": "raw", "fit": False, "source": "configured"},
        # as its readings met it (the daemon), and as the configuration says (no reading yet)
        {"datastream_id": 5, "rule": "mean of 30s windows (fit)", "source": "observed"} | window,
        {"datastream_id": 6, "rule": "mean of 30s windows (fit)", "source": "configured"} | window,
    ]
    assert kitchen["points_per_day"] == pytest.approx(30 * 1440, rel=0.05)
    assert kitchen["fits"] is False
    text = render(report)
    assert "sampling    quota 12,000 points per device per day" in text
    assert "        datastream 5: mean of 30s windows (fit)" in text


async def test_quota_overflow_forecast_once_a_day_for_a_device_without_sample(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    settings = make_settings(
        [FIT_ROUTE, RAW_ROUTE], devices=DEVICES, cloud={"daily_points_limit": 1000}
    )
    base = now_ms() - 3_600_000
    messages = [("raw/kitchen", json.dumps({"value": i, "ts": base + i})) for i in range(20)]
    messages += [("esp/boiler/temperature", f"{i}") for i in range(20)]
    async with InProcessGateway(settings) as gateway:
        observer, ingest = gateway.observer, gateway.ingest
        assert observer is not None and ingest is not None
        observer.sample_rates()
        await publish(publisher, messages)
        await wait_until(lambda: ingest.stats.received == 40, message="40 received")
        observer.sample_rates(now=time.monotonic() + 60)
        observer.sample_rates(now=time.monotonic() + 70)  # the same day: no second line
    [line] = events(log_output, "quota_overflow_forecast")
    # The sampled device (boiler, 28,800 a day arriving) is not warned about: fit is on.
    assert line["device_id"] == 102 and line["limit"] == 1000
    assert line["points_per_day"] == pytest.approx(20 * 1440, rel=0.05)
    assert 'sample = "fit"' in line["hint"]


def test_overflow_watch_waits_for_a_minute_of_rates_and_forgets_past_days() -> None:
    plan = SamplingPlan([], [], numeric_ids=True, daily_limit=10_000)
    watch = OverflowWatch()
    fast = {7: 1.0}  # 86,400 a day
    none: set[int] = set()
    assert watch.check(fast, observed_s=30, plan=plan, sampled=none, day="2025-01-01") == []
    assert watch.check(fast, observed_s=60, plan=plan, sampled=none, day="2025-01-01") == [7]
    assert watch.check(fast, observed_s=90, plan=plan, sampled=none, day="2025-01-01") == []
    slow = {7: 0.1}  # 8,640 a day
    assert watch.check(slow, observed_s=90, plan=plan, sampled=none, day="2025-01-02") == []
    assert watch.check(fast, observed_s=90, plan=plan, sampled={7}, day="2025-01-02") == []
    assert watch.check(fast, observed_s=90, plan=plan, sampled=none, day="2025-01-02") == [7]


async def test_metrics_count_suppressed_aggregated_and_late(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    class Clock:
        offset_ms = 0

        def __call__(self) -> int:
            return now_ms() + self.offset_ms

    clock = Clock()
    start = (now_ms() - 600_000) // 10_000 * 10_000
    routes = [
        {
            "topic": "win",
            "device_id": 101,
            "datastream_id": 5,
            "timestamp": "ts",
            "sample": {"every": "10s"},
        },
        {"topic": "db", "device_id": 101, "datastream_id": 6, "sample": {"deadband": 1}},
    ]
    settings = make_settings(routes, metrics={"listen": "127.0.0.1:0"})
    async with InProcessGateway(settings, clock_ms=clock) as gateway, httpx.AsyncClient() as client:
        ingest = gateway.ingest
        assert ingest is not None
        await publish(
            publisher, [("win", json.dumps({"value": i, "ts": start + i})) for i in range(4)]
        )
        await publish(publisher, [("db", v) for v in ("10", "10.5", "10.2", "12")])
        await wait_until(lambda: ingest.stats.suppressed == 2, message="2 suppressed")
        clock.offset_ms += 5_000
        await wait_until(lambda: len(sandbox.accepted) == 3, message="window point + 2 kept")
        await publish(publisher, [("win", json.dumps({"value": 1, "ts": start + 9}))])
        await wait_until(lambda: ingest.stats.late == 1, message="late")
        await wait_for_passes(gateway)
        await wait_until(
            lambda: gateway.metrics is not None and gateway.metrics.address is not None
        )
        samples = await scrape(client, gateway)
    assert value(samples, "blynk_gateway_readings_total", outcome="suppressed") == 2
    assert value(samples, "blynk_gateway_readings_total", outcome="aggregated") == 4
    assert value(samples, "blynk_gateway_readings_total", outcome="late") == 1
    assert value(samples, "blynk_gateway_dead_letters", reason="late_for_window") == 1


# --------------------------------------------------------------------------- routes test
def config_file(tmp_path: Path, routes: list[dict[str, Any]]) -> Path:
    config = daemon_config(1883, "http://127.0.0.1:9", tmp_path / "buffer.db", routes)
    config["devices"] = DEVICES
    return write_config(tmp_path / "config.toml", config)


async def remember_kept(db: Path, key: StreamKey, kept: tuple[int, str]) -> None:
    store = await Store.open(db, owner=True)
    try:
        await store.append([], kept={key: kept})
    finally:
        await store.close()


def routes_test(capsys: pytest.CaptureFixture[str], config: Path, topic: str, payload: str) -> Any:
    assert main(["routes", "test", "--config", str(config), topic, payload, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_routes_test_shows_the_window_and_the_deadband_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routes = [
        {
            "topic": "z2m/{device}",
            "fields": {
                "temperature": 5,
                "battery": {"datastream": 7, "sample": {"deadband": 1, "heartbeat": "6h"}},
            },
            "timestamp": "ts",
            "sample": {"every": "60s", "aggregate": "max"},
        }
    ]
    config = config_file(tmp_path, routes)
    ts = (now_ms() - 600_000) // 60_000 * 60_000 + 12_345
    payload = json.dumps({"temperature": 21.5, "battery": 90, "ts": ts})
    report = routes_test(capsys, config, "z2m/boiler", payload)
    window, battery = (reading["sampling"] for reading in report["readings"])
    assert window["rule"] == "max of 1m windows" and window["outcome"] == "windowed"
    assert (window["window_start"], window["window_end"]) == (ts - 12_345, ts - 12_345 + 60_000)
    assert battery["outcome"] == "kept" and "first reading" in battery["detail"]
    # With the daemon's buffer remembering 90.5 as the last kept battery value: suppressed.
    asyncio.run(remember_kept(tmp_path / "buffer.db", StreamKey(101, 7), (ts - 1000, "90.5")))
    report = routes_test(capsys, config, "z2m/boiler", payload)
    battery = report["readings"][1]["sampling"]
    assert battery["outcome"] == "suppressed"
    assert (
        battery["detail"] == "moved 0.5 from the last kept value 90.5, not more than the deadband 1"
    )
    assert main(["routes", "test", "--config", str(config), "z2m/boiler", payload]) == 0
    text = capsys.readouterr().out
    assert "  sample: deadband 1, heartbeat 6h: suppressed: moved 0.5" in text
    assert "  sample: max of 1m windows: windowed: folded into the point of window" in text


# --------------------------------------------------------------------------- routes suggest
def test_routes_suggest_proposes_fit_for_a_device_over_its_quota() -> None:
    observed = Observed()
    busy = json.dumps({"temperature": 21.5, "humidity": 40, "battery": 90, "voltage": 3000})
    for second in range(0, 20, 2):  # every 2 s, 4 values: 172,800 a day
        observed.add("zigbee2mqtt/busy", busy.encode(), at_s=float(second))
    for second in (0.0, 10.0, 20.0):  # every 10 s, 1 value: 8,640 a day
        observed.add("quiet/sensor/temperature/state", b"21.5", at_s=second)
    observed.add("zigbee2mqtt/replayed", busy.encode(), retained=True)  # says no rate
    text = suggest_config(observed, daily_limit=10_000)
    suggested = tomllib.loads(text)
    z2m, esphome = suggested["routes"]
    assert z2m["sample"] == "fit" and "sample" not in esphome
    assert "busy: 172,800 points/day seen, over the quota of 10,000" in text
    settings = Settings(
        cloud={"client_id": "c", "client_secret": "s"},
        devices={name: 1 + i for i, name in enumerate(suggested["devices"])},
        routes=suggested["routes"],
    )
    assert settings.routes[0].sample is not None and settings.routes[0].sample.fit
