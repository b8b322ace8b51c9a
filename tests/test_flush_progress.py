"""The `draining` progress line: while a large backlog drains, at most one line per interval
with the backlog, the observed rate and an ETA; nothing for small backlogs or when nothing
is delivered."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable

from gateway.config import Settings
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from gateway.uplink.flush import DrainProgress
from harness import InProcessGateway, events, publish, ts_payload, wait_until

TOPIC = "sensors/boiler/temperature"


async def test_draining_lines_while_a_backlog_drains(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    settings = make_settings(flush={"batch_size": 20, "probe_interval_s": 0.2})
    async with InProcessGateway(settings) as gateway:
        flush, store = gateway.flush, gateway.store
        assert flush is not None and store is not None
        assert flush.drain.min_backlog == 100  # five batches
        flush.drain.interval_s = 0.5  # the daemon's is 30 s; the rule is the same
        await sandbox.set_fault("down")
        now_ms = int(time.time() * 1000)
        # The first publish may beat the gateway's SUBACK: repeat one reading until it is
        # buffered (the same ts each time, so the same point).
        warm_up = [(TOPIC, ts_payload(0.5, now_ms - 20_000))]
        for _ in range(20):
            await publish(publisher, warm_up)
            with contextlib.suppress(AssertionError):
                await wait_until(lambda: store.pending_points == 1, 2.0)
                break
        messages = [(TOPIC, ts_payload(i, now_ms - 10_000 + i)) for i in range(600)]
        assert await publish(publisher, messages) == 600
        await wait_until(lambda: store.pending_points == 601, message="601 buffered")
        # Back, but slow: 20 points per ~0.1 s, so the drain takes a few seconds.
        await sandbox.set_fault("slow", delay_s=0.1)
        started = time.monotonic()
        await wait_until(lambda: store.pending_points == 0, 60, "the backlog drained")
        elapsed_s = time.monotonic() - started
    lines = events(log_output, "draining")
    assert len(lines) >= 2, lines
    assert len(lines) <= elapsed_s / 0.5 + 1, lines
    backlogs = [line["backlog"] for line in lines]
    assert backlogs == sorted(backlogs, reverse=True) and len(set(backlogs)) == len(backlogs)
    assert all(backlog > 100 for backlog in backlogs)  # quiet once it is small
    assert all(line["rate_per_s"] > 0 and line["eta_s"] >= 0 for line in lines)
    assert all(line["level"] == "info" and line["component"] == "flush" for line in lines)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_drain_progress_rules(log_output: io.StringIO) -> None:
    clock = Clock()
    progress = DrainProgress(5000, 30.0, clock=clock)
    progress.update(backlog=4000, delivered_total=0)  # small: never reported
    clock.now = 100.0
    progress.update(backlog=4000, delivered_total=0)
    progress.update(backlog=50_000, delivered_total=1000)  # the window starts
    clock.now = 110.0
    progress.update(backlog=49_000, delivered_total=2000)  # within the interval
    clock.now = 130.0
    progress.update(backlog=44_000, delivered_total=7000)  # 6000 in 30 s
    clock.now = 160.0
    progress.update(backlog=44_000, delivered_total=7000)  # offline: nothing delivered
    (line,) = events(log_output, "draining")
    assert line["backlog"] == 44_000
    assert line["rate_per_s"] == 200.0
    assert line["eta_s"] == 220
    assert line["eta"] == "3m40s"
