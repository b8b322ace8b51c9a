"""Flow control: a broker replaying a long outage cannot fill the gateway's memory.

Mosquitto does not hold a resumed session to its in-flight window: on reconnect it pushes
the whole queue as fast as the gateway reads. Ingest stops reading the socket while
READ_PAUSE_MESSAGES wait for a commit, so memory does not grow with the broker's backlog,
and nothing is deferred (no resync reconnect, no resend).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from gateway.config import Settings
from gateway.ingest import ingest as ingest_module
from gateway.testing.publisher import AckedPublisher
from harness import InProcessGateway, publish, ts_payload, wait_until

TOPIC = "sensors/boiler/temperature"
QUEUED = 12_000


async def replay_max_held(settings: Settings, publisher: AckedPublisher) -> tuple[int, int, int]:
    """(most messages held at once, messages deferred, readings stored) for a replay."""
    async with InProcessGateway(settings):
        pass  # the persistent session and its subscription
    first_ts = int(time.time() * 1000) - 3_600_000
    messages = [(TOPIC, ts_payload(i, first_ts + i)) for i in range(QUEUED)]
    assert await publish(publisher, messages) == QUEUED
    most = 0
    async with InProcessGateway(settings) as gateway:
        ingest = gateway.ingest
        assert ingest is not None
        deadline = time.monotonic() + 60
        while ingest.stats.stored < QUEUED and time.monotonic() < deadline:
            most = max(most, ingest.held_messages)
            await asyncio.sleep(0.001)
        await wait_until(lambda: ingest.stats.stored == QUEUED, 30, "the replay stored")
        return most, ingest.stats.deferred, ingest.stats.stored


def slow_commits(make_settings: Callable[..., Settings]) -> Settings:
    """Commits that wait for company (1 s, no count limit): the replay piles up behind them."""
    return make_settings(
        store={"commit_interval_ms": 1000, "commit_max_readings": 100_000},
        mqtt={"max_payload_bytes": 1024},
    )


async def test_a_replay_is_read_no_faster_than_it_is_committed(
    make_settings: Callable[..., Settings], publisher: AckedPublisher
) -> None:
    most, deferred, stored = await replay_max_held(slow_commits(make_settings), publisher)
    assert stored == QUEUED and deferred == 0
    # One read batch may land after the pause is asked for.
    assert most <= ingest_module.READ_PAUSE_MESSAGES + 200, most


async def test_without_the_pause_the_replay_piles_up(
    make_settings: Callable[..., Settings],
    publisher: AckedPublisher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The control: the broker really does push past its window, so the test above can fail."""
    monkeypatch.setattr(ingest_module, "READ_PAUSE_MESSAGES", 10**9)
    most, _, stored = await replay_max_held(slow_commits(make_settings), publisher)
    assert stored == QUEUED
    assert most > 2 * 2000, most
