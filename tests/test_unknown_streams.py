"""Issue 16 item 4: streams the cloud does not know never delay the ones it does.

A config that maps 3,000 names to ids the cloud does not have (a typo'd id list, or
numeric topic names taken for ids) buffers 3,000 streams the cloud answers 404 for. The
gateway may not spend a request on each before it serves a device the cloud has accepted
before, nor log a line per stream, nor repeat the burst every `parked_retry_s`.

Everything here runs through the real path: QoS 1 publishes to a real Mosquitto, the
running gateway, the sandbox cloud over HTTP (which answers unknown device ids with the
real cloud's 404, /work/shared/blynk-import-api.md §1).
"""

from __future__ import annotations

import io
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from store_kit import sql

from gateway.config import Settings
from gateway.models import StreamKey
from gateway.store import SCHEMA_VERSION, Store, StreamState, migrate
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from gateway.uplink.stream_order import StreamEvents, StreamOrder, TryAllowance
from harness import InProcessGateway, log_events, publish, ts_payload, wait_until

ROUTE = {"topic": "plain/{device}", "datastream_id": 5}  # 101/5 is a Double in the sandbox
UNKNOWN = range(100_000, 103_000)
DEVICES = {"kitchen": 101, **{f"serial{n}": n for n in UNKNOWN}}
# The known reading must arrive within this, where it took 88 s before.
KNOWN_WITHIN_S = 3.0
DEFAULT_TRIES_PER_MIN = 10


def flood() -> list[tuple[str, str]]:
    now_ms = int(time.time() * 1000)
    return [(f"plain/serial{n}", ts_payload(1.5, now_ms - 1000)) for n in UNKNOWN]


def not_found(sandbox: SandboxCloud) -> int:
    return sum(1 for r in sandbox.requests if r.status == 404)


def parked_lines(log: io.StringIO) -> list[dict[str, Any]]:
    return [e for e in log_events(log) if e["event"] in ("stream_parked", "streams_parked")]


async def known_reading_arrives(
    publisher: AckedPublisher, sandbox: SandboxCloud, value: float
) -> float:
    """Publish one reading of the known device; the seconds until the cloud holds it."""
    started = time.monotonic()
    assert await publish(publisher, [("plain/kitchen", ts_payload(value, int(time.time() * 1000)))])
    await wait_until(
        lambda: any(p.device_id == 101 and p.value == value for p in sandbox.accepted),
        KNOWN_WITHIN_S,
        f"the known device's reading {value} (unknown streams must not delay it)",
    )
    return time.monotonic() - started


@pytest.mark.parametrize("pass_through", [False, True], ids=["buffered", "pass_through"])
async def test_thousands_of_unknown_streams_never_delay_a_known_device(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
    pass_through: bool,
) -> None:
    flush = {"parked_retry_s": 5.0, "pass_through": pass_through}
    settings = make_settings([ROUTE], devices=DEVICES, flush=flush)
    runner = InProcessGateway(settings, clock_ms=sandbox.now_ms)
    async with runner as gateway:
        assert gateway.store is not None
        await known_reading_arrives(publisher, sandbox, 1.0)  # the cloud accepts 101/5
        started = time.monotonic()
        assert await publish(publisher, flood()) == len(UNKNOWN)
        await wait_until(lambda: not_found(sandbox) > 0, 10, "the first unknown stream tried")
        # Published after the flood, while the gateway works on it: it goes first.
        await known_reading_arrives(publisher, sandbox, 2.0)
        # Parked streams come due every 5 s here: their retries are rate-limited too.
        await wait_until(lambda: time.monotonic() - started > 7, 10, "a parked-retry period")
        await known_reading_arrives(publisher, sandbox, 3.0)
        elapsed_min = (time.monotonic() - started) / 60
        # At most the burst allowance plus the rate, never one request per stream.
        assert not_found(sandbox) <= DEFAULT_TRIES_PER_MIN * (1 + elapsed_min) + 1
        assert gateway.store.pending_points >= len(UNKNOWN) - not_found(sandbox)
    # A restart remembers which streams the cloud accepted: still first.
    async with InProcessGateway(settings, clock_ms=sandbox.now_ms):
        await known_reading_arrives(publisher, sandbox, 4.0)
    lines = log_events(log_output)
    assert len(parked_lines(log_output)) <= 4, "one line per interval, not one per stream"
    assert len(lines) < 40, [e["event"] for e in lines]


# --------------------------------------------------------------------------- the parts


def test_the_allowance_is_a_minute_at_once_then_even_and_refunds_what_was_not_refused() -> None:
    clock = [0.0]
    allowance = TryAllowance(10, clock=lambda: clock[0])
    assert [allowance.take() for _ in range(11)] == [True] * 10 + [False]
    clock[0] = 5.9
    assert not allowance.take()
    clock[0] = 6.0  # one try every 6 s
    assert allowance.take() and not allowance.take()
    allowance.give_back()  # accepted: it cost nothing
    assert allowance.take()
    clock[0] = 3600.0  # a long quiet spell does not bank more than a minute's worth
    assert sum(allowance.take() for _ in range(100)) == 10
    allowance.reconfigure(2)
    clock[0] = 7200.0
    assert sum(allowance.take() for _ in range(100)) == 2


def state(device: int, datastream: int = 5, parked_until: int | None = None) -> StreamState:
    reason = None if parked_until is None else "device_not_found: no"
    return StreamState(StreamKey(device, datastream), reason, parked_until)


def test_a_plan_serves_proven_streams_and_orders_the_trials() -> None:
    order = StreamOrder(10)
    order.load({StreamKey(1, 5), StreamKey(2, 5), StreamKey(3, 5)})
    streams = [
        state(9),  # new, unknown device
        state(1),  # proven
        state(7, parked_until=2_000),  # refused, due
        state(1, 6),  # new datastream of a known device
        state(2, parked_until=5_000),  # proven, parked, not due
        state(3, parked_until=1_000),  # proven, parked, due
        state(8, parked_until=1_500),  # refused, due earlier than 7
    ]
    plan = order.plan(streams, now_ms=3_000)
    assert [s.key for s in plan.served] == [StreamKey(1, 5)]
    assert [(s.key.device_id, s.key.datastream_id) for s in plan.trials] == [
        (3, 5),
        (1, 6),
        (9, 5),
        (8, 5),
        (7, 5),
    ]
    assert plan.untried == 2
    order.accepted(StreamKey(9, 5))
    order.accepted(StreamKey(1, 5))  # known already: nothing to write
    assert order.unsaved == {StreamKey(9, 5)}
    assert StreamKey(9, 5) in {s.key for s in order.plan(streams, 3_000).served}


def test_many_parked_streams_make_two_lines_per_interval(log_output: io.StringIO) -> None:
    clock = [0.0]
    parked = StreamEvents("stream_parked", "streams_parked", "error", clock=lambda: clock[0])
    for n in range(3000):
        parked.note(StreamKey(100_000 + n, 5), "device_not_found: no such device", retry_in_s=1)
        parked.flush(untried_streams=0)
    clock[0] = 60.0
    parked.flush(untried_streams=7)
    parked.note(StreamKey(5, 5), "datastream_not_found: no")  # a new interval: in full
    parked.flush(force=True)
    lines = [e for e in log_events(log_output) if e["component"] == "flush"]
    assert [e["event"] for e in lines] == ["stream_parked", "streams_parked", "stream_parked"]
    assert lines[0]["device_id"] == 100_000 and lines[0]["reason"].startswith("device_not")
    summary = lines[1]
    assert summary["count"] == 2999 and summary["reasons"] == {"device_not_found": 2999}
    assert summary["examples"] == ["100001/5", "100002/5", "100003/5"]
    assert summary["untried_streams"] == 7 and summary["retry_in_s"] == 1


async def test_a_version_3_file_remembers_the_streams_its_ledger_shows_delivering(
    tmp_path: Path,
) -> None:
    """Upgrading must not turn every known device into a trial: a stream whose device has
    points in the quota ledger, and that the cloud did not refuse, counts as accepted."""
    path = tmp_path / "buffer.db"
    connection = sqlite3.connect(path, isolation_level=None)
    migrate(connection, target=3)
    connection.executemany(
        "INSERT INTO streams (device_id, datastream_id, parked_reason) VALUES (?, ?, ?)",
        [
            (101, 5, None),  # delivering
            (101, 99, "datastream_not_found: Data stream with identifier 99 is not found!"),
            (101, 6, "refused_for_age: too old"),  # known to the cloud, parked for age
            (100000, 5, None),  # never delivered: not in the ledger
        ],
    )
    connection.execute("INSERT INTO quota_days (device_id, day, points) VALUES (101, 'd', 3)")
    connection.close()
    store = await Store.open(path)
    try:
        assert await store.accepted_streams() == {StreamKey(101, 5), StreamKey(101, 6)}
        await store.mark_accepted({StreamKey(100000, 5), StreamKey(101, 5)})
        assert StreamKey(100000, 5) in await store.accepted_streams()
    finally:
        await store.close()
    assert sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
