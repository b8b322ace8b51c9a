"""The buffer itself, on real SQLite files: schema upgrade, capacity policies, start-up
record, full disk and read-only faults (damaged files: test_store_recovery.py)."""

from __future__ import annotations

import asyncio
import io
import re
import sqlite3
from pathlib import Path

import pytest
import store_kit
from store_kit import (
    BASE_TS,
    BOILER,
    KITCHEN,
    MakeStore,
    append_all,
    as_rows,
    readings,
    sql,
)

from gateway.errors import BufferFull, StoreError
from gateway.models import Reading
from gateway.store import (
    EXPIRE_CHUNK,
    SCHEMA_VERSION,
    Capacity,
    RejectedPayload,
    Store,
    migrate,
)
from harness import log_events

# The store fixtures (shared with the other test_store*.py).
db_path, make_store = store_kit.db_path_fixture, store_kit.make_store_fixture


# --------------------------------------------------------------------------- basics


async def test_lease_and_ack_find_rows_by_key_and_free_space(
    make_store: MakeStore,
) -> None:
    store: Store = await make_store()
    result = await store.append(readings(10) + readings(5, KITCHEN))
    assert (result.inserted, result.duplicates, result.evicted) == (15, 0, 0)
    again = await store.append(readings(3))  # a broker redelivery
    assert (again.inserted, again.duplicates) == (0, 3)
    batch = (await store.lease(BOILER, 4)).batch
    assert [p.ts_ms for p in batch.points] == [BASE_TS + i for i in range(4)]
    assert len({(p.ts_ms, p.value_json) for p in batch.points}) == 4
    space_freed = store.space_freed.listen()
    await store.ack(batch, "2025-10-09")
    assert store.pending_points == 11
    assert space_freed.is_set()
    assert (await store.lease(BOILER, 1)).batch.points[0].ts_ms == BASE_TS + 4
    assert (await store.counts())["buffered"] == 11


async def test_ack_many_deletes_several_batches_and_counts_quota_in_one_commit(
    db_path: Path, make_store: MakeStore
) -> None:
    store: Store = await make_store()
    await store.append(readings(10) + readings(10, KITCHEN))
    boiler, kitchen = (await store.lease(BOILER, 4)).batch, (await store.lease(KITCHEN, 6)).batch
    await store.ack_many([(boiler, "2025-10-09"), (kitchen, "2025-10-09")])
    assert store.pending_points == 10
    assert await store.points_sent(101, "2025-10-09") == (4, False)
    assert await store.points_sent(102, "2025-10-09") == (6, False)
    assert (await store.counts())["buffered"] == 10


async def test_the_quota_ledger_keeps_only_the_last_days(
    db_path: Path, make_store: MakeStore
) -> None:
    """Flush only asks about today: a row per device per day must not pile up for years."""
    store: Store = await make_store()
    for day in range(1, 21):
        await store.append(readings(2, start=10 * day) + readings(1, KITCHEN, start=day))
        for stream in (BOILER, KITCHEN):
            await store.ack((await store.lease(stream, 10)).batch, f"2025-10-{day:02d}")
    await store.mark_exhausted(102, "2025-10-20")
    kept = sql(db_path, "SELECT DISTINCT day FROM quota_days ORDER BY day")
    assert [day for (day,) in kept] == [f"2025-10-{day:02d}" for day in range(14, 21)]
    assert sql(db_path, "SELECT count(*) FROM quota_days") == [(14,)]
    assert await store.points_sent(101, "2025-10-20") == (2, False)
    assert await store.points_sent(102, "2025-10-20") == (1, True)
    # A clock far ahead for one upload costs a kept day, not today's count.
    await store.append(readings(1, start=999))
    await store.ack((await store.lease(BOILER, 1)).batch, "2030-01-01")
    assert await store.points_sent(101, "2025-10-20") == (2, False)


async def test_version_1_file_is_upgraded_in_place(db_path: Path, make_store: MakeStore) -> None:
    connection = sqlite3.connect(db_path, isolation_level=None)
    migrate(connection, target=1)
    connection.execute("INSERT INTO streams (id, device_id, datastream_id) VALUES (1, 101, 5)")
    connection.executemany(
        "INSERT INTO readings (stream_id, ts_ms, value) VALUES (1, ?, ?)",
        [(BASE_TS + i, str(i)) for i in range(500)],
    )
    connection.close()
    store: Store = await make_store()
    assert store.pending_points == 500
    assert set(await store.buffered_points()) == as_rows(readings(500))
    assert (await store.append(readings(1))).duplicates == 1
    await store.close()
    assert sql(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    (schema,) = sql(db_path, "SELECT sql FROM sqlite_schema WHERE name = 'readings'")[0]
    assert "WITHOUT ROWID" in schema


async def test_a_commit_cancelled_while_it_runs_still_updates_the_count(
    db_path: Path, make_store: MakeStore
) -> None:
    """app.py cancels the flush task at shutdown, possibly while its ack is committing.

    The COMMIT happens regardless; if the in-memory count then missed it, the clean-shutdown
    record would save the wrong count and the next start would trust it.
    """
    store: Store = await make_store()
    await store.append(readings(10))
    batch = (await store.lease(BOILER, 4)).batch
    loop = asyncio.get_running_loop()
    acking: list[asyncio.Task[None]] = []

    def cancel_at_commit(statement: str) -> None:  # runs in the connection's thread
        if statement == "COMMIT" and acking:
            loop.call_soon_threadsafe(acking[0].cancel)

    await store.set_trace_callback(cancel_at_commit)
    acking.append(asyncio.create_task(store.ack(batch, "2025-10-09")))
    with pytest.raises(asyncio.CancelledError):
        await acking[0]
    await store.set_trace_callback(None)
    [(stored,)] = sql(db_path, "SELECT count(*) FROM readings")
    assert stored == 6  # the commit went through
    assert store.pending_points == stored
    assert await store.points_sent(101, "2025-10-09") == (4, False)
    await store.close()
    again: Store = await make_store()
    assert again.started_clean and again.pending_points == stored


async def test_expire_moves_all_in_chunks_and_lets_an_append_commit_in_between(
    make_store: MakeStore,
) -> None:
    """After a long power-off most of the buffer may expire at once: ingest must not wait
    for the whole sweep (one transaction holding the store lock)."""
    store: Store = await make_store()
    old = readings(2 * EXPIRE_CHUNK + 100)
    await append_all(store, old, group=EXPIRE_CHUNK)
    cutoff_ms = BASE_TS + 10**9
    order: list[str] = []
    expiring = asyncio.create_task(store.expire(cutoff_ms))
    expiring.add_done_callback(lambda _: order.append("expire done"))
    await asyncio.sleep(0)  # the sweep starts and holds the lock for its first chunk
    result = await store.append(readings(5, KITCHEN, start=10**9 + 1))  # fresh readings
    order.append("append done")
    expired_by_then = len(old) - (store.pending_points - 5)
    assert await expiring == len(old)
    assert order == ["append done", "expire done"]
    assert result.inserted == 5
    assert 0 < expired_by_then < len(old)  # it went in between two chunks
    counts = await store.counts()
    assert (counts["buffered"], counts["dead_letters"]) == (5, len(old))
    assert len(await store.dead_letters(limit=len(old), reason="expired")) == len(old)


# --------------------------------------------------------------------------- start-up record


async def test_clean_close_lets_the_next_start_skip_counting(
    db_path: Path, make_store: MakeStore
) -> None:
    store: Store = await make_store()
    await append_all(store, readings(300))
    await store.close()
    assert sql(db_path, "SELECT value FROM meta WHERE key = 'pending_points'") == [(300,)]
    again: Store = await make_store()
    assert again.started_clean and again.pending_points == 300
    # The first write makes the record stale, in the same transaction: a crash from now on
    # leaves no record, and the next start counts.
    await again.append(readings(1, start=300))
    assert sql(db_path, "SELECT value FROM meta WHERE key = 'pending_points'") == []


async def test_another_writer_makes_the_owner_skip_the_record(
    db_path: Path, make_store: MakeStore
) -> None:
    store: Store = await make_store()
    await store.append(readings(10))
    other: Store = await make_store(owner=False)
    await other.append(readings(5, start=10))
    await other.close()
    await store.close()  # its in-memory count (10) is wrong now: it must not record it
    assert sql(db_path, "SELECT value FROM meta WHERE key = 'pending_points'") == []
    again: Store = await make_store()
    assert not again.started_clean and again.pending_points == 15


# --------------------------------------------------------------------------- capacity


async def test_drop_oldest_evicts_the_oldest_timestamps_across_streams(
    make_store: MakeStore, log_output: io.StringIO
) -> None:
    store: Store = await make_store(capacity=Capacity(max_points=100))
    boiler = readings(80, BOILER, step=2)  # even timestamps
    kitchen = readings(80, KITCHEN, step=2, start=0)
    kitchen = [Reading(r.device_id, r.datastream_id, r.ts_ms + 1, r.value_json) for r in kitchen]
    merged = sorted(boiler + kitchen, key=lambda r: r.ts_ms)
    evicted_total = 0
    for start in range(0, len(merged), 20):
        result = await store.append(merged[start : start + 20])
        evicted_total += result.evicted
    assert store.pending_points == 100 and evicted_total == 60
    kept = sorted(merged, key=lambda r: r.ts_ms)[60:]
    assert set(await store.buffered_points()) == as_rows(kept)
    assert await store.capacity_drops() == {101: (30, 0), 102: (30, 0)}
    full = [e for e in log_events(log_output) if e["event"] == "buffer_full"]
    assert len(full) == 1  # one line per interval, not per commit
    assert full[0]["level"] == "warning" and full[0]["policy"] == "drop-oldest"
    assert full[0]["evicted"] > 0 and full[0]["oldest_kept_ts"] is not None


async def test_eviction_summary_once_per_interval_then_streak_closes(
    make_store: MakeStore, log_output: io.StringIO
) -> None:
    now = [1000.0]
    store: Store = await make_store(capacity=Capacity(max_points=10), monotonic=lambda: now[0])
    await store.append(readings(10))
    for i in range(5):  # each commit evicts 10
        await store.append(readings(10, start=10 * (i + 1)))
    now[0] += 61
    await store.append(readings(10, start=100))  # second summary: 40 + 10 since the first
    full = [e for e in log_events(log_output) if e["event"] == "buffer_full"]
    assert [e["evicted"] for e in full] == [10, 50]
    assert full[-1]["by_device"] == {"101": 50}
    assert full[-1]["oldest_kept_ts"] == BASE_TS + 100
    # Uploads make room; after a quiet interval the next append closes the streak.
    await store.ack((await store.lease(BOILER, 5)).batch, "d")
    now[0] += 61
    await store.append(readings(1, start=200))
    ended = [e for e in log_events(log_output) if e["event"] == "buffer_full_ended"]
    assert len(ended) == 1 and ended[0]["dropped_total"] == 60


async def test_drop_newest_refuses_new_readings_but_not_redeliveries(make_store: MakeStore) -> None:
    store: Store = await make_store(capacity=Capacity(max_points=50, policy="drop-newest"))
    result = await store.append(readings(80))
    assert (result.inserted, result.refused, result.evicted) == (50, 30, 0)
    assert result.refused_by_device == {101: 30}
    again = await store.append(readings(5))  # already stored: duplicates, not refusals
    assert (again.inserted, again.duplicates, again.refused) == (0, 5, 0)
    assert set(await store.buffered_points()) == as_rows(readings(50))
    assert (await store.counts())["refused"] == 30


async def test_backpressure_refuses_the_commit_until_uploads_free_space(
    make_store: MakeStore, log_output: io.StringIO
) -> None:
    store: Store = await make_store(capacity=Capacity(max_points=50, policy="backpressure"))
    await append_all(store, readings(50), group=25)
    space_freed = store.space_freed.listen()
    with pytest.raises(BufferFull):
        await store.append(readings(10, start=50))
    with pytest.raises(BufferFull):
        await store.append(readings(10, start=50))
    assert store.pending_points == 50 and not space_freed.is_set()
    await store.ack((await store.lease(BOILER, 20)).batch, "d")
    assert space_freed.is_set()
    result = await store.append(readings(10, start=50))
    assert result.inserted == 10 and result.refused == 0 and result.evicted == 0
    # Ingest holds the acks, so ingest logs that state (test_buffer_pressure.py).
    assert not [e for e in log_events(log_output) if e["event"].startswith("buffer_full")]


async def test_max_bytes_caps_the_file_and_lifts_when_drained(
    db_path: Path, make_store: MakeStore
) -> None:
    max_bytes = 1024 * 1024
    store: Store = await make_store(capacity=Capacity(max_bytes=max_bytes))
    items = readings(12_000, width=120)  # ~150 bytes per row: 1 MiB holds ~6,000
    evicted = 0
    for start in range(0, len(items), 200):
        evicted += (await store.append(items[start : start + 200])).evicted
    assert evicted > 3000
    assert store.limit() < 12_000
    used_pages = (
        sql(db_path, "PRAGMA page_count")[0][0] - sql(db_path, "PRAGMA freelist_count")[0][0]
    )
    assert store.used_bytes <= max_bytes * 1.05
    assert used_pages * store.page_size <= max_bytes * 1.1
    # What is kept is the newest, contiguous in time.
    kept = sorted(row[2] for row in await store.buffered_points())
    assert kept == list(range(kept[0], BASE_TS + 12_000))
    # Drained by uploads: the cap is lifted again.
    while store.pending_points:
        await store.ack((await store.lease(BOILER, 1000)).batch, "d")
    await store.append(readings(1, start=20_000))
    assert store.limit() == Capacity().max_points


async def test_capacity_work_uses_the_primary_key_never_a_table_scan(
    db_path: Path, make_store: MakeStore
) -> None:
    """`no full table scans on the hot path`: check every statement append runs when full."""
    store: Store = await make_store(capacity=Capacity(max_points=200))
    await append_all(store, readings(200) + readings(200, KITCHEN))
    statements: list[str] = []
    await store.set_trace_callback(statements.append)
    await store.append(readings(30, start=500) + readings(30, KITCHEN, start=500))
    await store.ack((await store.lease(KITCHEN, 10)).batch, "d")
    await store.set_trace_callback(None)
    plans = []
    connection = sqlite3.connect(db_path)
    for statement in statements:
        if statement.split()[0].upper() in {"SELECT", "DELETE", "INSERT", "UPDATE"}:
            plan = connection.execute(f"EXPLAIN QUERY PLAN {statement}").fetchall()
            plans += [row[3] for row in plan]
    connection.close()
    assert any("readings USING PRIMARY KEY" in line for line in plans)
    assert not [line for line in plans if re.match(r"SCAN (readings|r)\b", line)]


async def test_dead_letters_are_pruned_to_the_limit(make_store: MakeStore) -> None:
    store: Store = await make_store(capacity=Capacity(max_dead_letters=20))
    for i in range(5):
        rejected = [RejectedPayload("bad_payload: x", "t", f"{i}-{j}".encode()) for j in range(10)]
        await store.append([], rejected)
    letters = await store.dead_letters(limit=100)
    assert len(letters) == 20
    assert (await store.counts())["dead_letters"] == 20


async def test_a_rejected_payload_keeps_its_reading_when_it_had_one(make_store: MakeStore) -> None:
    """Ingest refuses readings too old to send on arrival: their dead letter carries ts and
    value, like one the flush loop expired; an undecodable payload has neither."""
    store: Store = await make_store()
    too_old = RejectedPayload(
        "expired", "t", b"21.5", 101, 5, "ts older than cutoff", BASE_TS, "21.5"
    )
    garbage = RejectedPayload("not_a_number", "t", b"x", 101, 5, "x")
    await store.append([], [too_old, garbage])
    letters = {letter.reason: letter for letter in await store.dead_letters()}
    assert (letters["expired"].ts_ms, letters["expired"].value_json) == (BASE_TS, "21.5")
    assert (letters["not_a_number"].ts_ms, letters["not_a_number"].value_json) == (None, None)
    assert letters["expired"].detail == "ts older than cutoff"


async def test_dead_letter_pruning_is_logged_once_per_interval_with_the_sum(
    make_store: MakeStore, log_output: io.StringIO
) -> None:
    """Once the table is full every commit with a bad payload prunes: not a line each."""
    now = [1000.0]
    store: Store = await make_store(
        capacity=Capacity(max_dead_letters=20), monotonic=lambda: now[0]
    )

    def bad(commit: int) -> list[RejectedPayload]:
        return [RejectedPayload("not_a_number", "t", f"{commit}-{j}".encode()) for j in range(10)]

    for commit in range(50):  # the first two fill the table, each later one prunes 10
        await store.append([], bad(commit))
    now[0] += 61
    await store.append([], bad(50))  # an interval later: one line for all pruned since
    await store.append([], bad(51))
    await store.close()  # what is left unreported is reported at close
    lines = [e for e in log_events(log_output) if e["event"] == "dead_letters_pruned"]
    assert [e["count"] for e in lines] == [10, 480, 10]
    assert {e["max_dead_letters"] for e in lines} == {20}
    assert sql(store.path, "SELECT count(*) FROM dead_letters") == [(20,)]


# --------------------------------------------------------------------------- faults


async def test_injected_full_disk_holds_appends_but_deletes_work_and_free_room(
    make_store: MakeStore, log_output: io.StringIO
) -> None:
    store: Store = await make_store(capacity=Capacity(disk_reserve_bytes=0))
    await append_all(store, readings(3000), group=500)
    await store.inject_fault("full")
    with pytest.raises(StoreError, match="disk full"):
        for start in range(3000, 20_000, 500):
            await store.append(readings(500, start=start))
    assert store.disk_full
    stored = store.pending_points
    with pytest.raises(StoreError, match="disk full"):  # refused without touching the file
        await store.append(readings(10, start=50_000))
    # Uploads keep going: deletes need no new pages, and free some inside the file.
    space_freed = store.space_freed.listen()
    for _ in range(4):
        await store.ack((await store.lease(BOILER, 500)).batch, "d")
    assert space_freed.is_set()
    result = await store.append(readings(10, start=50_000))
    assert result.inserted == 10
    assert store.pending_points == stored - 2000 + 10
    await store.inject_fault("none")
    await store.append(readings(10, start=60_000))
    assert not store.disk_full
    events = [e["event"] for e in log_events(log_output)]
    assert events.count("disk_full") == 1 and events.count("disk_space_recovered") == 1


async def test_injected_read_only_fails_writes_and_clears(make_store: MakeStore) -> None:
    store: Store = await make_store()
    await store.append(readings(10))
    await store.inject_fault("read-only")
    with pytest.raises(StoreError, match="read-only"):
        await store.append(readings(10, start=10))
    assert store.pending_points == 10
    assert len(((await store.lease(BOILER, 100)).batch).points) == 10  # reads still work
    await store.inject_fault("none")
    assert (await store.append(readings(10, start=10))).inserted == 10
