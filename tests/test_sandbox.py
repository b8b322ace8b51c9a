"""The sandbox cloud over real HTTP: the gateway's tests are only as good as this fake."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.testing.sandbox import (
    IMPORT_PATH,
    MAX_REQUEST_BYTES,
    STATUS_RESET,
    AcceptedPoint,
    RequestRecord,
    SandboxCloud,
)
from gateway.testing.sandbox_run import SandboxThread, parse_devices

DEVICES = {
    101: {5: "double", 6: "string", 7: "integer", 8: "boolean", 9: "location"},
    102: {1: "double"},
}
AUTH = ("sandbox-client", "sandbox-secret")


@pytest.fixture
async def cloud() -> AsyncIterator[SandboxCloud]:
    c = SandboxCloud(DEVICES, daily_points_limit=10)
    await c.start()
    yield c
    await c.stop()


@pytest.fixture
async def client(cloud: SandboxCloud) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=cloud.base_url, timeout=5) as c:
        yield c


async def get_token(client: httpx.AsyncClient) -> str:
    r = await client.post("/oauth2/token", params={"grant_type": "client_credentials"}, auth=AUTH)
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    assert isinstance(token, str)
    return token


def body(device: int, stream: int, values: list[Any], ts: int | None = None) -> dict[str, Any]:
    base = ts if ts is not None else int(time.time() * 1000)
    return {
        "deviceId": device,
        "dataStreamId": stream,
        "values": [{"value": v, "ts": base + i} for i, v in enumerate(values)],
    }


async def upload(
    client: httpx.AsyncClient, token: str | None, payload: object, **kw: Any
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await client.post(IMPORT_PATH, json=payload, headers=headers, **kw)


def message(r: httpx.Response) -> str:
    msg = r.json()["error"]["message"]
    assert isinstance(msg, str)
    return msg


# --------------------------------------------------------------------------- OAuth2
async def test_token_ok_and_bad_credentials(client: httpx.AsyncClient, cloud: SandboxCloud) -> None:
    r = await client.post("/oauth2/token", params={"grant_type": "client_credentials"}, auth=AUTH)
    data = r.json()
    assert r.status_code == 200
    assert data["token_type"] == "Bearer" and data["expires_in"] == 86_400
    assert data["access_token"] and data["refresh_token"]

    r = await client.post(
        "/oauth2/token", params={"grant_type": "client_credentials"}, auth=("x", "y")
    )
    assert r.status_code == 400
    assert r.json() == {
        "error": "invalid_client",
        "error_description": "Client ID is not found or password is wrong.",
    }
    r = await client.post("/oauth2/token", auth=AUTH)
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"
    assert cloud.token_requests == 3 and cloud.tokens_issued == 1


async def test_refresh_token_is_single_use(client: httpx.AsyncClient) -> None:
    r = await client.post("/oauth2/token", params={"grant_type": "client_credentials"}, auth=AUTH)
    params = {"grant_type": "refresh_token", "refresh_token": r.json()["refresh_token"]}
    assert (await client.post("/oauth2/token", params=params, auth=AUTH)).status_code == 200
    again = await client.post("/oauth2/token", params=params, auth=AUTH)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


# --------------------------------------------------------------------------- import: happy path
async def test_import_204_records_points(client: httpx.AsyncClient, cloud: SandboxCloud) -> None:
    token = await get_token(client)
    ts = cloud.now_ms()
    r = await upload(client, token, body(101, 5, [1.5, 2], ts=ts))
    assert r.status_code == 204 and r.content == b""
    r = await upload(client, token, body(101, 9, [[24.1, 56.9]], ts=ts))
    assert r.status_code == 204
    assert cloud.accepted == [
        AcceptedPoint(101, 5, ts, 1.5),
        AcceptedPoint(101, 5, ts + 1, 2),
        AcceptedPoint(101, 9, ts, [24.1, 56.9]),
    ]
    assert cloud.accepted_count(101) == 3 and cloud.accepted_count(102) == 0
    assert cloud.requests[-1] == RequestRecord(204, 101, 9, 1, None)


# --------------------------------------------------------------------------- import: refusals
async def test_401_without_bad_and_revoked_token(
    client: httpx.AsyncClient, cloud: SandboxCloud
) -> None:
    payload = body(101, 5, [1.0])
    for token in (None, "nope"):
        r = await upload(client, token, payload)
        assert r.status_code == 401 and message(r) == "Invalid token."
    token = await get_token(client)
    assert (await upload(client, token, payload)).status_code == 204
    cloud.revoke_tokens()
    assert (await upload(client, token, payload)).status_code == 401
    assert (await upload(client, await get_token(client), payload)).status_code == 204


async def test_token_expires_on_sandbox_clock(
    client: httpx.AsyncClient, cloud: SandboxCloud
) -> None:
    token = await get_token(client)
    cloud.advance_clock(86_400)
    r = await upload(client, token, body(101, 5, [1.0], ts=cloud.now_ms()))
    assert r.status_code == 401


async def test_404_messages(client: httpx.AsyncClient) -> None:
    token = await get_token(client)
    r = await upload(client, token, body(999, 5, [1.0]))
    assert r.status_code == 404
    assert message(r) == (
        "Device with identifier 999 is not found or belong to another organization."
    )
    r = await upload(client, token, body(101, 77, [1.0]))
    assert r.status_code == 404
    assert message(r) == "Data stream with identifier 77 is not found!"


@pytest.mark.parametrize(
    ("stream", "good", "bad"),
    [
        (5, 1, True),
        (5, 2.5, "3"),
        (6, "é" * 512, "x" * 1025),
        (7, 2**31 - 1, 2**31),
        (7, -(2**31), 1.0),
        (8, False, 0),
        (9, [1, 2.5], [1, 2, 3]),
    ],
)
async def test_type_validation_rejects_whole_request(
    client: httpx.AsyncClient, cloud: SandboxCloud, stream: int, good: object, bad: object
) -> None:
    token = await get_token(client)
    r = await upload(client, token, body(101, stream, [good, bad]))
    assert r.status_code == 400
    assert message(r).startswith("Invalid value ")
    assert message(r).endswith(f" at index 1 for data stream {stream}.")
    assert cloud.accepted == []
    assert (await upload(client, token, body(101, stream, [good]))).status_code == 204


async def test_invalid_value_message_uses_repr(client: httpx.AsyncClient) -> None:
    r = await upload(client, await get_token(client), body(101, 5, ["abc"]))
    assert message(r) == "Invalid value 'abc' at index 0 for data stream 5."


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        ([1, 2], "expected a JSON object"),
        ({"deviceId": "101", "dataStreamId": 5, "values": [{"value": 1, "ts": 1}]}, "deviceId"),
        ({"deviceId": 101, "dataStreamId": 5, "values": []}, "non-empty list"),
        ({"deviceId": 101, "dataStreamId": 5, "values": [{"value": 1, "ts": 1.5}]}, "ts"),
        ({"deviceId": 101, "dataStreamId": 5, "values": [7]}, "object"),
    ],
)
async def test_malformed_body(client: httpx.AsyncClient, payload: object, detail: str) -> None:
    r = await upload(client, await get_token(client), payload)
    assert r.status_code == 400
    assert message(r).startswith("Malformed request body: ") and detail in message(r)


async def test_not_json_and_too_large(client: httpx.AsyncClient, cloud: SandboxCloud) -> None:
    headers = {"Authorization": f"Bearer {await get_token(client)}"}
    r = await client.post(IMPORT_PATH, content=b"{nope", headers=headers)
    assert r.status_code == 400 and message(r).startswith("Malformed request body: ")
    big = body(101, 6, ["x" * 1000] * (MAX_REQUEST_BYTES // 1000))
    r = await client.post(IMPORT_PATH, json=big, headers=headers)
    assert r.status_code == 413 and message(r) == "Request is too large."
    assert cloud.accepted == []


async def test_timestamps_too_old_and_future(
    client: httpx.AsyncClient, cloud: SandboxCloud
) -> None:
    token = await get_token(client)
    now = cloud.now_ms()
    old = now - 31 * 86_400_000
    payload = {
        "deviceId": 101,
        "dataStreamId": 5,
        "values": [{"value": 1, "ts": now}, {"value": 2, "ts": old}],
    }
    r = await upload(client, token, payload)
    assert r.status_code == 400
    assert message(r) == f"Timestamp {old} at index 1 is older than 30 days."
    future = now + 2 * 86_400_000
    r = await upload(client, token, body(101, 5, [1], ts=future))
    assert r.status_code == 400 and message(r) == f"Timestamp {future} at index 0 is in the future."
    assert cloud.accepted == []


async def test_daily_quota_all_or_nothing(client: httpx.AsyncClient, cloud: SandboxCloud) -> None:
    token = await get_token(client)
    cloud.precount(101, 4)  # the device uploaded 4 points itself today (limit is 10)
    assert (await upload(client, token, body(101, 5, [1.0] * 5))).status_code == 204
    r = await upload(client, token, body(101, 5, [2.0] * 2))
    assert r.status_code == 400
    assert message(r) == "Device 101 has exceeded the daily limit of 10 points."
    assert cloud.accepted_count(101) == 5  # nothing of the refused request was stored
    assert (await upload(client, token, body(102, 1, [1.0] * 10))).status_code == 204  # per device
    assert (await upload(client, token, body(101, 5, [3.0]))).status_code == 204  # exactly 10

    # The next UTC day resets the counter.
    today = cloud.today()
    midnight = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), dt.UTC)
    cloud.advance_clock(midnight.timestamp() - cloud.now_ms() / 1000 + 1)
    assert cloud.today() == today + dt.timedelta(days=1)
    r = await upload(client, token, body(101, 5, [4.0] * 10, ts=cloud.now_ms()))
    assert r.status_code == 204
    assert cloud.quota_used(101, today) == 10 and cloud.quota_used(101) == 10


async def test_redirect_308(client: httpx.AsyncClient, cloud: SandboxCloud) -> None:
    cloud.set_redirect("https://fra1.blynk.cloud")
    r = await upload(client, await get_token(client), body(101, 5, [1.0]))
    assert r.status_code == 308
    assert r.headers["Location"] == "https://fra1.blynk.cloud" + IMPORT_PATH
    assert message(r) == "Wrong region. Use https://fra1.blynk.cloud"
    assert cloud.requests[-1].status == 308 and cloud.requests[-1].device_id == 101


# --------------------------------------------------------------------------- faults
async def test_fault_down_refuses_then_same_port(
    client: httpx.AsyncClient, cloud: SandboxCloud
) -> None:
    token = await get_token(client)  # leaves a keep-alive connection in the pool
    port = cloud.port
    await cloud.set_fault("down")
    with pytest.raises(httpx.ConnectError):
        await upload(client, token, body(101, 5, [1.0]))
    with pytest.raises(httpx.ConnectError):
        await get_token(client)
    await cloud.set_fault("none")
    assert cloud.port == port
    assert (await upload(client, token, body(101, 5, [1.0]))).status_code == 204


@pytest.mark.parametrize(
    ("mode", "status", "msg"),
    [
        ("error500", 500, "Internal server error"),
        ("rate_limit", 429, "Too many requests"),
        ("unauthorized", 401, "Invalid token."),
    ],
)
async def test_fault_status_with_count_clears_itself(
    client: httpx.AsyncClient, cloud: SandboxCloud, mode: str, status: int, msg: str
) -> None:
    token = await get_token(client)
    await cloud.set_fault(mode, count=2)
    for _ in range(2):
        r = await upload(client, token, body(101, 5, [1.0]))
        assert r.status_code == status and message(r) == msg
        assert "Retry-After" not in r.headers
    assert cloud.fault == "none"
    assert (await upload(client, token, body(101, 5, [1.0]))).status_code == 204
    assert [rec.status for rec in cloud.requests] == [status, status, 204]
    assert cloud.requests[0] == RequestRecord(status, 101, 5, 1, msg)


async def test_fault_rate_limit_retry_after(client: httpx.AsyncClient, cloud: SandboxCloud) -> None:
    token = await get_token(client)
    await cloud.set_fault("rate_limit", retry_after_s=1.2)
    for _ in range(3):  # count=None: until changed
        r = await upload(client, token, body(101, 5, [1.0]))
        assert r.status_code == 429 and r.headers["Retry-After"] == "2"
    r = await client.post("/oauth2/token", params={"grant_type": "client_credentials"}, auth=AUTH)
    assert r.status_code == 200  # token requests are not faulted


async def test_fault_slow_times_out_but_still_stores(
    client: httpx.AsyncClient, cloud: SandboxCloud
) -> None:
    token = await get_token(client)
    await cloud.set_fault("slow", delay_s=0.3, count=1)
    with pytest.raises(httpx.TimeoutException):
        await upload(client, token, body(101, 5, [1.0]), timeout=0.05)
    # The cloud finished the request after the client gave up: the classic duplicate source.
    for _ in range(50):
        if cloud.accepted_count():
            break
        await asyncio.sleep(0.02)
    assert cloud.accepted_count() == 1
    assert (await upload(client, token, body(101, 5, [2.0]))).status_code == 204


async def test_fault_reset(client: httpx.AsyncClient, cloud: SandboxCloud) -> None:
    token = await get_token(client)
    await cloud.set_fault("reset", count=1)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        await upload(client, token, body(101, 5, [1.0]))
    assert cloud.requests[-1].status == STATUS_RESET and cloud.accepted == []
    assert (await upload(client, token, body(101, 5, [1.0]))).status_code == 204


async def test_set_fault_rejects_nonsense(cloud: SandboxCloud) -> None:
    with pytest.raises(ValueError):
        await cloud.set_fault("explode")
    with pytest.raises(ValueError):
        await cloud.set_fault("down", count=1)
    with pytest.raises(ValueError):
        await cloud.set_fault("error500", count=0)


# --------------------------------------------------------------------------- admin API
async def test_admin_endpoints(client: httpx.AsyncClient, cloud: SandboxCloud) -> None:
    token = await get_token(client)
    assert (await upload(client, token, body(101, 5, [1.0, 2.0]))).status_code == 204
    assert (await upload(client, token, body(102, 1, [3.0]))).status_code == 204
    assert (await upload(client, token, body(999, 1, [3.0]))).status_code == 404

    r = await client.post("/_sandbox/fault", json={"mode": "rate_limit", "count": 1})
    assert r.status_code == 200 and r.json() == {"fault": "rate_limit"}
    assert (await upload(client, token, body(101, 5, [1.0]))).status_code == 429
    state = (await client.get("/_sandbox/state")).json()
    assert state["accepted_total"] == 3
    assert state["accepted_per_device"] == {"101": 2, "102": 1}
    assert state["requests_total"] == 4
    assert state["refused"] == {"404": 1, "429": 1}
    assert state["fault"] == "none"

    points = (await client.get("/_sandbox/points", params={"device_id": 102})).json()
    assert [(p["device_id"], p["datastream_id"], p["value"]) for p in points] == [(102, 1, 3.0)]
    assert len((await client.get("/_sandbox/points")).json()) == 3

    before = cloud.now_ms()
    r = await client.post("/_sandbox/clock", json={"advance_s": 3600})
    assert r.json()["now_ms"] >= before + 3_600_000
    assert (await client.post("/_sandbox/fault", json={"mode": "bogus"})).status_code == 400

    await client.post("/_sandbox/revoke")
    assert (await upload(client, token, body(101, 5, [1.0]))).status_code == 401
    r = await client.post("/_sandbox/precount", json={"device_id": 555, "n": 5})
    assert r.json() == {"used_today": 5}


async def test_admin_down_answers_before_closing(
    client: httpx.AsyncClient, cloud: SandboxCloud
) -> None:
    r = await client.post("/_sandbox/fault", json={"mode": "down"})
    assert r.status_code == 200 and r.json() == {"fault": "down"}
    with pytest.raises(httpx.ConnectError):
        await client.get("/_sandbox/state")
    await cloud.set_fault("none")
    assert (await client.get("/_sandbox/state")).json()["fault"] == "none"


# --------------------------------------------------------------------------- thread / CLI
def test_sandbox_thread_from_sync_code() -> None:
    thread = SandboxThread(SandboxCloud(DEVICES))
    url = thread.start()
    try:
        with httpx.Client(base_url=url, timeout=5) as c:
            r = c.post("/oauth2/token", params={"grant_type": "client_credentials"}, auth=AUTH)
            headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
            assert c.post(IMPORT_PATH, json=body(101, 5, [1.0]), headers=headers).status_code == 204
            assert thread.call(lambda cl: cl.accepted_count(101)) == 1
            thread.call(lambda cl: cl.set_fault("down"))  # a coroutine: awaited on the loop
            with pytest.raises(httpx.ConnectError):
                c.get("/_sandbox/state")
            thread.call(lambda cl: cl.set_fault("none"))
            assert c.get("/_sandbox/state").json()["accepted_total"] == 1
    finally:
        thread.stop()
    with pytest.raises(RuntimeError):
        thread.call(lambda cl: cl.fault)


def test_parse_devices() -> None:
    assert parse_devices("101:5=double,6=String;102:1; 103") == {
        101: {5: "double", 6: "string"},
        102: {1: "double"},
        103: {},
    }
    for bad in ("x:1", "101:1=float", "101:a", "1:1;1:2"):
        with pytest.raises(ValueError):
            parse_devices(bad)


def test_cli_serves_and_exits_on_sigterm() -> None:
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "gateway", "sandbox", "--devices", "101:5", "--port", "0"]
    with subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line.startswith("sandbox_listening url=http://127.0.0.1:")
            url = line.split("url=", 1)[1]
            state = json.loads(httpx.get(url + "/_sandbox/state", timeout=5).text)
            assert state["accepted_total"] == 0
        finally:
            proc.terminate()
        assert proc.wait(timeout=10) == 0
