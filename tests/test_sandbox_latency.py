"""The sandbox cloud's round trip (issue 18): every token and import answer comes late by
the setting, concurrent requests each wait their own latency (none waits for another's),
the "slow" fault adds to it, and the admin API, the CLI and `SandboxProcess` set it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.testing.sandbox import IMPORT_PATH, TOKEN_PATH, SandboxCloud
from gateway.testing.sandbox_latency import Latency, LatencySetting
from gateway.testing.sandbox_run import SandboxProcess

DEVICES = {101: {5: "double"}}
AUTH = ("sandbox-client", "sandbox-secret")
LATENCY_MS = 200.0


@pytest.fixture
async def cloud() -> AsyncIterator[SandboxCloud]:
    c = SandboxCloud(DEVICES)
    await c.start()
    yield c
    await c.stop()


@pytest.fixture
async def client(cloud: SandboxCloud) -> AsyncIterator[httpx.AsyncClient]:
    # Enough connections for every concurrent request: one each, as a real client pool.
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with httpx.AsyncClient(base_url=cloud.base_url, timeout=30, limits=limits) as c:
        yield c


async def token(client: httpx.AsyncClient) -> str:
    r = await client.post(TOKEN_PATH, params={"grant_type": "client_credentials"}, auth=AUTH)
    assert r.status_code == 200, r.text
    value = r.json()["access_token"]
    assert isinstance(value, str)
    return value


async def import_one(client: httpx.AsyncClient, access: str, ts: int, value: float) -> int:
    body = {"deviceId": 101, "dataStreamId": 5, "values": [{"value": value, "ts": ts}]}
    r = await client.post(IMPORT_PATH, json=body, headers={"Authorization": f"Bearer {access}"})
    return r.status_code


async def timed(coroutine: object) -> tuple[object, float]:
    started = time.perf_counter()
    result = await coroutine  # type: ignore[misc]
    return result, time.perf_counter() - started


async def test_token_and_import_answers_take_at_least_the_latency(
    cloud: SandboxCloud, client: httpx.AsyncClient
) -> None:
    access, fast_token_s = await timed(token(client))  # warm: the connection is open now
    assert fast_token_s < LATENCY_MS / 1000
    cloud.set_latency(LATENCY_MS)
    assert cloud.latency == LatencySetting(LATENCY_MS, 0.0)
    _, token_s = await timed(token(client))
    status, import_s = await timed(import_one(client, str(access), cloud.now_ms(), 1.0))
    assert status == 204
    assert token_s >= LATENCY_MS / 1000
    assert import_s >= LATENCY_MS / 1000
    assert cloud.accepted_count() == 1
    cloud.set_latency(0)
    _, off_s = await timed(import_one(client, str(access), cloud.now_ms() + 1, 2.0))
    assert off_s < LATENCY_MS / 1000


async def test_concurrent_requests_each_wait_their_own_latency(
    cloud: SandboxCloud, client: httpx.AsyncClient
) -> None:
    access = await token(client)
    cloud.set_latency(LATENCY_MS)
    first_ts = cloud.now_ms()
    started = time.perf_counter()
    tasks = [
        asyncio.create_task(import_one(client, access, first_ts + i, float(i))) for i in range(8)
    ]
    # All eight are in their round trip at the same moment: nothing serialises them.
    deadline = time.monotonic() + LATENCY_MS / 1000
    while cloud.requests_in_round_trip < 8 and time.monotonic() < deadline:
        await asyncio.sleep(0.002)
    in_flight_at_once = cloud.requests_in_round_trip
    statuses = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    assert statuses == [204] * 8
    assert in_flight_at_once == 8
    assert elapsed >= LATENCY_MS / 1000
    # One latency (plus connection set-up on a busy machine), far from the 8 of a queue.
    assert elapsed < 3 * LATENCY_MS / 1000, f"8 concurrent requests took {elapsed:.2f} s"
    assert cloud.accepted_count() == 8
    assert cloud.requests_in_round_trip == 0


async def test_the_slow_fault_adds_to_the_latency(
    cloud: SandboxCloud, client: httpx.AsyncClient
) -> None:
    access = await token(client)
    cloud.set_latency(LATENCY_MS)
    await cloud.set_fault("slow", count=1, delay_s=0.3)
    status, elapsed = await timed(import_one(client, access, cloud.now_ms(), 1.0))
    assert status == 204
    assert elapsed >= LATENCY_MS / 1000 + 0.3


async def test_jitter_spreads_answers_within_its_bounds() -> None:
    latency = Latency(seed=18)
    latency.set(100, 40)
    draws = [latency.draw_s() for _ in range(2000)]
    assert min(draws) >= 0.060 and max(draws) <= 0.140
    assert max(draws) - min(draws) > 0.060  # spread, not a constant
    latency.set(10, 50)  # jitter wider than the latency: never a negative sleep
    assert min(latency.draw_s() for _ in range(2000)) == 0.0
    latency.set(0)
    assert not latency.active and latency.draw_s() == 0.0


@pytest.mark.parametrize(
    ("latency_ms", "jitter_ms", "error"),
    [(-1, 0, ValueError), (0, -5, ValueError), (float("nan"), 0, ValueError), (True, 0, TypeError)],
)
def test_bad_settings_are_refused(latency_ms: float, jitter_ms: float, error: type) -> None:
    with pytest.raises(error):
        LatencySetting(latency_ms, jitter_ms)


async def test_admin_api_sets_and_reads_it_and_is_not_delayed(
    cloud: SandboxCloud, client: httpx.AsyncClient
) -> None:
    r = await client.post("/_sandbox/latency", json={"latency_ms": 1000, "jitter_ms": 5})
    assert r.status_code == 200 and r.json() == {"latency_ms": 1000, "jitter_ms": 5}
    assert cloud.latency == LatencySetting(1000, 5)
    r, elapsed = await timed(client.get("/_sandbox/latency"))
    assert isinstance(r, httpx.Response) and r.json() == {"latency_ms": 1000, "jitter_ms": 5}
    _, state_s = await timed(client.get("/_sandbox/state"))
    assert max(elapsed, state_s) < 0.5  # the control plane answers at once
    for bad in ({"latency_ms": -1}, {"latency_ms": "fast"}, {"latecny_ms": 5}, [100]):
        r = await client.post("/_sandbox/latency", json=bad)
        assert r.status_code == 400, bad
    assert cloud.latency == LatencySetting(1000, 5)  # a refused change changes nothing
    r = await client.post("/_sandbox/latency", json={})
    assert r.json() == {"latency_ms": 0, "jitter_ms": 0}


async def test_stop_does_not_wait_out_a_long_latency(cloud: SandboxCloud) -> None:
    cloud.set_latency(30_000)
    async with httpx.AsyncClient(base_url=cloud.base_url, timeout=60) as c:
        request = asyncio.create_task(
            c.post(TOKEN_PATH, params={"grant_type": "client_credentials"}, auth=AUTH)
        )
        while cloud.requests_in_round_trip == 0:
            await asyncio.sleep(0.01)
        _, elapsed = await timed(cloud.stop())
        assert elapsed < 5
        with pytest.raises(httpx.HTTPError):
            await request


def test_sandbox_process_and_cli_take_the_latency(tmp_path: Path) -> None:
    process = SandboxProcess(
        "101:5", daily_points_limit=100, counter_path=tmp_path / "count", latency_ms=LATENCY_MS
    )
    url = process.start()
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.get("/_sandbox/latency").json()["latency_ms"] == LATENCY_MS
            started = time.perf_counter()
            r = c.post(TOKEN_PATH, params={"grant_type": "client_credentials"}, auth=AUTH)
            assert r.status_code == 200
            assert time.perf_counter() - started >= LATENCY_MS / 1000
    finally:
        process.stop()
    with pytest.raises(ValueError):
        SandboxProcess("101:5", daily_points_limit=1, counter_path=tmp_path / "c", latency_ms=-1)

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "gateway", "sandbox", "--port", "0", "--latency-ms", "150"]
    cmd += ["--jitter-ms", "10"]
    with subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip().partition("url=")[2]
            setting = httpx.get(url + "/_sandbox/latency", timeout=5).json()
            assert setting == {"latency_ms": 150, "jitter_ms": 10}
        finally:
            proc.terminate()
        assert proc.wait(timeout=10) == 0
    bad = subprocess.run(
        [sys.executable, "-m", "gateway", "sandbox", "--latency-ms", "-3"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "--latency-ms" in bad.stderr
