"""The Blynk cloud client against the real sandbox over HTTP on 127.0.0.1.

httpx.MockTransport is used only for answers the sandbox cannot give (HTTP-date Retry-After,
non-JSON error bodies, broken token responses, a broken Content-Encoding).
"""

from __future__ import annotations

import base64
import email.utils
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from gateway.errors import (
    AuthFailed,
    BatchRejected,
    CloudError,
    CloudServerError,
    CloudUnreachable,
    PermanentCloudError,
    QuotaRefused,
    RateLimited,
    RetryableCloudError,
    UnknownTarget,
    WrongRegion,
)
from gateway.ingest import encode_value
from gateway.models import Batch, Point, StreamKey
from gateway.testing.sandbox import STATUS_RESET, AcceptedPoint, SandboxCloud
from gateway.uplink.cloud import IMPORT_PATH, TOKEN_PATH, BlynkCloud, build_body, parse_retry_after

DEVICES = {
    101: {5: "double", 6: "string", 7: "integer", 8: "boolean", 9: "location"},
    102: {1: "double"},
}
CLIENT_ID = "sandbox-client"
CLIENT_SECRET = "sandbox-secret"

CloudFactory = Callable[..., Any]


def now_ms() -> int:
    return int(time.time() * 1000)


def batch(device: int, stream: int, values: list[Any], ts: int | None = None) -> Batch:
    base = now_ms() - 60_000 if ts is None else ts
    points = tuple(
        Point(ts_ms=base + i * 1000, value_json=encode_value(v)) for i, v in enumerate(values)
    )
    return Batch(StreamKey(device, stream), points)


def accepted(b: Batch, values: list[Any]) -> list[AcceptedPoint]:
    return [
        AcceptedPoint(b.stream.device_id, b.stream.datastream_id, p.ts_ms, v)
        for p, v in zip(b.points, values, strict=True)
    ]


@pytest.fixture
async def start_sandbox() -> AsyncIterator[Callable[..., Any]]:
    """`await start_sandbox(**kwargs)` → a started SandboxCloud; all are stopped at teardown."""
    clouds: list[SandboxCloud] = []

    async def start(**kwargs: Any) -> SandboxCloud:
        cloud = SandboxCloud(DEVICES, **kwargs)
        clouds.append(cloud)
        await cloud.start()
        return cloud

    yield start
    for cloud in clouds:
        await cloud.stop()


@pytest.fixture
async def sandbox(start_sandbox: Callable[..., Any]) -> SandboxCloud:
    cloud: SandboxCloud = await start_sandbox()
    return cloud


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., BlynkCloud]]:
    """`make_client(server, **kwargs)` → BlynkCloud; every client is closed at teardown."""
    clients: list[BlynkCloud] = []

    def make(
        server: str,
        client_id: str = CLIENT_ID,
        client_secret: str = CLIENT_SECRET,
        **kwargs: Any,
    ) -> BlynkCloud:
        kwargs.setdefault("timeout_s", 5.0)
        client = BlynkCloud(server, client_id, client_secret, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
def client(sandbox: SandboxCloud, make_client: Callable[..., BlynkCloud]) -> BlynkCloud:
    return make_client(sandbox.base_url)


# --------------------------------------------------------------------------- success
async def test_upload_204_records_exact_points(client: BlynkCloud, sandbox: SandboxCloud) -> None:
    doubles = [21.5, -3, 0.1 + 0.2, 1e-7, 123456789.125]
    strings = ['say "hi"', "Zürich ✓ 😀", "back\\slash\nnewline\ttab", "", "x" * 1024]
    booleans = [True, False]
    locations = [[24.1052, 56.9496], [-180, -90]]
    integers = [0, -(2**31), 2**31 - 1]
    uploads: list[tuple[Batch, list[Any]]] = [
        (batch(101, 5, doubles), doubles),
        (batch(101, 6, strings), strings),
        (batch(101, 8, booleans), booleans),
        (batch(101, 9, locations), locations),
        (batch(101, 7, integers), integers),
        (batch(102, 1, [7.25], ts=now_ms() - 5 * 86_400_000), [7.25]),
    ]
    expected: list[AcceptedPoint] = []
    for b, values in uploads:
        await client.upload(b)
        expected += accepted(b, values)
    assert sandbox.accepted == expected
    # Types survive too (== would let True pass for 1 and 1.0 for 1).
    assert [type(p.value) for p in sandbox.accepted] == [type(p.value) for p in expected]
    assert [r.status for r in sandbox.requests] == [204] * len(uploads)
    assert [(r.device_id, r.datastream_id, r.n_values) for r in sandbox.requests] == [
        (b.stream.device_id, b.stream.datastream_id, len(b)) for b, _ in uploads
    ]


async def test_token_is_cached(client: BlynkCloud, sandbox: SandboxCloud) -> None:
    for value in range(5):
        await client.upload(batch(101, 5, [value]))
    assert sandbox.token_requests == 1
    assert client.token_renewals == 1
    assert len(sandbox.accepted) == 5


async def test_revoked_token_is_renewed_and_upload_succeeds(
    client: BlynkCloud, sandbox: SandboxCloud
) -> None:
    await client.upload(batch(101, 5, [1.0]))
    await client.upload(batch(101, 5, [2.0]))
    assert sandbox.token_requests == 1
    sandbox.revoke_tokens()
    await client.upload(batch(101, 5, [3.0]))
    assert sandbox.token_requests == 2
    assert [r.status for r in sandbox.requests] == [204, 204, 401, 204]
    assert [p.value for p in sandbox.accepted] == [1.0, 2.0, 3.0]


async def test_token_renewed_ahead_of_expiry(
    start_sandbox: Callable[..., Any], make_client: Callable[..., BlynkCloud]
) -> None:
    sandbox: SandboxCloud = await start_sandbox(token_ttl_s=60)
    clock = [1000.0]
    client = make_client(sandbox.base_url, monotonic=lambda: clock[0])
    await client.upload(batch(101, 5, [1.0]))
    clock[0] += 30
    sandbox.advance_clock(30)
    await client.upload(batch(101, 5, [2.0]))
    assert sandbox.token_requests == 1
    # 55 s into a 60 s token: still valid for the cloud, but the client renews first.
    clock[0] += 25
    sandbox.advance_clock(25)
    await client.upload(batch(101, 5, [3.0]))
    assert sandbox.token_requests == 2
    assert 401 not in [r.status for r in sandbox.requests]
    assert [p.value for p in sandbox.accepted] == [1.0, 2.0, 3.0]


async def test_token_expired_server_side_is_renewed_once(
    start_sandbox: Callable[..., Any], make_client: Callable[..., BlynkCloud]
) -> None:
    """If the cloud expires the token early (clock skew), a 401 leads to one renewal."""
    sandbox: SandboxCloud = await start_sandbox(token_ttl_s=60)
    client = make_client(sandbox.base_url, monotonic=lambda: 0.0)
    await client.upload(batch(101, 5, [1.0]))
    sandbox.advance_clock(61)
    await client.upload(batch(101, 5, [2.0]))
    assert sandbox.token_requests == 2
    assert [r.status for r in sandbox.requests] == [204, 401, 204]


# --------------------------------------------------------------------------- authentication
async def test_wrong_client_secret(
    sandbox: SandboxCloud, make_client: Callable[..., BlynkCloud]
) -> None:
    secret = "Wr0ng-Secr3t-Value"
    client = make_client(sandbox.base_url, client_secret=secret)
    with pytest.raises(AuthFailed) as info:
        await client.upload(batch(101, 5, [1.0]))
    exc = info.value
    assert isinstance(exc, RetryableCloudError)
    assert exc.status == 400
    assert "Client ID is not found or password is wrong." in str(exc)
    assert secret not in str(exc)
    assert secret not in repr(exc.args)
    assert sandbox.token_requests == 1
    assert sandbox.requests == []  # no import without a token
    assert sandbox.accepted == []


async def test_two_401_in_a_row_is_auth_failed(client: BlynkCloud, sandbox: SandboxCloud) -> None:
    await sandbox.set_fault("unauthorized", count=2)
    with pytest.raises(AuthFailed) as info:
        await client.upload(batch(101, 5, [1.0]))
    assert info.value.status == 401
    assert "Invalid token." in str(info.value)
    assert sandbox.token_requests == 2  # the first token and exactly one renewal
    assert [r.status for r in sandbox.requests] == [401, 401]
    # The refused token is dropped: the next upload asks for a fresh one.
    await client.upload(batch(101, 5, [2.0]))
    assert sandbox.token_requests == 3
    assert [p.value for p in sandbox.accepted] == [2.0]


async def test_one_401_then_success_after_renewal(
    client: BlynkCloud, sandbox: SandboxCloud
) -> None:
    await sandbox.set_fault("unauthorized", count=1)
    b = batch(101, 5, [4.5])
    await client.upload(b)
    assert sandbox.token_requests == 2
    assert [r.status for r in sandbox.requests] == [401, 204]
    assert sandbox.accepted == accepted(b, [4.5])


# --------------------------------------------------------------------------- retryable
async def test_500_is_cloud_server_error(client: BlynkCloud, sandbox: SandboxCloud) -> None:
    await sandbox.set_fault("error500", count=1)
    with pytest.raises(CloudServerError) as info:
        await client.upload(batch(101, 5, [1.0]))
    assert isinstance(info.value, RetryableCloudError)
    assert info.value.status == 500
    assert info.value.retry_after_s is None
    assert "Internal server error" in str(info.value)
    await client.upload(batch(101, 5, [2.0]))  # the fault was for one request only
    assert [p.value for p in sandbox.accepted] == [2.0]


async def test_429_is_rate_limited_with_retry_after(
    client: BlynkCloud, sandbox: SandboxCloud
) -> None:
    await sandbox.set_fault("rate_limit", count=1, retry_after_s=7)
    with pytest.raises(RateLimited) as info:
        await client.upload(batch(101, 5, [1.0]))
    assert isinstance(info.value, RetryableCloudError)
    assert info.value.status == 429
    assert info.value.retry_after_s == 7


async def test_429_without_retry_after(client: BlynkCloud, sandbox: SandboxCloud) -> None:
    await sandbox.set_fault("rate_limit", count=1)
    with pytest.raises(RateLimited) as info:
        await client.upload(batch(101, 5, [1.0]))
    assert info.value.retry_after_s is None


async def test_slow_cloud_times_out(
    sandbox: SandboxCloud, make_client: Callable[..., BlynkCloud]
) -> None:
    client = make_client(sandbox.base_url, timeout_s=0.3)
    await client.access_token()  # the token endpoint is not slowed
    await sandbox.set_fault("slow", count=1, delay_s=5.0)
    started = time.monotonic()
    with pytest.raises(CloudUnreachable) as info:
        await client.upload(batch(101, 5, [1.0]))
    assert time.monotonic() - started < 3.0
    assert "timeout" in str(info.value).lower()
    assert isinstance(info.value, RetryableCloudError)


async def test_connection_reset_is_unreachable(client: BlynkCloud, sandbox: SandboxCloud) -> None:
    await sandbox.set_fault("reset", count=1)
    with pytest.raises(CloudUnreachable):
        await client.upload(batch(101, 5, [1.0]))
    assert [r.status for r in sandbox.requests] == [STATUS_RESET]
    await client.upload(batch(101, 5, [2.0]))  # the client recovers on a new connection
    assert [p.value for p in sandbox.accepted] == [2.0]


async def test_cloud_down_is_unreachable(client: BlynkCloud, sandbox: SandboxCloud) -> None:
    await client.upload(batch(101, 5, [1.0]))  # a pooled keep-alive connection exists
    await sandbox.set_fault("down")
    with pytest.raises(CloudUnreachable) as info:
        await client.upload(batch(101, 5, [2.0]))
    assert sandbox.base_url in str(info.value)
    await sandbox.set_fault("none")
    await client.upload(batch(101, 5, [3.0]))
    assert [p.value for p in sandbox.accepted] == [1.0, 3.0]


async def test_down_before_first_token(client: BlynkCloud, sandbox: SandboxCloud) -> None:
    await sandbox.set_fault("down")
    with pytest.raises(CloudUnreachable):
        await client.upload(batch(101, 5, [1.0]))
    assert sandbox.token_requests == 0


# --------------------------------------------------------------------------- permanent
async def test_unknown_device(client: BlynkCloud, sandbox: SandboxCloud) -> None:
    with pytest.raises(UnknownTarget) as info:
        await client.upload(batch(999, 5, [1.0]))
    assert info.value.kind == "device"
    assert info.value.status == 404
    assert info.value.message == (
        "Device with identifier 999 is not found or belong to another organization."
    )
    assert isinstance(info.value, PermanentCloudError)


async def test_unknown_datastream(client: BlynkCloud, sandbox: SandboxCloud) -> None:
    with pytest.raises(UnknownTarget) as info:
        await client.upload(batch(101, 77, [1.0]))
    assert info.value.kind == "datastream"
    assert info.value.message == "Data stream with identifier 77 is not found!"


async def test_type_invalid_value_is_batch_rejected(
    client: BlynkCloud, sandbox: SandboxCloud
) -> None:
    with pytest.raises(BatchRejected) as info:
        await client.upload(batch(101, 5, [1.0, "not a number"]))
    assert info.value.status == 400
    assert info.value.message == "Invalid value 'not a number' at index 1 for data stream 5."
    assert sandbox.accepted == []  # all or nothing


async def test_over_quota_is_quota_refused(
    start_sandbox: Callable[..., Any], make_client: Callable[..., BlynkCloud]
) -> None:
    sandbox: SandboxCloud = await start_sandbox(daily_points_limit=5)
    client = make_client(sandbox.base_url)
    with pytest.raises(QuotaRefused) as info:
        await client.upload(batch(101, 5, [1, 2, 3, 4, 5, 6]))
    assert isinstance(info.value, PermanentCloudError)
    assert not isinstance(info.value, BatchRejected)
    assert info.value.status == 400
    assert "daily limit of 5 points" in info.value.message
    await client.upload(batch(101, 5, [1, 2, 3, 4, 5]))  # exactly the limit is fine
    assert len(sandbox.accepted) == 5


async def test_too_old_timestamp_is_batch_rejected(
    client: BlynkCloud, sandbox: SandboxCloud
) -> None:
    with pytest.raises(BatchRejected) as info:
        await client.upload(batch(101, 5, [1.0], ts=now_ms() - 31 * 86_400_000))
    assert not isinstance(info.value, QuotaRefused)
    assert "older than 30 days" in info.value.message


async def test_308_is_wrong_region_and_not_followed(
    client: BlynkCloud, sandbox: SandboxCloud
) -> None:
    sandbox.set_redirect("https://lon1.blynk.cloud")
    with pytest.raises(WrongRegion) as info:
        await client.upload(batch(101, 5, [1.0]))
    exc = info.value
    assert isinstance(exc, PermanentCloudError)
    assert exc.status == 308
    assert "lon1.blynk.cloud" in str(exc)
    assert "https://lon1.blynk.cloud" in str(exc)
    assert exc.location == "https://lon1.blynk.cloud" + IMPORT_PATH
    # Not followed: had httpx followed it, the error would be a network one to lon1.
    assert [r.status for r in sandbox.requests] == [308]
    assert sandbox.accepted == []


# --------------------------------------------------------------------------- wire format (mock)
def mock_client(
    make_client: Callable[..., BlynkCloud],
    handler: Callable[[httpx.Request], httpx.Response],
    seen: list[httpx.Request] | None = None,
    **kwargs: Any,
) -> BlynkCloud:
    def record(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return handler(request)

    return make_client("https://fra1.blynk.cloud", transport=httpx.MockTransport(record), **kwargs)


def token_ok(request: httpx.Request) -> httpx.Response | None:
    if request.url.path == TOKEN_PATH:
        return httpx.Response(200, json={"access_token": "tok-1", "expires_in": 3600})
    return None


async def test_request_shape(make_client: Callable[..., BlynkCloud]) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        return token_ok(request) or httpx.Response(204)

    client = mock_client(make_client, handler, seen)
    b = batch(101, 5, [21.5, "x"])
    await client.upload(b)
    token_request, import_request = seen
    assert token_request.method == "POST"
    assert token_request.url.path == TOKEN_PATH
    assert token_request.url.params["grant_type"] == "client_credentials"
    basic = token_request.headers["Authorization"].removeprefix("Basic ")
    user, _, password = base64.b64decode(basic).decode().partition(":")
    assert (user, password) == (CLIENT_ID, CLIENT_SECRET)
    assert import_request.method == "POST"
    assert str(import_request.url) == "https://fra1.blynk.cloud" + IMPORT_PATH
    assert import_request.headers["Authorization"] == "Bearer tok-1"
    assert import_request.headers["Content-Type"] == "application/json"
    assert json.loads(import_request.content) == {
        "deviceId": 101,
        "dataStreamId": 5,
        "values": [
            {"value": 21.5, "ts": b.points[0].ts_ms},
            {"value": "x", "ts": b.points[1].ts_ms},
        ],
    }


async def test_redirect_to_other_host_never_requested(
    make_client: Callable[..., BlynkCloud],
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host != "fra1.blynk.cloud":
            return httpx.Response(204)
        return token_ok(request) or httpx.Response(
            308, headers={"Location": "https://ny3.blynk.cloud" + IMPORT_PATH}
        )

    client = mock_client(make_client, handler, seen)
    with pytest.raises(WrongRegion, match=r"ny3\.blynk\.cloud") as info:
        await client.upload(batch(101, 5, [1.0]))
    assert info.value.location == "https://ny3.blynk.cloud" + IMPORT_PATH
    assert {r.url.host for r in seen} == {"fra1.blynk.cloud"}
    assert len(seen) == 2  # token + one import


async def test_503_with_http_date_retry_after(make_client: Callable[..., BlynkCloud]) -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)

    def handler(request: httpx.Request) -> httpx.Response:
        return token_ok(request) or httpx.Response(
            503, headers={"Retry-After": when}, text="Service Unavailable"
        )

    client = mock_client(make_client, handler)
    with pytest.raises(CloudServerError) as info:
        await client.upload(batch(101, 5, [1.0]))
    assert info.value.status == 503
    assert info.value.retry_after_s is not None
    assert 100 <= info.value.retry_after_s <= 121


@pytest.mark.parametrize(
    ("status", "body", "kind", "text"),
    [
        (502, "<html><body>Bad Gateway</body></html>", CloudServerError, "Bad Gateway"),
        (400, "bad things happened", BatchRejected, "bad things happened"),
        (400, "", BatchRejected, "Bad Request"),
        (422, '{"error": "invalid_value", "error_description": "nope"}', BatchRejected, "nope"),
        (400, '["unexpected", "shape"]', BatchRejected, "unexpected"),
        (403, "Forbidden", AuthFailed, "Forbidden"),
        (429, "<html>slow down</html>", RateLimited, "slow down"),
    ],
)
async def test_non_json_or_odd_error_bodies(
    make_client: Callable[..., BlynkCloud],
    status: int,
    body: str,
    kind: type[CloudError],
    text: str,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return token_ok(request) or httpx.Response(status, text=body)

    client = mock_client(make_client, handler)
    with pytest.raises(kind) as info:
        await client.upload(batch(101, 5, [1.0]))
    assert text in str(info.value)
    assert info.value.status == status


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, json={"token_type": "Bearer", "expires_in": 60}),
        httpx.Response(200, text="<html>captive portal</html>"),
        httpx.Response(200, json=["access_token"]),
        httpx.Response(200, json={"access_token": "t", "expires_in": "soon"}),
    ],
)
async def test_token_200_without_usable_token(
    make_client: Callable[..., BlynkCloud], response: httpx.Response
) -> None:
    seen: list[httpx.Request] = []
    client = mock_client(make_client, lambda request: response, seen)
    with pytest.raises(CloudServerError) as info:
        await client.upload(batch(101, 5, [1.0]))
    assert info.value.status == 200
    assert [r.url.path for r in seen] == [TOKEN_PATH]  # no import without a token


@pytest.mark.parametrize(
    ("response", "kind"),
    [
        (httpx.Response(503, text="maintenance"), CloudServerError),
        (httpx.Response(429, headers={"Retry-After": "30"}), RateLimited),
        (httpx.Response(401, json={"error": "invalid_client"}), AuthFailed),
        (
            httpx.Response(308, headers={"Location": "https://sgp1.blynk.cloud/oauth2/token"}),
            WrongRegion,
        ),
    ],
)
async def test_token_endpoint_failures_classified(
    make_client: Callable[..., BlynkCloud], response: httpx.Response, kind: type[CloudError]
) -> None:
    client = mock_client(make_client, lambda request: response)
    with pytest.raises(kind) as info:
        await client.access_token()
    if isinstance(info.value, RateLimited):
        assert info.value.retry_after_s == 30


async def test_token_lifetime_from_expires_in(make_client: Callable[..., BlynkCloud]) -> None:
    issued = []

    def handler(request: httpx.Request) -> httpx.Response:
        issued.append(request)
        return httpx.Response(200, json={"access_token": f"t{len(issued)}", "expires_in": 100})

    clock = [0.0]
    client = mock_client(make_client, handler, monotonic=lambda: clock[0])
    assert await client.access_token() == "t1"
    clock[0] = 89.9  # renewal margin is 10 % of the lifetime
    assert await client.access_token() == "t1"
    clock[0] = 90.0
    assert await client.access_token() == "t2"
    assert len(issued) == 2


async def test_oversized_batch_refused_without_sending(
    make_client: Callable[..., BlynkCloud],
) -> None:
    seen: list[httpx.Request] = []
    client = mock_client(make_client, lambda r: token_ok(r) or httpx.Response(204), seen)
    big = batch(101, 6, ["x" * 1024] * 2000)
    with pytest.raises(BatchRejected) as info:
        await client.upload(big)
    assert info.value.status == 413
    assert [r.url.path for r in seen if r.url.path == IMPORT_PATH] == []


async def test_broken_response_encoding_is_a_cloud_error(
    make_client: Callable[..., BlynkCloud],
) -> None:
    """ "httpx's own exceptions never escape this module" — not even a body that fails to decode.

    A proxy answering with `Content-Encoding: gzip` and a non-gzip body makes httpx raise
    `DecodingError`, which is a RequestError but not a TransportError.
    """

    def handler(request: httpx.Request) -> httpx.Response:
        return token_ok(request) or httpx.Response(
            502, headers={"Content-Encoding": "gzip"}, content=b"definitely not gzip"
        )

    client = mock_client(make_client, handler)
    with pytest.raises(CloudError):
        await client.upload(batch(101, 5, [1.0]))


# --------------------------------------------------------------------------- helpers
def test_build_body_shape() -> None:
    b = Batch(
        StreamKey(101, 5),
        (
            Point(1_702_656_423_136, "21.5"),
            Point(1_702_656_428_136, '"Zürich \\"q\\""'),
            Point(1_702_656_433_136, "true"),
            Point(1_702_656_438_136, "[24.1,56.9]"),
        ),
    )
    body = build_body(b)
    assert isinstance(body, bytes)
    document = json.loads(body)
    assert document == {
        "deviceId": 101,
        "dataStreamId": 5,
        "values": [
            {"value": 21.5, "ts": 1_702_656_423_136},
            {"value": 'Zürich "q"', "ts": 1_702_656_428_136},
            {"value": True, "ts": 1_702_656_433_136},
            {"value": [24.1, 56.9], "ts": 1_702_656_438_136},
        ],
    }
    assert list(document) == ["deviceId", "dataStreamId", "values"]
    assert body.decode("utf-8")  # UTF-8, not escaped ASCII only
    assert "Zürich".encode() in body


def test_build_body_matches_documented_example() -> None:
    b = Batch(StreamKey(1, 1), (Point(1702656423136, "5"), Point(1702656428136, "2")))
    documented = (
        '{"deviceId": 1, "dataStreamId": 1, "values": [{"value": 5, "ts": 1702656423136}, '
        '{"value": 2, "ts": 1702656428136}]}'
    )
    assert json.loads(build_body(b)) == json.loads(documented)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("7", 7.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("Wed, 32 Foo 2015 99:99:99 GMT", None),
    ],
)
def test_parse_retry_after_seconds_and_garbage(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


def test_parse_retry_after_http_date() -> None:
    header = "Wed, 21 Oct 2015 07:28:00 GMT"
    epoch = 1445412480.0  # 2015-10-21T07:28:00Z
    assert parse_retry_after(header, now=lambda: epoch - 90) == pytest.approx(90.0)
    assert parse_retry_after(header, now=lambda: epoch + 10) == 0.0  # in the past


def test_parse_retry_after_http_date_against_real_clock() -> None:
    header = email.utils.formatdate(time.time() + 60, usegmt=True)
    result = parse_retry_after(header)
    assert result is not None
    assert 55 <= result <= 61
