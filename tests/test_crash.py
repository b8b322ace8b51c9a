"""The gateway as a real subprocess: SIGKILL mid-upload, SIGTERM, and a second signal.

SIGKILLs at random moments while readings stream in are the crash harness's job
(`test_crash_harness.py`); these are the deterministic cases around them.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import pytest

from gateway.testing.process import GatewayProcess
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import accepted_set, ts_payload, wait_until

BASE_TS = int(time.time() * 1000) - 3_600_000
TOPIC = "sensors/boiler/temperature"


@pytest.fixture
def gateway_process(make_gateway_process: Callable[..., GatewayProcess]) -> GatewayProcess:
    return make_gateway_process(flush={"batch_size": 200}, cloud={"timeout_s": 10.0})


def expected_points(count: int, offset: int = 0) -> set[tuple[int, int, int, float]]:
    return {(101, 5, BASE_TS + i, float(i)) for i in range(offset, offset + count)}


def messages(count: int, offset: int = 0) -> list[tuple[str, str]]:
    return [(TOPIC, ts_payload(float(i), BASE_TS + i)) for i in range(offset, offset + count)]


@pytest.mark.slow
async def test_sigkill_during_upload_resends_after_restart(
    gateway_process: GatewayProcess, sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    gateway_process.start()
    await asyncio.to_thread(gateway_process.wait_for_event, "mqtt_connected")
    await sandbox.set_fault("slow", delay_s=30.0)
    assert await asyncio.to_thread(publisher.publish_many, messages(500)) == 500
    await wait_until(lambda: sandbox.delayed_imports > 0, 20, "an upload in flight")
    await asyncio.to_thread(gateway_process.kill)
    await sandbox.set_fault("none")
    # The upload that was in flight never completed: nothing was accepted yet.
    assert sandbox.accepted == []
    gateway_process.start()
    await wait_until(lambda: accepted_set(sandbox) == expected_points(500), 30, "all 500")
    assert gateway_process.terminate() == 0
    # The killed request was cut off before the sandbox stored anything: no duplicates.
    assert len(sandbox.accepted) == 500


@pytest.mark.slow
async def test_sigterm_exits_zero_and_second_start_resumes(
    gateway_process: GatewayProcess, sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    gateway_process.start()
    await asyncio.to_thread(gateway_process.wait_for_event, "mqtt_connected")
    await sandbox.set_fault("down")
    assert await asyncio.to_thread(publisher.publish_many, messages(300)) == 300
    await asyncio.to_thread(gateway_process.wait_for_event, "went_offline")
    assert await asyncio.to_thread(gateway_process.terminate) == 0
    stopped = [e for e in gateway_process.events() if e["event"] == "gateway_stopped"]
    # Whatever was committed stays buffered; the rest waits in the broker for our session.
    assert stopped and 0 < stopped[-1]["buffered"] <= 300
    await sandbox.set_fault("none")
    gateway_process.start()
    await wait_until(lambda: accepted_set(sandbox) == expected_points(300), 30, "all 300")
    assert gateway_process.terminate() == 0


@pytest.mark.slow
async def test_second_signal_exits_at_once_and_loses_nothing(
    make_gateway_process: Callable[..., GatewayProcess],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
) -> None:
    process = make_gateway_process(flush={"shutdown_flush_s": 60.0}, cloud={"timeout_s": 60.0})
    try:
        process.start()
        await asyncio.to_thread(process.wait_for_event, "mqtt_connected")
        await sandbox.set_fault("slow", delay_s=60.0)  # every upload hangs: so will the final flush
        assert await asyncio.to_thread(publisher.publish_many, messages(200)) == 200
        await wait_until(lambda: sandbox.delayed_imports > 0, 20, "an upload in flight")
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait_for_event, "gateway_stopping")
        process.send_signal(signal.SIGTERM)
        # The final flush would hang for 60 s: only an immediate exit ends within the wait.
        assert await asyncio.to_thread(process.wait, 10) == 1
        events = process.events()
        actions = [e["action"] for e in events if e["event"] == "signal_received"]
        assert actions == ["stopping", "exit_now"]
        assert not [e for e in events if e["event"] == "gateway_stopped"]
        await sandbox.set_fault("none")
        process.start()
        await wait_until(lambda: expected_points(200) <= accepted_set(sandbox), 30, "all 200")
        assert process.terminate() == 0
    finally:
        process.close()
