"""How fast does the gateway drain a broker backlog, compared with a bare MQTT subscriber?

The situation measured is the one that matters after the gateway was down: the broker has
queued N QoS 1 messages for our persistent session, and we reconnect. A bare paho
subscriber (auto-ack, no storage) drains that queue as fast as paho and Mosquitto allow;
that is the baseline, measured in the same run against the same broker, and every other
figure is a ratio against it, because absolute numbers on a small noisy box mean little.

    .venv/bin/python benchmarks/ingest_throughput.py --messages 20000 --repeats 3

Variants (``--only PREFIX`` keeps some; the baselines always run):

* ``bare-paho``      paho's own ``loop()``, auto-ack, nothing stored: the baseline, one per
                     payload kind (and one over MQTT 5, to separate protocol from gateway).
* ``bare-paho-manual``  the same with ``manual_ack=True``, acknowledging each message as it
                     arrives and only counting it: the baseline of the whole daemon, which
                     also acknowledges by hand (``benchmarks/run.py``).
* ``bare-asyncio``   the same subscriber driven by asyncio the way ``gateway.ingest`` drives
                     paho (socket callbacks, connect in an executor): the bridge's own cost.
* ``ingest-311``     ``MqttIngest`` + ``Store`` as ``gateway.app`` builds them (SQLite file,
                     synchronous FULL, commit_interval_ms 200), MQTT 3.1.1 against a broker
                     with ``max_inflight_messages 20`` (so commit_max = 16). Timed until every
                     reading is committed (``store.pending_points == N``).
* ``ingest-v5``      the same over MQTT 5 with Receive Maximum 1000 (commit_max = 800).
* ``ingest-311 fields``  a 6-key zigbee2mqtt object per message, 3 keys mapped through a
                     ``fields`` route with a ``last_seen`` time: 3 readings per message; the
                     table's last line gives its readings/s against the plain-value variant.
* ``gateway-*``      the whole ``Gateway`` in-process, the sandbox cloud in a child process:
                     timed until the cloud has accepted every reading.
* ``… x20``          the backlog spread round-robin over 20 devices (one topic and one route
                     each), as a site's sensors queue it (issue 18); the bare client
                     subscribes to all of them with one wildcard.

``--cloud-latency-ms`` makes the sandbox answer every request that much later, as a real
cloud 30-300 ms away does (`SandboxCloud.set_latency`); the bare clients never talk to the
cloud, so their figures do not change and stay the baseline.

Each repeat primes one persistent session per variant, publishes the backlog once per
payload kind (the broker fans it out into every session's queue), then drains the sessions
one variant after another, so drift of the machine hits all variants alike. Figures are
medians over repeats. After each drain we wait until the broker has processed the client's
DISCONNECT (it handles a connection's packets in order, so every PUBACK before it too),
then a fresh client resumes the session and counts what the broker still holds: anything
but 0 means a message was never acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import math
import os
import pstats
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import Gateway
from gateway import log as gateway_log
from gateway.config import Settings
from gateway.ingest import MqttIngest, RouteTable
from gateway.models import Reading
from gateway.store import Store
from gateway.testing.broker import MosquittoBroker
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox_run import SandboxProcess

Protocol = Literal["3.1.1", "5"]
PayloadKind = Literal["json", "plain", "fields"]
# Readings one message becomes: a zigbee2mqtt-style object maps 3 of its 6 keys.
READINGS_PER_MESSAGE: dict[str, int] = {"json": 1, "plain": 1, "fields": 3}
FIELDS_ROUTE = {"temperature": 5, "humidity": 6, "battery": 7}
Driver = Literal["bare-paho", "bare-paho-manual", "bare-asyncio", "ingest", "gateway"]

DEVICE_ID = 101
DATASTREAM_ID = 5
BROKER_INFLIGHT = 20  # Mosquitto's default max_inflight_messages
V5_RECEIVE_MAXIMUM = 1000
SESSION_EXPIRY_S = 3600
DRAIN_TIMEOUT_S = 300.0
# Once the broker has seen the DISCONNECT, how long a resumed session may stay silent
# before we call it empty (the broker resends what it holds right after CONNACK).
LEFTOVER_QUIET_S = 0.3


@dataclass(frozen=True)
class Variant:
    name: str
    driver: Driver
    payload: PayloadKind
    protocol: Protocol = "3.1.1"
    inflight_window: int = BROKER_INFLIGHT
    read_batch: int = 1  # what-if: packets read per readable event (see packets_per_read)
    devices: int = 1  # the backlog round-robin over this many devices (topics, routes)
    cloud_latency_ms: float = 0.0  # the sandbox's added round trip (gateway variants)

    @property
    def topic(self) -> str:
        """The filter the session subscribes to (and a one-device backlog's topic)."""
        if self.devices == 1:
            return f"bench/{self.payload}"
        return f"bench/{self.payload}-x{self.devices}/+"

    def device_topic(self, index: int) -> str:
        """Where the backlog's message `index` is published."""
        if self.devices == 1:
            return self.topic
        return f"bench/{self.payload}-x{self.devices}/{index % self.devices}"

    @property
    def backlog_key(self) -> tuple[str, int]:
        """Variants with the same key share one published backlog in a round."""
        return self.payload, self.devices

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "-")


VARIANTS: tuple[Variant, ...] = (
    Variant("bare-paho json", "bare-paho", "json"),
    Variant("bare-paho plain", "bare-paho", "plain"),
    Variant("bare-paho-v5 json", "bare-paho", "json", "5", V5_RECEIVE_MAXIMUM),
    Variant("bare-paho-manual json", "bare-paho-manual", "json"),
    Variant("bare-asyncio json", "bare-asyncio", "json"),
    Variant("ingest-311 json", "ingest", "json"),
    Variant("ingest-311 plain", "ingest", "plain"),
    Variant("bare-paho fields", "bare-paho", "fields"),
    Variant("ingest-311 fields", "ingest", "fields"),
    Variant("ingest-v5 json", "ingest", "json", "5", V5_RECEIVE_MAXIMUM),
    Variant("ingest-v5 plain", "ingest", "plain", "5", V5_RECEIVE_MAXIMUM),
    Variant("gateway-311 json", "gateway", "json"),
    Variant("gateway-v5 json", "gateway", "json", "5", V5_RECEIVE_MAXIMUM),
    Variant("bare-paho-manual json x20", "bare-paho-manual", "json", devices=20),
    Variant("gateway-311 json x20", "gateway", "json", devices=20),
)


def _broker_cpu_s(pid: int | None) -> float:
    """CPU seconds the broker process has used (Linux /proc); NaN where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Stopwatch:
    """Wall time, our CPU (all threads) and the broker's CPU over exactly the timed span.

    On a 2-core box the broker and we share the CPUs, so CPU per message says more about
    where the cost is than wall time alone.
    """

    broker_pid: int | None
    elapsed_s: float = math.nan
    cpu_s: float = math.nan
    broker_cpu_s: float = math.nan
    finished_at: float = math.nan
    _marks: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def start(self) -> None:
        self._marks = (time.perf_counter(), time.process_time(), _broker_cpu_s(self.broker_pid))

    def stop(self) -> None:
        self.finished_at = time.perf_counter()
        wall, cpu, broker = self._marks
        self.elapsed_s = self.finished_at - wall
        self.cpu_s = time.process_time() - cpu
        self.broker_cpu_s = _broker_cpu_s(self.broker_pid) - broker


@dataclass
class Trial:
    """What one drain measured; the commit fields exist only for our own code paths."""

    watch: Stopwatch
    commits: int | None = None
    commit_ms: list[float] = field(default_factory=list)
    stored: int | None = None
    duplicates: int = 0
    ack_lag_ms: float = math.nan
    leftover: int = 0

    @property
    def elapsed_s(self) -> float:
        return self.watch.elapsed_s


# --------------------------------------------------------------------------- payloads


def make_payloads(kind: PayloadKind, count: int, now_ms: int) -> list[bytes]:
    """Realistic small payloads that still become `count` distinct rows.

    The store's unique key is (stream, ts, value). JSON readings carry distinct `ts` values
    (and repeating values, like a real sensor); plain numbers are stamped with the receive
    time, many per millisecond during a drain, so their values must be distinct or they
    would be counted as duplicates and the run would never reach N rows.
    """
    if kind == "fields":
        first_ts = now_ms - count - 60_000
        return [
            b'{"temperature":%.2f,"humidity":%.2f,"battery":%d,"linkquality":%d,'
            b'"voltage":%d,"last_seen":%d}'
            % (
                20 + (i % 50) / 10,
                40 + (i % 30),
                50 + i % 50,
                90 + i % 10,
                3000 + i % 9,
                first_ts + i,
            )
            for i in range(count)
        ]
    if kind == "json":
        first_ts = now_ms - count - 60_000
        return [
            b'{"value": %.1f, "ts": %d}' % (20 + (i % 50) / 10, first_ts + i) for i in range(count)
        ]
    return [b"%.2f" % (i / 100) for i in range(count)]


# --------------------------------------------------------------------------- bare clients


def _paho_client(client_id: str, protocol: Protocol, *, manual_ack: bool = False) -> mqtt.Client:
    """A subscriber whose session outlives its connection (the gateway's set-up); auto-ack
    unless `manual_ack`."""
    if protocol == "5":
        return mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=manual_ack,
        )
    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=False,
        protocol=MQTTProtocolVersion.MQTTv311,
        manual_ack=manual_ack,
    )


def _connect_kwargs(protocol: Protocol, *, clean_start: bool, receive_maximum: int) -> Any:
    """MQTT 5 needs a Session Expiry Interval to keep the session, and announces its window."""
    if protocol != "5":
        return {}
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = SESSION_EXPIRY_S
    properties.ReceiveMaximum = receive_maximum
    return {"clean_start": clean_start, "properties": properties}


def _loop_until(client: mqtt.Client, done: Callable[[], bool], timeout_s: float) -> None:
    """Drive paho's own loop in this thread until `done()`, or raise on timeout."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"client {client._client_id!r} timed out")
        client.loop(timeout=0.05)


def _disconnect(client: mqtt.Client) -> None:
    """Disconnect cleanly so queued PUBACKs are written before the socket closes."""
    client.disconnect()
    with contextlib.suppress(TimeoutError):
        _loop_until(client, lambda: client.socket() is None, 2.0)
    client._reset_sockets()


def prime_session(broker: MosquittoBroker, variant: Variant, client_id: str) -> None:
    """Create the persistent session with its QoS 1 subscription, then go away.

    From then on the broker queues every matching message for that client id, which is
    exactly the backlog a gateway finds after being down.
    """
    client = _paho_client(client_id, variant.protocol)
    subscribed: list[bool] = []
    client.on_subscribe = lambda *args: subscribed.append(True)
    kwargs = _connect_kwargs(variant.protocol, clean_start=True, receive_maximum=65535)
    client.connect(broker.host, broker.port, **kwargs)
    client.subscribe(variant.topic, qos=1)
    _loop_until(client, lambda: bool(subscribed), 10.0)
    _disconnect(client)


def publish_backlog(broker: MosquittoBroker, variant: Variant, payloads: list[bytes]) -> float:
    """Publish counting PUBACKs, so the whole backlog is known to be queued; returns s.

    Message i goes to `variant.device_topic(i)`: round-robin over its devices.
    """
    started = time.perf_counter()
    messages = ((variant.device_topic(i), payload) for i, payload in enumerate(payloads))
    with AckedPublisher(broker.host, broker.port, "bench-publisher", max_inflight=1000) as pub:
        pub.connect()
        pub.publish_many(messages, timeout=120)
    return time.perf_counter() - started


class _Counter:
    """Counts distinct payloads, so a redelivered message cannot end a drain early.

    The ingest path has the same protection for free (the store's unique key); a set
    insert costs well under 1 % of a message's handling.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.received = 0
        self.seen: set[object] = set()

    def on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.received += 1
        self.seen.add(message.payload)

    def complete(self) -> bool:
        return len(self.seen) >= self.n

    @property
    def duplicates(self) -> int:
        return self.received - len(self.seen)


def drain_bare_paho(
    broker: MosquittoBroker, variant: Variant, client_id: str, n: int, watch: Stopwatch
) -> Trial:
    """The baseline: paho's own select() loop, PUBACK sent as soon as on_message returns
    (or, `bare-paho-manual`, by an explicit `client.ack()` in on_message, as the gateway
    acknowledges: same wire traffic, paho's manual-ack path)."""
    manual = variant.driver == "bare-paho-manual"
    client = _paho_client(client_id, variant.protocol, manual_ack=manual)
    counter = _Counter(n)
    if manual:

        def on_message(c: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            counter.on_message(c, userdata, message)
            c.ack(message.mid, message.qos)

        client.on_message = on_message
    else:
        client.on_message = counter.on_message
    kwargs = _connect_kwargs(
        variant.protocol, clean_start=False, receive_maximum=variant.inflight_window
    )
    watch.start()
    client.connect(broker.host, broker.port, **kwargs)
    _loop_until(client, counter.complete, DRAIN_TIMEOUT_S)
    watch.stop()
    _disconnect(client)
    return Trial(watch, duplicates=counter.duplicates)


async def drain_bare_asyncio(
    broker: MosquittoBroker, variant: Variant, client_id: str, n: int, watch: Stopwatch
) -> Trial:
    """The baseline subscriber wired to the event loop the way `gateway.ingest` wires paho.

    The difference to `bare-paho` is the asyncio bridge alone (one loop iteration per
    readable event, writes through `add_writer`), with no storage and no decoding.
    """
    loop = asyncio.get_running_loop()
    client = _paho_client(client_id, variant.protocol)
    counter = _Counter(n)
    all_in = asyncio.Event()

    def on_message(c: Any, u: Any, message: mqtt.MQTTMessage) -> None:
        counter.on_message(c, u, message)
        if counter.complete():
            all_in.set()

    def watch_read(sock: Any) -> None:
        loop.add_reader(sock, client.loop_read)

    def watch_write(sock: Any) -> None:
        if sock.fileno() != -1:
            loop.add_writer(sock, client.loop_write)

    def unwatch_write(c: Any, u: Any, sock: Any) -> None:
        if sock.fileno() != -1:
            loop.remove_writer(sock)

    def on_socket_open(c: Any, u: Any, sock: Any) -> None:
        loop.call_soon_threadsafe(watch_read, sock)

    def on_socket_register_write(c: Any, u: Any, sock: Any) -> None:
        loop.call_soon_threadsafe(watch_write, sock)

    client.on_message = on_message
    client.on_socket_open = on_socket_open
    client.on_socket_register_write = on_socket_register_write
    client.on_socket_unregister_write = unwatch_write
    kwargs = _connect_kwargs(
        variant.protocol, clean_start=False, receive_maximum=variant.inflight_window
    )
    watch.start()
    await loop.run_in_executor(None, lambda: client.connect(broker.host, broker.port, **kwargs))
    async with asyncio.timeout(DRAIN_TIMEOUT_S):
        await all_in.wait()
    watch.stop()
    await _disconnect_async(loop, client)
    return Trial(watch, duplicates=counter.duplicates)


async def _disconnect_async(loop: asyncio.AbstractEventLoop, client: mqtt.Client) -> None:
    """Let the writer flush the PUBACKs and the DISCONNECT, then unhook the socket."""
    sock = client.socket()
    client.disconnect()
    for _ in range(400):
        if client.socket() is None:
            break
        await asyncio.sleep(0.005)
    if sock is not None:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(sock)
            loop.remove_writer(sock)
    client._reset_sockets()


# --------------------------------------------------------------------------- our code


@dataclass(frozen=True)
class _BrokerAddress:
    host: str = "127.0.0.1"
    port: int = 1883


_NO_BROKER = _BrokerAddress()


def gateway_settings(
    variant: Variant,
    broker: MosquittoBroker | _BrokerAddress,
    client_id: str,
    db_path: Path,
    cloud_url: str,
) -> Settings:
    """Production defaults except what the scenario needs (ids, port, a big enough quota).

    BLYNK_GATEWAY_* environment overrides still apply, as in the daemon, so other settings
    can be measured without editing this file (BLYNK_GATEWAY_STORE__SYNCHRONOUS=NORMAL);
    the header line prints the effective values.
    """
    return Settings.model_validate(
        {
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "client_id": client_id,
                "protocol": variant.protocol,
                "inflight_window": variant.inflight_window,
                "session_expiry_s": SESSION_EXPIRY_S,
            },
            "cloud": {
                "server": cloud_url,
                "client_id": "sandbox-client",
                "client_secret": "sandbox-secret",
                "daily_points_limit": 10_000_000,
            },
            "store": {"path": db_path},
            "log": {"level": "warning"},
            # The benchmark machine (a container) has no NTP daemon: with `auto` the kernel
            # says unsynchronized and uploads would wait for the clock (issue 20).
            "clock": {"trust": "always"},
            "routes": gateway_routes(variant),
        }
    )


def gateway_routes(variant: Variant) -> list[dict[str, Any]]:
    """One route per device: device `DEVICE_ID + i` for the backlog's topic i."""
    if variant.payload == "fields":
        if variant.devices != 1:
            raise ValueError("the fields payload is measured on one device only")
        return [
            {
                "topic": variant.topic,
                "device_id": DEVICE_ID,
                "fields": FIELDS_ROUTE,
                "timestamp": "last_seen",
            }
        ]
    return [
        {
            "topic": variant.device_topic(i),
            "device_id": DEVICE_ID + i,
            "datastream_id": DATASTREAM_ID,
        }
        for i in range(variant.devices)
    ]


def sandbox_devices(variant: Variant) -> str:
    """The sandbox's devices for `gateway_routes`, as `parse_devices` reads them."""
    streams = ",".join(str(s) for s in sorted({DATASTREAM_ID, *FIELDS_ROUTE.values()}))
    return ";".join(f"{DEVICE_ID + i}:{streams}" for i in range(variant.devices))


def _time_commits(store: Store, samples_ms: list[float]) -> None:
    """Wrap this store's `append` to record each group commit's latency (one fsync each)."""
    append = store.append

    async def timed_append(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await append(*args, **kwargs)
        finally:
            samples_ms.append((time.perf_counter() - started) * 1000)

    store.append = timed_append  # type: ignore[method-assign]


async def _wait_committed(store: Store, n: int) -> None:
    """Wake on each commit (the store's `new_rows` event) until n readings are on disk."""
    new_rows = store.new_rows.listen()
    async with asyncio.timeout(DRAIN_TIMEOUT_S):
        while store.pending_points < n:
            new_rows.clear()
            if store.pending_points >= n:
                break
            await new_rows.wait()


async def drain_ingest(
    broker: MosquittoBroker,
    variant: Variant,
    client_id: str,
    n: int,
    watch: Stopwatch,
    db_path: Path,
) -> Trial:
    """`MqttIngest` + `Store` built as `gateway.app` builds them; timed until all committed."""
    settings = gateway_settings(variant, broker, client_id, db_path, "http://127.0.0.1:9")
    store = await Store.open(settings.store.path, synchronous=settings.store.synchronous)
    commit_ms: list[float] = []
    _time_commits(store, commit_ms)
    ingest = MqttIngest(
        settings.mqtt,
        RouteTable(settings.routes, settings.mqtt.max_payload_bytes),
        store,
        commit_interval_s=settings.store.commit_interval_ms / 1000,
        commit_max_readings=settings.commit_max_readings(),
        oldest_sendable_ms=settings.cloud.oldest_sendable_ms,
    )
    watch.start()
    task = asyncio.create_task(ingest.run(), name="bench-ingest")
    try:
        await _wait_committed(store, n * READINGS_PER_MESSAGE[variant.payload])
        watch.stop()
    finally:
        await ingest.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.close()
    return Trial(
        watch,
        commits=ingest.stats.commits,
        commit_ms=commit_ms,
        stored=ingest.stats.stored,
        duplicates=ingest.stats.duplicates,
    )


async def _wait_accepted(cloud: SandboxProcess, n: int, task: asyncio.Task[None]) -> None:
    """Poll the sandbox's shared counter (5 ms is small against seconds of drain)."""
    async with asyncio.timeout(DRAIN_TIMEOUT_S):
        while cloud.accepted_count() < n:
            if task.done():
                task.result()
                raise RuntimeError("gateway stopped before the cloud had every reading")
            await asyncio.sleep(0.005)


async def drain_gateway(
    broker: MosquittoBroker,
    variant: Variant,
    client_id: str,
    n: int,
    watch: Stopwatch,
    db_path: Path,
) -> Trial:
    """The whole daemon in-process: queued in the broker → accepted by the (sandbox) cloud.

    The sandbox runs in a child process, as a real cloud runs elsewhere: in a thread of
    this process it took the GIL for every request it served, slowing the daemon by its
    own share, and its CPU had to be subtracted. `cpu_s` is this process's alone.
    """
    cloud = SandboxProcess(
        sandbox_devices(variant),
        daily_points_limit=10_000_000,
        counter_path=db_path.with_suffix(".accepted"),
        latency_ms=variant.cloud_latency_ms,
    )
    url = await asyncio.to_thread(cloud.start)
    gateway = Gateway(gateway_settings(variant, broker, client_id, db_path, url))
    try:
        watch.start()
        task = asyncio.create_task(gateway.run(), name="bench-gateway")
        await _wait_accepted(cloud, n, task)
        watch.stop()
        gateway.request_stop()
        async with asyncio.timeout(30):
            await task
    finally:
        await asyncio.to_thread(cloud.stop)
    assert gateway.ingest is not None
    return Trial(
        watch,
        commits=gateway.ingest.stats.commits,
        # Not `stored`: with pass-through a reading the cloud took at once is never
        # written; the cloud holding all n (the wait above) is this variant's check.
        duplicates=gateway.ingest.stats.duplicates,
    )


# --------------------------------------------------------------------------- broker checks


def _broker_disconnects(broker: MosquittoBroker, client_id: str) -> int:
    """How often the broker has logged this client's connection as finished."""
    pattern = re.compile(rf"Client {re.escape(client_id)} (disconnected|closed its connection)")
    return len(pattern.findall(broker.log_path.read_text(errors="replace")))


def wait_broker_saw_disconnect(
    broker: MosquittoBroker, client_id: str, seen_before: int, timeout_s: float = 60.0
) -> float:
    """Wait until the broker has processed the DISCONNECT; returns when (perf_counter).

    Mosquitto handles a connection's packets in order, so by then it has processed every
    PUBACK sent before it. Resuming the session earlier makes the broker drop the old
    connection with its unread PUBACKs, which would look like lost acknowledgements.
    """
    deadline = time.monotonic() + timeout_s
    while _broker_disconnects(broker, client_id) <= seen_before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"broker never logged the disconnect of {client_id}")
        time.sleep(0.005)
    return time.perf_counter()


def count_leftover(broker: MosquittoBroker, variant: Variant, client_id: str) -> int:
    """Resume the session with a fresh client and count what the broker still delivers."""
    client = _paho_client(client_id, variant.protocol)
    state = {"connected": False, "session_present": False, "messages": 0}

    def on_connect(c: Any, u: Any, flags: mqtt.ConnectFlags, rc: Any, p: Any) -> None:
        state["connected"] = True
        state["session_present"] = bool(flags.session_present)

    def on_message(c: Any, u: Any, message: mqtt.MQTTMessage) -> None:
        state["messages"] += 1

    client.on_connect = on_connect
    client.on_message = on_message
    kwargs = _connect_kwargs(variant.protocol, clean_start=False, receive_maximum=65535)
    client.connect(broker.host, broker.port, **kwargs)
    _loop_until(client, lambda: bool(state["connected"]), 10.0)
    if not state["session_present"]:
        raise RuntimeError(f"session {client_id} vanished: the leftover check would prove nothing")
    quiet_until = time.monotonic() + LEFTOVER_QUIET_S
    _loop_until(client, lambda: time.monotonic() > quiet_until, LEFTOVER_QUIET_S + 5)
    _disconnect(client)
    return int(state["messages"])


# --------------------------------------------------------------------------- what-ifs


@contextlib.contextmanager
def packets_per_read(limit: int) -> Iterator[None]:
    """What-if: let paho read up to `limit` packets per readable event instead of one.

    paho's `loop_read()` ignores its argument and handles a single packet when nothing is in
    flight, so an event-loop-driven client pays one loop iteration (epoll + callback) per
    message. This patches `Client.loop_read` for the duration, to measure what reading
    on while the socket still has bytes would gain (`--read-batch`); off by default.
    """
    if limit <= 1:
        yield
        return
    original = mqtt.Client.loop_read

    def loop_read(self: mqtt.Client, max_packets: int = 1) -> Any:
        rc = original(self)
        for _ in range(limit - 1):
            sock = cast(socket.socket | None, self._sock)
            if rc or sock is None:
                break
            try:
                if not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    break
            except (BlockingIOError, InterruptedError):
                break
            rc = original(self)
        return rc

    mqtt.Client.loop_read = loop_read  # type: ignore[method-assign]
    try:
        yield
    finally:
        mqtt.Client.loop_read = original  # type: ignore[method-assign]


async def _store_append_ms(path: Path, group: int, commits: int) -> float:
    """Median latency of `Store.append` for `group` readings with nothing else running."""
    store = await Store.open(path)
    samples = []
    ts_ms = time.time_ns() // 1_000_000 - commits * group - 60_000
    try:
        for _ in range(commits):
            readings = [Reading(DEVICE_ID, DATASTREAM_ID, ts_ms + i, "21.5") for i in range(group)]
            ts_ms += group
            started = time.perf_counter()
            await store.append(readings)
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        await store.close()
    return statistics.median(samples)


def measure_store_alone(workdir: Path, groups: tuple[int, ...] = (16, 800)) -> str:
    """Group-commit latency with an idle event loop (production settings: WAL, FULL).

    With a broker that enforces an in-flight window of 20, ingest is stop-and-wait on this
    latency: at most one group of commit_max (16) readings per commit plus a round trip.
    """
    lines = ["Store.append alone (idle loop, synchronous FULL, median of 40 commits):"]
    for group in groups:
        path = workdir / f"store-alone-{group}.db"
        median_ms = asyncio.run(_store_append_ms(path, group, 40))
        lines.append(
            f"  {group:>4} readings/commit: {median_ms:6.2f} ms "
            f"-> at most {group / median_ms * 1000:>9,.0f} readings/s if commits never overlap"
        )
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    return "\n".join(lines)


def describe_settings(variants: list[Variant]) -> str:
    """The settings that shape ingest, as the variants will see them (env included)."""
    parts = []
    for variant in variants:
        if variant.driver not in ("ingest", "gateway"):
            continue
        settings = gateway_settings(variant, _NO_BROKER, "x", Path("x.db"), "http://127.0.0.1:9")
        parts.append(
            f"MQTT {variant.protocol}: synchronous={settings.store.synchronous} "
            f"commit_interval_ms={settings.store.commit_interval_ms} "
            f"inflight_window={settings.mqtt.inflight_window} "
            f"commit_max={settings.commit_max_readings()}"
        )
    return "; ".join(dict.fromkeys(parts)) or "-"


def code_version() -> str:
    """Which gateway code was measured: other people edit it while benchmarks run."""
    package_dir = Path(gateway_log.__file__).resolve().parent
    try:
        described = subprocess.run(
            ["git", "-C", str(package_dir), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        described = "not a git checkout"
    return f"{package_dir} ({described})"


# --------------------------------------------------------------------------- orchestration


def drain(
    broker: MosquittoBroker, variant: Variant, client_id: str, n: int, workdir: Path
) -> Trial:
    """Run the variant's drain; async ones get a fresh event loop each, like a fresh daemon."""
    watch = Stopwatch(broker.pid)
    db_path = workdir / f"{client_id}.db"
    if variant.driver in ("bare-paho", "bare-paho-manual"):
        return drain_bare_paho(broker, variant, client_id, n, watch)
    with packets_per_read(variant.read_batch):
        if variant.driver == "bare-asyncio":
            return asyncio.run(drain_bare_asyncio(broker, variant, client_id, n, watch))
        if variant.driver == "ingest":
            return asyncio.run(drain_ingest(broker, variant, client_id, n, watch, db_path))
        return asyncio.run(drain_gateway(broker, variant, client_id, n, watch, db_path))


def run_trial(
    broker: MosquittoBroker, variant: Variant, client_id: str, n: int, workdir: Path
) -> Trial:
    """One timed drain of a primed, filled session, then the PUBACK checks (untimed)."""
    disconnects = _broker_disconnects(broker, client_id)
    trial = drain(broker, variant, client_id, n, workdir)
    broker_done = wait_broker_saw_disconnect(broker, client_id, disconnects)
    trial.ack_lag_ms = (broker_done - trial.watch.finished_at) * 1000
    trial.leftover = count_leftover(broker, variant, client_id)
    for suffix in ("", "-wal", "-shm"):
        (workdir / f"{client_id}.db{suffix}").unlink(missing_ok=True)
    return trial


def run_round(
    broker: MosquittoBroker, variants: list[Variant], n: int, round_no: int, workdir: Path
) -> dict[str, Trial]:
    """Prime a session per variant, fill them all with one publish per payload kind, drain."""
    client_ids = {v.name: f"bench-r{round_no}-{v.slug}" for v in variants}
    for variant in variants:
        prime_session(broker, variant, client_ids[variant.name])
    now_ms = time.time_ns() // 1_000_000
    for key in sorted({v.backlog_key for v in variants}):
        first = next(v for v in variants if v.backlog_key == key)
        seconds = publish_backlog(broker, first, make_payloads(first.payload, n, now_ms))
        print(
            f"  round {round_no}: queued {n} {first.payload} messages for {first.devices} "
            f"device(s) in {seconds:.1f} s",
            flush=True,
        )
    results: dict[str, Trial] = {}
    for variant in variants:
        trial = run_trial(broker, variant, client_ids[variant.name], n, workdir)
        results[variant.name] = trial
        print(
            f"  round {round_no}: {variant.name:<26} {n / trial.elapsed_s:>9,.0f} readings/s"
            f"  ack lag {trial.ack_lag_ms:>6.0f} ms  leftover {trial.leftover}",
            flush=True,
        )
    return results


# --------------------------------------------------------------------------- report


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _fmt(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def _baseline_rate(variant: Variant, rates: dict[str, float]) -> float | None:
    """The bare-paho figure for the same payload kind (else any bare-paho figure); for a
    backlog over several devices, the bare client that drained that very backlog."""
    if variant.devices > 1:
        same_backlog = rates.get(f"bare-paho-manual {variant.payload} x{variant.devices}")
        if same_backlog is not None:
            return same_backlog
    same = rates.get(f"bare-paho {variant.payload}")
    if same is not None:
        return same
    return next((rate for name, rate in rates.items() if name.startswith("bare-paho")), None)


TABLE_LEGEND = """\
rd/s: readings/s (median of repeats), min-max over repeats; vs base: rd/s / bare-paho's
(same payload); µs/msg: median wall time per message; cpu µs: our process (all threads)
and mosquitto's CPU per message; commit/s, rd/commit, commit ms: group commits (median
latency of Store.append); ack lag: end of timing until the broker had processed our
DISCONNECT (so every PUBACK); left: messages a resumed session still got (must be 0)."""


def format_table(variants: list[Variant], trials: dict[str, list[Trial]], n: int) -> str:
    """Medians per variant, one line each."""
    rates = {v.name: _median([n / t.elapsed_s for t in trials[v.name]]) for v in variants}
    header = (
        f"{'variant':<26} {'rd/s':>7} {'min-max':>13} {'vs base':>7} {'µs/msg':>6} "
        f"{'cpu µs':>6} {'mosq µs':>7} {'commit/s':>8} {'rd/commit':>9} {'commit ms':>9} "
        f"{'ack lag':>7} {'left':>4}"
    )
    lines = [header, "-" * len(header)]
    for variant in variants:
        runs = trials[variant.name]
        per_run = [n / t.elapsed_s for t in runs]
        rate = rates[variant.name]
        base = _baseline_rate(variant, rates)
        commits = [(t.commits, t.elapsed_s) for t in runs if t.commits]
        samples = [ms for t in runs for ms in t.commit_ms]
        lines.append(
            f"{variant.name:<26} {rate:>7,.0f} {min(per_run):>6,.0f}-{max(per_run):<6,.0f} "
            f"{_fmt(rate / base if base else math.nan, '.2f'):>7} "
            f"{_median([t.elapsed_s for t in runs]) / n * 1e6:>6.1f} "
            f"{_fmt(_median([t.watch.cpu_s for t in runs]) / n * 1e6, '.1f'):>6} "
            f"{_fmt(_median([t.watch.broker_cpu_s for t in runs]) / n * 1e6, '.1f'):>7} "
            f"{_fmt(_median([c / s for c, s in commits]), ',.0f'):>8} "
            f"{_fmt(_median([n / c for c, _ in commits]), ',.0f'):>9} "
            f"{_fmt(_median(samples), '.1f'):>9} "
            f"{_fmt(_median([t.ack_lag_ms for t in runs]), '.0f'):>7} "
            f"{max(t.leftover for t in runs):>4}"
        )
    fields, plain = rates.get("ingest-311 fields"), rates.get("ingest-311 plain")
    if fields and plain:
        per = READINGS_PER_MESSAGE["fields"]
        lines.append(
            f"fields: a 6-key zigbee2mqtt object, {per} keys mapped: {fields * per:,.0f} "
            f"readings/s = x{fields * per / plain:.2f} the plain-value variant's readings/s "
            f"({fields / plain:.2f}x its messages/s)"
        )
    return "\n".join(lines)


def check_integrity(variants: list[Variant], trials: dict[str, list[Trial]], n: int) -> list[str]:
    """Every reading stored exactly once and every message acknowledged, or say which not."""
    problems = []
    for variant in variants:
        for index, trial in enumerate(trials[variant.name]):
            if trial.leftover:
                problems.append(f"{variant.name} run {index}: {trial.leftover} never PUBACKed")
            expected = n * READINGS_PER_MESSAGE[variant.payload]
            if trial.stored is not None and trial.stored != expected:
                problems.append(f"{variant.name} run {index}: stored {trial.stored} of {expected}")
            if trial.duplicates:
                problems.append(f"{variant.name} run {index}: {trial.duplicates} duplicates")
    return problems


# --------------------------------------------------------------------------- profiling


def profile_variant(broker: MosquittoBroker, variant: Variant, n: int, workdir: Path) -> str:
    """One extra drain under cProfile, top functions by own time.

    cProfile sees the event-loop thread only; SQLite work in aiosqlite's thread shows up as
    the time the loop spends waiting, not as its own entries.
    """
    if variant.driver not in ("ingest", "gateway"):
        raise SystemExit("--profile takes an ingest-* or gateway-* variant")
    client_id = f"bench-profile-{variant.slug}"
    prime_session(broker, variant, client_id)
    payloads = make_payloads(variant.payload, n, time.time_ns() // 1_000_000)
    publish_backlog(broker, variant, payloads)
    watch = Stopwatch(broker.pid)
    db_path = workdir / f"{client_id}.db"
    drain_fn = drain_ingest if variant.driver == "ingest" else drain_gateway
    coroutine: Coroutine[Any, Any, Trial] = drain_fn(broker, variant, client_id, n, watch, db_path)
    profiler = cProfile.Profile()
    profiler.enable()
    trial = asyncio.run(coroutine)
    profiler.disable()
    out = io.StringIO()
    out.write(f"cProfile of {variant.name}: {n / trial.elapsed_s:,.0f} readings/s (profiled)\n")
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    return out.getvalue()


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def private_broker(workdir: Path, n: int) -> Iterator[MosquittoBroker]:
    """Mosquitto's default in-flight window, a queue big enough for the backlog, no autosave.

    Persistence is off so a periodic dump of the whole queue cannot land inside one
    variant's timing and not another's.
    """
    broker = MosquittoBroker(
        workdir / "broker",
        max_inflight_messages=BROKER_INFLIGHT,
        max_queued_messages=max(100_000, n),
        persistence=False,
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Backlog drain throughput of the gateway's ingest path vs a bare subscriber."
    )
    parser.add_argument("--messages", type=int, default=20_000, help="backlog size N")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PREFIX",
        help="run only variants whose name starts with PREFIX (repeatable; baselines stay)",
    )
    parser.add_argument(
        "--cloud-latency-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="the sandbox answers every request this much later (gateway-* variants)",
    )
    parser.add_argument(
        "--profile",
        metavar="VARIANT",
        help='after the table, cProfile one more drain of this variant, e.g. "ingest-311 json"',
    )
    parser.add_argument(
        "--read-batch",
        type=int,
        default=1,
        metavar="K",
        help="what-if: also run each asyncio variant reading up to K MQTT packets per "
        'readable event (paho patched; shown as "<variant> rbK"); default 1 = off',
    )
    parser.add_argument(
        "--workdir", type=Path, help="where the broker and SQLite files go (default: a temp dir)"
    )
    return parser.parse_args(argv)


def select_variants(prefixes: list[str], read_batch: int = 1) -> list[Variant]:
    """The variants to run; with a what-if read batch, each asyncio one gets a twin.

    The twin runs in the same rounds as its original, so the two are compared under the
    same machine noise.
    """
    wanted = [v for v in VARIANTS if not prefixes or any(v.name.startswith(p) for p in prefixes)]
    backlogs = {v.backlog_key for v in wanted}
    chosen = [
        v
        for v in VARIANTS
        if v in wanted or (v.driver.startswith("bare-paho") and v.backlog_key in backlogs)
    ]
    if read_batch <= 1:
        return chosen
    with_twins = []
    for variant in chosen:
        with_twins.append(variant)
        if not variant.driver.startswith("bare-paho"):
            twin = replace(variant, name=f"{variant.name} rb{read_batch}", read_batch=read_batch)
            with_twins.append(twin)
    return with_twins


def run(args: argparse.Namespace, workdir: Path) -> int:
    n: int = args.messages
    variants = [
        replace(v, cloud_latency_ms=args.cloud_latency_ms) if v.driver == "gateway" else v
        for v in select_variants(args.only, args.read_batch)
    ]
    trials: dict[str, list[Trial]] = {v.name: [] for v in variants}
    started = time.monotonic()
    with private_broker(workdir, n) as broker:
        for round_no in range(args.repeats):
            results = run_round(broker, variants, n, round_no, workdir)
            for name, trial in results.items():
                trials[name].append(trial)
        print()
        print(format_table(variants, trials, n))
        print(TABLE_LEGEND)
        problems = check_integrity(variants, trials, n)
        if problems:
            print("INTEGRITY PROBLEMS:\n  " + "\n  ".join(problems))
        else:
            print("integrity: every reading stored once, every message PUBACKed")
        print()
        print(measure_store_alone(workdir))
        print(f"total wall time {time.monotonic() - started:.0f} s")
        if args.profile:
            chosen = next((v for v in VARIANTS if v.name == args.profile), None)
            if chosen is None:
                raise SystemExit(f"unknown variant {args.profile!r}")
            print()
            print(profile_variant(broker, chosen, n, workdir))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gateway_log.configure(level="warning", log_format="console", stream=sys.stderr)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"N={args.messages} messages, {args.repeats} repeats, {os.cpu_count()} CPUs, "
        f"mosquitto max_inflight_messages={BROKER_INFLIGHT}, "
        f"sandbox latency {args.cloud_latency_ms:g} ms, workdir {workdir}\n"
        f"gateway code: {code_version()}\n"
        f"ingest settings: {describe_settings(select_variants(args.only))}",
        flush=True,
    )
    if args.read_batch > 1:
        batch = args.read_batch
        print(f"what-if rows 'rb{batch}': paho reads up to {batch} packets per readable event")
    try:
        return run(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
