"""Readings held for the clock, in the store (gateway/store/provisional.py): kept apart
from the upload queue, corrected in chunks, estimated for a boot that never synchronized."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

from store_kit import (
    BASE_TS,
    BOILER,
    KITCHEN,
    MakeStore,
    db_path_fixture,
    make_store_fixture,
    readings,
    sql,
)

from gateway.clock import ClockSettings
from gateway.models import ProvisionalReading, StreamKey
from gateway.store import SCHEMA_VERSION, Store, migrate
from gateway.store.timekeeping import TimeKeeper
from gateway.testing.clocks import FakeTime, SyncSwitch

__all__ = ["db_path_fixture", "make_store_fixture"]

BOOT_A = "aaaaaaaa-0000-4000-8000-000000000001"
BOOT_B = "bbbbbbbb-0000-4000-8000-000000000002"
BOOT_C = "cccccccc-0000-4000-8000-000000000003"
UPTIME_MS = 60_000


def held(count: int, stream: StreamKey = BOILER, start: int = 0) -> list[ProvisionalReading]:
    """`count` readings stamped with this boot's boottime: UPTIME_MS + i seconds."""
    return [
        ProvisionalReading(stream.device_id, stream.datastream_id, UPTIME_MS + i * 1000, str(i))
        for i in range(start, start + count)
    ]


async def test_held_readings_are_stored_apart_from_the_upload_queue(
    make_store: MakeStore, db_path: Path
) -> None:
    store: Store = await make_store(boot_id=BOOT_A)
    result = await store.append([*held(5), *readings(3, KITCHEN)])
    assert (result.inserted, result.held) == (8, 5)
    assert (store.pending_points, store.provisional_points) == (3, 5)
    # The flush loop's view: only the reading with a trusted time.
    assert [state.key for state in await store.pending_streams()] == [KITCHEN]
    assert (await store.lease(BOILER, 100)).batch.points == ()
    assert sql(db_path, "SELECT count(*) FROM provisional") == [(5,)]
    # A broker redelivery of a held reading is one row, as in the buffer.
    again = await store.append(held(1))
    assert (again.inserted, again.duplicates, store.provisional_points) == (0, 1, 5)
    await store.close()
    reopened: Store = await make_store(boot_id=BOOT_A)
    assert reopened.provisional_points == 5


async def test_correction_moves_this_boots_readings_in_chunks_with_ingest_in_between(
    make_store: MakeStore,
) -> None:
    store: Store = await make_store(boot_id=BOOT_A)
    await store.append(held(10))
    offset_ms = BASE_TS - UPTIME_MS  # the wall clock at boottime 0
    new_rows = store.new_rows.listen()
    order: list[str] = []
    correcting = asyncio.create_task(store.correct_provisional(offset_ms, chunk=3))
    correcting.add_done_callback(lambda _: order.append("corrected"))
    await asyncio.sleep(0)  # the first chunk holds the lock
    await store.append(readings(2, KITCHEN, start=100))
    order.append("appended")
    assert await correcting == 10
    assert order == ["appended", "corrected"]
    assert (store.pending_points, store.provisional_points) == (12, 0)
    assert new_rows.is_set()
    points = (await store.lease(BOILER, 100)).batch.points
    assert [(p.ts_ms, p.value_json) for p in points] == [
        (BASE_TS + i * 1000, str(i)) for i in range(10)
    ]
    last = await store.last_correction()
    assert last is not None
    assert (last.boot_id, last.corrected, last.offset_ms, last.estimated) == (
        BOOT_A,
        10,
        offset_ms,
        False,
    )


async def test_once_the_offset_is_known_late_held_readings_go_straight_to_the_buffer(
    make_store: MakeStore,
) -> None:
    """Readings ingest stamped just before the sync reach the store after the correction."""
    store: Store = await make_store(boot_id=BOOT_A)
    store.boot_offset_ms = BASE_TS - UPTIME_MS
    result = await store.append(held(3))
    assert (result.inserted, result.held, store.provisional_points) == (3, 0, 0)
    points = (await store.lease(BOILER, 10)).batch.points
    assert [p.ts_ms for p in points] == [BASE_TS, BASE_TS + 1000, BASE_TS + 2000]


async def test_an_earlier_boot_is_estimated_from_its_own_last_trusted_moment(
    make_store: MakeStore,
) -> None:
    first: Store = await make_store(boot_id=BOOT_A)
    await first.record_trusted(BASE_TS, UPTIME_MS - 30_000)  # trusted, then it was not
    await first.append(held(4))
    await first.close()
    store: Store = await make_store(boot_id=BOOT_B)
    [boot] = await store.earlier_boots()
    assert (boot.boot_id, boot.readings, boot.estimated_from) == (BOOT_A, 4, "own")
    assert boot.offset_ms == BASE_TS - (UPTIME_MS - 30_000)
    assert await store.settle_earlier_boot(boot, keep=True) == 4
    points = (await store.lease(BOILER, 10)).batch.points
    assert [p.ts_ms for p in points] == [BASE_TS + 30_000 + i * 1000 for i in range(4)]
    last = await store.last_correction()
    assert last is not None and last.estimated and last.boot_id == BOOT_A
    assert (store.pending_points, store.provisional_points) == (4, 0)
    assert await store.earlier_boots() == []


async def test_a_boot_that_never_synchronized_is_a_lower_bound_from_the_boot_before(
    make_store: MakeStore,
) -> None:
    synced: Store = await make_store(boot_id=BOOT_A)
    await synced.record_trusted(BASE_TS, 5_000_000)
    await synced.close()
    never: Store = await make_store(boot_id=BOOT_B)
    await never.append(held(3))
    await never.close()
    store: Store = await make_store(boot_id=BOOT_C)
    [boot] = await store.earlier_boots()
    # Boot B started after A's last trusted moment: wall >= that moment + B's boottime.
    assert (boot.boot_id, boot.offset_ms, boot.estimated_from) == (BOOT_B, BASE_TS, "previous")
    assert await store.settle_earlier_boot(boot, keep=False) == 3
    letters = await store.dead_letters(reason="clock_unknown")
    assert sorted(letter.ts_ms or 0 for letter in letters) == [
        BASE_TS + UPTIME_MS + i * 1000 for i in range(3)
    ]
    assert {(letter.device_id, letter.datastream_id) for letter in letters} == {(101, 5)}
    assert all("lower bound" in (letter.detail or "") for letter in letters)
    assert (store.pending_points, store.provisional_points) == (0, 0)
    last = await store.last_correction()
    assert last is not None and (last.dead_lettered, last.corrected) == (3, 0)


async def test_without_any_trusted_moment_there_is_no_estimate_to_keep(
    make_store: MakeStore,
) -> None:
    never: Store = await make_store(boot_id=BOOT_A)
    await never.append(held(2))
    await never.close()
    store: Store = await make_store(boot_id=BOOT_B)
    [boot] = await store.earlier_boots()
    assert (boot.offset_ms, boot.estimated_from) == (None, None)
    assert await store.settle_earlier_boot(boot, keep=True) == 2  # nothing to keep it with
    letters = await store.dead_letters(reason="clock_unknown")
    assert [letter.ts_ms for letter in letters] == [None, None]
    assert all("no time" in (letter.detail or "") for letter in letters)


async def test_a_version_3_file_gains_the_clock_tables(
    db_path: Path, make_store: MakeStore
) -> None:
    connection = sqlite3.connect(db_path, isolation_level=None)
    migrate(connection, target=3)
    connection.execute("INSERT INTO streams (id, device_id, datastream_id) VALUES (1, 101, 5)")
    connection.execute(
        "INSERT INTO readings (stream_id, ts_ms, value) VALUES (1, ?, '1')", (BASE_TS,)
    )
    connection.close()
    store: Store = await make_store(boot_id=BOOT_A)
    assert (store.pending_points, store.provisional_points) == (1, 0)
    await store.append(held(2))
    await store.close()
    assert sql(db_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert sql(db_path, "SELECT count(*) FROM provisional") == [(2,)]


async def test_a_salvage_keeps_the_held_readings(db_path: Path, make_store: MakeStore) -> None:
    store = await Store.open(db_path, owner=True, boot_id=BOOT_A)
    await store.append([*held(20), *readings(20)])
    await store.record_trusted(BASE_TS, UPTIME_MS)
    await store.close()
    with db_path.open("r+b") as handle:
        handle.write(os.urandom(100))  # a trashed header: everything is salvaged
    salvaged: Store = await make_store(boot_id=BOOT_A)
    assert salvaged.recovery is not None
    assert (salvaged.pending_points, salvaged.provisional_points) == (20, 20)
    assert await salvaged.correct_provisional(BASE_TS) == 20


async def test_the_timekeeper_follows_the_clock_losing_and_regaining_trust(
    make_store: MakeStore, db_path: Path
) -> None:
    """Held readings are corrected at each sync with the offset of that moment (a step in
    between included); trusted moments are recorded at each sync and every interval."""
    fake = FakeTime(true_ms=lambda: BASE_TS, uptime_ms=UPTIME_MS, boot_id=BOOT_A)
    sync = SyncSwitch()
    now = [0.0]
    store: Store = await make_store(boot_id=BOOT_A, clock_ms=fake.wall_ms)
    keeper = TimeKeeper(
        fake.clock(sync), store, ClockSettings(), record_every_s=600, monotonic=lambda: now[0]
    )
    await keeper.start()
    assert store.boot_offset_ms is None
    assert sql(db_path, "SELECT count(*) FROM boots WHERE trusted_wall_ms IS NOT NULL") == [(0,)]
    await store.append([ProvisionalReading(101, 5, fake.boottime_ms(), "1")])
    sync.synchronized = True
    await keeper.tick()
    first_offset = BASE_TS - fake.boottime_ms()
    assert store.boot_offset_ms is not None and abs(store.boot_offset_ms - first_offset) < 50
    assert (store.provisional_points, store.pending_points) == (0, 1)
    [(wall, _)] = sql(db_path, "SELECT trusted_wall_ms, trusted_boottime_ms FROM boots")
    assert wall == BASE_TS
    # Trust is lost, the clock steps 5 s while nobody trusts it, then it syncs again.
    sync.synchronized = False
    await keeper.tick()
    assert store.boot_offset_ms is None
    await store.append([ProvisionalReading(101, 5, fake.boottime_ms(), "2")])
    assert store.provisional_points == 1
    fake.step(5000)
    sync.synchronized = True
    await keeper.tick()
    points = (await store.lease(BOILER, 10)).batch.points
    assert [p.value_json for p in points] == ["1", "2"]
    assert abs(points[1].ts_ms - (BASE_TS + 5000)) < 50  # the offset after the step
    assert keeper.last_correction is not None and keeper.last_correction.corrected == 2
    # Every record_every_s while trusted, the moment is written again.
    now[0] = 601.0
    await keeper.tick()
    [(wall, _)] = sql(db_path, "SELECT trusted_wall_ms, trusted_boottime_ms FROM boots")
    assert wall == BASE_TS + 5000
