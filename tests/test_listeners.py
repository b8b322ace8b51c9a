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
import io
import json
import os
import re
import resource
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from gateway.config import Settings
from gateway.ops.listener import ACCEPT_RETRY_S, BoundedListener, Connection, listening_socket
from gateway.ops.metrics import MAX_CONNECTIONS
from gateway.ops.status_socket import StatusServer, query
from gateway.testing.process import GatewayProcess
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import InProcessGateway, cli, events, publish, ts_payload, wait_until

TOPIC = "sensors/boiler/temperature"
SLOW_CLIENTS = 1_100
# The shipped unit's LimitNOFILE= (1,024, also systemd's default soft limit).
UNIT = Path(__file__).resolve().parent.parent / "systemd" / "blynk-gateway.service"
(DAEMON_NOFILE,) = map(int, re.findall(r"^LimitNOFILE=(\d+)$", UNIT.read_text(), re.M))
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


# --------------------------------------------------------------------------- /metrics, in-process


async def exchange(port: int, request: bytes, timeout_s: float = 5.0) -> bytes:
    """Send `request`, read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(timeout_s):
            return await reader.read()
    finally:
        writer.close()


def status_line(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode()


async def test_metrics_http_answers_only_what_it_serves(
    make_settings: Callable[..., Settings], log_output: io.StringIO
) -> None:
    async with InProcessGateway(make_settings(metrics={"listen": "127.0.0.1:0"})) as gateway:
        assert gateway.metrics is not None
        await wait_until(
            lambda: gateway.metrics is not None and gateway.metrics.address is not None
        )
        assert gateway.metrics.address is not None
        port = gateway.metrics.address[1]

        got = await exchange(port, b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
        head, _, body = got.partition(b"\r\n\r\n")
        assert status_line(got) == "HTTP/1.1 200 OK"
        assert b"Content-Type: text/plain; version=0.0.4" in head
        assert b"blynk_gateway_info" in body
        assert f"Content-Length: {len(body)}".encode() in head

        got = await exchange(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        head, _, body = got.partition(b"\r\n\r\n")
        assert status_line(got) == "HTTP/1.1 200 OK" and body == b""
        assert int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) > 100

        got = await exchange(port, b"GET / HTTP/1.1\r\n\r\n")
        assert status_line(got) == "HTTP/1.1 200 OK" and b'href="/metrics"' in got
        got = await exchange(port, b"GET /favicon.ico HTTP/1.1\r\n\r\n")
        assert status_line(got) == "HTTP/1.1 404 Not Found"
        got = await exchange(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert status_line(got) == "HTTP/1.1 405 Method Not Allowed"
        assert b"Allow: GET, HEAD" in got
        got = await exchange(port, b"HELLO\r\n\r\n")
        assert status_line(got) == "HTTP/1.1 400 Bad Request"
        got = await exchange(port, b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 20_000)
        assert status_line(got) == "HTTP/1.1 431 Request Header Fields Too Large"
        many = b"".join(b"X-%d: %s\r\n" % (i, b"b" * 100) for i in range(100))
        got = await exchange(port, b"GET /metrics HTTP/1.1\r\n" + many + b"\r\n")
        assert status_line(got) == "HTTP/1.1 431 Request Header Fields Too Large"
    assert not events(log_output, "metrics_clients_dropped")
    assert not events(log_output, "metrics_handler_failed")


async def test_metrics_drops_slow_clients_and_keeps_room_for_a_scrape(
    make_settings: Callable[..., Settings], log_output: io.StringIO
) -> None:
    async with InProcessGateway(make_settings(metrics={"listen": "127.0.0.1:0"})) as gateway:
        await wait_until(
            lambda: gateway.metrics is not None and gateway.metrics.address is not None
        )
        assert gateway.metrics is not None and gateway.metrics.address is not None
        listener = gateway.metrics.listener
        assert listener is not None
        port = gateway.metrics.address[1]

        # Half a header: dropped at the header timeout.
        started = time.monotonic()
        got = await exchange(port, PARTIAL_HEADER, timeout_s=HEADER_TIMEOUT_S + 3)
        assert got == b""
        assert HEADER_TIMEOUT_S - 0.5 < time.monotonic() - started < HEADER_TIMEOUT_S + 2

        # Silent clients beyond the cap: the oldest make way, at once.
        extra = 4
        silent = []
        for _ in range(MAX_CONNECTIONS + extra):
            silent.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.sleep(0.01)
        await wait_until(lambda: listener.open_connections == MAX_CONNECTIONS, 2.0, "the cap")
        for reader, _ in silent[:extra]:
            async with asyncio.timeout(1.0):
                assert await reader.read() == b""
        # A scrape still gets in (a silent client makes way for it), and is answered.
        got = await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status_line(got) == "HTTP/1.1 200 OK"
        assert listener.open_connections <= MAX_CONNECTIONS
        for _, writer in silent:
            writer.close()
        assert listener.dropped.totals == {"timed_out": 1, "evicted": extra + 1}
    # One line at once, the rest summed up when the listener closed: never one per client.
    dropped = events(log_output, "metrics_clients_dropped")
    assert len(dropped) == 2, dropped
    assert dropped[0]["timed_out"] == 1
    assert sum(line.get("evicted", 0) for line in dropped) == extra + 1


# --------------------------------------------------------------------------- accept errors


def lowest_free_fd() -> int:
    fd = os.dup(0)
    os.close(fd)
    return fd


async def test_accept_failures_are_counted_not_logged_one_by_one(log_output: io.StringIO) -> None:
    """accept() failing with EMFILE (the process out of descriptors) is retried every
    second and summarised; once descriptors are free again the clients are served."""
    sock = listening_socket(socket.AF_INET, ("127.0.0.1", 0))
    address = sock.getsockname()

    async def hello(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: Connection
    ) -> None:
        writer.write(b"hello")
        await writer.drain()

    listener = BoundedListener("probe", sock, hello, max_connections=8, deadline_s=5.0)
    # Made before descriptors run out: connecting needs none.
    clients = [socket.socket() for _ in range(3)]
    serving = asyncio.create_task(listener.serve())
    await asyncio.sleep(0.05)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd(), hard))
    try:
        for client in clients:
            client.setblocking(False)
            client.connect_ex(address)
        await asyncio.sleep(3 * ACCEPT_RETRY_S + 0.5)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    loop = asyncio.get_running_loop()
    try:
        for client in clients:
            async with asyncio.timeout(2 * ACCEPT_RETRY_S + 1):
                assert await loop.sock_recv(client, 16) == b"hello"
    finally:
        for client in clients:
            client.close()
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
    failures = listener.accept_failures.totals["EMFILE"]
    assert 3 <= failures <= 5, listener.accept_failures.totals
    lines = events(log_output, "probe_accept_failed")
    assert len(lines) == 2, lines  # the first at once; the rest when the listener closed
    assert lines[0]["EMFILE"] == 1 and lines[1]["EMFILE"] == failures - 1


# --------------------------------------------------------------------------- the status socket

# gateway.ops.status_socket: the server's deadline per connection, and its cap.
STATUS_DEADLINE_S = 5.0
STATUS_CAP = 8
# Far more than a unix socket's buffers hold: the server's write waits on the reader.
ANSWER_BYTES = 900_000


def read_to_end(sock: socket.socket, timeout_s: float = 5.0) -> int:
    """Bytes read until the server closes (or resets) the connection."""
    sock.settimeout(timeout_s)
    total = 0
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(1 << 16):
            total += len(chunk)
    return total


@contextlib.asynccontextmanager
async def status_server(path: Path) -> AsyncIterator[StatusServer]:
    answer = {"pid": 4242, "padding": "x" * ANSWER_BYTES}
    server = StatusServer(path, lambda: answer)
    serving = asyncio.create_task(server.serve())
    try:
        await wait_until(path.exists, message="the status socket")
        yield server
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving


def connect_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return sock


async def test_status_socket_client_that_never_reads_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "status.sock"
    async with status_server(path):
        stuck = connect_unix(path)  # and does not read, for now
        try:
            answer = await asyncio.to_thread(query, path)
            assert answer is not None and answer["pid"] == 4242  # others are answered
            await asyncio.sleep(STATUS_DEADLINE_S + 1.0)
            # The server gave up on it: what is left to read ends before the answer does.
            assert await asyncio.to_thread(read_to_end, stuck) < ANSWER_BYTES
        finally:
            stuck.close()


async def test_status_socket_answers_while_clients_that_never_read_crowd_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "status.sock"
    async with status_server(path) as server:
        stuck = []
        try:
            for _ in range(3 * STATUS_CAP):
                stuck.append(await asyncio.to_thread(connect_unix, path))
                await asyncio.sleep(0.02)  # admitted in this order
            answer = await asyncio.to_thread(query, path)
            assert answer is not None and answer["pid"] == 4242
            # Well before the deadline, the oldest have made way: their answers end early.
            received = [await asyncio.to_thread(read_to_end, sock) for sock in stuck]
            assert all(n < ANSWER_BYTES for n in received[: 2 * STATUS_CAP]), received
            assert server.listener is not None
            assert server.listener.dropped.totals["evicted"] >= 2 * STATUS_CAP
        finally:
            for sock in stuck:
                sock.close()
