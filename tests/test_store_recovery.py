"""Recovery of deliberately damaged buffer files: moved aside, salvaged, carried on."""

from __future__ import annotations

import asyncio
import io
import os
import random
import re
from pathlib import Path
from typing import Any

import pytest
import store_kit
from store_kit import (
    BOILER,
    KITCHEN,
    MakeStore,
    append_all,
    as_rows,
    readings,
    sql,
)

from gateway.errors import StoreCorrupt
from gateway.models import StreamKey
from gateway.store import SalvageReport, Store, rawpages, recovery
from harness import log_events

# The store fixtures (shared with the other test_store*.py).
db_path, make_store = store_kit.db_path_fixture, store_kit.make_store_fixture


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
    db_path: Path, make_store: MakeStore, log_output: io.StringIO
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


async def test_cancelling_verify_during_a_recovery_leaves_a_working_store(
    db_path: Path, make_store: MakeStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown cancels the background integrity check; a recovery it started must finish,
    or the store is left with its old connection closed and no new one."""
    original = await build_file(db_path)
    damage(db_path, inner_pages(db_path, stream_id=2, count=3))
    store: Store = await make_store()
    loop = asyncio.get_running_loop()
    verifying: list[asyncio.Task[bool]] = []
    salvage = recovery.recover_file

    def cancel_then_salvage(*args: Any) -> SalvageReport:  # runs in a worker thread
        loop.call_soon_threadsafe(verifying[0].cancel)
        return salvage(*args)

    monkeypatch.setattr(recovery, "recover_file", cancel_then_salvage)
    verifying.append(asyncio.create_task(store.verify()))
    with pytest.raises(asyncio.CancelledError):
        await verifying[0]
    assert store.recovery is not None
    salvaged = set(await store.buffered_points())
    assert salvaged and salvaged <= original
    assert store.pending_points == len(salvaged)
    assert (await store.append(readings(5, start=10_000))).inserted == 5


async def test_damage_found_by_a_read_is_recovered_and_the_read_retried(
    db_path: Path, make_store: MakeStore
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
    db_path: Path, make_store: MakeStore, log_output: io.StringIO
) -> None:
    original = await build_file(db_path)
    with db_path.open("r+b") as handle:
        handle.write(os.urandom(100))
    store: Store = await make_store()
    assert store.recovery is not None and store.recovery.header_repaired
    assert set(await store.buffered_points()) == original
    assert len(corrupt_copies(db_path)) == 1
    assert [e["event"] for e in log_events(log_output)].count("buffer_corrupt") == 1


async def test_salvage_keeps_dead_letters_with_their_detail(
    db_path: Path, make_store: MakeStore
) -> None:
    await build_file(db_path, per_stream=100)
    store = await Store.open(db_path, owner=True)
    batch = (await store.lease(BOILER, 3)).batch
    await store.dead_letter(batch, "rejected", "Invalid value 'x' at index 0.")
    await store.close()
    with db_path.open("r+b") as handle:
        handle.write(os.urandom(100))
    store = await make_store()
    assert store.recovery is not None
    letters = await store.dead_letters(reason="rejected")
    assert sorted(letter.ts_ms or 0 for letter in letters) == [p.ts_ms for p in batch.points]
    assert {letter.detail for letter in letters} == {"Invalid value 'x' at index 0."}


async def test_salvage_keeps_the_streams_the_cloud_accepted(
    db_path: Path, make_store: MakeStore
) -> None:
    """Lost, they would be tried at the new-stream rate until the cloud accepts them again."""
    await build_file(db_path, per_stream=100)
    store = await Store.open(db_path, owner=True)
    await store.mark_accepted({BOILER, KITCHEN})
    await store.close()
    with db_path.open("r+b") as handle:
        handle.write(os.urandom(100))
    store = await make_store()
    assert store.recovery is not None
    assert await store.accepted_streams() == {BOILER, KITCHEN}


async def test_trashed_first_page_falls_back_to_a_raw_page_scan(
    db_path: Path, make_store: MakeStore
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
    db_path: Path, make_store: MakeStore
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
