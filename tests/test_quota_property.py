"""Property test of the quota ledger: the real FlushLoop and Store, a scripted cloud.

For random sequences of readings, day changes and cloud answers: no device is ever sent
more than its daily limit on any day, and no reading is lost (each one ends delivered or
dead-lettered with a reason).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import CloudSettings, FlushSettings
from gateway.errors import BatchRejected, CloudServerError, CloudUnreachable, QuotaRefused
from gateway.models import Batch, Reading
from gateway.store import Store
from gateway.uplink.flush import FlushLoop
from gateway.uplink.quota import DailyQuota

LIMIT = 7
DAY_MS = 86_400_000
START_MS = 1_790_000_000_000 - 1_790_000_000_000 % DAY_MS + 3_600_000


class ScriptedCloud:
    """Answers uploads from a script; records what it accepted per device and day.

    A `CloudClient`: the flush loop takes it as it takes the real one.
    """

    server = "scripted"

    def __init__(self, answers: list[str], clock: list[int]) -> None:
        self.answers = answers
        self.clock = clock
        self.accepted: list[tuple[int, int, int, str]] = []
        self.sent_per_day: Counter[tuple[int, str]] = Counter()
        self.quota = DailyQuota(LIMIT)

    async def upload(self, batch: Batch) -> None:
        answer = self.answers.pop(0) if self.answers else "ok"
        if answer == "server_error":
            raise CloudServerError("503", status=503)
        if answer == "network":
            raise CloudUnreachable("connection refused")
        if answer == "quota":
            raise QuotaRefused("Device has exceeded the daily limit", status=400)
        if answer == "reject" and len(batch) >= 1:
            raise BatchRejected("Invalid value", status=400)
        day = self.quota.day_of(self.clock[0])
        self.sent_per_day[(batch.stream.device_id, day)] += len(batch)
        for point in batch.points:
            key = (batch.stream.device_id, batch.stream.datastream_id, point.ts_ms)
            self.accepted.append((*key, point.value_json))

    async def probe(self) -> None:
        """The scripted cloud is always reachable: a network answer is a one-off."""

    async def aclose(self) -> None:
        return None


step = st.one_of(
    st.tuples(st.just("readings"), st.integers(1, 3), st.integers(1, 12)),
    st.tuples(st.just("next_day"), st.just(0), st.just(0)),
    st.tuples(st.just("pass"), st.just(0), st.just(0)),
)
answer = st.sampled_from(["ok", "ok", "ok", "server_error", "network", "quota", "reject"])


async def scenario(steps: list[tuple[str, int, int]], answers: list[str], db: Path) -> None:
    clock = [START_MS]
    store = await Store.open(db, clock_ms=lambda: clock[0])
    cloud = ScriptedCloud(list(answers), clock)
    flush = FlushLoop(
        store,
        cloud,
        FlushSettings(batch_size=3),
        CloudSettings(client_id="c", client_secret="s", daily_points_limit=LIMIT),
        clock_ms=lambda: clock[0],
    )
    appended: set[tuple[int, int, int, str]] = set()
    sequence = 0
    try:
        for kind, device, count in steps:
            if kind == "readings":
                readings = []
                for _ in range(count):
                    sequence += 1
                    readings.append(Reading(device, 1, clock[0] - 1000 + sequence, str(sequence)))
                await store.append(readings)
                appended |= {
                    (r.device_id, r.datastream_id, r.ts_ms, r.value_json) for r in readings
                }
            elif kind == "next_day":
                clock[0] += DAY_MS
            else:
                await flush.run_pass(drain=True)
        # Drain: the cloud now says yes; days pass until the buffer is empty.
        cloud.answers.clear()
        for _ in range(200):
            if store.pending_points == 0:
                break
            await flush.run_pass(drain=True)
            if store.pending_points:
                clock[0] += DAY_MS
        letters = await store.dead_letters(limit=100_000)
        dead = {(d.device_id, d.datastream_id, d.ts_ms, d.value_json) for d in letters}
        reasons = [d.reason for d in letters]
        remaining = store.pending_points
    finally:
        await store.close()

    for (device, day), points in cloud.sent_per_day.items():
        assert points <= LIMIT, f"device {device} was sent {points} > {LIMIT} points on {day}"
    delivered = set(cloud.accepted)
    assert remaining == 0
    assert delivered | dead == appended, "a reading was lost"
    assert not delivered & dead, "a reading was both delivered and dead-lettered"
    assert all(reason for reason in reasons), "a dead letter without a reason"


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(steps=st.lists(step, min_size=1, max_size=25), answers=st.lists(answer, max_size=30))
def test_quota_ledger_never_exceeds_limit_and_loses_nothing(
    steps: list[tuple[str, int, int]], answers: list[str]
) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        asyncio.run(scenario(steps, answers, Path(workdir) / "buffer.db"))


def test_day_boundaries_follow_the_configured_timezone() -> None:
    quota = DailyQuota(10, "Europe/Berlin")
    # 23:30 UTC on 2026-01-10 is already 00:30 on the 11th in Berlin.
    ts = 1_768_087_800_000
    assert DailyQuota(10).day_of(ts) == "2026-01-10"
    assert quota.day_of(ts) == "2026-01-11"
    assert quota.next_reset_ms(ts) == 1_768_172_400_000  # 2026-01-11T23:00:00Z
