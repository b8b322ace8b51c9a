"""Receive stamps: readings without a time of their own never run ahead of their arrival.

The promise through the running daemon is in test_routes_e2e.py; here the rule itself,
through `RouteTable.route` (what the daemon calls) and against a real buffer file.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import RouteSettings, load_settings
from gateway.ingest.routes import RouteTable
from gateway.ingest.routes.stamps import MAX_RUNS, REMEMBERED_RUNS, UsedStamps
from gateway.store import Store
from gateway.testing.broker import MosquittoBroker
from gateway.testing.process import write_config
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import InProcessGateway, settings_dict, wait_until

R = 1_760_000_000_000  # arrival, epoch ms
BIG = 1 << 20  # max_payload_bytes for the big arrays
ROUTES = [
    RouteSettings(topic="arr/k", device_id=1, datastream_id=7, format="array"),
    RouteSettings(topic="plain/k", device_id=1, datastream_id=7),
    RouteSettings(topic="other/k", device_id=1, datastream_id=8, format="array"),
    RouteSettings(topic="senml/k", device_id=1, format="senml", fields={"temp": 7}),
]


def untimed_array(count: int, value: object = None) -> bytes:
    """`count` readings without times; values 0..count-1 unless one value is given."""
    return json.dumps([{"value": i if value is None else value} for i in range(count)]).encode()


def stamps(table: RouteTable, topic: str, payload: bytes, received_ms: int) -> list[int]:
    outcome = table.route(topic, payload, received_ms)
    assert not outcome.refusals, outcome.refusals
    return [reading.ts_ms for reading in outcome.readings]


def test_an_untimed_array_ends_at_its_arrival_in_its_order() -> None:
    table = RouteTable(ROUTES, BIG)
    outcome = table.route("arr/k", untimed_array(50_000), R)
    # element i keeps its place: value i, stamp R - 49,999 + i; the last is the arrival
    assert [(r.ts_ms, r.value_json) for r in outcome.readings] == [
        (R - 49_999 + i, str(i)) for i in range(50_000)
    ]


def test_the_next_reading_after_a_big_array_keeps_its_own_receive_time() -> None:
    table = RouteTable(ROUTES, BIG)
    stamps(table, "arr/k", untimed_array(50_000), R)
    assert stamps(table, "plain/k", b"21.5", R + 40) == [R + 40]
    # a small array after it: the latest free milliseconds, around the reading's
    assert stamps(table, "arr/k", untimed_array(3), R + 41) == [R + 38, R + 39, R + 41]


def test_a_second_array_in_the_same_millisecond_goes_just_before_the_first() -> None:
    """Both cannot end at the arrival: the second takes the free milliseconds below the
    first rather than stamps after the arrival (or the first one's, which the buffer would
    take for duplicates when the values are equal)."""
    table = RouteTable(ROUTES, BIG)
    first = stamps(table, "arr/k", untimed_array(1000, 0), R)
    second = stamps(table, "arr/k", untimed_array(1000, 0), R)
    assert first == list(range(R - 999, R + 1))
    assert second == list(range(R - 1999, R - 999))


async def test_equal_values_of_two_arrays_in_one_millisecond_are_all_stored(
    tmp_path: Path,
) -> None:
    """What the stamps are for: the buffer keeps one row per (stream, ts, value)."""
    table = RouteTable(ROUTES, BIG)
    readings = [
        reading
        for _ in range(2)
        for reading in table.route("arr/k", untimed_array(3000, 1), R).readings
    ]
    store = await Store.open(tmp_path / "buffer.db", owner=True)
    try:
        result = await store.append(readings)
        assert (result.inserted, result.duplicates) == (6000, 0)
    finally:
        await store.close()
    assert max(reading.ts_ms for reading in readings) == R


def test_an_array_avoids_the_stamps_of_single_readings_before_it() -> None:
    table = RouteTable(ROUTES, BIG)
    singles = [stamps(table, "plain/k", b"1", R - 1500 + 500 * i)[0] for i in range(3)]
    assert singles == [R - 1500, R - 1000, R - 500]
    block = stamps(table, "arr/k", untimed_array(2000), R)
    assert block == sorted(block) and len(set(block)) == 2000
    assert max(block) == R and not set(block) & set(singles)
    assert min(block) == R - 2002  # the 2,000 latest free milliseconds


def test_other_streams_and_timed_readings_are_not_moved() -> None:
    table = RouteTable(ROUTES, BIG)
    stamps(table, "arr/k", untimed_array(5000), R)
    assert stamps(table, "other/k", untimed_array(2), R) == [R - 1, R]
    timed = json.dumps([{"value": 1, "ts": R - 10}, {"value": 2}, {"value": 3}]).encode()
    # the payload's own time is kept; the two untimed ones take what is free before R + 5
    assert stamps(table, "arr/k", timed, R + 5) == [R - 10, R + 4, R + 5]


def test_a_senml_pack_without_times_is_stamped_the_same_way() -> None:
    table = RouteTable(ROUTES, BIG)
    pack = json.dumps([{"n": "temp", "v": 20 + i} for i in range(300)]).encode()
    assert stamps(table, "senml/k", pack, R) == list(range(R - 299, R + 1))


def test_a_reload_keeps_the_stamps_handed_out() -> None:
    old = RouteTable(ROUTES, BIG)
    first = stamps(old, "arr/k", untimed_array(1000, 0), R)
    new = RouteTable(ROUTES, BIG)
    new.keep_receive_stamps(old)
    second = stamps(new, "arr/k", untimed_array(1000, 0), R + 10)
    assert not set(first) & set(second) and max(second) == R + 10


async def test_a_reload_in_the_running_daemon_keeps_the_stamps_handed_out(
    broker: MosquittoBroker, sandbox: SandboxCloud, publisher: AckedPublisher, tmp_path: Path
) -> None:
    """SIGHUP builds a new route table; an untimed array after it must not reuse the stamps
    of one before it (equal values would be dropped as duplicates)."""
    route = {"topic": "arr/boiler", "format": "array", "device_id": 101, "datastream_id": 5}
    config = settings_dict(
        broker.port,
        sandbox.base_url,
        tmp_path / "buffer.db",
        [route],
        mqtt={"max_payload_bytes": BIG},
    )
    path = write_config(tmp_path / "gateway.toml", config)
    count = 3000  # 3 s of stamps: the reload and the second publish take far less
    async with InProcessGateway(load_settings(path), config_path=path) as gateway:
        ingest = gateway.ingest
        assert ingest is not None
        first_table = ingest.routes
        await asyncio.to_thread(publisher.publish, "arr/boiler", untimed_array(count, 1))
        await wait_until(lambda: ingest.stats.stored == count, 20, "the first array stored")
        gateway.request_reload()
        await wait_until(lambda: ingest.routes is not first_table, 20, "the reload")
        await asyncio.to_thread(publisher.publish, "arr/boiler", untimed_array(count, 1))
        await wait_until(lambda: ingest.stats.received == 2, 20, "the second array")
        await wait_until(lambda: len(sandbox.accepted) >= 2 * count, 30, "both arrays uploaded")
        assert ingest.stats.duplicates == 0
    assert len({point.ts for point in sandbox.accepted}) == 2 * count


def test_single_readings_in_one_millisecond_stay_in_order() -> None:
    """A lone reading moves at most a millisecond per message past the stream's last
    stamp (a burst): order kept, never a message's size ahead."""
    table = RouteTable(ROUTES, BIG)
    stamps(table, "arr/k", untimed_array(5000), R)
    assert [stamps(table, "plain/k", b"1", R)[0] for _ in range(3)] == [R + 1, R + 2, R + 3]
    assert stamps(table, "arr/k", untimed_array(1), R) == [R + 4]


def test_beyond_the_remembered_runs_the_rest_follows_the_last_stamp() -> None:
    """The documented limit: stamps at or below the forgotten runs are never handed out
    again, so a block bigger than the free milliseconds remembered runs past."""
    used = UsedStamps()
    singles = [R - 10 * (MAX_RUNS + 1) + 10 * i for i in range(MAX_RUNS + 1)]  # 10 ms apart
    assert [used.after(ms) for ms in singles] == singles
    assert len(used.lows) == REMEMBERED_RUNS  # the oldest were forgotten in one batch
    floor = used.floor
    assert floor == singles[-REMEMBERED_RUNS - 1]
    free = [ms for ms in range(floor + 1, R + 1) if ms not in singles]
    block = used.before(len(free) + 5, R)
    assert block == [*free, R + 1, R + 2, R + 3, R + 4, R + 5]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 300), st.integers(1, 400)),  # (ms since the last, count)
        min_size=1,
        max_size=MAX_RUNS // 2,
    )
)
def test_stamps_are_unique_and_blocks_never_pass_their_arrival(
    messages: list[tuple[int, int]],
) -> None:
    used = UsedStamps()
    seen: set[int] = set()
    now = R
    for step, count in messages:
        now += step
        if count == 1:
            stamp = used.after(now)
            assert stamp >= now and stamp > max(seen, default=0)
            got = [stamp]
        else:
            got = used.before(count, now)
            assert got == sorted(got) and max(got) <= now
        assert len(got) == count and not seen & set(got)
        seen.update(got)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 50), st.integers(1, 200)),
        min_size=MAX_RUNS,
        max_size=4 * MAX_RUNS,
    )
)
def test_stamps_stay_unique_when_older_runs_are_forgotten(
    messages: list[tuple[int, int]],
) -> None:
    used = UsedStamps()
    seen: set[int] = set()
    now = R
    for step, count in messages:
        now += step
        floor = used.floor
        got = [used.after(now)] if count == 1 else used.before(count, now)
        assert len(got) == count and got == sorted(got) and not seen & set(got)
        assert min(got) > floor
        seen.update(got)
