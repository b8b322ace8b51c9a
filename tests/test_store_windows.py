"""Sampled streams in the buffer (store/windows.py), on real SQLite files with an injected
clock: windows leased only once closed, one point per window from the raw rows, rows gone
only with the record of the window sent, late readings refused, everything surviving a
reopen as if nothing happened."""

from __future__ import annotations

import sqlite3
import statistics
from pathlib import Path

import store_kit
from store_kit import MakeStore, sql

from gateway.models import Batch, Point, Reading, StreamKey
from gateway.sampling import WindowRule
from gateway.store import Store

db_path, make_store = store_kit.db_path_fixture, store_kit.make_store_fixture

STREAM = StreamKey(7, 3)
RAW = StreamKey(7, 4)
T0 = 1_760_000_000_000  # a multiple of 10 s
RULE = WindowRule(10_000, "mean", grace_ms=2_000)


class Clock:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def window_readings(start_s: int, count: int, step_ms: int = 200) -> list[Reading]:
    """`count` readings 200 ms apart from T0 + start_s, values 0.0, 1.0, ..."""
    return [
        Reading(STREAM.device_id, STREAM.datastream_id, T0 + start_s * 1000 + i * step_ms, f"{i}.5")
        for i in range(count)
    ]


async def open_store(make_store: MakeStore, clock: Clock) -> Store:
    store = await make_store(clock_ms=clock)
    store.sampling.want(STREAM, RULE)
    return store


async def arrive(store: Store, items: list[Reading], clock: Clock) -> None:
    """What ingest does: note the arrivals (windows wait a grace), then commit."""
    for reading in items:
        store.sampling.note_arrival(STREAM, RULE, reading.ts_ms, clock())
    await store.append(items)


def means(items: list[Reading], width_ms: int) -> dict[int, float]:
    by_window: dict[int, list[float]] = {}
    for reading in items:
        start = reading.ts_ms - reading.ts_ms % width_ms
        by_window.setdefault(start, []).append(float(reading.value_json))
    return {start: statistics.fmean(values) for start, values in by_window.items()}


async def test_a_window_is_leased_once_closed_and_its_rows_go_with_its_record(
    make_store: MakeStore, db_path: Path
) -> None:
    clock = Clock(T0 + 25_000)  # windows T0 and T0+10s are over, T0+20s is open
    store = await open_store(make_store, clock)
    items = window_readings(0, 125)  # 25 s of readings: 2.5 windows
    await arrive(store, items, clock)
    assert store.windowed(STREAM) and store.pending_points == 125
    # Just arrived: nothing is closed until a grace has passed without readings for it.
    assert (await store.lease(STREAM, 100)).batch.points == ()
    clock.now_ms += 2_000
    batch = (await store.lease(STREAM, 100)).batch
    expected = means(items, 10_000)
    assert batch.window_ms == 10_000
    assert [p.ts_ms for p in batch.points] == [T0, T0 + 10_000]
    assert [float(p.value_json) for p in batch.points] == [expected[T0], expected[T0 + 10_000]]
    # Leased is closed: a reading for it is refused as late, in the store's transaction.
    late = Reading(7, 3, T0 + 5_000, "99")
    result = await store.append([late])
    assert (result.inserted, result.late) == (0, 1)
    await store.ack(batch, "2025-10-09")
    assert store.pending_points == 25  # the open window's rows only
    assert sql(db_path, "SELECT sent_until_ms FROM streams WHERE datastream_id = 3") == [
        (T0 + 20_000,)
    ]
    assert store.sampling.aggregated == 100
    dead = await store.dead_letters(reason="late_for_window")
    assert [(d.ts_ms, d.value_json) for d in dead] == [(T0 + 5_000, "99")]


async def test_the_batch_is_limited_to_whole_windows(make_store: MakeStore) -> None:
    clock = Clock(T0 + 3_600_000)
    store = await open_store(make_store, clock)
    items = window_readings(0, 600)  # 120 s: 12 windows
    await arrive(store, items, clock)
    clock.now_ms += 2_000
    first = (await store.lease(STREAM, 5)).batch
    assert [p.ts_ms for p in first.points] == [T0 + k * 10_000 for k in range(5)]
    await store.ack(first, "d")
    assert store.pending_points == 600 - 250
    rest = (await store.lease(STREAM, 100)).batch
    assert len(rest.points) == 7
    expected = means(items, 10_000)
    assert {p.ts_ms: float(p.value_json) for p in first.points + rest.points} == expected


async def test_a_crash_before_the_ack_makes_the_same_points_again(
    make_store: MakeStore,
) -> None:
    """kill -9 between the upload and its delete: the rows are all there, the same points
    come again (a second upload of the same (ts, value), never a lost reading)."""
    clock = Clock(T0 + 60_000)
    store = await open_store(make_store, clock)
    await arrive(store, window_readings(0, 150), clock)
    clock.now_ms += 2_000
    before = (await store.lease(STREAM, 100)).batch
    assert len(before.points) == 3
    # No close(): the connection just goes, as in a crash (the file keeps what committed).
    again = await open_store(make_store, clock)
    # After a restart arrivals are unknown: windows wait a grace from the start.
    assert (await again.lease(STREAM, 100)).batch.points == ()
    clock.now_ms += 2_000
    after = (await again.lease(STREAM, 100)).batch
    assert after == before


async def test_the_rule_survives_a_restart_so_a_backlog_is_cut_as_meant(
    make_store: MakeStore,
) -> None:
    clock = Clock(T0 + 3_600_000)
    store = await open_store(make_store, clock)
    await arrive(store, window_readings(0, 100), clock)
    await store.close()
    reopened = await make_store(clock_ms=clock)  # no reading yet: the file says the rule
    assert reopened.sampling.rules[STREAM] == RULE
    clock.now_ms += 2_000
    assert len((await reopened.lease(STREAM, 100)).batch.points) == 2
    # A configuration without the rule: the stream goes raw from its next reading on.
    reopened.sampling.want(STREAM, None)
    await reopened.append([Reading(7, 3, T0 + 3_000_000, "1")])
    assert not reopened.windowed(STREAM)
    assert len((await reopened.lease(STREAM, 1000)).batch.points) == 101


async def test_sent_windows_survive_a_restart_and_late_rows_are_dead_lettered(
    make_store: MakeStore,
) -> None:
    clock = Clock(T0 + 60_000)
    store = await open_store(make_store, clock)
    await arrive(store, window_readings(0, 50), clock)
    clock.now_ms += 2_000
    batch = (await store.lease(STREAM, 100)).batch
    await store.ack(batch, "d")
    await store.close()
    again = await open_store(make_store, clock)
    late = await again.append([Reading(7, 3, T0 + 9_999, "5")])
    assert late.late == 1 and again.pending_points == 0
    # A reading put back in the buffer behind our back (dead-letters retry) is late too.
    connection = sqlite3.connect(again.path)
    with connection:
        connection.execute(
            "INSERT INTO readings (stream_id, ts_ms, value) SELECT id, ?, '1' FROM streams "
            "WHERE datastream_id = 3",
            (T0 + 1,),
        )
    connection.close()
    await again.pending_streams()
    clock.now_ms += 10_000
    assert (await again.lease(STREAM, 100)).batch.points == ()
    assert again.pending_points == 0
    assert again.sampling.late == 1


async def test_a_window_batch_dead_lettered_moves_its_raw_readings(make_store: MakeStore) -> None:
    clock = Clock(T0 + 60_000)
    store = await open_store(make_store, clock)
    items = window_readings(0, 100)
    await arrive(store, items, clock)
    clock.now_ms += 2_000
    batch = (await store.lease(STREAM, 100)).batch
    first, second = batch.split()
    assert first.window_ms == second.window_ms == 10_000
    await store.dead_letter(second, "rejected", "Invalid value")
    dead = await store.dead_letters(limit=1000, reason="rejected")
    assert sorted((d.ts_ms or 0) for d in dead) == [r.ts_ms for r in items[50:]]
    assert store.pending_points == 50
    await store.ack(first, "d")
    assert store.pending_points == 0
    assert store.sampling.sent_until[STREAM] == T0 + 20_000


async def test_expired_windows_are_dead_lettered_whole(make_store: MakeStore) -> None:
    clock = Clock(T0 + 60_000)
    store = await open_store(make_store, clock)
    await arrive(store, window_readings(0, 100), clock)
    clock.now_ms += 2_000
    # A cutoff inside the first window: its point would be stamped before it.
    lease = await store.lease(STREAM, 100, expire_before_ms=T0 + 4_000)
    assert lease.expired == 50
    assert [p.ts_ms for p in lease.batch.points] == [T0 + 10_000]


async def test_raw_streams_beside_windowed_ones_are_unchanged(make_store: MakeStore) -> None:
    clock = Clock(T0 + 60_000)
    store = await open_store(make_store, clock)
    raw = [Reading(7, 4, T0 + i, str(i)) for i in range(5)]
    await store.append(raw)
    assert store.only_windows_buffered() is False
    batch = (await store.lease(RAW, 10)).batch
    assert batch.window_ms == 0 and [p.ts_ms for p in batch.points] == [T0 + i for i in range(5)]
    await store.ack(batch, "d")
    await arrive(store, window_readings(0, 10), clock)
    await store.pending_streams()
    assert store.only_windows_buffered() is True


async def test_the_deadband_memory_is_written_with_its_commit(
    make_store: MakeStore, db_path: Path
) -> None:
    clock = Clock(T0)
    store = await make_store(clock_ms=clock)
    reading = Reading(7, 9, T0, "20.5")
    await store.append([reading], kept={StreamKey(7, 9): (T0, "20.5")})
    # Kept but uploaded without being written (pass-through): the memory alone is written.
    await store.append([], kept={StreamKey(7, 9): (T0 + 1000, "22")})
    await store.close()
    again = await make_store(clock_ms=clock)
    assert again.sampling.kept[StreamKey(7, 9)] == (T0 + 1000, "22")
    assert sql(db_path, "SELECT ts_ms, value FROM deadband") == [(T0 + 1000, "22")]


def test_split_keeps_the_windows() -> None:
    batch = Batch(STREAM, (Point(T0, "1"), Point(T0 + 10_000, "2")), 10_000)
    assert batch.take(1) == Batch(STREAM, (Point(T0, "1"),), 10_000)
    assert batch.with_points(()).window_ms == 10_000
