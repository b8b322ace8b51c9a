"""Dead letters at the store level (filters, retry, purge, a second process's retry seen by
the owner), the status socket's edge cases, and the forecast's arithmetic."""

from __future__ import annotations

import argparse
import asyncio
import socket
from pathlib import Path

import pytest
import store_kit
from store_kit import BASE_TS, BOILER, MakeStore, readings

from gateway.cli.dead_letters import parse_duration_s
from gateway.models import Batch, Point, StreamKey
from gateway.ops.forecast import DAY_MS, drain_eta_s, forecast_device
from gateway.ops.status_socket import StatusServer, query
from gateway.store import DeadLetterFilter, RejectedPayload, Retarget

db_path, make_store = store_kit.db_path_fixture, store_kit.make_store_fixture
H = 3_600_000


# --------------------------------------------------------------------------- store


async def dead_letter_some(store: store_kit.Store) -> None:
    await store.append(readings(4))
    points = tuple(Point(BASE_TS + i, str(i)) for i in range(4))
    await store.dead_letter(Batch(BOILER, points[:3]), "rejected", "Invalid value")
    await store.dead_letter(Batch(BOILER, points[3:]), "expired")
    await store.append([], [RejectedPayload("not_a_number", "sensors/x", b"abc", 101, 5)])


async def test_filters_select_by_reason_ids_and_age(make_store: MakeStore) -> None:
    now = [BASE_TS + 10 * DAY_MS]
    store = await make_store(clock_ms=lambda: now[0])
    await dead_letter_some(store)
    assert await store.dead_letter_counts() == {"expired": 1, "not_a_number": 1, "rejected": 3}
    by_reason = DeadLetterFilter(reason="rejected", device_id=101, datastream_id=5)
    assert len(await store.dead_letters(selection=by_reason)) == 3
    assert await store.dead_letters(selection=DeadLetterFilter(device_id=999)) == []
    older = DeadLetterFilter(dead_before_ms=now[0] + 1)
    assert len(await store.dead_letters(selection=older)) == 5
    assert await store.dead_letters(selection=DeadLetterFilter(dead_after_ms=now[0] + 1)) == []
    assert await store.purge_dead_letters(DeadLetterFilter(reason="expired")) == 1
    assert await store.dead_letter_counts() == {"not_a_number": 1, "rejected": 3}


async def test_retry_from_another_connection_is_adopted_by_the_owner(
    make_store: MakeStore, db_path: Path
) -> None:
    """The CLI's store is a second connection: the owner learns the new stream and the
    count at its next `pending_streams` (each flush pass), and is told of new rows."""
    owner = await make_store()
    await dead_letter_some(owner)
    assert owner.pending_points == 0
    listener = owner.new_rows.listen()
    cli = await make_store(owner=False)
    result = await cli.retry_dead_letters(
        DeadLetterFilter(),
        Retarget(datastream_id=7),
        oldest_sendable_ms=BASE_TS,  # all four are young enough
    )
    assert (result.requeued, result.already_buffered, result.too_old) == (4, 0, 0)
    assert dict(result.not_retryable) == {"not_a_number": 1}
    await cli.close()

    streams = await owner.pending_streams()
    assert [s.key for s in streams] == [StreamKey(101, 7)]
    assert owner.pending_points == 4
    assert listener.is_set()
    lease = await owner.lease(StreamKey(101, 7), 10)
    assert [p.value_json for p in lease.batch.points] == ["0", "1", "2", "3"]
    assert await owner.dead_letter_counts() == {"not_a_number": 1}
    await owner.ack(lease.batch, "2025-10-09")
    assert owner.pending_points == 0
    await owner.close()
    # The clean-shutdown record is exact again, so the next start trusts it.
    assert store_kit.sql(db_path, "SELECT value FROM meta WHERE key = 'pending_points'") == [(0,)]


async def test_retry_leaves_too_old_readings_and_counts_duplicates(make_store: MakeStore) -> None:
    store = await make_store()
    await dead_letter_some(store)
    await store.append(readings(1))  # reading 0 is buffered again
    result = await store.retry_dead_letters(
        DeadLetterFilter(), Retarget(), oldest_sendable_ms=BASE_TS + 2
    )
    # ts 0 and 1 are too old now; 2 and 3 go back (neither buffered).
    assert (result.requeued, result.already_buffered, result.too_old) == (2, 0, 2)
    result = await store.retry_dead_letters(
        DeadLetterFilter(reason="rejected"), Retarget(), oldest_sendable_ms=0
    )
    assert (result.requeued, result.already_buffered) == (1, 1)
    assert store.pending_points == 4


def test_durations() -> None:
    assert parse_duration_s("90s") == 90
    assert parse_duration_s("2h") == 7200
    assert parse_duration_s("1d12h") == 1.5 * 86_400
    assert parse_duration_s("1w") == 7 * 86_400
    for bad in ("", "2", "h", "2 hours", "-1d"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_duration_s(bad)


# --------------------------------------------------------------------------- status socket


async def test_status_socket_beyond_the_unix_path_limit(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "buffer.db.sock"
    assert len(str(path)) > 108
    server = StatusServer(path, lambda: {"db": "x", "n": 1})
    task = asyncio.create_task(server.serve())
    try:
        answer = None
        while answer is None:
            assert not task.done()
            await asyncio.sleep(0.01)
            answer = await asyncio.to_thread(query, path)
        assert answer == {"db": "x", "n": 1}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert not path.exists()


async def test_a_stale_socket_is_replaced_and_a_live_one_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a killed daemon's
    assert query(path) is None
    first = asyncio.create_task(StatusServer(path, lambda: {"who": 1}).serve())
    while await asyncio.to_thread(query, path) is None:
        await asyncio.sleep(0.01)
    second = asyncio.create_task(StatusServer(path, lambda: {"who": 2}).serve())
    await second  # returns at once: the socket is in use
    assert await asyncio.to_thread(query, path) == {"who": 1}
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)


# --------------------------------------------------------------------------- forecast

NOW = 1000 * DAY_MS


def forecast(streams: list[list[tuple[int, int]]], **kwargs: int | bool) -> tuple[int, int, int]:
    params: dict[str, int | bool] = {
        "bucket_ms": H,
        "now_ms": NOW,
        "allowance_today": 100,
        "daily_limit": 100,
        "next_reset_ms": NOW + DAY_MS // 2,
        "max_age_ms": 30 * DAY_MS,
    } | kwargs
    result = forecast_device(streams, **params)  # type: ignore[arg-type]
    return result.backlog, result.will_send, result.will_expire


def test_forecast_nothing_buffered() -> None:
    assert forecast([]) == (0, 0, 0)


def test_forecast_fits_within_quota_before_the_age_limit() -> None:
    # 250 fresh readings at 100 a day: today 100, then two more days.
    result = forecast_device(
        [[(NOW - H, 250)]],
        bucket_ms=H,
        now_ms=NOW,
        allowance_today=100,
        daily_limit=100,
        next_reset_ms=NOW + DAY_MS // 2,
        max_age_ms=30 * DAY_MS,
    )
    assert (result.will_send, result.will_expire, result.days) == (250, 0, 3)
    assert result.clears_at_ms == NOW + DAY_MS // 2 + DAY_MS


def test_forecast_what_cannot_be_sent_in_time_expires() -> None:
    # 300 readings an hour from the age limit, today's quota spent: all expire before the
    # reset; 50 fresh ones go at the reset.
    old = [(NOW - 30 * DAY_MS + H, 300)]
    fresh = [(NOW - H, 50)]
    assert forecast([old, fresh], allowance_today=0) == (350, 50, 300)
    # With 120 left today, oldest first: the round robin gives each stream its share
    # (60 each, the fresh stream then takes no more than it has: 50, the old one 70).
    assert forecast([old, fresh], allowance_today=120) == (350, 120, 230)
    # Newest first, the old readings wait behind the fresh ones in the same stream.
    assert forecast([old + fresh], allowance_today=50, newest_first=True) == (350, 50, 300)


def test_forecast_a_backlog_beyond_the_age_limit_loses_the_rest() -> None:
    # 10 days x 1000 readings, spread over the last 10 days, at 100 a day for 30 days.
    buckets = [(NOW - 10 * DAY_MS + i * H, 1000 // 24) for i in range(240)]
    backlog, sent, expired = forecast([buckets])
    assert backlog == sum(count for _, count in buckets)
    # Sent: today's 100, then 100 at each of the 30 resets before the newest readings pass
    # the age limit (30 days from now); everything else expires on the way.
    assert sent == 100 + 30 * 100
    assert sent + expired == backlog


def test_forecast_already_expired_readings_count_at_once() -> None:
    assert forecast([[(NOW - 31 * DAY_MS, 10)]]) == (10, 0, 10)


def test_drain_eta() -> None:
    assert drain_eta_s(0, 0.0) == 0.0
    assert drain_eta_s(100, 10.0) == 10.0
    assert drain_eta_s(100, 10.0, in_per_s=5.0) == 20.0
    assert drain_eta_s(100, 5.0, in_per_s=5.0) is None
