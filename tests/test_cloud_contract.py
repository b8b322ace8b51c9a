"""The cloud's rules, enforced by the sandbox, honoured by the gateway (issue #3).

Most tests pre-fill the buffer through the real Store (a real SQLite file) and then start
the real gateway against the sandbox, whose clock the gateway shares, so "midnight" can be
reached by time travel instead of waiting.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from gateway.config import Settings
from gateway.models import Reading
from gateway.store import Store
from gateway.testing.sandbox import SandboxCloud
from harness import InProcessGateway, accepted_set, log_events, wait_for_passes, wait_until

DAY_MS = 86_400_000


async def prefill(db_path: Path, readings: list[Reading]) -> None:
    store = await Store.open(db_path)
    try:
        for start in range(0, len(readings), 5000):
            await store.append(readings[start : start + 5000])
    finally:
        await store.close()


def series(device: int, stream: int, count: int, end_ms: int, step_ms: int = 1000) -> list[Reading]:
    """`count` readings ending at `end_ms`, oldest first, value = index."""
    start = end_ms - (count - 1) * step_ms
    return [Reading(device, stream, start + i * step_ms, str(i)) for i in range(count)]


def quota_refusals(sandbox: SandboxCloud) -> int:
    return sum(1 for r in sandbox.requests if r.message and "daily limit" in r.message)


async def test_daily_quota_is_never_exceeded_and_the_rest_goes_after_midnight(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    tmp_path: Path,
    log_output: io.StringIO,
) -> None:
    # Start a little after midnight UTC so a day of time travel lands on the next day.
    sandbox.set_clock((sandbox.now_ms() // DAY_MS) * DAY_MS + 3_600_000)
    now = sandbox.now_ms()
    await prefill(tmp_path / "buffer.db", series(101, 5, 12_000, now - 60_000, step_ms=100))
    async with InProcessGateway(make_settings(), clock_ms=sandbox.now_ms) as gateway:
        assert gateway.store is not None
        await wait_until(lambda: len(sandbox.accepted) >= 10_000, 30, "10,000 accepted")
        await wait_for_passes(gateway)  # nothing more may go out today
        assert len(sandbox.accepted) == 10_000
        assert sandbox.quota_used(101) == 10_000
        assert quota_refusals(sandbox) == 0
        assert gateway.store.pending_points == 2_000
        exhausted = [e for e in log_events(log_output) if e["event"] == "quota_exhausted"]
        assert len(exhausted) == 1
        assert exhausted[0]["device_id"] == 101 and exhausted[0]["resumes_at"].endswith("00:00:00Z")

        sandbox.advance_clock(DAY_MS / 1000)
        await wait_until(lambda: len(sandbox.accepted) == 12_000, 30, "the rest after midnight")
    assert accepted_set(sandbox) == {
        (101, 5, r.ts_ms, int(r.value_json))
        for r in series(101, 5, 12_000, now - 60_000, step_ms=100)
    }
    assert quota_refusals(sandbox) == 0


async def test_each_device_has_its_own_quota(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, tmp_path: Path
) -> None:
    now = sandbox.now_ms()
    readings = series(101, 5, 10_500, now - 60_000, 100) + series(102, 1, 10_500, now - 60_000, 100)
    await prefill(tmp_path / "buffer.db", readings)
    async with InProcessGateway(make_settings(), clock_ms=sandbox.now_ms) as gateway:
        await wait_until(lambda: len(sandbox.accepted) >= 20_000, 40, "20,000 accepted")
        await wait_for_passes(gateway)
        assert sandbox.accepted_count(101) == 10_000
        assert sandbox.accepted_count(102) == 10_000
        assert gateway.store is not None and gateway.store.pending_points == 1_000
    assert quota_refusals(sandbox) == 0


async def test_configured_limit_and_newest_first_order(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, tmp_path: Path
) -> None:
    now = sandbox.now_ms()
    readings = series(101, 5, 300, now - 60_000)
    await prefill(tmp_path / "buffer.db", readings)
    settings = make_settings(
        cloud={"daily_points_limit": 120}, flush={"order": "newest", "batch_size": 50}
    )
    async with InProcessGateway(settings, clock_ms=sandbox.now_ms) as gateway:
        await wait_until(lambda: len(sandbox.accepted) >= 120, 20, "120 accepted")
        await wait_for_passes(gateway)
    assert len(sandbox.accepted) == 120
    # Newest first: exactly the 120 most recent readings went out.
    assert {p.ts for p in sandbox.accepted} == {r.ts_ms for r in readings[-120:]}


async def test_cloud_side_exhaustion_parks_the_device_until_reset(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    tmp_path: Path,
    log_output: io.StringIO,
) -> None:
    sandbox.set_clock((sandbox.now_ms() // DAY_MS) * DAY_MS + 3_600_000)
    now = sandbox.now_ms()
    sandbox.precount(101, 9_500)  # the device uploaded these itself
    readings = series(101, 5, 2_000, now - 60_000, 100)
    await prefill(tmp_path / "buffer.db", readings + series(102, 1, 50, now - 60_000))
    async with InProcessGateway(make_settings(), clock_ms=sandbox.now_ms) as gateway:
        assert gateway.store is not None
        await wait_until(lambda: sandbox.accepted_count(102) == 50, 20, "other device flows")
        await wait_until(lambda: quota_refusals(sandbox) == 1, 20, "one refusal")
        await wait_for_passes(gateway)
        assert quota_refusals(sandbox) == 1, "the refused device must not be retried today"
        assert gateway.store.pending_points == 2_000
        events = [e for e in log_events(log_output) if e["event"] == "quota_exhausted"]
        assert len(events) == 1 and "daily limit" in events[0]["refused_by_cloud"]
        sandbox.advance_clock(DAY_MS / 1000)
        await wait_until(lambda: sandbox.accepted_count(101) == 2_000, 20, "after reset")
    assert quota_refusals(sandbox) == 1
    assert {p.ts for p in sandbox.accepted if p.device_id == 101} == {r.ts_ms for r in readings}


async def test_too_old_readings_are_dead_lettered_never_sent(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    tmp_path: Path,
    log_output: io.StringIO,
) -> None:
    now = sandbox.now_ms()
    old = series(101, 5, 100, now - 31 * DAY_MS)
    fresh = series(101, 5, 100, now - 60_000)
    await prefill(tmp_path / "buffer.db", old + fresh)
    async with InProcessGateway(make_settings(), clock_ms=sandbox.now_ms) as gateway:
        assert gateway.store is not None
        await wait_until(lambda: len(sandbox.accepted) >= 100, 20, "fresh readings")
        letters = await gateway.store.dead_letters(limit=1000, reason="expired")
    assert {p.ts for p in sandbox.accepted} == {r.ts_ms for r in fresh}
    assert sorted(letter.ts_ms for letter in letters) == sorted(r.ts_ms for r in old)
    assert not any(r.message and "older than" in r.message for r in sandbox.requests)
    expired = [e for e in log_events(log_output) if e["event"] == "readings_expired"]
    assert len(expired) == 1 and expired[0]["count"] == 100


async def test_bisect_isolates_bad_points_and_delivers_the_rest(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, tmp_path: Path
) -> None:
    now = sandbox.now_ms()
    readings = series(101, 5, 1000, now - 60_000)
    bad_positions = {17, 500, 998}
    # The datastream is a Double: a string is valid JSON locally but refused by the cloud.
    readings = [
        Reading(
            r.device_id, r.datastream_id, r.ts_ms, '"oops"' if i in bad_positions else r.value_json
        )
        for i, r in enumerate(readings)
    ]
    await prefill(tmp_path / "buffer.db", readings)
    async with InProcessGateway(make_settings(), clock_ms=sandbox.now_ms) as gateway:
        assert gateway.store is not None
        await wait_until(lambda: len(sandbox.accepted) >= 997, 20, "997 delivered")
        await wait_until(lambda: gateway.store is not None and gateway.store.pending_points == 0)
        letters = await gateway.store.dead_letters(limit=100)
    assert len(sandbox.accepted) == 997
    assert {letter.ts_ms for letter in letters} == {readings[i].ts_ms for i in bad_positions}
    assert all(letter.reason == "rejected" for letter in letters)
    assert all((letter.detail or "").startswith("Invalid value") for letter in letters)
    # Bisecting 1000 points with 3 bad ones costs a few dozen requests, not hundreds.
    assert len(sandbox.requests) < 80


async def test_fairness_a_small_device_is_not_starved_by_a_big_backlog(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, tmp_path: Path
) -> None:
    now = sandbox.now_ms()
    sandbox.daily_points_limit = 100_000
    await prefill(
        tmp_path / "buffer.db",
        series(101, 5, 50_000, now - 60_000, 10) + series(102, 1, 10, now - 1000, 10),
    )
    settings = make_settings(cloud={"daily_points_limit": 100_000})
    async with InProcessGateway(settings, clock_ms=sandbox.now_ms):
        await wait_until(lambda: sandbox.accepted_count(102) == 10, 20, "the quiet device")
        first_quiet = next(i for i, r in enumerate(sandbox.requests) if r.device_id == 102)
    assert first_quiet <= 2


async def test_bad_credentials_keep_buffering_and_recover(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    tmp_path: Path,
    log_output: io.StringIO,
) -> None:
    now = sandbox.now_ms()
    await prefill(tmp_path / "buffer.db", series(101, 5, 100, now - 60_000))
    sandbox.client_secret = "rotated-in-the-console"
    async with InProcessGateway(make_settings(flush={"auth_retry_s": 0.5})) as gateway:
        await wait_until(
            lambda: any(e["event"] == "auth_failed" for e in log_events(log_output)), 10
        )
        flush = gateway.flush
        assert flush is not None
        await wait_until(lambda: flush.uplink.stats.failures >= 3, 10, "three slow retries")
        assert sandbox.accepted == []
        # Slow retries, not a loop: each pass asked for a token once, failed, then waited
        # (and one more was asked at start, ahead of the first upload).
        assert sandbox.token_requests == flush.uplink.stats.failures + 1
        assert flush.stats.passes <= flush.uplink.stats.failures + 1
        sandbox.client_secret = "sandbox-secret"
        await wait_until(lambda: len(sandbox.accepted) == 100, 10, "delivered after the fix")
        await wait_until(lambda: gateway.store is not None and gateway.store.pending_points == 0)
    events = [e["event"] for e in log_events(log_output)]
    assert events.count("auth_failed") == 1
    assert "sandbox-secret" not in log_output.getvalue()


async def test_wrong_region_is_named_and_not_followed(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    tmp_path: Path,
    log_output: io.StringIO,
) -> None:
    now = sandbox.now_ms()
    await prefill(tmp_path / "buffer.db", series(101, 5, 50, now - 60_000))
    sandbox.set_redirect("https://lon1.blynk.cloud")
    async with InProcessGateway(make_settings(flush={"auth_retry_s": 0.3})):
        await wait_until(
            lambda: any(e["event"] == "wrong_region" for e in log_events(log_output)), 10
        )
        event = next(e for e in log_events(log_output) if e["event"] == "wrong_region")
        assert "lon1.blynk.cloud" in event["error"]
        sandbox.set_redirect(None)
        await wait_until(lambda: len(sandbox.accepted) == 50, 10, "delivered after the fix")


async def test_unpark_after_reload_retries_a_parked_stream_at_once(
    make_settings: Callable[..., Settings], sandbox: SandboxCloud, tmp_path: Path
) -> None:
    now = sandbox.now_ms()
    await prefill(tmp_path / "buffer.db", series(103, 9, 20, now - 60_000))
    async with InProcessGateway(make_settings(flush={"parked_retry_s": 3600})) as gateway:
        assert gateway.store is not None and gateway.flush is not None
        await wait_until(lambda: any(r.status == 404 for r in sandbox.requests), 10)
        sandbox.add_device(103, {1: "double", 9: "double"})
        await wait_for_passes(gateway)
        assert sandbox.accepted == []  # parked for an hour
        await gateway.flush.unpark_all()  # what a config reload does
        await wait_until(lambda: len(sandbox.accepted) == 20, 10, "sent right after reload")
