"""Long store work under systemd: a salvage, an upgrade or a full check must not be killed.

A damaged or old buffer can take longer to salvage than `WatchdogSec=` (or, before READY,
`TimeoutStartSec=`); killed half-way, the next start begins again. The store reports its
progress, and the notifier turns it into `EXTEND_TIMEOUT_USEC=`, `WATCHDOG=1` (once READY)
and `STATUS=`, read here from a real AF_UNIX datagram socket standing in for
`NOTIFY_SOCKET` (test_systemd.py's `NotifyListener`), under a 1 s watchdog. The salvage is
made slow by a delay per salvaged row, injected into `recovery`.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_store_recovery import damage as damage_pages
from test_store_recovery import inner_pages
from test_systemd import WATCHDOG_USEC, NotifyListener

from gateway import app
from gateway.config import Settings
from gateway.models import Reading, StreamKey
from gateway.ops.systemd import LONG_WORK_EXTEND_S, ServiceNotifier
from gateway.store import Store, migrate, progress, recovery
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import InProcessGateway, events, publish, ts_payload, wait_until

# sd_notify's watchdog interval under WATCHDOG_USEC: what systemd must hear at least this often.
MAX_GAP_S = WATCHDOG_USEC / 2_000_000
ROW_DELAY_S = 0.001  # per salvaged row: 3,000 rows make a salvage of over 3 s
BOILER = StreamKey(101, 5)
HUMIDITY = StreamKey(102, 1)


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    listener = NotifyListener(f"@blynk-test-{os.urandom(8).hex()}")
    yield listener
    listener.close()


class SlowSalvage:
    """Wraps `recovery.recover_file`: each salvaged row costs ROW_DELAY_S, and the
    salvage's start and end are recorded (monotonic), as the listener records messages."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.ended = threading.Event()
        self.start_at = self.end_at = 0.0
        salvage, valid = recovery.recover_file, recovery._valid_reading

        def slow_valid(*row: object) -> bool:
            time.sleep(ROW_DELAY_S)
            return valid(*row)

        def timed_salvage(*args: Any) -> recovery.SalvageReport:
            self.start_at = time.monotonic()
            self.started.set()
            try:
                return salvage(*args)
            finally:
                self.end_at = time.monotonic()
                self.ended.set()

        monkeypatch.setattr(recovery, "_valid_reading", slow_valid)
        monkeypatch.setattr(recovery, "recover_file", timed_salvage)

    def window(self, listener: NotifyListener, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(at, m) for at, m in listener.with_key(key) if self.start_at <= at <= self.end_at]

    def longest_silence(self, listener: NotifyListener, key: str) -> float:
        """The longest time without a `key` message from the salvage's start to its end."""
        times = [self.start_at, *(at for at, _ in self.window(listener, key)), self.end_at]
        return max(b - a for a, b in itertools.pairwise(times))


async def write_buffer(path: Path, now_ms: int, per_stream: int) -> None:
    """A closed buffer holding `per_stream` recent readings of two routed streams."""
    store = await Store.open(path, owner=True)
    for key in (BOILER, HUMIDITY):
        items = [
            Reading(key.device_id, key.datastream_id, now_ms - 3_600_000 + i, f"{i}.5")
            for i in range(per_stream)
        ]
        for start in range(0, per_stream, 500):
            await store.append(items[start : start + 500])
    await store.close()


# --------------------------------------------------------------------------- the daemon


async def test_a_slow_salvage_at_start_extends_the_start_timeout_until_ready(
    make_settings: Callable[..., Settings],
    listener: NotifyListener,
    log_output: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Before READY=1 only TimeoutStartSec= applies: EXTEND_TIMEOUT_USEC= keeps coming,
    WATCHDOG=1 does not (it would arm the watchdog early), and the gateway ends READY."""
    db_path = tmp_path / "buffer.db"
    await write_buffer(db_path, int(time.time() * 1000), per_stream=1500)
    with db_path.open("r+b") as handle:  # a torn write over the header
        handle.write(os.urandom(100))
    salvage = SlowSalvage(monkeypatch)
    notifier = ServiceNotifier(listener.address, watchdog_usec=WATCHDOG_USEC)
    try:
        async with InProcessGateway(make_settings(), notifier=notifier) as gateway:
            assert gateway.store is not None and gateway.store.recovery is not None
            assert gateway.store.recovery.readings == 3000
    finally:
        notifier.close()

    assert salvage.end_at - salvage.start_at > 3000 * ROW_DELAY_S
    assert salvage.longest_silence(listener, "EXTEND_TIMEOUT_USEC") <= MAX_GAP_S
    extended = salvage.window(listener, "EXTEND_TIMEOUT_USEC")
    assert {m["EXTEND_TIMEOUT_USEC"] for _, m in extended} == {str(int(LONG_WORK_EXTEND_S * 1e6))}
    statuses = [m["STATUS"] for _, m in extended]
    assert all(status.startswith("salvaging the damaged buffer: ") for status in statuses)
    assert statuses[-1].endswith(" readings read") and statuses[-1] != statuses[0]
    messages = [m for _, m in listener.messages()]
    ready_at = next(i for i, m in enumerate(messages) if m.get("READY") == "1")
    assert not [m for m in messages[:ready_at] if "WATCHDOG" in m]
    assert "EXTEND_TIMEOUT_USEC" in messages[ready_at - 1]  # READY came after the salvage
    [corrupt] = events(log_output, "buffer_corrupt")
    assert corrupt["salvaged_readings"] == 3000
    [work] = events(log_output, "store_long_work")
    assert work["activity"] == "salvaging the damaged buffer"
    [done] = events(log_output, "store_long_work_done")
    assert done["duration_s"] >= 3.0 and done["failed"] is False


async def test_watchdog_fed_while_a_salvage_found_after_start_holds_ingest_up(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    listener: NotifyListener,
    log_output: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Damage only the background integrity check finds: the salvage holds the store, so
    readings published meanwhile wait in ingest, which the watchdog would count as stuck.
    The pings go on through the salvage, and every reading arrives afterwards."""
    monkeypatch.setattr(app, "INGEST_STALL_BUDGET_S", 1.0)  # the daemon's is 60 s
    monkeypatch.setattr(app, "VERIFY_DELAY_S", 0.5)
    db_path = tmp_path / "buffer.db"
    now_ms = int(time.time() * 1000)
    await write_buffer(db_path, now_ms, per_stream=1500)
    damage_pages(db_path, inner_pages(db_path, stream_id=1, count=3))  # the probe misses it
    salvage = SlowSalvage(monkeypatch)
    await sandbox.set_fault("down")  # the backlog stays; batches of 100 never reach the damage
    notifier = ServiceNotifier(listener.address, watchdog_usec=WATCHDOG_USEC)
    topic = "sensors/boiler/temperature"
    fresh = [(topic, ts_payload(99.5 + i, now_ms + i)) for i in range(5)]
    try:
        settings = make_settings(flush={"batch_size": 100})
        async with InProcessGateway(settings, notifier=notifier) as gateway:
            await wait_until(lambda: bool(listener.with_key("READY")), message="READY")
            await asyncio.to_thread(salvage.started.wait, 30)
            ingest = gateway.ingest
            assert ingest is not None
            publishing = asyncio.create_task(publish(publisher, fresh))
            await wait_until(lambda: ingest.held_messages > 0, message="readings held")
            await asyncio.to_thread(salvage.ended.wait, 30)
            assert await publishing == 5  # PUBACKed once committed, after the salvage
            await sandbox.set_fault("none")
            await wait_until(
                lambda: {p.ts for p in sandbox.accepted} >= {now_ms + i for i in range(5)},
                message="the readings published during the salvage",
            )
            # STATUS= is the monitor's summary again once the salvage is over.
            await wait_until(
                lambda: any(
                    at > salvage.end_at and not m["STATUS"].startswith("salvaging")
                    for at, m in listener.with_key("STATUS")
                ),
                message="the monitor's STATUS= after the salvage",
            )
    finally:
        notifier.close()

    assert salvage.end_at - salvage.start_at > 3000 * ROW_DELAY_S - 1.0
    assert salvage.longest_silence(listener, "WATCHDOG") <= MAX_GAP_S
    statuses = [m["STATUS"] for _, m in salvage.window(listener, "EXTEND_TIMEOUT_USEC")]
    assert statuses and all(s.startswith("salvaging the damaged buffer: ") for s in statuses)
    assert not events(log_output, "watchdog_withheld")
    [corrupt] = events(log_output, "buffer_corrupt")
    assert corrupt["error"].startswith("quick_check")


# --------------------------------------------------------------------------- units


def test_long_work_messages_follow_the_service_state(listener: NotifyListener) -> None:
    notifier = ServiceNotifier(listener.address, watchdog_usec=WATCHDOG_USEC)
    extend = str(int(LONG_WORK_EXTEND_S * 1_000_000))
    try:
        notifier.long_work("salvaging: 10 pages read", holds_store=True)
        # Within long_work_every_s: not sent.
        notifier.long_work("salvaging: 20 pages read", holds_store=True)
        assert listener.wait_for(lambda m: "EXTEND_TIMEOUT_USEC" in m) == {
            "EXTEND_TIMEOUT_USEC": extend,  # no WATCHDOG=1 before READY=1
            "STATUS": "salvaging: 10 pages read",
        }
        assert notifier.long_work_active and notifier.long_work_excuses_loops()
        notifier.long_work_done()
        assert not notifier.long_work_active
        assert notifier.long_work_excuses_loops()  # the loops get time to move again ...
        time.sleep(WATCHDOG_USEC / 1e6 + 0.05)
        assert not notifier.long_work_excuses_loops()  # ... one watchdog timeout
        notifier.ready("online, backlog 0")
        # Work beside the loops (the full check): their pings stay the monitor's.
        notifier.long_work("checking: 1 s so far", holds_store=False)
        assert listener.wait_for(lambda m: "checking" in m.get("STATUS", "")) == {
            "EXTEND_TIMEOUT_USEC": extend,
            "STATUS": "checking: 1 s so far",
        }
        assert not notifier.long_work_excuses_loops()
        notifier.long_work_done()
        notifier.long_work("salvaging: 3 pages read", holds_store=True)  # told at once
        assert listener.wait_for(lambda m: "salvaging: 3" in m.get("STATUS", "")) == {
            "EXTEND_TIMEOUT_USEC": extend,
            "WATCHDOG": "1",
            "STATUS": "salvaging: 3 pages read",
        }
        assert notifier.long_work_excuses_loops()
        notifier.long_work_done()
        notifier.stopping("stopping, backlog 0")
        # TimeoutStopSec= is extended; no WATCHDOG=1 after STOPPING=1.
        notifier.long_work("salvaging: 5 pages read", holds_store=True)
        assert listener.wait_for(lambda m: m.get("STATUS") == "salvaging: 5 pages read") == {
            "EXTEND_TIMEOUT_USEC": extend,
            "STATUS": "salvaging: 5 pages read",
        }
        assert [m["STATUS"] for _, m in listener.with_key("EXTEND_TIMEOUT_USEC")] == [
            "salvaging: 10 pages read",
            "checking: 1 s so far",
            "salvaging: 3 pages read",
            "salvaging: 5 pages read",
        ]
    finally:
        notifier.close()


class Recorder:
    """A `LongWorkObserver` that keeps what it was told."""

    def __init__(self) -> None:
        self.told: list[str] = []
        self._lock = threading.Lock()

    def long_work(self, status: str, *, holds_store: bool) -> None:
        with self._lock:
            self.told.append(f"{status} (holds the store)" if holds_store else status)

    def long_work_done(self) -> None:
        with self._lock:
            self.told.append("done")


async def test_a_sound_buffer_opens_and_checks_without_a_word(tmp_path: Path) -> None:
    await write_buffer(tmp_path / "buffer.db", int(time.time() * 1000), per_stream=500)
    recorder = Recorder()
    store = await Store.open(tmp_path / "buffer.db", owner=True, long_work=recorder)
    assert await store.verify()
    await store.close()
    assert recorder.told == []


async def test_an_upgrade_reports_its_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version-1 file: the upgrade rewrites every reading, reported from SQLite's
    progress handler inside the statement; QUIET_S 0 so a test-sized file is reported."""
    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    monkeypatch.setattr(progress, "REPORT_EVERY_S", 0.0)
    path = tmp_path / "buffer.db"
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    migrate(connection, target=1)
    connection.execute("INSERT INTO streams (id, device_id, datastream_id) VALUES (1, 101, 5)")
    connection.executemany(
        "INSERT INTO readings (stream_id, ts_ms, value) VALUES (1, ?, ?)",
        [(1_760_000_000_000 + i, json.dumps(i)) for i in range(20_000)],
    )
    connection.close()
    recorder = Recorder()
    store = await Store.open(path, owner=True, long_work=recorder)
    assert store.pending_points == 20_000
    await store.close()
    assert len(recorder.told) > 2 and recorder.told[-1] == "done"
    for status in recorder.told[:-1]:
        assert status.startswith("upgrading the buffer file (")
        assert status.endswith(" s so far) (holds the store)")
