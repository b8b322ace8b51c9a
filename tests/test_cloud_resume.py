"""Issue #7: the age rule at send time, clock skew, fast resume after outages, the quota day.

Readings arrive the way a user's do: published over MQTT to a real Mosquitto while the
gateway runs, uploaded over HTTP to the sandbox cloud. The gateway shares the sandbox's
clock, so ageing past the cutoff or crossing midnight is time travel, not waiting.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gateway.config import CloudSettings, FlushSettings, Settings
from gateway.errors import (
    AuthFailed,
    BatchRejected,
    CloudServerError,
    CloudUnreachable,
    ConnectFailed,
    RateLimited,
    TooOld,
)
from gateway.models import Batch, Point, Reading, StreamKey
from gateway.store import Store
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from gateway.uplink.cloud import BlynkCloud, classify_failure
from gateway.uplink.flush import FlushLoop
from gateway.uplink.quota import DailyQuota
from harness import InProcessGateway, accepted_set, log_events, publish, ts_payload, wait_until

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
TOPIC = "sensors/boiler/temperature"  # device 101, datastream 5 (a Double)
# The defaults: max_age_days = 30, age_margin_hours = 6.
SENDABLE_AGE_MS = 30 * DAY_MS - 6 * HOUR_MS


def refused_for_age(sandbox: SandboxCloud) -> int:
    return sum(1 for r in sandbox.requests if r.message and "older than" in r.message)


def interleaved(old_ts: list[int], fresh_ts: list[int]) -> list[tuple[str, str]]:
    """Old and fresh readings alternating, values telling them apart (old ones negative)."""
    messages = []
    for i, (old, fresh) in enumerate(zip(old_ts, fresh_ts, strict=True)):
        messages.append((TOPIC, ts_payload(-(i + 1), old)))
        messages.append((TOPIC, ts_payload(i + 1, fresh)))
    return messages


async def expired_letters(store: Store) -> set[int]:
    return {letter.ts_ms or 0 for letter in await store.dead_letters(1000, reason="expired")}


# --------------------------------------------------------------------------- age at send


async def test_readings_ageing_past_the_cutoff_while_buffered_are_not_sent(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    """Young enough when they arrive, too old by the time the flush loop sends them."""
    # linger_s: the pass that follows new readings waits, so the clock can move first.
    settings = make_settings(flush={"linger_s": 3.0, "interval_s": 60.0})
    async with InProcessGateway(settings, clock_ms=sandbox.now_ms) as gateway:
        assert gateway.store is not None
        now = sandbox.now_ms()
        almost_old = [now - SENDABLE_AGE_MS + 30_000 + i for i in range(100)]
        fresh = [now - HOUR_MS + i for i in range(100)]
        assert await publish(publisher, interleaved(almost_old, fresh)) == 200
        await wait_until(lambda: gateway.store is not None and gateway.store.pending_points == 200)
        assert not sandbox.requests, "the linger must hold the pass back (test setup)"
        sandbox.advance_clock(60)  # the almost-old ones are now past the cutoff
        await wait_until(lambda: len(sandbox.accepted) == 100, 20, "fresh readings delivered")
        await wait_until(lambda: gateway.store is not None and gateway.store.pending_points == 0)
        assert await expired_letters(gateway.store) == set(almost_old)
    assert refused_for_age(sandbox) == 0
    assert accepted_set(sandbox) == {(101, 5, ts, i + 1) for i, ts in enumerate(fresh)}
    expired = [e for e in log_events(log_output) if e["event"] == "readings_expired"]
    assert [(e["count"], e["found_by"]) for e in expired] == [(100, "send")]


async def test_readings_already_too_old_on_arrival_cost_no_request(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
) -> None:
    """The issue's scenario: 31-day-old readings published while the gateway runs."""
    async with InProcessGateway(make_settings(), clock_ms=sandbox.now_ms) as gateway:
        assert gateway.store is not None
        now = sandbox.now_ms()
        old = [now - 31 * DAY_MS + i for i in range(100)]
        fresh = [now - HOUR_MS + i for i in range(100)]
        assert await publish(publisher, interleaved(old, fresh)) == 200
        await wait_until(lambda: len(sandbox.accepted) == 100, 20, "fresh readings delivered")
        await wait_until(lambda: gateway.store is not None and gateway.store.pending_points == 0)
        assert await expired_letters(gateway.store) == set(old)
    assert refused_for_age(sandbox) == 0
    assert accepted_set(sandbox) == {(101, 5, ts, i + 1) for i, ts in enumerate(fresh)}


async def test_final_flush_applies_the_age_rule(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    tmp_path: Path,
) -> None:
    """Readings that age past the cutoff just before SIGTERM go out in the final flush."""
    settings = make_settings(flush={"linger_s": 120.0, "interval_s": 120.0})
    runner = InProcessGateway(settings, clock_ms=sandbox.now_ms)
    async with runner as gateway:
        assert gateway.store is not None and gateway.flush is not None
        now = sandbox.now_ms()
        almost_old = [now - SENDABLE_AGE_MS + 30_000 + i for i in range(100)]
        fresh = [now - HOUR_MS + i for i in range(100)]
        assert await publish(publisher, interleaved(almost_old, fresh)) == 200
        await wait_until(lambda: gateway.store is not None and gateway.store.pending_points == 200)
        sandbox.advance_clock(60)
        assert not sandbox.requests, "nothing may have been sent before the stop (test setup)"
        await runner.stop()  # the daemon's SIGTERM path: stop ingest, final flush, close
    assert refused_for_age(sandbox) == 0
    assert accepted_set(sandbox) == {(101, 5, ts, i + 1) for i, ts in enumerate(fresh)}
    store = await Store.open(tmp_path / "buffer.db")
    try:
        assert store.pending_points == 0
        assert await expired_letters(store) == set(almost_old)
    finally:
        await store.close()


async def test_cloud_clock_ahead_dead_letters_what_it_implies_without_bisecting(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    """The cloud's clock runs 12 h ahead: our margin (6 h) does not cover it."""
    skew_ms = 12 * HOUR_MS

    def gateway_clock() -> int:
        return sandbox.now_ms() - skew_ms

    async with InProcessGateway(make_settings(), clock_ms=gateway_clock) as gateway:
        assert gateway.store is not None
        now = gateway_clock()
        # Fine by our clock (7 h inside the limit), 5 h too old by the cloud's.
        skewed_old = [now - 30 * DAY_MS + 7 * HOUR_MS + i for i in range(100)]
        fresh = [now - HOUR_MS + i for i in range(100)]
        assert await publish(publisher, interleaved(skewed_old, fresh)) == 200
        await wait_until(lambda: len(sandbox.accepted) == 100, 20, "fresh readings delivered")
        await wait_until(lambda: gateway.store is not None and gateway.store.pending_points == 0)
        assert await expired_letters(gateway.store) == set(skewed_old)
    assert accepted_set(sandbox) == {(101, 5, ts, i + 1) for i, ts in enumerate(fresh)}
    # Not one request per point: each refused request dead-letters all it implies.
    assert 1 <= refused_for_age(sandbox) <= 3
    skew = [e for e in log_events(log_output) if e["event"] == "clock_skew_suspected"]
    assert len(skew) == 1
    assert skew[0]["cloud_date"] and skew[0]["gateway_time"]
    assert abs(skew[0]["cloud_ahead_s"] - 12 * 3600) <= 2


# --------------------------------------------------------------------------- outages


async def test_cloud_back_ends_a_long_backoff_through_a_probe(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    """Unreachable for longer than the backoff cap, then back: a probe ends the wait.

    The backoff (60 s) is far longer than the test waits for the upload, so only a probe
    can have resumed it; the sequence of attempts and probes says so directly.
    """
    settings = make_settings(
        flush={"backoff_min_s": 60.0, "backoff_max_s": 60.0, "probe_interval_s": 0.2}
    )
    async with InProcessGateway(settings, clock_ms=sandbox.now_ms) as gateway:
        flush = gateway.flush
        assert flush is not None
        await sandbox.set_fault("down")
        now = sandbox.now_ms()
        messages = [(TOPIC, ts_payload(i, now - 1000 + i)) for i in range(50)]
        assert await publish(publisher, messages) == 50
        await wait_until(lambda: flush.uplink.stats.failures == 1, 20, "one failed upload")
        await wait_until(lambda: flush.uplink.stats.probes >= 5, 20, "probes while down")
        assert flush.stats.requests == 1, "no upload attempts while unreachable, only probes"
        await sandbox.set_fault("none")
        await wait_until(lambda: len(sandbox.accepted) == 50, 20, "delivered after the probe")
        assert flush.uplink.stats.probe_resumes == 1
        assert flush.uplink.stats.failures == 1
        assert flush.stats.requests == 2
    events = [e["event"] for e in log_events(log_output)]
    sequence = [e for e in events if e in ("went_offline", "cloud_reachable", "back_online")]
    assert sequence == ["went_offline", "cloud_reachable", "back_online"]
    offline = next(e for e in log_events(log_output) if e["event"] == "went_offline")
    assert offline["kind"] == "unreachable"


async def test_a_cloud_answering_5xx_is_backed_off_not_probed(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    """A connect would succeed, so probing would say nothing: exponential backoff instead."""
    settings = make_settings(
        flush={"backoff_min_s": 0.05, "backoff_max_s": 0.2, "probe_interval_s": 0.05}
    )
    async with InProcessGateway(settings, clock_ms=sandbox.now_ms) as gateway:
        flush = gateway.flush
        assert flush is not None
        await sandbox.set_fault("error500", count=3)
        now = sandbox.now_ms()
        messages = [(TOPIC, ts_payload(i, now - 1000 + i)) for i in range(20)]
        assert await publish(publisher, messages) == 20
        await wait_until(lambda: len(sandbox.accepted) == 20, 20, "delivered after the 500s")
        assert flush.uplink.stats.failures == 3
        assert flush.uplink.stats.probes == 0
    offline = [e for e in log_events(log_output) if e["event"] == "went_offline"]
    assert len(offline) == 1 and offline[0]["kind"] == "server_error"


async def test_probe_connects_without_http_and_reports_refusal(sandbox: SandboxCloud) -> None:
    cloud = BlynkCloud(sandbox.base_url, "sandbox-client", "sandbox-secret", timeout_s=2.0)
    try:
        await cloud.probe()
        assert sandbox.token_requests == 0 and not sandbox.requests
        await sandbox.set_fault("down")
        with pytest.raises(ConnectFailed):
            await cloud.probe()
        batch = Batch(StreamKey(101, 5), (Point(sandbox.now_ms(), "1"),))
        with pytest.raises(ConnectFailed):
            await cloud.upload(batch)
        await sandbox.set_fault("none")
        await cloud.probe()
    finally:
        await cloud.aclose()


async def test_a_timeout_after_sending_is_not_a_connect_failure(sandbox: SandboxCloud) -> None:
    cloud = BlynkCloud(sandbox.base_url, "sandbox-client", "sandbox-secret", timeout_s=0.3)
    try:
        await sandbox.set_fault("slow", delay_s=2.0, count=1)
        batch = Batch(StreamKey(101, 5), (Point(sandbox.now_ms(), "1"),))
        with pytest.raises(CloudUnreachable) as info:
            await cloud.upload(batch)
        assert not isinstance(info.value, ConnectFailed)
    finally:
        await cloud.aclose()


async def test_probe_fails_on_a_tls_handshake_it_cannot_verify(tmp_path: Path) -> None:
    """A TLS listener whose certificate does not verify: ConnectFailed, like httpx would."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = await asyncio.create_subprocess_exec(
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await openssl.wait() == 0
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    cloud = BlynkCloud(f"https://127.0.0.1:{port}", "id", "secret", timeout_s=2.0)
    try:
        with pytest.raises(ConnectFailed) as info:
            await cloud.probe()
        assert "SSL" in str(info.value) or "certificate" in str(info.value).lower()
    finally:
        await cloud.aclose()
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------- quota day


async def test_a_batch_accepted_after_midnight_counts_against_the_new_day(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
) -> None:
    """Sent at 23:59:59.9, accepted after midnight: the cloud charges the new day, so must we.

    Charging the old day would leave the new day's allowance untouched and make the next
    batch exceed the cloud's count for it.
    """
    quota = DailyQuota(100)
    midnight = quota.next_reset_ms(sandbox.now_ms())
    sandbox.set_clock(midnight - 5 * 60_000)
    settings = make_settings(cloud={"daily_points_limit": 100}, flush={"batch_size": 100})
    async with InProcessGateway(settings, clock_ms=sandbox.now_ms) as gateway:
        assert gateway.store is not None
        await sandbox.set_fault("down")
        now = sandbox.now_ms()
        messages = [(TOPIC, ts_payload(i, now - 60_000 + i)) for i in range(150)]
        assert await publish(publisher, messages) == 150
        await wait_until(lambda: gateway.store is not None and gateway.store.pending_points == 150)
        await sandbox.set_fault("slow", delay_s=1.0, count=1)
        sandbox.set_clock(midnight - 100)  # 23:59:59.9
        await wait_until(lambda: sandbox.delayed_imports == 1, 20, "the upload in flight")
        sandbox.set_clock(midnight + 500)  # the cloud accepts it after midnight
        await wait_until(lambda: len(sandbox.accepted) == 100, 20, "the first batch")
        new_day = quota.day_of(midnight + 1)
        await wait_until(
            lambda: gateway.store is not None and gateway.store.pending_points == 50,
            message="the first batch acknowledged",
        )
        assert await gateway.store.points_sent(101, new_day) == (100, False)
        assert await gateway.store.points_sent(101, quota.day_of(midnight - 1)) == (0, False)
        flush = gateway.flush
        assert flush is not None
        passes = flush.stats.passes
        await wait_until(lambda: flush.stats.passes >= passes + 3, message="more passes")
    assert len(sandbox.accepted) == 100
    assert not any(r.message and "daily limit" in r.message for r in sandbox.requests)


# --------------------------------------------------------------------------- classifier


@pytest.mark.parametrize("endpoint", ["token", "import"])
@pytest.mark.parametrize(
    ("response", "kind", "retry_after_s"),
    [
        (
            httpx.Response(503, headers={"Retry-After": "7"}, text="maintenance"),
            CloudServerError,
            7,
        ),
        (httpx.Response(429, headers={"Retry-After": "9"}), RateLimited, 9),
        (httpx.Response(502), CloudServerError, None),
    ],
)
def test_one_classifier_reads_retry_after_for_both_endpoints(
    endpoint: str, response: httpx.Response, kind: type[Exception], retry_after_s: float | None
) -> None:
    error = classify_failure(response, endpoint)  # type: ignore[arg-type]
    assert type(error) is kind
    assert getattr(error, "retry_after_s", None) == retry_after_s


async def test_token_endpoint_503_keeps_retry_after_end_to_end(sandbox: SandboxCloud) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": "42"}, json={"error": "busy"})

    cloud = BlynkCloud(
        "https://fra1.blynk.cloud", "id", "secret", transport=httpx.MockTransport(answer)
    )
    try:
        with pytest.raises(CloudServerError) as info:
            await cloud.upload(Batch(StreamKey(1, 1), (Point(1_702_656_423_136, "5"),)))
        assert info.value.retry_after_s == 42
    finally:
        await cloud.aclose()


def test_age_refusal_is_too_old_with_the_cloud_date_and_others_are_not() -> None:
    date = "Wed, 02 Dec 2026 12:00:00 GMT"
    too_old = classify_failure(
        httpx.Response(
            400,
            headers={"Date": date},
            json={"error": {"message": "Timestamp 1 at index 0 is older than 30 days."}},
        ),
        "import",
    )
    assert isinstance(too_old, TooOld)
    assert too_old.cloud_date == date and too_old.cloud_now_ms == 1_796_212_800_000
    invalid = classify_failure(
        httpx.Response(400, json={"error": {"message": "Invalid value 'x' at index 0."}}),
        "import",
    )
    assert type(invalid) is BatchRejected
    token = classify_failure(httpx.Response(400, json={"error": "invalid_client"}), "token")
    assert type(token) is AuthFailed


async def test_a_network_change_ends_the_probe_wait_at_once(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
) -> None:
    """Probes every 60 s, backoff 60 s: only the network watcher can resume it quickly."""
    settings = make_settings(
        flush={"backoff_min_s": 60.0, "backoff_max_s": 60.0, "probe_interval_s": 60.0}
    )
    async with InProcessGateway(settings, clock_ms=sandbox.now_ms) as gateway:
        flush, network = gateway.flush, gateway.network
        assert flush is not None and network is not None
        await sandbox.set_fault("down")
        now = sandbox.now_ms()
        assert await publish(publisher, [(TOPIC, ts_payload(1, now))]) == 1
        await wait_until(lambda: flush.uplink.stats.failures == 1, 20, "one failed upload")
        network.changed.notify()  # what the kernel's rtnetlink message does
        await wait_until(lambda: flush.uplink.stats.probes == 1, 20, "a probe right away")
        await sandbox.set_fault("none")
        assert len(sandbox.accepted) == 0
        network.changed.notify()  # the link is back
        await wait_until(lambda: len(sandbox.accepted) == 1, 20, "delivered after the change")
        assert flush.uplink.stats.probes == 2 and flush.uplink.stats.probe_resumes == 1
        assert flush.stats.requests == 2


class AgeingCloud:
    """Refuses the first request as if one point were bad; every request takes 2 minutes.

    It records, for each request, the oldest point it carried and the cutoff at that moment.
    """

    server = "ageing"

    def __init__(self, clock: list[int], cloud_settings: CloudSettings) -> None:
        self.clock = clock
        self.cloud_settings = cloud_settings
        self.sent: list[tuple[int, int]] = []  # (oldest ts in the request, cutoff then)
        self.accepted: list[int] = []

    async def upload(self, batch: Batch) -> None:
        cutoff = self.cloud_settings.oldest_sendable_ms(self.clock[0])
        self.sent.append((min(p.ts_ms for p in batch.points), cutoff))
        self.clock[0] += 120_000
        if len(self.sent) == 1:
            raise BatchRejected("Invalid value at index 0.", status=400)
        self.accepted.extend(p.ts_ms for p in batch.points)

    async def probe(self) -> None:
        return None


async def test_halves_of_a_bisected_batch_get_the_age_rule_when_they_are_sent(
    tmp_path: Path,
) -> None:
    """The first request is refused; while it was out, its oldest points aged past the cutoff."""
    clock = [1_790_000_000_000]
    cloud_settings = CloudSettings(client_id="c", client_secret="s")  # type: ignore[arg-type]
    store = await Store.open(tmp_path / "buffer.db", clock_ms=lambda: clock[0])
    try:
        cutoff = cloud_settings.oldest_sendable_ms(clock[0])
        # 10 points within 1 minute of the cutoff (they age out during the first request),
        # then 10 fresh ones.
        ageing = [cutoff + 1_000 + i for i in range(10)]
        fresh = [clock[0] - HOUR_MS + i for i in range(10)]
        await store.append([Reading(101, 5, ts, "1") for ts in ageing + fresh])
        cloud = AgeingCloud(clock, cloud_settings)
        flush = FlushLoop(store, cloud, FlushSettings(), cloud_settings, clock_ms=lambda: clock[0])
        await flush.run_pass()
        assert len(cloud.sent) >= 2, "the refused batch was bisected"
        assert all(oldest >= cutoff_then for oldest, cutoff_then in cloud.sent[1:])
        assert sorted(cloud.accepted) == fresh
        assert await expired_letters(store) == set(ageing)
        assert flush.stats.expired == 10
    finally:
        await store.close()
