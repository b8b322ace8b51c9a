"""Running the real gateway in tests, in-process (as an asyncio task), and test configs.

Real components only: a private Mosquitto, the sandbox cloud over HTTP on 127.0.0.1, and a
SQLite file under the test's tmp_path. The daemon as a subprocess is
`gateway.testing.process.GatewayProcess` (the benchmarks use it too).
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gateway.app import Gateway
from gateway.config import Settings
from gateway.testing.process import daemon_config
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud

DEVICES: dict[int, dict[int, str]] = {
    101: {5: "double", 6: "double", 7: "string"},
    102: {1: "double", 2: "double"},
    103: {1: "double"},
}
ROUTES: list[dict[str, Any]] = [
    {"topic": "sensors/boiler/temperature", "device_id": 101, "datastream_id": 5},
    {"topic": "sensors/+/humidity", "device_id": 102, "datastream_id": 1},
]


def settings_dict(
    broker_port: int,
    cloud_url: str,
    db_path: Path,
    routes: list[dict[str, Any]] | None = None,
    **sections: Mapping[str, Any],
) -> dict[str, Any]:
    """A complete config as a dict, with fast test timings; `sections` are merged over it."""
    fast: dict[str, dict[str, Any]] = {
        "cloud": {"timeout_s": 5.0},
        "store": {"commit_interval_ms": 20},
        "flush": {
            "interval_s": 0.2,
            "linger_s": 0.0,
            "backoff_min_s": 0.1,
            "backoff_max_s": 0.5,
            "auth_retry_s": 0.5,
            "parked_retry_s": 60.0,
            "shutdown_flush_s": 2.0,
            # The buffered path, which most tests are about; test_pass_through.py turns
            # upload-before-write on (the daemon's default).
            "pass_through": False,
        },
    }
    for name, values in sections.items():
        fast[name] = {**fast.get(name, {}), **values}
    return daemon_config(
        broker_port, cloud_url, db_path, routes if routes is not None else ROUTES, **fast
    )


async def wait_until(
    predicate: Callable[[], bool], timeout_s: float = 20.0, message: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {message}")
        await asyncio.sleep(0.02)


async def wait_for_passes(gateway: Gateway, count: int = 3, timeout_s: float = 20.0) -> None:
    """Let the flush loop make `count` more passes: whatever it would still send, it has sent.

    The honest replacement for "sleep, then assert nothing more happened": the assertion
    that follows holds after several chances to break it, however fast the machine.
    """
    flush = gateway.flush
    assert flush is not None, "the gateway is not running"
    target = flush.stats.passes + count
    await wait_until(lambda: flush.stats.passes >= target, timeout_s, f"{count} more flush passes")


class InProcessGateway:
    """`async with InProcessGateway(settings) as gw:` runs the daemon until the block ends."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.gateway = Gateway(settings, **kwargs)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Gateway:
        self._task = asyncio.create_task(self.gateway.run(), name="gateway-under-test")
        await wait_until(
            lambda: (
                (self.gateway.ingest is not None and self.gateway.ingest.subscribed.is_set())
                or (self._task is not None and self._task.done())
            ),
            message="gateway connected to the broker",
        )
        if self._task.done():
            self._task.result()
        return self.gateway

    async def stop(self) -> None:
        if self._task is None:
            return
        self.gateway.request_stop()
        async with asyncio.timeout(30):
            await self._task
        self._task = None

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None and not self._task.done():
            await self.stop()
        elif self._task is not None:
            self._task.result()


def log_events(stream: io.StringIO) -> list[dict[str, Any]]:
    """The JSON log lines captured by the `log_output` fixture, parsed."""
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


def events(stream: io.StringIO, name: str) -> list[dict[str, Any]]:
    return [event for event in log_events(stream) if event["event"] == name]


async def publish(publisher: AckedPublisher, messages: list[tuple[str, str]]) -> int:
    """QoS 1, waiting for every PUBACK, off the event loop (the gateway runs on it)."""
    return await asyncio.to_thread(publisher.publish_many, messages)


async def trickle(
    publisher: AckedPublisher, messages: list[tuple[str, str]], per_s: float = 40.0
) -> int:
    """Like `publish`, but `per_s` messages a second (in steps of 0.1 s): a trickle, which
    pass-through takes without writing, where a burst fills the broker's in-flight window
    and is written first (gateway/ingest/pass_gate.py)."""
    step = max(1, round(per_s / 10))
    acked = 0
    for index in range(0, len(messages), step):
        started = time.monotonic()
        acked += await asyncio.to_thread(publisher.publish_many, messages[index : index + step])
        await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - started)))
    return acked


def accepted_set(cloud: SandboxCloud) -> set[tuple[int, int, int, Any]]:
    return {(p.device_id, p.datastream_id, p.ts, p.value) for p in cloud.accepted}


def ts_payload(value: float | int | str, ts_ms: int) -> str:
    return json.dumps({"value": value, "ts": ts_ms})


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`blynk-gateway ARGS` as an operator runs it: a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60
    )


async def status_json(config: Path) -> dict[str, Any]:
    """`blynk-gateway status --json`, which must exit 0."""
    result = await asyncio.to_thread(cli, "status", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report
