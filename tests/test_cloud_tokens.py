"""Issue 16 item 7 and its "Tokens" bullet, and a reload that keeps the access token.

The tokens the cloud hands out are secrets the moment they arrive: they join the log
scrubber, and one that could not be sent as a header (a newline, non-ASCII, control
characters, empty, not a string) is a cloud error, retried with the usual backoff, never a
crash and never echoed in the log or `status`. Through the daemon as a subprocess, fed over
a real Mosquitto, against the sandbox handing out bad tokens (`SandboxCloud.bad_tokens`).
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.errors import CloudServerError
from gateway.log import get_logger
from gateway.testing.broker import MosquittoBroker
from gateway.testing.process import GatewayProcess, write_config
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from gateway.testing.sandbox_rules import BAD_TOKEN_MARKER, BAD_TOKENS
from gateway.uplink.cloud import BlynkCloud
from harness import log_events, publish, settings_dict, ts_payload, wait_until

TOPIC = "sensors/boiler/temperature"  # device 101, datastream 5


def status_json(config: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "status", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert BAD_TOKEN_MARKER not in result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


async def token_retries(process: GatewayProcess, sandbox: SandboxCloud, kind: str) -> None:
    """Two more token requests (the gateway retried), or the daemon ended."""
    target = sandbox.token_requests + 2
    await wait_until(
        lambda: not process.running or sandbox.token_requests >= target, 20, f"retries ({kind})"
    )


async def test_malformed_tokens_are_cloud_errors_retried_never_a_crash_nor_echoed(
    make_gateway_process: Callable[..., GatewayProcess],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
) -> None:
    process = make_gateway_process()
    sandbox.bad_tokens = "non_ascii"  # from the first token on: the daemon asks at start
    process.start()
    pid = process.pid
    await asyncio.to_thread(process.wait_for_event, "mqtt_connected")
    assert await publish(publisher, [(TOPIC, ts_payload(1.5, int(time.time() * 1000)))])
    # non_ascii ended the daemon (UnicodeEncodeError); newline was echoed in went_offline.
    for kind in ["non_ascii", *(kind for kind in BAD_TOKENS if kind != "non_ascii")]:
        sandbox.bad_tokens = kind
        await token_retries(process, sandbox, kind)
        assert process.running, f"{kind!r} token: the daemon ended\n{process.tail()}"
        report = await asyncio.to_thread(status_json, process.config_path)
        last_error = report["cloud"]["last_error"]
        assert "access_token" in last_error and report["cloud"]["last_error_kind"], last_error
    assert not sandbox.accepted
    sandbox.bad_tokens = None
    await wait_until(lambda: len(sandbox.accepted) == 1, 20, "delivered with a good token")
    assert process.pid == pid and process.running
    assert await asyncio.to_thread(process.stop) == 0
    lines = "\n".join(json.dumps(event) for event in process.events())
    assert BAD_TOKEN_MARKER not in lines
    offline = [e for e in process.events() if e["event"] == "went_offline"]
    assert offline and offline[0]["kind"] == "server_error"
    assert "access_token" in offline[0]["error"]
    assert not [e for e in process.events() if "Traceback" in json.dumps(e)]


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_each_malformed_token_is_a_retryable_cloud_error(
    sandbox: SandboxCloud, kind: str
) -> None:
    sandbox.bad_tokens = kind
    client = BlynkCloud(sandbox.base_url, "sandbox-client", "sandbox-secret", timeout_s=5)
    try:
        with pytest.raises(CloudServerError) as info:
            await client.access_token()
        assert BAD_TOKEN_MARKER not in str(info.value)
        assert "access_token" in str(info.value)
        sandbox.bad_tokens = None
        assert await client.access_token()  # the next request gets a good one
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("expires_in", "lifetime_s"),
    [(10**400, None), ("soon", None), ([1], None), (float("inf"), 300), (-5, 300), (None, 300)],
)
async def test_an_odd_expires_in_is_a_cloud_error_or_a_short_lifetime(
    expires_in: object, lifetime_s: float | None
) -> None:
    body = json.dumps({"access_token": "good-token-1234", "expires_in": expires_in})

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body.encode())

    clock = [0.0]
    client = BlynkCloud(
        "http://127.0.0.1:9",
        "id",
        "secret",
        transport=httpx.MockTransport(answer),
        monotonic=lambda: clock[0],
    )
    try:
        if lifetime_s is None:
            with pytest.raises(CloudServerError, match="expires_in"):
                await client.access_token()
            return
        assert await client.access_token() == "good-token-1234"
        assert client.token_renewals == 1
        clock[0] = lifetime_s * 0.9  # renewed 10 % before the end, as for any lifetime
        await client.access_token()
        assert client.token_renewals == 2
    finally:
        await client.aclose()


async def test_tokens_join_the_scrubber_as_soon_as_they_arrive(
    sandbox: SandboxCloud, log_output: io.StringIO
) -> None:
    seen: list[dict[str, Any]] = []
    original = sandbox._issue_token

    def recording() -> Any:
        response = original()
        seen.append(json.loads(response.text or ""))
        return response

    sandbox._issue_token = recording  # type: ignore[method-assign]
    client = BlynkCloud(sandbox.base_url, "sandbox-client", "sandbox-secret", timeout_s=5)
    try:
        access = await client.access_token()
    finally:
        await client.aclose()
    refresh = seen[0]["refresh_token"]
    get_logger("test").warning("oops", detail=f"header Bearer {access}; refresh {refresh}")
    [line] = [e for e in log_events(log_output) if e["event"] == "oops"]
    assert access not in line["detail"] and refresh not in line["detail"]
    assert line["detail"] == "header Bearer ***; refresh ***"


async def test_a_reload_with_the_same_credentials_keeps_the_token(
    make_gateway_process: Callable[..., GatewayProcess],
    broker: MosquittoBroker,
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
) -> None:
    process = make_gateway_process()
    process.start()
    await asyncio.to_thread(process.wait_for_event, "mqtt_connected")
    now_ms = int(time.time() * 1000)
    assert await publish(publisher, [(TOPIC, ts_payload(1.0, now_ms))])
    await wait_until(lambda: len(sandbox.accepted) == 1, 20, "the first reading")
    assert sandbox.token_requests == 1

    async def reload(**sections: Any) -> None:
        db = process.config_path.parent / "buffer.db"
        write_config(
            process.config_path, settings_dict(broker.port, sandbox.base_url, db, **sections)
        )
        mark = process.event_count()
        process.send_signal(signal.SIGHUP)
        await asyncio.to_thread(process.wait_for_event, "config_reloaded", after=mark)

    await reload(flush={"batch_size": 500})  # the credentials unchanged
    assert await publish(publisher, [(TOPIC, ts_payload(2.0, now_ms + 1))])
    await wait_until(lambda: len(sandbox.accepted) == 2, 20, "the second reading")
    assert sandbox.token_requests == 1, "a reload without new credentials keeps the token"

    sandbox.client_secret = "rotated-secret"
    await reload(cloud={"client_secret": "rotated-secret"})
    assert await publish(publisher, [(TOPIC, ts_payload(3.0, now_ms + 2))])
    await wait_until(lambda: len(sandbox.accepted) == 3, 20, "the third reading")
    assert sandbox.token_requests == 2, "new credentials: a new token"
    assert await asyncio.to_thread(process.stop) == 0
