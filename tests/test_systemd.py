"""systemd integration against the real daemon: sd_notify read from a real AF_UNIX datagram
socket standing in for the service manager's NOTIFY_SOCKET, the watchdog's liveness rule
(a flush loop stuck in a cloud exchange that never ends), and LoadCredential= secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import os
import signal
import socket
import socketserver
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import app
from gateway.aio import Heartbeat, ProgressWatch
from gateway.config import Settings, load_settings, read_credential
from gateway.errors import ConfigError
from gateway.log import format_duration
from gateway.ops.systemd import ServiceMonitor, ServiceNotifier, status_line
from gateway.testing.broker import MosquittoBroker
from gateway.testing.process import GatewayProcess, write_config
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import InProcessGateway, events, publish, settings_dict, ts_payload, wait_until

WATCHDOG_USEC = 1_000_000  # pings expected every 0.5 s


class NotifyListener:
    """The service manager's end of NOTIFY_SOCKET: every datagram, with its arrival time."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self._sock.settimeout(0.2)
        self._messages: list[tuple[float, dict[str, str]]] = []
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, name="notify-listener", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._changed:
                self._messages.append((time.monotonic(), fields))
                self._changed.notify_all()

    def messages(self) -> list[tuple[float, dict[str, str]]]:
        with self._changed:
            return list(self._messages)

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(at, fields) for at, fields in self.messages() if key in fields]

    def wait_for(
        self,
        predicate: Callable[[dict[str, str]], bool],
        timeout_s: float = 30.0,
        after: int = 0,
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for _, fields in self._messages[after:]:
                    if predicate(fields):
                        return fields
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"no matching sd_notify message within {timeout_s} s; got "
                        f"{[fields for _, fields in self._messages][-10:]}"
                    )
                self._changed.wait(remaining)

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self._sock.close()


@pytest.fixture
def notify_listener(tmp_path: Path) -> Iterator[NotifyListener]:
    path = tmp_path / "notify.sock"
    # sockaddr_un holds 108 bytes: fall back to an abstract name for a deep tmp_path.
    address = str(path) if len(str(path)) < 100 else f"@blynk-test-{uuid.uuid4().hex}"
    listener = NotifyListener(address)
    yield listener
    listener.close()


@pytest.fixture
def abstract_listener() -> Iterator[NotifyListener]:
    listener = NotifyListener(f"@blynk-test-{uuid.uuid4().hex}")
    yield listener
    listener.close()


def notify_env(listener: NotifyListener, **extra: str) -> dict[str, str]:
    return {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": str(WATCHDOG_USEC), **extra}


def start_daemon(
    make_gateway_process: Callable[..., GatewayProcess],
    env: dict[str, str],
    **sections: Any,
) -> GatewayProcess:
    gateway = make_gateway_process(**sections)
    gateway.env.update(env)
    gateway.start()
    return gateway


async def publish_until(
    publisher: AckedPublisher, messages: list[tuple[str, str]], done: Callable[[], bool]
) -> None:
    """Publish until `done()`: the first publish may beat the daemon's SUBACK (the broker
    drops what no one is subscribed to yet). Payloads carry their own time, so a repeat is
    the same point, never a second one."""
    for _ in range(20):
        assert await publish(publisher, messages) == len(messages)
        try:
            await wait_until(done, 3.0)
        except AssertionError:
            continue
        return
    raise AssertionError("the published readings never got where they should")


def ping_gaps(listener: NotifyListener, since: float, until: float) -> list[float]:
    times = [at for at, fields in listener.with_key("WATCHDOG") if since <= at <= until]
    return [b - a for a, b in itertools.pairwise(times)]


# --------------------------------------------------------------------------- the daemon
# The sandbox cloud runs on the test's event loop: blocking waits go to a thread.
async def wait_notify(
    listener: NotifyListener, predicate: Callable[[dict[str, str]], bool], after: int = 0
) -> dict[str, str]:
    return await asyncio.to_thread(listener.wait_for, predicate, 30.0, after)


async def wait_event(gateway: GatewayProcess, name: str, timeout_s: float = 20.0) -> Any:
    return await asyncio.to_thread(gateway.wait_for_event, name, timeout_s)


async def test_ready_watchdog_status_and_stopping(
    make_gateway_process: Callable[..., GatewayProcess],
    notify_listener: NotifyListener,
) -> None:
    gateway = start_daemon(make_gateway_process, notify_env(notify_listener))
    ready = await wait_notify(notify_listener, lambda m: m.get("READY") == "1")
    assert "backlog" in ready["STATUS"]
    await wait_event(gateway, "mqtt_connected")
    # STATUS= follows the broker connection within a few seconds (at most one per 5 s).
    status = await wait_notify(
        notify_listener,
        lambda m: "STATUS" in m and "READY" not in m and "not connected" not in m["STATUS"],
    )
    assert status["STATUS"] == "online, backlog 0"

    window_start = time.monotonic()
    await asyncio.sleep(3.0)
    gaps = ping_gaps(notify_listener, window_start, time.monotonic())
    assert len(gaps) >= 3, notify_listener.messages()
    # Half of WATCHDOG_USEC; generous bounds for a loaded machine.
    assert 0.3 <= statistics.median(gaps) <= 0.8, gaps

    count = len(notify_listener.messages())
    gateway.send_signal(signal.SIGTERM)
    stopping = await wait_notify(notify_listener, lambda m: m.get("STOPPING") == "1", count)
    assert stopping["STATUS"].startswith("stopping")
    assert await asyncio.to_thread(gateway.wait, 30) == 0
    messages = notify_listener.messages()
    stop_index = next(i for i, (_, m) in enumerate(messages) if m.get("STOPPING") == "1")
    assert not [m for _, m in messages[stop_index + 1 :] if "WATCHDOG" in m]


async def test_ready_does_not_wait_for_a_broker_that_is_down(
    make_gateway_process: Callable[..., GatewayProcess],
    broker: MosquittoBroker,
    notify_listener: NotifyListener,
) -> None:
    broker.stop()
    gateway = start_daemon(make_gateway_process, notify_env(notify_listener))
    ready = await wait_notify(notify_listener, lambda m: m.get("READY") == "1")
    assert "MQTT broker not connected" in ready["STATUS"]
    # ...and the watchdog is fed: an idle ingest without a broker is not a stuck one.
    count = len(notify_listener.messages())
    await wait_notify(notify_listener, lambda m: m.get("WATCHDOG") == "1", count)
    assert await asyncio.to_thread(gateway.terminate) == 0


async def test_abstract_notify_socket_and_foreign_watchdog_pid(
    make_gateway_process: Callable[..., GatewayProcess],
    abstract_listener: NotifyListener,
) -> None:
    """'@name' is an abstract socket; WATCHDOG_PID of another process disables pings."""
    env = notify_env(abstract_listener, WATCHDOG_PID="1")
    gateway = start_daemon(make_gateway_process, env)
    await wait_notify(abstract_listener, lambda m: m.get("READY") == "1")
    await wait_event(gateway, "mqtt_connected")
    await asyncio.sleep(1.5)  # three watchdog intervals
    assert not abstract_listener.with_key("WATCHDOG")
    assert await asyncio.to_thread(gateway.terminate) == 0


class TrickleHandler(socketserver.BaseRequestHandler):
    """An HTTP server that answers 200 and then sends one body byte every 0.1 s, forever.

    Each read completes well within the client's timeout, so no timeout ever fires: the
    exchange simply never ends, as with a broken middlebox or a wedged server.
    """

    server: TrickleServer

    def handle(self) -> None:
        self.server.connections += 1
        self.request.settimeout(5)
        with contextlib.suppress(OSError):
            self.request.recv(65536)
            self.request.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            while not self.server.stopping.wait(0.1):
                self.request.sendall(b"1\r\n \r\n")


class TrickleServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), TrickleHandler)
        self.stopping = threading.Event()
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def trickle_server() -> Iterator[TrickleServer]:
    server = TrickleServer()
    thread = threading.Thread(target=server.serve_forever, name="trickle", daemon=True)
    thread.start()
    yield server
    server.stopping.set()
    server.shutdown()
    server.server_close()
    thread.join(5)


async def test_no_watchdog_once_the_flush_loop_is_stuck(
    make_gateway_process: Callable[..., GatewayProcess],
    notify_listener: NotifyListener,
    publisher: AckedPublisher,
    trickle_server: TrickleServer,
) -> None:
    # timeout_s 0.5: the flush loop's heartbeat budget is 10 s + 6 x 0.5 s.
    gateway = start_daemon(
        make_gateway_process,
        notify_env(notify_listener),
        cloud={"server": trickle_server.url, "timeout_s": 0.5},
    )
    await wait_notify(notify_listener, lambda m: m.get("READY") == "1")
    await wait_event(gateway, "mqtt_connected")
    count = len(notify_listener.messages())
    await wait_notify(notify_listener, lambda m: m.get("WATCHDOG") == "1", count)

    reading = [("sensors/boiler/temperature", ts_payload(21.5, int(time.time() * 1000)))]
    await publish_until(publisher, reading, lambda: trickle_server.connections > 0)
    withheld = await wait_event(gateway, "watchdog_withheld", timeout_s=60)
    assert withheld["loop"] == "flush"
    assert trickle_server.connections >= 1  # stuck in the exchange, not idle
    pings = len(notify_listener.with_key("WATCHDOG"))
    await asyncio.sleep(2.0)  # four watchdog intervals
    assert len(notify_listener.with_key("WATCHDOG")) == pings
    assert await asyncio.to_thread(gateway.terminate) == 0


# --------------------------------------------------------------------------- in-process
async def test_in_process_gateway_notifies_an_abstract_socket(
    make_settings: Callable[..., Settings], abstract_listener: NotifyListener
) -> None:
    notifier = ServiceNotifier(abstract_listener.address, watchdog_usec=WATCHDOG_USEC)
    try:
        async with InProcessGateway(make_settings(), notifier=notifier) as gateway:
            await wait_until(lambda: bool(abstract_listener.with_key("READY")), message="READY")
            await wait_until(
                lambda: len(abstract_listener.with_key("WATCHDOG")) >= 2, message="two pings"
            )
            assert gateway.flush is not None and gateway.flush.heartbeat.beats > 0
    finally:
        notifier.close()
    await wait_until(lambda: bool(abstract_listener.with_key("STOPPING")), message="STOPPING")


# --------------------------------------------------------------------------- units
def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = ServiceNotifier.from_environment({})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert not notifier.ready("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()


def test_watchdog_pid_must_name_this_process(notify_listener: NotifyListener) -> None:
    env = notify_env(notify_listener)
    ours = ServiceNotifier.from_environment({**env, "WATCHDOG_PID": str(os.getpid())})
    theirs = ServiceNotifier.from_environment({**env, "WATCHDOG_PID": str(os.getpid() + 1)})
    try:
        assert ours.watchdog_interval_s == 0.5
        assert theirs.watchdog_interval_s is None
        assert theirs.enabled  # READY/STATUS still go out
        assert ours.reloading("reloading config")
        message = notify_listener.wait_for(lambda m: "RELOADING" in m)
        assert int(message["MONOTONIC_USEC"]) > 0
        assert message["STATUS"] == "reloading config"
    finally:
        ours.close()
        theirs.close()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_heartbeat_stalls_only_past_its_declared_wait_and_budget() -> None:
    clock = Clock()
    heartbeat = Heartbeat(10.0, clock=clock)
    heartbeat.beat(then_wait_s=30.0)
    clock.now += 39.0
    assert heartbeat.stalled_s() == 0.0
    clock.now += 2.0
    assert heartbeat.stalled_s() == pytest.approx(1.0)
    backing_off = True
    heartbeat.beat_while(lambda: backing_off)
    clock.now += 3600.0  # a long Retry-After is waiting, not stuck
    assert heartbeat.stalled_s() == 0.0
    backing_off = False
    clock.now += 10.5
    assert heartbeat.stalled_s() == pytest.approx(0.5)


def test_progress_watch_idle_is_alive_waiting_work_is_not() -> None:
    clock = Clock()
    state = {"busy": False, "commits": 0}
    watch = ProgressWatch(
        lambda: bool(state["busy"]), lambda: int(state["commits"]), 60.0, clock=clock
    )
    clock.now += 3600.0
    assert watch.stalled_s() == 0.0  # no messages for an hour: idle
    state["busy"] = True
    clock.now += 59.0
    assert watch.stalled_s() == 0.0
    clock.now += 2.0
    assert watch.stalled_s() == pytest.approx(1.0)
    state["commits"] = 1
    assert watch.stalled_s() == 0.0


def test_status_line() -> None:
    assert (
        status_line(
            cloud_online=True,
            mqtt_connected=True,
            backlog=12_345,
            oldest_age_s=3 * 3600 + 12 * 60,
            quota_used=4210,
            quota_limit=10_000,
        )
        == "online, backlog 12,345 (oldest 3h12m), quota 4,210/10,000 today"
    )
    assert (
        status_line(cloud_online=False, mqtt_connected=False, backlog=0)
        == "offline (buffering), backlog 0, MQTT broker not connected"
    )
    assert [format_duration(s) for s in (5, 425, 90_000)] == ["5s", "7m05s", "1d01h"]


# --------------------------------------------------------------------------- credentials
def write_daemon_config(
    tmp_path: Path, broker: MosquittoBroker, sandbox: SandboxCloud, **sections: Any
) -> Path:
    config = settings_dict(broker.port, sandbox.base_url, tmp_path / "buffer.db", **sections)
    del config["cloud"]["client_secret"]
    return write_config(tmp_path / "etc" / "config.toml", config)


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    return tmp_path / "etc"


def test_credential_beats_the_file_and_the_environment_beats_both(
    tmp_path: Path,
    etc: Path,
    broker: MosquittoBroker,
    sandbox: SandboxCloud,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config_path = write_daemon_config(tmp_path, broker, sandbox)
    text = config_path.read_text().replace("[cloud]", '[cloud]\nclient_secret = "from-file"')
    config_path.write_text(text)
    assert load_settings(config_path).cloud.client_secret.get_secret_value() == "from-file"

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "client_secret").write_text("from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    secret = load_settings(config_path).cloud.client_secret.get_secret_value()
    assert secret == "from-credential"

    monkeypatch.setenv("BLYNK_GATEWAY_CLOUD__CLIENT_SECRET", "from-env")
    assert load_settings(config_path).cloud.client_secret.get_secret_value() == "from-env"


def test_credential_beside_the_config_serves_commands_run_by_hand(
    tmp_path: Path, etc: Path, broker: MosquittoBroker, sandbox: SandboxCloud
) -> None:
    config_path = write_daemon_config(tmp_path, broker, sandbox)
    with pytest.raises(ConfigError, match=r"cloud\.client_secret: required key is missing"):
        load_settings(config_path)
    (etc / "client_secret").write_text("beside\n")
    assert load_settings(config_path).cloud.client_secret.get_secret_value() == "beside"


def test_empty_credential_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "client_secret").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_credential("client_secret", {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert read_credential("absent", {"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None
    assert read_credential("client_secret", {}) is None


async def test_daemon_uploads_with_the_secret_from_credentials_directory(
    tmp_path: Path,
    etc: Path,
    broker: MosquittoBroker,
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
) -> None:
    """As under systemd: the config has no secret; $CREDENTIALS_DIRECTORY supplies it, and
    the secret never appears in the log."""
    config_path = write_daemon_config(tmp_path, broker, sandbox)
    credentials = tmp_path / "run-credentials"
    credentials.mkdir()
    (credentials / "client_secret").write_text("sandbox-secret\n")
    gateway = GatewayProcess(
        config_path, tmp_path / "gw.log", env={"CREDENTIALS_DIRECTORY": str(credentials)}
    )
    with gateway:
        gateway.start()
        await wait_event(gateway, "mqtt_connected")
        reading = [("sensors/boiler/temperature", ts_payload(21.5, int(time.time() * 1000)))]
        await publish_until(publisher, reading, lambda: sandbox.accepted_count() >= 1)
        assert await asyncio.to_thread(gateway.terminate) == 0
    assert "sandbox-secret" not in (tmp_path / "gw.log").read_text()


async def test_status_tells_offline_backlog_oldest_and_quota(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    abstract_listener: NotifyListener,
) -> None:
    notifier = ServiceNotifier(abstract_listener.address)
    now_ms = int(time.time() * 1000)
    topic = "sensors/boiler/temperature"
    try:
        async with InProcessGateway(make_settings(), notifier=notifier):
            ten = [(topic, ts_payload(i, now_ms - 100 + i)) for i in range(10)]
            await publish_until(publisher, ten, lambda: sandbox.accepted_count() >= 10)
            await sandbox.set_fault("down")
            two_hours_ago = now_ms - 2 * 3600 * 1000 - 5 * 60 * 1000
            await publish(publisher, [(topic, ts_payload(i, two_hours_ago + i)) for i in range(5)])
            status = await wait_notify(
                abstract_listener, lambda m: m.get("STATUS", "").startswith("offline")
            )
    finally:
        notifier.close()
    # 10 unless a slow machine made publish_until repeat them after they were delivered.
    accepted = sandbox.accepted_count()
    assert status["STATUS"] == (
        f"offline (buffering), backlog 5 (oldest 2h05m), quota {accepted}/10,000 today"
    )


async def test_no_watchdog_while_a_commit_hangs_and_pings_resume_after(
    make_settings: Callable[..., Settings],
    publisher: AckedPublisher,
    abstract_listener: NotifyListener,
    log_output: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ingest stuck for real: SQLite's worker thread blocks inside the INSERT of a commit."""
    monkeypatch.setattr(app, "INGEST_STALL_BUDGET_S", 1.0)  # the daemon's is 60 s
    release = threading.Event()

    def hang_in_insert(sql: str) -> None:
        if "INTO readings" in sql:
            release.wait(60)

    notifier = ServiceNotifier(abstract_listener.address, watchdog_usec=WATCHDOG_USEC)
    try:
        async with InProcessGateway(make_settings(), notifier=notifier) as gateway:
            store = gateway.store
            assert store is not None
            await wait_until(lambda: len(abstract_listener.with_key("WATCHDOG")) >= 2)
            await store.set_trace_callback(hang_in_insert)
            ingest = gateway.ingest
            assert ingest is not None
            reading = [("sensors/boiler/temperature", ts_payload(21.5, int(time.time() * 1000)))]
            await publish_until(publisher, reading, lambda: ingest.held_messages > 0)
            await wait_until(lambda: bool(events(log_output, "watchdog_withheld")), 30)
            (withheld,) = events(log_output, "watchdog_withheld")
            assert withheld["loop"] == "ingest"
            pings = len(abstract_listener.with_key("WATCHDOG"))
            await asyncio.sleep(2.0)  # four watchdog intervals
            assert len(abstract_listener.with_key("WATCHDOG")) == pings
            release.set()
            await wait_until(lambda: bool(events(log_output, "watchdog_resumed")), 30)
            await wait_until(lambda: len(abstract_listener.with_key("WATCHDOG")) > pings, 30)
            await store.set_trace_callback(None)
    finally:
        release.set()
        notifier.close()


async def test_monitor_status_replaces_a_reloads_own_status(
    abstract_listener: NotifyListener,
) -> None:
    """`reloading()`/`ready()` around a reload say what happened; the monitor's summary
    comes back at its next tick even though the summary itself did not change."""
    notifier = ServiceNotifier(abstract_listener.address)

    async def summary() -> str:
        return "online, backlog 0"

    monitor = ServiceMonitor(notifier, {}, summary, status_interval_s=0.1)
    task = asyncio.create_task(monitor.run())
    try:
        await wait_notify(abstract_listener, lambda m: m.get("STATUS") == "online, backlog 0")
        count = len(abstract_listener.messages())
        notifier.reloading("reloading configuration")
        notifier.ready("configuration reloaded")
        assert notifier.last_status == "configuration reloaded"
        await wait_notify(
            abstract_listener, lambda m: m.get("STATUS") == "online, backlog 0", count
        )
        assert [m for _, m in abstract_listener.messages()[count:]][:2] == [
            {
                "RELOADING": "1",
                "MONOTONIC_USEC": abstract_listener.messages()[count][1]["MONOTONIC_USEC"],
                "STATUS": "reloading configuration",
            },
            {"READY": "1", "STATUS": "configuration reloaded"},
        ]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        notifier.close()
