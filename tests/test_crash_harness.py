"""The crash harness: SIGKILL the real gateway process at random moments, many times.

One gateway subprocess (`python -m gateway run`), a real Mosquitto and the sandbox cloud;
a publisher streams readings that carry their own timestamp the whole time. The gateway is
killed 24 times at random delays, in four phases of six kills each:

* ingest    readings streaming in, group commits every 20 ms
* upload    the cloud answers slowly (50-300 ms), so uploads are in flight at the kill
* token     access tokens live 2 s and are revoked just before the kill, so token
            renewals and 401-retries are in progress
* eviction  the cloud is down and the buffer is capped at 300 readings (drop-oldest), so
            commits evict; by policy the evicted readings are not delivered

Then it checks that every reading the broker acknowledged to the publisher reached the
cloud (eviction phase: or was evicted, counted, and older than every reading kept), and
reports duplicates per phase. The bound asserted is one upload batch per kill; the kinds
of duplicates that remain are explained in README "Data safety".

Set CRASH_HARNESS_SEED to replay a run's random delays (the seed is printed).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.testing.broker import MosquittoBroker
from gateway.testing.process import GatewayProcess, write_config
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import settings_dict, wait_until

KILLS_PER_PHASE = 6
BATCH_SIZE = 100
EVICTION_LIMIT = 300
TOPIC = "sensors/boiler/temperature"  # device 101 / datastream 5
EVICTION_TOPIC = "sensors/kitchen/humidity"  # device 102 / datastream 1


@dataclass
class Phase:
    name: str
    first_index: int = 0
    last_index: int = 0
    kills: int = 0
    delays_s: list[float] = field(default_factory=list)


class Streamer:
    """Publishes readings with their own ts, one every `period_s`, until stopped."""

    def __init__(self, publisher: AckedPublisher, topic: str, base_ts: int) -> None:
        self.publisher = publisher
        self.topic = topic
        self.base_ts = base_ts
        self.next_index = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, period_s: float = 0.002) -> None:
        self._stop.clear()

        def run() -> None:
            while not self._stop.is_set():
                index = self.next_index
                payload = json.dumps({"value": float(index), "ts": self.base_ts + index})
                self.publisher.publish(self.topic, payload)
                self.next_index += 1
                time.sleep(period_s)

        self._thread = threading.Thread(target=run, name=f"stream-{self.topic}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def duplicate_runs(indexes: list[int]) -> list[str]:
    """Contiguous runs of duplicated readings, as "first+length": a batch shows as one run."""
    runs: list[str] = []
    start = previous = None
    for index in sorted(indexes):
        if previous is None or index != previous + 1:
            if start is not None and previous is not None:
                runs.append(f"{start}+{previous - start + 1}")
            start = index
        previous = index
    if start is not None and previous is not None:
        runs.append(f"{start}+{previous - start + 1}")
    return runs


def acked_indexes(publisher: AckedPublisher, topic: str) -> set[int]:
    """Readings the broker acknowledged to the publisher: what must not be lost."""
    return {int(json.loads(payload)["value"]) for t, payload in publisher.acked if t == topic}


def delivered(sandbox: SandboxCloud, device_id: int) -> Counter[int]:
    return Counter(int(p.value) for p in sandbox.accepted if p.device_id == device_id)


@pytest.fixture
def crash_rig(
    make_gateway_process: Callable[..., GatewayProcess],
) -> GatewayProcess:
    return make_gateway_process(
        flush={"batch_size": BATCH_SIZE, "shutdown_flush_s": 0.5}, cloud={"timeout_s": 5.0}
    )


def reconfigure(
    process: GatewayProcess, broker: MosquittoBroker, sandbox: SandboxCloud, db: Path, **store: Any
) -> None:
    """Rewrite the config the process starts with (the next start reads it)."""
    config = settings_dict(
        broker.port,
        sandbox.base_url,
        db,
        flush={"batch_size": BATCH_SIZE, "shutdown_flush_s": 0.5},
        cloud={"timeout_s": 5.0},
        store={"commit_interval_ms": 20, **store},
    )
    write_config(process.config_path, config)


async def run_and_kill(process: GatewayProcess, delay_s: float, before_kill: Any = None) -> None:
    seen = process.event_count()
    process.start()
    await asyncio.to_thread(process.wait_for_event, "mqtt_connected", 20.0, seen)
    await asyncio.sleep(delay_s)
    if before_kill is not None:
        await before_kill()
    await asyncio.to_thread(process.kill)


@pytest.mark.slow
async def test_sigkill_at_random_moments_loses_nothing_acknowledged(
    crash_rig: GatewayProcess,
    broker: MosquittoBroker,
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    tmp_path: Path,
) -> None:
    process = crash_rig
    seed = int(os.environ.get("CRASH_HARNESS_SEED", str(time.time_ns() % 1_000_000)))
    rng = random.Random(seed)
    db = tmp_path / "buffer.db"
    base_ts = int(time.time() * 1000) - 3_600_000
    streamer = Streamer(publisher, TOPIC, base_ts)
    phases: list[Phase] = []
    started = time.monotonic()

    # The broker queues for us only once our session exists: subscribe once first.
    process.start()
    await asyncio.to_thread(process.wait_for_event, "mqtt_connected", 20.0)
    assert await asyncio.to_thread(process.terminate) == 0

    # ---------------------------------------------------------------- phases 1-3
    streamer.start()
    for name in ("ingest", "upload", "token"):
        phase = Phase(name, first_index=streamer.next_index)
        phases.append(phase)
        if name == "upload":
            sandbox.token_ttl_s = 86_400
        if name == "token":
            await sandbox.set_fault("none")
            sandbox.token_ttl_s = 2  # renewed every ~1.8 s
        for _ in range(KILLS_PER_PHASE):
            delay = rng.uniform(0.05, 0.8)
            phase.delays_s.append(round(delay, 3))
            before_kill = None
            if name == "upload":
                await sandbox.set_fault("slow", delay_s=rng.uniform(0.05, 0.3))
            if name == "token":

                async def revoke_then_wait() -> None:
                    sandbox.revoke_tokens()
                    await asyncio.sleep(rng.uniform(0.0, 0.05))

                before_kill = revoke_then_wait
            await run_and_kill(process, delay, before_kill)
            phase.kills += 1
        phase.last_index = streamer.next_index - 1
    streamer.stop()
    await sandbox.set_fault("none")
    sandbox.token_ttl_s = 86_400
    await asyncio.to_thread(publisher.wait_all_acked, 30)
    must_arrive = acked_indexes(publisher, TOPIC)
    process.start()
    try:
        await wait_until(
            lambda: must_arrive <= set(delivered(sandbox, 101)), 60, "every acked reading delivered"
        )
    except AssertionError:
        missing = sorted(must_arrive - set(delivered(sandbox, 101)))
        raise AssertionError(
            f"{len(missing)} acked readings not delivered, e.g. {missing[:10]}; "
            f"published={streamer.next_index} acked={len(must_arrive)} "
            f"delivered={len(delivered(sandbox, 101))}\n{process.tail(30)}"
        ) from None
    # Stopping the daemon is the barrier: a late duplicate arrives before it exits or never.
    assert await asyncio.to_thread(process.terminate) == 0

    # ---------------------------------------------------------------- phase 4: eviction
    reconfigure(process, broker, sandbox, db, max_points=EVICTION_LIMIT, full_policy="drop-oldest")
    await sandbox.set_fault("down")
    evicting = Streamer(publisher, EVICTION_TOPIC, base_ts)
    phase = Phase("eviction", first_index=0)
    phases.append(phase)
    evicting.start(period_s=0.001)
    for _ in range(KILLS_PER_PHASE):
        delay = rng.uniform(0.05, 0.8)
        phase.delays_s.append(round(delay, 3))
        await run_and_kill(process, delay)
        phase.kills += 1
    evicting.stop()
    phase.last_index = evicting.next_index - 1
    await asyncio.to_thread(publisher.wait_all_acked, 30)
    acked_102 = acked_indexes(publisher, EVICTION_TOPIC)
    # Take in what the broker still queues while the cloud is down, then deliver.
    seen = process.event_count()
    process.start()
    await asyncio.to_thread(process.wait_for_event, "mqtt_connected", 20.0, seen)
    await asyncio.sleep(2.0)
    await sandbox.set_fault("none")
    newest = set(sorted(acked_102)[-EVICTION_LIMIT:])
    await wait_until(lambda: newest <= set(delivered(sandbox, 102)), 60, "the newest readings")
    assert await asyncio.to_thread(process.terminate) == 0
    connection = sqlite3.connect(db)
    ((evicted_102,),) = connection.execute(
        "SELECT coalesce(sum(evicted), 0) FROM capacity_drops WHERE device_id = 102"
    ).fetchall()
    connection.close()

    # ---------------------------------------------------------------- verdict
    got_101, got_102 = delivered(sandbox, 101), delivered(sandbox, 102)
    lost = must_arrive - set(got_101)
    missing_102 = acked_102 - set(got_102)
    lines = [
        f"crash harness: seed={seed} kills={sum(p.kills for p in phases)} "
        f"runtime_s={time.monotonic() - started:.1f} batch_size={BATCH_SIZE}",
        f"{'phase':<9} {'kills':>5} {'readings':>8} {'acked':>6} {'dups':>5} {'runs':>4}  "
        "delays_s; duplicate runs (first index+length)",
    ]
    total_duplicates = 0
    for phase in phases:
        got, acked = (got_102, acked_102) if phase.name == "eviction" else (got_101, must_arrive)
        span = range(phase.first_index, phase.last_index + 1)
        duplicates = sum(got[i] - 1 for i in span if got[i] > 1)
        total_duplicates += duplicates
        runs = duplicate_runs([i for i in span if got[i] > 1])
        lines.append(
            f"{phase.name:<9} {phase.kills:>5} {len(span):>8} {len(acked & set(span)):>6} "
            f"{duplicates:>5} {len(runs):>4}  {phase.delays_s}; {runs}"
        )
    lines.append(
        f"eviction: acked={len(acked_102)} delivered={len(set(got_102))} "
        f"evicted_counted={evicted_102} not_delivered={len(missing_102)}"
    )
    report = "\n".join(lines)
    print("\n" + report)
    (tmp_path / "crash_report.txt").write_text(report + "\n")
    assert sum(p.kills for p in phases) >= 20
    # The target: at most one upload batch repeated per kill (README "Data safety").
    assert total_duplicates <= sum(p.kills for p in phases) * BATCH_SIZE
    assert not lost, f"acknowledged readings lost: {sorted(lost)[:20]}"
    # Eviction: only the oldest may be missing, and each is counted as evicted.
    assert len(missing_102) <= evicted_102
    assert not missing_102 & newest
    assert set(got_102) <= acked_102 | set(range(evicting.next_index))
