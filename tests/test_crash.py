"""SIGKILL the gateway (a real subprocess) mid-stream and mid-upload: nothing acked is lost."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.testing.broker import MosquittoBroker
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import (
    GatewayProcess,
    accepted_set,
    settings_dict,
    ts_payload,
    wait_until,
    write_config,
)

BASE_TS = int(time.time() * 1000) - 3_600_000
TOPIC = "sensors/boiler/temperature"


@pytest.fixture
def make_gateway_process(
    broker: MosquittoBroker, sandbox: SandboxCloud, tmp_path: Path
) -> Iterator[Callable[..., GatewayProcess]]:
    """`make_gateway_process(flush={...}, cloud={...})`: a subprocess gateway, killed at teardown."""
    processes: list[GatewayProcess] = []

    def make(**sections: dict[str, Any]) -> GatewayProcess:
        config = settings_dict(broker.port, sandbox.base_url, tmp_path / "buffer.db", **sections)
        config_path = write_config(tmp_path / "gateway.toml", config)
        processes.append(GatewayProcess(config_path, tmp_path / "gw.log"))
        return processes[-1]

    yield make
    for process in processes:
        process.close()


@pytest.fixture
def gateway_process(make_gateway_process: Callable[..., GatewayProcess]) -> GatewayProcess:
    return make_gateway_process(flush={"batch_size": 200}, cloud={"timeout_s": 10.0})


def expected_points(count: int, offset: int = 0) -> set[tuple[int, int, int, float]]:
    return {(101, 5, BASE_TS + i, float(i)) for i in range(offset, offset + count)}


def messages(count: int, offset: int = 0) -> list[tuple[str, str]]:
    return [(TOPIC, ts_payload(float(i), BASE_TS + i)) for i in range(offset, offset + count)]


def acked_points(publisher: AckedPublisher) -> set[tuple[int, int, int, float]]:
    """What the broker accepted, as the points the cloud must end up with."""
    import json

    points = set()
    for _, payload in publisher.acked:
        document = json.loads(payload)
        points.add((101, 5, int(document["ts"]), float(document["value"])))
    return points


@pytest.mark.slow
async def test_sigkill_while_readings_flow_loses_nothing_acked(
    gateway_process: GatewayProcess, sandbox: SandboxCloud, publisher: AckedPublisher
) -> None:
    gateway_process.start()
    await asyncio.to_thread(gateway_process.wait_for_event, "mqtt_connected")
    total = 3000
    done = threading.Event()

    def stream() -> None:
        for topic, payload in messages(total):
            publisher.publish(topic, payload)
            time.sleep(0.0005)
        done.set()

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    for _ in range(3):
        await asyncio.sleep(0.4)
        await asyncio.to_thread(gateway_process.kill)
        await asyncio.sleep(0.2)
        gateway_process.start()
    await asyncio.to_thread(done.wait, 30)
    await asyncio.to_thread(publisher.wait_all_acked, 30)
    expected = acked_points(publisher)
    assert len(expected) == total
    await wait_until(lambda: expected <= accepted_set(sandbox), 30, "every acked reading delivered")
    duplicates = len(sandbox.accepted) - len(accepted_set(sandbox))
    # Each kill can repeat at most the batch that was in flight (batch_size=200).
    assert duplicates <= 3 * 200
    assert gateway_process.terminate() == 0


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
        assert process.process is not None
        process.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait_for_event, "gateway_stopping")
        started = time.monotonic()
        process.process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(process.process.wait, 10)
        assert time.monotonic() - started < 5, "the second signal must not wait for the flush"
        assert exit_code != 0
        await sandbox.set_fault("none")
        process.start()
        await wait_until(lambda: expected_points(200) <= accepted_set(sandbox), 30, "all 200")
        assert process.terminate() == 0
    finally:
        process.close()
