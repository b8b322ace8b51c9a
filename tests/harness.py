"""Running the real gateway in tests: in-process (as an asyncio task) or as a subprocess.

Both use real components only: a private Mosquitto, the sandbox cloud over HTTP on
127.0.0.1, and a SQLite file under the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gateway.app import Gateway
from gateway.config import Settings
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
    """A complete config as a dict; `sections` are merged over the defaults per section."""
    base: dict[str, Any] = {
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "client_id": "gw-under-test"},
        "cloud": {
            "server": cloud_url,
            "client_id": "sandbox-client",
            "client_secret": "sandbox-secret",
            "timeout_s": 5.0,
        },
        "store": {"path": str(db_path), "commit_interval_ms": 20},
        "flush": {
            "interval_s": 0.2,
            "linger_s": 0.0,
            "backoff_min_s": 0.1,
            "backoff_max_s": 0.5,
            "auth_retry_s": 0.5,
            "parked_retry_s": 60.0,
            "shutdown_flush_s": 2.0,
        },
        "log": {"level": "info", "format": "json"},
        "routes": routes if routes is not None else ROUTES,
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    """Enough TOML for our config shape: tables of scalars and an array of route tables."""
    lines: list[str] = []
    for section, values in config.items():
        if section == "routes":
            continue
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    for route in config.get("routes", []):
        lines.append("[[routes]]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in route.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


async def wait_until(
    predicate: Callable[[], bool], timeout_s: float = 20.0, message: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {message}")
        await asyncio.sleep(0.02)


class InProcessGateway:
    """`async with InProcessGateway(settings) as gw:` runs the daemon until the block ends."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.gateway = Gateway(settings, **kwargs)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Gateway:
        self._task = asyncio.create_task(self.gateway.run(), name="gateway-under-test")
        await wait_until(
            lambda: (
                (self.gateway.ingest is not None and self.gateway.ingest.connected.is_set())
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


class GatewayProcess:
    """The gateway as `python -m gateway run`, so it can be SIGKILLed like on a real box."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(self.config_path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log_file.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (across restarts)."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                found.append(json.loads(line))
        return found

    def wait_for_event(self, name: str, timeout_s: float = 20.0, after: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            matches = [event for event in self.events()[after:] if event.get("event") == name]
            if matches:
                return matches[0]
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"gateway exited ({self.process.returncode}):\n{self.tail()}")
            time.sleep(0.05)
        raise AssertionError(f"no {name} event within {timeout_s} s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def accepted_set(cloud: SandboxCloud) -> set[tuple[int, int, int, Any]]:
    return {(p.device_id, p.datastream_id, p.ts, p.value) for p in cloud.accepted}


def ts_payload(value: float | int | str, ts_ms: int) -> str:
    return json.dumps({"value": value, "ts": ts_ms})
