"""Listeners that cannot be starved (issue 16): `/metrics` and the status socket against
clients that connect and then say nothing, or never read.

The proof runs the daemon as a subprocess with the shipped unit's file limit (1,024), a
real Mosquitto and the sandbox cloud: 1,100 slow clients on `/metrics` must not stop a
normal scrape, `blynk-gateway status`, or readings published over MQTT on their way to
the cloud, and must not flood the log. Before issue 16 prometheus-client's threaded server
took a thread and a descriptor per client until the daemon ran out of both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx

from gateway.testing.process import GatewayProcess
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import publish, ts_payload, wait_until

TOPIC = "sensors/boiler/temperature"
SLOW_CLIENTS = 1_100
# The shipped unit's LimitNOFILE= (and systemd's default soft limit).
DAEMON_NOFILE = 1_024
# The daemon's header timeout for `/metrics` (gateway.ops.metrics.HEADER_TIMEOUT_S).
HEADER_TIMEOUT_S = 5.0
# The attack's length: the ramp, then the checks below while the slow clients go on.
HOLD_S = 20.0
SCRAPES = 5
# A slow client sends its header a byte at a time, and reconnects when it is dropped.
TRICKLE_S = 1.0
RECONNECT_S = 1.0
# New slow clients per second, as slowhttptest opens them (the kernel's accept queue
# would otherwise hide most of them from a server that accepts slowly).
RAMP_PER_S = 200
PARTIAL_HEADER = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow"


def enough_descriptors(wanted: int) -> None:
    """The test itself holds a socket per slow client: raise the soft limit if need be."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        assert hard == resource.RLIM_INFINITY or hard >= wanted, f"RLIMIT_NOFILE hard {hard}"
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60
    )


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class FdWatch:
    """The most descriptors a process had open, sampled every 0.1 s."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0

    async def watch(self) -> None:
        with contextlib.suppress(FileNotFoundError):  # it exited: the test says so
            while True:
                self.peak = max(self.peak, open_fds(self.pid))
                await asyncio.sleep(0.1)


class SlowClients:
    """Connect, send part of a request header (every other client: nothing), then wait
    for the server to hang up; until `deadline` at most."""

    def __init__(self, port: int, deadline: float) -> None:
        self.port = port
        self.deadline = deadline
        self.outcomes: Counter[str] = Counter()
        self.connected = 0
        self.open = 0
        self.longest_held_s = 0.0

    async def one(self, index: int) -> None:
        """One slow client: reconnects after a pause each time the server hangs up."""
        try:
            async with asyncio.timeout(self.deadline - time.monotonic()):
                while True:
                    await self.connection(index)
                    await asyncio.sleep(RECONNECT_S)
        except TimeoutError:
            pass

    async def connection(self, index: int) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError as exc:
            self.outcomes[f"connect_failed_{type(exc).__name__}"] += 1
            await asyncio.sleep(RECONNECT_S)
            return
        self.connected += 1
        self.open += 1
        since = time.monotonic()
        sent = 0
        try:
            while True:
                if index % 3 and sent < len(PARTIAL_HEADER):  # every third says nothing
                    writer.write(PARTIAL_HEADER[sent : sent + 1])
                    sent += 1
                try:
                    async with asyncio.timeout(TRICKLE_S):
                        if not await reader.read(65536):  # EOF (after a 503, maybe)
                            break
                except TimeoutError:
                    continue
            self.outcomes["closed_by_server"] += 1
        except OSError:
            self.outcomes["closed_by_server"] += 1  # reset
        finally:
            self.open -= 1
            self.longest_held_s = max(self.longest_held_s, time.monotonic() - since)
            writer.close()

    async def run(self, count: int) -> None:
        async with asyncio.TaskGroup() as group:
            for index in range(count):
                group.create_task(self.one(index))
                await asyncio.sleep(1 / RAMP_PER_S)


async def test_slow_metrics_clients_do_not_stop_status_or_ingest(
    make_gateway_process: Callable[..., GatewayProcess],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
) -> None:
    enough_descriptors(SLOW_CLIENTS + 1_000)
    gateway = make_gateway_process(metrics={"listen": "127.0.0.1:0"})
    gateway.nofile = DAEMON_NOFILE
    gateway.start()
    await asyncio.to_thread(gateway.wait_for_event, "mqtt_connected")
    url = (await asyncio.to_thread(gateway.wait_for_event, "metrics_listening"))["url"]
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    pid = gateway.pid
    idle_fds = open_fds(pid)
    lines_before = gateway.line_count()

    clients = SlowClients(port, deadline=time.monotonic() + HOLD_S)
    attack = asyncio.create_task(clients.run(SLOW_CLIENTS))
    fds = FdWatch(pid)
    watching = asyncio.create_task(fds.watch())
    try:
        # Once every slow client has been let loose (they keep coming back when dropped):
        await asyncio.sleep(SLOW_CLIENTS / RAMP_PER_S + 1.0)
        # scrapes as Prometheus makes them succeed (its scrape timeout is 10 s; we allow 5;
        # from a thread, as from another process: this loop is busy with the slow clients),
        for _ in range(SCRAPES):
            response = await asyncio.to_thread(httpx.get, url, timeout=5.0)
            assert response.status_code == 200, response.text
            assert "blynk_gateway_info" in response.text
            await asyncio.sleep(0.2)
        # `status` finds the daemon running,
        result = await asyncio.to_thread(
            cli, "status", "--config", str(gateway.config_path), "--json"
        )
        assert result.returncode == 0, result.stderr
        report: dict[str, Any] = json.loads(result.stdout)
        assert report["daemon"]["running"] is True, report["daemon"]
        assert report["daemon"]["pid"] == pid
        # and readings published over MQTT reach the cloud.
        now_ms = int(time.time() * 1000)
        readings = [(TOPIC, ts_payload(20.0 + i, now_ms - 1_000 + i)) for i in range(20)]
        assert await publish(publisher, readings) == len(readings)
        await wait_until(
            lambda: sandbox.accepted_count(101) == len(readings), timeout_s=5.0, message="readings"
        )
        assert not attack.done(), "the checks outlasted the attack: raise HOLD_S"
        await attack
    finally:
        attack.cancel()
        watching.cancel()

    # Slow clients were dropped after the header timeout, never held at a descriptor each.
    assert clients.connected >= SLOW_CLIENTS, clients.outcomes
    assert clients.outcomes["closed_by_server"] >= SLOW_CLIENTS, clients.outcomes
    assert clients.longest_held_s < HEADER_TIMEOUT_S + 2.0, clients.longest_held_s
    assert fds.peak < idle_fds + 40, (idle_fds, fds.peak)
    assert gateway.running and gateway.pid == pid
    printed = gateway.line_count() - lines_before
    assert printed < 100, gateway.tail(30)
    during = gateway.tail(printed).splitlines() if printed else []
    assert not [line for line in during if "Traceback" in line or "Too many open" in line]
