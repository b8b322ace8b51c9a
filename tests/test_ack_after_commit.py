"""Ack after commit, deterministically: readings the store could not commit survive a SIGKILL.

The gateway acknowledges an MQTT message (PUBACK) only after the SQLite transaction that
holds it committed. So while the store cannot be written, the broker keeps every message,
and a gateway killed in that state loses nothing: the next start receives them again.
The crash harness (`test_crash_harness.py`) hits this window only by chance; here the
store is made unwritable on purpose, from outside the daemon, without any hook in it:
another connection holds SQLite's write lock, so each of the daemon's commits fails
(SQLITE_BUSY once its busy timeout runs out) exactly as a write to a failing disk would.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from gateway.testing.process import GatewayProcess
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import ts_payload, wait_until

TOPIC = "sensors/boiler/temperature"  # device 101 / datastream 5
READINGS = 200


async def test_readings_the_store_refused_are_delivered_once_after_sigkill(
    make_gateway_process: Callable[..., GatewayProcess],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    tmp_path: Path,
) -> None:
    base_ts = int(time.time() * 1000) - 3_600_000
    expected = {base_ts + i: float(i) for i in range(READINGS)}
    process = make_gateway_process()
    process.start()
    await asyncio.to_thread(process.wait_for_event, "mqtt_connected")

    # The store becomes unwritable: this connection takes the write lock and keeps it.
    blocker = sqlite3.connect(tmp_path / "buffer.db", timeout=30.0, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        seen = process.event_count()
        messages = [(TOPIC, ts_payload(value, ts)) for ts, value in expected.items()]
        # The broker accepted every one (PUBACK to the publisher): from here it owes them
        # to the gateway's session until the gateway acknowledges them.
        assert await asyncio.to_thread(publisher.publish_many, messages) == READINGS
        failed = await asyncio.to_thread(process.wait_for_event, "store_write_failed", 30.0, seen)
        assert "locked" in failed["error"]
        assert failed["held"] > 0  # the gateway holds received messages it could not commit
        ((stored,),) = blocker.execute("SELECT count(*) FROM readings").fetchall()
        assert stored == 0

        await asyncio.to_thread(process.kill)
        blocker.execute("ROLLBACK")  # the store is writable again
    finally:
        blocker.close()
    assert sandbox.accepted == []

    process.start()
    await wait_until(
        lambda: {p.ts for p in sandbox.accepted} >= expected.keys(),
        60,
        f"all {READINGS} readings delivered after the restart",
    )
    # A graceful stop ends every upload: nothing can arrive after this.
    assert await asyncio.to_thread(process.terminate) == 0
    delivered = Counter((p.device_id, p.datastream_id, p.ts, p.value) for p in sandbox.accepted)
    assert delivered == Counter({(101, 5, ts, value): 1 for ts, value in expected.items()})
