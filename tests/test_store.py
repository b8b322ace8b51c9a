"""The buffer itself, on real SQLite files: schema upgrade, capacity policies, start-up
record, full disk and read-only faults, and recovery of deliberately damaged files."""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import log_events
from gateway.errors import BufferFull, StoreCorrupt, StoreError
from gateway.models import Reading, StreamKey
from gateway.store import SCHEMA_VERSION, Capacity, RejectedPayload, Store, migrate, rawpages

BASE_TS = 1_760_000_000_000
BOILER = StreamKey(101, 5)
KITCHEN = StreamKey(102, 1)


def readings(
    count: int, stream: StreamKey = BOILER, start: int = 0, step: int = 1, width: int = 0
) -> list[Reading]:
    """`count` readings of one stream at BASE_TS + start + i*step; value i (or a long text)."""
    out = []
    for i in range(start, start + count):
        value = f'"{i:0{width}d}"' if width else str(i)
        out.append(Reading(stream.device_id, stream.datastream_id, BASE_TS + i * step, value))
    return out


def as_rows(items: list[Reading]) -> set[tuple[int, int, int, str]]:
    return {(r.device_id, r.datastream_id, r.ts_ms, r.value_json) for r in items}


async def append_all(store: Store, items: list[Reading], group: int = 50) -> None:
    for start in range(0, len(items), group):
        await store.append(items[start : start + group])


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "buffer.db"


@pytest.fixture
async def make_store(db_path: Path) -> Any:
    opened: list[Store] = []

    async def make(**kwargs: Any) -> Store:
        kwargs.setdefault("owner", True)
        store = await Store.open(kwargs.pop("path", db_path), **kwargs)
        opened.append(store)
        return store

    yield make
    for store in opened:
        with contextlib.suppress(ValueError):  # already closed by the test
            await store.close()


def sql(path: Path, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute(statement, params).fetchall()
    finally:
        connection.close()


# --------------------------------------------------------------------------- basics


async def test_lease_and_ack_find_rows_by_key_and_free_space(
    make_store: Callable[..., Any],
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
    db_path: Path, make_store: Any
) -> None:
    store: Store = await make_store()
    await store.append(readings(10) + readings(10, KITCHEN))
    boiler, kitchen = (await store.lease(BOILER, 4)).batch, (await store.lease(KITCHEN, 6)).batch
    await store.ack_many([(boiler, "2025-10-09"), (kitchen, "2025-10-09")])
    assert store.pending_points == 10
    assert await store.points_sent(101, "2025-10-09") == (4, False)
    assert await store.points_sent(102, "2025-10-09") == (6, False)
    assert (await store.counts())["buffered"] == 10


async def test_version_1_file_is_upgraded_in_place(db_path: Path, make_store: Any) -> None:
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


# --------------------------------------------------------------------------- start-up record


async def test_clean_close_lets_the_next_start_skip_counting(
    db_path: Path, make_store: Any
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
    db_path: Path, make_store: Any
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
    make_store: Any, log_output: io.StringIO
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
    make_store: Any, log_output: io.StringIO
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


async def test_drop_newest_refuses_new_readings_but_not_redeliveries(make_store: Any) -> None:
    store: Store = await make_store(capacity=Capacity(max_points=50, policy="drop-newest"))
    result = await store.append(readings(80))
    assert (result.inserted, result.refused, result.evicted) == (50, 30, 0)
    assert result.refused_by_device == {101: 30}
    again = await store.append(readings(5))  # already stored: duplicates, not refusals
    assert (again.inserted, again.duplicates, again.refused) == (0, 5, 0)
    assert set(await store.buffered_points()) == as_rows(readings(50))
    assert (await store.counts())["refused"] == 30


async def test_backpressure_refuses_the_commit_until_uploads_free_space(
    make_store: Any, log_output: io.StringIO
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
    db_path: Path, make_store: Any
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
    db_path: Path, make_store: Any
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


async def test_dead_letters_are_pruned_to_the_limit(make_store: Any) -> None:
    store: Store = await make_store(capacity=Capacity(max_dead_letters=20))
    for i in range(5):
        rejected = [RejectedPayload("bad_payload: x", "t", f"{i}-{j}".encode()) for j in range(10)]
        await store.append([], rejected)
    letters = await store.dead_letters(limit=100)
    assert len(letters) == 20
    assert (await store.counts())["dead_letters"] == 20


# --------------------------------------------------------------------------- faults


async def test_injected_full_disk_holds_appends_but_deletes_work_and_free_room(
    make_store: Any, log_output: io.StringIO
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


async def test_injected_read_only_fails_writes_and_clears(make_store: Any) -> None:
    store: Store = await make_store()
    await store.append(readings(10))
    await store.inject_fault("read-only")
    with pytest.raises(StoreError, match="read-only"):
        await store.append(readings(10, start=10))
    assert store.pending_points == 10
    assert len(((await store.lease(BOILER, 100)).batch).points) == 10  # reads still work
    await store.inject_fault("none")
    assert (await store.append(readings(10, start=10))).inserted == 10


# --------------------------------------------------------------------------- corruption


async def build_file(path: Path, per_stream: int = 3000) -> set[tuple[int, int, int, str]]:
    """A closed (fully checkpointed) buffer with three streams; returns its rows."""
    store = await Store.open(path, owner=True)
    items = (
        readings(per_stream)
        + readings(per_stream, KITCHEN)
        + readings(per_stream, StreamKey(103, 1))
    )
    await append_all(store, items, group=1000)
    await store.close()
    return as_rows(items)


def rows_on_pages(path: Path, pages: set[int]) -> set[tuple[int, int, str]]:
    """(stream, ts, value) keys stored on the given pages of an intact file."""
    raw = rawpages.RawPages.open(path, page_size_of(path))
    assert raw is not None
    return set(rawpages.raw_readings(raw, only=pages))


def inner_pages(path: Path, stream_id: int, count: int) -> list[int]:
    """`count` readings leaves holding only `stream_id`'s rows, away from its first and last.

    Start-up probes the edges of each stream (min and max timestamp); damage in here is
    only found by the full check or by a read that crosses it.
    """
    raw = rawpages.RawPages.open(path, page_size_of(path))
    assert raw is not None
    (low, high) = sql(
        path, "SELECT min(ts_ms), max(ts_ms) FROM readings WHERE stream_id = ?", (stream_id,)
    )[0]
    chosen = []
    for page in readings_pages(path):
        data = raw.page(page)
        if data is None or data[0] != 0x0A:  # leaves only: interior pages are on every path
            continue
        rows = list(rawpages.raw_readings(raw, only={page}))
        if rows and all(sid == stream_id and low < ts < high for sid, ts, _ in rows):
            chosen.append(page)
    return chosen[len(chosen) // 2 : len(chosen) // 2 + count]


def readings_pages(path: Path) -> list[int]:
    return [
        row[0]
        for row in sql(path, "SELECT pageno FROM dbstat WHERE name = 'readings' ORDER BY pageno")
    ]


def page_size_of(path: Path) -> int:
    return int(sql(path, "PRAGMA page_size")[0][0])


def damage(path: Path, pages: list[int]) -> None:
    page_size = page_size_of(path)
    noise = random.Random(7)
    with path.open("r+b") as handle:
        for page in pages:
            handle.seek((page - 1) * page_size)
            handle.write(bytes(noise.getrandbits(8) for _ in range(page_size)))


def streams_of(rows: set[tuple[int, int, str]], path: Path) -> set[tuple[int, int, int, str]]:
    mapping = {
        sid: (dev, ds)
        for sid, dev, ds in sql(path, "SELECT id, device_id, datastream_id FROM streams")
    }
    return {(*mapping[sid], ts, value) for sid, ts, value in rows}


def corrupt_copies(path: Path) -> list[Path]:
    return sorted(
        p
        for p in path.parent.iterdir()
        if re.fullmatch(r"buffer\.db\.corrupt-\d{8}T\d{6}Z", p.name)
    )


async def test_damaged_middle_pages_are_moved_aside_and_the_rest_salvaged(
    db_path: Path, make_store: Any, log_output: io.StringIO
) -> None:
    original = await build_file(db_path)
    hit = inner_pages(db_path, stream_id=2, count=3)
    lost = streams_of(rows_on_pages(db_path, set(hit)), db_path)
    assert 0 < len(lost) < len(original) // 10
    damage(db_path, hit)
    store: Store = await make_store()  # the start-up probe only touches the edges
    assert await store.verify() is False
    [aside] = corrupt_copies(db_path)
    assert store.recovery is not None and store.recovery.moved_to == aside
    salvaged = set(await store.buffered_points())
    assert salvaged <= original
    assert salvaged >= original - lost  # every row on an undamaged page came back
    assert store.pending_points == len(salvaged)
    [event] = [e for e in log_events(log_output) if e["event"] == "buffer_corrupt"]
    assert event["level"] == "error" and event["salvaged_readings"] == len(salvaged)
    assert event["moved_to"] == str(aside)
    # ... and the gateway carries on with the fresh file.
    assert (await store.append(readings(5, start=10_000))).inserted == 5
    assert await store.verify() is True


async def test_damage_found_by_a_read_is_recovered_and_the_read_retried(
    db_path: Path, make_store: Any
) -> None:
    original = await build_file(db_path)
    pages = readings_pages(db_path)
    damage(db_path, pages[2:4])  # early pages: the oldest readings of the first stream
    store: Store = await make_store()
    batch = (await store.lease(BOILER, 3000)).batch  # would read the damaged pages
    assert store.recovery is not None
    assert batch.points  # served from the salvaged file
    assert set(await store.buffered_points()) <= original


async def test_trashed_header_is_repaired_and_everything_salvaged(
    db_path: Path, make_store: Any, log_output: io.StringIO
) -> None:
    original = await build_file(db_path)
    with db_path.open("r+b") as handle:
        handle.write(os.urandom(100))
    store: Store = await make_store()
    assert store.recovery is not None and store.recovery.header_repaired
    assert set(await store.buffered_points()) == original
    assert len(corrupt_copies(db_path)) == 1
    assert [e["event"] for e in log_events(log_output)].count("buffer_corrupt") == 1


async def test_trashed_first_page_falls_back_to_a_raw_page_scan(
    db_path: Path, make_store: Any
) -> None:
    store = await Store.open(db_path, owner=True)
    items = readings(4000) + readings(4000, KITCHEN)
    await append_all(store, items, group=1000)
    # Deliver the oldest half of the boiler's: their pages go to the freelist, and must not
    # come back from the dead.
    for _ in range(2):
        await store.ack((await store.lease(BOILER, 1000)).batch, "d")
    await store.close()
    assert sql(db_path, "PRAGMA freelist_count")[0][0] > 0
    damage(db_path, [1])
    store = await make_store()
    assert store.recovery is not None and not store.recovery.header_repaired
    assert set(await store.buffered_points()) == as_rows(
        readings(2000, start=2000) + readings(4000, KITCHEN)
    )


async def test_a_file_of_garbage_is_replaced_by_an_empty_buffer(
    db_path: Path, make_store: Any
) -> None:
    db_path.write_bytes(os.urandom(64 * 1024))
    store: Store = await make_store()
    assert store.pending_points == 0 and store.recovery is not None
    assert len(corrupt_copies(db_path)) == 1
    assert (await store.append(readings(3))).inserted == 3


async def test_only_the_owner_moves_a_damaged_file(db_path: Path) -> None:
    db_path.write_bytes(os.urandom(8192))
    with pytest.raises(StoreCorrupt):
        await Store.open(db_path)
    assert db_path.exists() and corrupt_copies(db_path) == []
