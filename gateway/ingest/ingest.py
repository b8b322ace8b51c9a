"""MQTT → store: paho-mqtt driven by the asyncio loop, acknowledged only after commit.

No paho network thread: paho's socket is registered with the event loop (`add_reader` /
`add_writer`) and a timer calls `loop_misc`, as aiomqtt 2.x does. Only the blocking
`connect()` runs in an executor, so only the socket callbacks it triggers are marshalled
with `call_soon_threadsafe`; every other callback already runs on the loop thread.

The broker keeps our session (fixed client id, clean session off) and we use
`manual_ack=True`: a QoS 1 message is PUBACKed only after the transaction that holds its
reading has committed. Messages are grouped so one commit (one fsync) covers many, and a
group is committed early when it nears the broker's in-flight window — the broker sends at
most that many unacknowledged messages, so waiting longer would only stall it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.aio import wait_any
from gateway.config import MqttSettings
from gateway.errors import BufferFull, StoreError
from gateway.ingest.routes import PayloadError, RouteTable
from gateway.log import Throttle, get_logger
from gateway.models import Reading
from gateway.store import RejectedPayload, Store

log = get_logger("ingest")

MISC_INTERVAL_S = 1.0
CONNACK_TIMEOUT_S = 10.0
# A failed commit (disk full, read-only) is retried with capped backoff, and at once when
# the flush loop frees rows: a full disk often has room again after an upload.
STORE_RETRY_MIN_S = 0.5
STORE_RETRY_MAX_S = 10.0
# backpressure: while the buffer is full, look again at least this often.
BUFFER_FULL_RECHECK_S = 5.0
# At most this many uncommitted messages are kept in memory. The broker should stop at its
# in-flight window anyway, but Mosquitto 2.0.x does not always (eclipse-mosquitto#2301), and
# while commits are held it would push its whole queue to us: beyond this, messages are left
# unacknowledged and not kept (the broker still has them in our session) and are fetched
# again by one reconnect after the next successful commit.
PENDING_MAX_MESSAGES = 5000
# The same cap while commits work: only a broker pushing far past its window faster than
# commits complete reaches it. Deferring has a cost (a resync reconnect, after which the
# broker may resend messages whose PUBACK it had not read yet), so it is a last resort.
PENDING_HARD_MAX_MESSAGES = 100_000
# After that reconnect is asked for, commits wait (at most this long) for the new
# connection, so that what the broker resends is not also committed from memory.
RESYNC_WAIT_S = 10.0
# Packets read per readable socket event before yielding to the event loop.
READ_BATCH_PACKETS = 64
# Unsubscribed (never subscribed) at shutdown: its UNSUBACK proves our PUBACKs were read.
ACK_BARRIER_TOPIC = "blynk-gateway/ack-barrier"
ACK_BARRIER_TIMEOUT_S = 2.0
# How many committed messages are remembered to recognise broker redeliveries (~2 MB).
RECENT_COMMITTED_MAX = 20_000


@dataclass
class IngestStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    unmapped: int = 0
    retained_skipped: int = 0
    redelivered_acked: int = 0
    commits: int = 0
    # capacity policy outcomes (see Store.append): evicted = dropped oldest to make room,
    # refused = acknowledged but not stored (drop-newest)
    evicted: int = 0
    refused: int = 0
    # commits that found the buffer full (backpressure) or unwritable, and were held
    held_commits: int = 0
    # messages left unacknowledged (and not kept) while holding; the broker resends them
    deferred: int = 0
    # uncommitted messages of an earlier connection, left out because the broker resends them
    resent_dropped: int = 0
    rejected_by_reason: Counter[str] = field(default_factory=Counter)


_Ack = tuple[int, int, int, str, bytes]  # mid, qos, connection generation, topic, payload
# one message: its ack, what it became (a reading, a dead letter, or neither), its DUP flag
_Entry = tuple[_Ack, Reading | None, RejectedPayload | None, bool]


@dataclass(slots=True)
class _PendingGroup:
    """What the next commit will hold, and which messages it will acknowledge.

    One entry per message, in arrival order, so a held group can be committed in slices.
    """

    entries: list[_Entry] = field(default_factory=list)
    first_at: float = 0.0

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def readings(self) -> list[Reading]:
        return [reading for _, reading, _, _ in self.entries if reading is not None]

    @property
    def rejected(self) -> list[RejectedPayload]:
        return [item for _, _, item, _ in self.entries if item is not None]

    @property
    def acks(self) -> list[_Ack]:
        return [entry[0] for entry in self.entries]

    def split(self, count: int) -> tuple[_PendingGroup, _PendingGroup]:
        return (
            _PendingGroup(self.entries[:count], self.first_at),
            _PendingGroup(self.entries[count:], self.first_at),
        )


class MqttIngest:
    """Subscribes to the routes' topics and turns messages into committed readings."""

    def __init__(
        self,
        settings: MqttSettings,
        routes: RouteTable,
        store: Store,
        *,
        commit_interval_s: float,
        commit_max_readings: int,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self._settings = settings
        self._routes = routes
        self._store = store
        self._space_freed = store.space_freed.listen()
        self._commit_interval_s = commit_interval_s
        self._commit_max = commit_max_readings
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self.stats = IngestStats()
        self.connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._generation = 0
        self._pending = _PendingGroup()
        self._group_ready = asyncio.Event()
        self._group_full = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._stopping = False
        self._accepting = True
        self._committer_idle = asyncio.Event()
        self._committer_idle.set()
        # Committed but not acknowledged because the connection dropped first: when the
        # broker redelivers them (DUP flag) they are acknowledged without being stored again.
        self._committed_unacked: Counter[tuple[str, bytes]] = Counter()
        # The connection generation that started the broker's current session of ours.
        self._session_first_generation = 0
        self._recently_committed: set[int] = set()
        self._recent_order: deque[int] = deque()
        self._reject_throttle = Throttle(60.0)
        self._store_failing_since: float | None = None
        # Set while commits fail or the buffer is full: acks are being held.
        self.holding = False
        self._deferred_since_resync = 0
        self._resyncing = False
        self._resync_generation: int | None = None
        self._full_since: float | None = None  # backpressure: holding since
        self._subscribed: set[str] = set()
        self._barrier_mid: int | None = None
        self._barrier_done = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Connect, reconnect with capped jittered backoff, and commit groups until cancelled."""
        self._loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._commit_loop(), name="ingest-commit")
            tasks.create_task(self._connection_loop(), name="ingest-connection")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking messages, commit and acknowledge what we hold, then disconnect."""
        self._stopping = True
        self._accepting = False
        client = self._client
        if client is not None:
            sock = client.socket()
            if sock is not None and self._loop is not None:
                self._loop.remove_reader(sock)
        self._group_ready.set()
        self._group_full.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while len(self._pending) or not self._committer_idle.is_set():
                    if self.holding:
                        break  # cannot commit now: the broker keeps these for our session
                    self._group_full.set()
                    await asyncio.sleep(0.01)
        if client is not None and client.is_connected():
            await self._ack_barrier(client)
            client.disconnect()
            for _ in range(20):
                if client.socket() is None:
                    break
                client.loop_write()
                await asyncio.sleep(0.01)

    async def _ack_barrier(self, client: mqtt.Client, *, reader_active: bool = False) -> None:
        """Wait until the broker has processed every PUBACK we sent.

        MQTT does not acknowledge a PUBACK, and a broker may drop the ones still unread in
        its socket buffer when the session is taken over by our next start (Mosquitto logs
        "already connected, closing old connection") and then resend those messages: as
        duplicates, since they were stored and may be uploaded already. The broker answers
        packets in order, so the UNSUBACK of a harmless UNSUBSCRIBE (of a topic we never
        subscribed) proves that every earlier PUBACK has been processed.
        """
        if self._loop is None:
            return
        sock = client.socket()
        if sock is None:
            return
        self._barrier_mid = None
        self._barrier_done.clear()
        if not reader_active:  # at shutdown the reader is already gone: read the UNSUBACK
            self._loop.add_reader(sock, self._read_ready, client)
        result, mid = client.unsubscribe(ACK_BARRIER_TOPIC)
        if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._barrier_mid = mid
            answered = await wait_any(self._barrier_done, timeout_s=ACK_BARRIER_TIMEOUT_S)
            if not answered:
                log.warning("mqtt_ack_barrier_timed_out", timeout_s=ACK_BARRIER_TIMEOUT_S)
        if not reader_active:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock)

    def _on_unsubscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if mid == self._barrier_mid:
            self._barrier_done.set()

    # ------------------------------------------------------------------ connection

    def _new_client(self) -> mqtt.Client:
        protocol = (
            MQTTProtocolVersion.MQTTv5
            if self._settings.protocol == "5"
            else MQTTProtocolVersion.MQTTv311
        )
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._settings.client_id,
            clean_session=False if protocol == MQTTProtocolVersion.MQTTv311 else None,
            protocol=protocol,
            manual_ack=True,
            reconnect_on_failure=False,
        )
        if self._settings.username is not None:
            password = self._settings.password
            client.username_pw_set(
                self._settings.username,
                password.get_secret_value() if password is not None else None,
            )
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    async def _connection_loop(self) -> None:
        attempt = 0
        failures_since_log = 0
        last_error = ""
        while not self._stopping:
            self._client = self._new_client()
            self._disconnected.clear()
            try:
                await self._connect(self._client)
            except (OSError, TimeoutError, ConnectionError) as exc:
                attempt += 1
                error = f"{type(exc).__name__}: {exc}"
                if attempt == 1 or error != last_error:
                    log.warning(
                        "mqtt_connect_failed",
                        host=self._settings.host,
                        port=self._settings.port,
                        error=error,
                        attempt=attempt,
                        previous_failures=failures_since_log,
                    )
                    failures_since_log = 0
                else:
                    failures_since_log += 1
                last_error = error
                self._close_client(self._client)
                await self._sleep_backoff(attempt)
                continue
            if attempt > 1 and failures_since_log:
                log.info("mqtt_connect_recovered", failed_attempts=attempt)
            attempt = 0
            failures_since_log = 0
            last_error = ""
            misc = asyncio.create_task(self._misc_loop(self._client), name="ingest-mqtt-misc")
            try:
                await self._disconnected.wait()
            finally:
                misc.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await misc
                self._close_client(self._client)
            if not self._stopping:
                attempt = 1
                await self._sleep_backoff(attempt)

    async def _sleep_backoff(self, attempt: int) -> None:
        cap = min(
            self._settings.reconnect_max_s, self._settings.reconnect_min_s * 2 ** (attempt - 1)
        )
        delay = max(self._settings.reconnect_min_s / 2, random.uniform(0, cap))
        await asyncio.sleep(delay)

    async def _connect(self, client: mqtt.Client) -> None:
        assert self._loop is not None
        self._generation += 1
        self.connected.clear()
        properties: Properties | None = None
        clean_start: bool | Literal[3] = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if self._settings.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._settings.session_expiry_s
            properties.ReceiveMaximum = self._settings.inflight_window
            clean_start = False
        await self._loop.run_in_executor(
            None,
            lambda: client.connect(
                self._settings.host,
                self._settings.port,
                keepalive=self._settings.keepalive_s,
                clean_start=clean_start,
                properties=properties,
            ),
        )
        answered = await wait_any(self.connected, self._disconnected, timeout_s=CONNACK_TIMEOUT_S)
        if not answered:
            raise TimeoutError(f"no CONNACK within {CONNACK_TIMEOUT_S:.0f} s")
        if not self.connected.is_set():
            raise ConnectionError(self._last_refusal or "connection closed before CONNACK")

    _last_refusal: str | None = None

    def _close_client(self, client: mqtt.Client | None) -> None:
        if client is None:
            return
        sock = client.socket()
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        with contextlib.suppress(Exception):
            client._sock_close()
        self.connected.clear()

    async def _misc_loop(self, client: mqtt.Client) -> None:
        while True:
            await asyncio.sleep(MISC_INTERVAL_S)
            if client.loop_misc() == MQTTErrorCode.MQTT_ERR_NO_CONN:
                self._disconnected.set()
                return

    # ------------------------------------------------------------------ paho callbacks

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._watch_socket, client, sock)

    def _watch_socket(self, client: mqtt.Client, sock: Any) -> None:
        if self._accepting and client is self._client:
            self._loop_add_reader(sock, client)

    def _loop_add_reader(self, sock: Any, client: mqtt.Client) -> None:
        assert self._loop is not None
        self._loop.add_reader(sock, self._read_ready, client)

    def _read_ready(self, client: mqtt.Client) -> None:
        """Read up to READ_BATCH_PACKETS packets per readable event.

        paho's `loop_read` handles one packet; going back to the event loop between packets
        of a burst costs more than the packet itself (the ingest benchmark measured +12 % to
        +30 % readings/s with a batch), so keep reading while the socket has bytes.
        """
        try:
            for _ in range(READ_BATCH_PACKETS):
                rc = client.loop_read()
                if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                    self._disconnected.set()
                    return
                if not self._accepting or not _has_unread_bytes(client.socket()):
                    return
        except Exception as exc:  # a bug in a callback must not kill the daemon
            log.exception("mqtt_read_failed", error=f"{type(exc).__name__}: {exc}")
            self._disconnected.set()

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._forget_socket, sock)

    def _forget_socket(self, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._watch_writable, client, sock)

    def _watch_writable(self, client: mqtt.Client, sock: Any) -> None:
        assert self._loop is not None
        if sock.fileno() != -1:
            self._loop.add_writer(sock, client.loop_write)

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        if sock.fileno() != -1:
            self._loop.remove_writer(sock)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._last_refusal = f"broker refused connection: {reason_code}"
            self._disconnected.set()
            return
        self._last_refusal = None
        session_present = bool(flags.session_present)
        if not session_present:
            self._subscribed.clear()
            # The broker forgot our session: it will resend nothing we did not acknowledge.
            self._session_first_generation = self._generation
            self._committed_unacked.clear()
        wanted = self._routes.subscriptions
        missing = [topic for topic in wanted if topic not in self._subscribed]
        if missing:
            if self._settings.protocol == "5":
                client.subscribe([(topic, self._subscribe_options()) for topic in missing])
            else:
                client.subscribe([(topic, 1) for topic in missing])
            self._subscribed.update(missing)
        self.connected.set()
        log.info(
            "mqtt_connected",
            host=self._settings.host,
            port=self._settings.port,
            client_id=self._settings.client_id,
            session_present=session_present,
            subscribed=len(missing),
        )

    def _subscribe_options(self) -> SubscribeOptions:
        if self._settings.protocol == "5":
            # Retained messages only on a brand-new subscription, never on a resumed one.
            return SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        return SubscribeOptions(qos=1)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            log.error("mqtt_subscribe_refused", reasons=refused)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self._disconnected.set()
        if self._resyncing:
            self._resyncing = False
            return
        if was_connected and not self._stopping:
            log.warning(
                "mqtt_disconnected",
                host=self._settings.host,
                port=self._settings.port,
                reason=str(reason_code),
                pending=len(self._pending),
            )

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if not self._accepting:
            return  # shutting down: left unacknowledged, the broker resends it next session
        stats = self.stats
        stats.received += 1
        topic = message.topic
        payload = bytes(message.payload)
        qos = message.qos
        group = self._pending
        if len(group) >= (PENDING_MAX_MESSAGES if self.holding else PENDING_HARD_MAX_MESSAGES):
            # Not acknowledged, not kept: the broker keeps it in our session (see _resync).
            stats.deferred += 1
            self._deferred_since_resync += 1
            return
        if not group.entries:
            group.first_at = time.monotonic()
            self._group_ready.set()
        ack = (message.mid, qos, self._generation, topic, payload)
        if message.dup and self._already_committed(topic, payload):
            stats.redelivered_acked += 1
            group.entries.append((ack, None, None, True))
        else:
            reading, rejected = self._accept(topic, payload, message.retain)
            group.entries.append((ack, reading, rejected, bool(message.dup)))
        if len(group) >= self._commit_max:
            self._group_full.set()

    def _already_committed(self, topic: str, payload: bytes) -> bool:
        """Is this redelivery (DUP) a message we already stored?

        Two cases. We committed it but the connection dropped before our PUBACK: known
        exactly. Or we did send the PUBACK but the broker did not process it before it
        restarted (Mosquitto then redelivers from its persistence file): recognisable only
        when the payload carries its own `ts`, since then it names one exact point. A
        receive-stamped payload like `21.5` may legitimately repeat, so it is stored again
        rather than risk dropping a real reading.
        """
        key = (topic, payload)
        if self._committed_unacked.get(key):
            self._committed_unacked[key] -= 1
            return True
        return _has_own_timestamp(payload) and hash(key) in self._recently_committed

    def _accept(
        self, topic: str, payload: bytes, retained: bool
    ) -> tuple[Reading | None, RejectedPayload | None]:
        """The reading a message becomes, or why it is kept as a dead letter, or neither."""
        route = self._routes.match(topic)
        if route is None:
            self.stats.unmapped += 1
            self._log_rejected(topic, "no route matches this topic", payload)
            return None, None
        try:
            reading = self._routes.decode(route, payload, self._clock_ms())
        except PayloadError as exc:
            reason = str(exc)
            self.stats.rejected += 1
            self.stats.rejected_by_reason[reason.split(":")[0]] += 1
            self._log_rejected(topic, reason, payload)
            return None, RejectedPayload(
                f"bad_payload: {reason}",
                topic,
                payload[:1024],
                route.device_id,
                route.datastream_id,
            )
        if retained and not _has_own_timestamp(payload):
            # A retained value was published at an unknown time; stamping it "now" would lie.
            self.stats.retained_skipped += 1
            return None, None
        return reading, None

    def _log_rejected(self, topic: str, reason: str, payload: bytes) -> None:
        allowed, suppressed = self._reject_throttle.allow((topic, reason.split(":")[0]))
        if allowed:
            log.warning(
                "payload_rejected",
                topic=topic,
                reason=reason,
                payload_bytes=len(payload),
                suppressed_since_last=suppressed,
                rejected_total=self.stats.rejected + self.stats.unmapped,
            )

    # ------------------------------------------------------------------ group commit

    async def _commit_loop(self) -> None:
        failures = 0  # in this streak of failed commits (for the log)
        consecutive = 0  # failures since the last successful slice (for the backoff)
        while True:
            await self._group_ready.wait()
            group = self._pending
            if not group.entries:
                self._group_ready.clear()
                if self._stopping:
                    self._committer_idle.set()
                    await asyncio.sleep(0.05)
                continue
            if self._resync_generation is not None:
                await self._wait_for_resync(self._resync_generation)
                self._resync_generation = None
                group = self._pending
            wait_s = group.first_at + self._commit_interval_s - time.monotonic()
            if wait_s > 0 and not self._group_full.is_set() and not self._stopping:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._group_full.wait()
            self._committer_idle.clear()
            self._pending = _PendingGroup()
            degraded = self.holding or self._store.disk_full
            if degraded and len(group) > self._commit_max:
                # Room comes back a little at a time (uploads free pages): retry in slices.
                group, self._pending = group.split(self._commit_max)
            self._group_full.clear()
            self._group_ready.clear()
            if self._pending.entries:
                self._group_ready.set()
            group = self._without_redeliveries(group)
            try:
                result = await self._store.append(group.readings, group.rejected)
            except BufferFull as full:
                self._space_freed.clear()  # wake only for room freed after this refusal
                # backpressure: no PUBACK, so the broker stops sending once its in-flight
                # window is used up and queues the rest for our session.
                attempted = len(group)
                self._requeue(group)
                self._hold()
                if attempted > self._commit_max:
                    await asyncio.sleep(0)  # a big group: retry at once, in a slice
                    continue
                if self._full_since is None:
                    self._full_since = time.monotonic()
                    log.warning(
                        "buffer_full",
                        policy="backpressure",
                        buffered=full.buffered,
                        limit=full.limit,
                        held=len(self._pending),
                        action="holding MQTT acknowledgements; the broker queues for us "
                        "until uploads free room",
                    )
                await self._wait_for_space(BUFFER_FULL_RECHECK_S)
                continue
            except StoreError as exc:
                self._space_freed.clear()
                failures += 1
                consecutive += 1
                self._requeue(group)
                self._hold()
                await self._store_failed(exc, first=failures == 1, attempt=consecutive)
                continue
            finally:
                self._committer_idle.set()
            consecutive = 0
            # Held messages are committed slice by slice; the hold ends when they are done.
            # On a full disk the streak lasts until the store has room again (it logs that
            # condition itself): one line each way, however often freed pages run out.
            self.holding = self.holding and len(self._pending) > self._commit_max
            if self._full_since is not None and not self.holding:
                log.info(
                    "buffer_full_ended",
                    policy="backpressure",
                    buffered=self._store.pending_points,
                    held_s=round(time.monotonic() - self._full_since, 1),
                )
                self._full_since = None
            if failures and not self.holding and not self._store.disk_full:
                log.info(
                    "store_recovered",
                    failed_attempts=failures,
                    down_s=round(time.monotonic() - (self._store_failing_since or 0), 1),
                )
                failures = 0
                self._store_failing_since = None
            self.stats.commits += 1
            self.stats.stored += result.inserted
            self.stats.duplicates += result.duplicates
            self.stats.evicted += result.evicted
            self.stats.refused += result.refused
            self._acknowledge(group)
            if self._deferred_since_resync and not self.holding:
                await self._resync()

    def _requeue(self, group: _PendingGroup) -> None:
        """Put a group that failed to commit back in front of what arrived since."""
        group.entries.extend(self._pending.entries)
        self._pending = group
        self._group_ready.set()

    @property
    def held_messages(self) -> int:
        """Messages received but neither committed nor acknowledged yet."""
        return len(self._pending)

    async def _resync(self) -> None:
        """Reconnect once, so the broker resends what we left unacknowledged while holding.

        MQTT 3.1.1 brokers resend unacknowledged messages only when the session resumes.
        The session outlives the disconnect (fixed client id, no clean start). The PUBACKs
        just sent must be read by the broker first (the ack barrier), or it resends those
        messages too.
        """
        log.info(
            "mqtt_resync",
            deferred=self._deferred_since_resync,
            reason="messages left unacknowledged while the buffer was unavailable",
        )
        self._deferred_since_resync = 0
        self._resync_generation = self._generation
        client = self._client
        if client is not None and client.is_connected():
            await self._ack_barrier(client, reader_active=True)
        if client is not None and client.is_connected():
            self._resyncing = True
            client.disconnect()
        else:
            self._disconnected.set()

    async def _wait_for_resync(self, generation: int) -> None:
        """Until a connection newer than `generation` is up (or RESYNC_WAIT_S, or stop)."""
        deadline = time.monotonic() + RESYNC_WAIT_S
        while not self._stopping and time.monotonic() < deadline:
            if self._generation > generation and self.connected.is_set():
                return
            await asyncio.sleep(0.02)

    def _hold(self) -> None:
        self.holding = True
        self.stats.held_commits += 1

    async def _wait_for_space(self, timeout_s: float) -> None:
        """Until the flush loop deletes rows, or the timeout. `stop` does not wait for us."""
        await wait_any(self._space_freed, timeout_s=timeout_s)
        self._space_freed.clear()

    async def _store_failed(self, exc: StoreError, *, first: bool, attempt: int) -> None:
        """Log once per failure streak; retry with backoff, or as soon as rows are freed."""
        if first:
            self._store_failing_since = time.monotonic()
            log.error(
                "store_write_failed",
                error=str(exc),
                action="holding MQTT acknowledgements; the broker keeps the messages; "
                "uploads continue and free space; retrying by itself",
                held=len(self._pending),
            )
        await self._wait_for_space(min(STORE_RETRY_MAX_S, STORE_RETRY_MIN_S * 2 ** (attempt - 1)))

    def _without_redeliveries(self, group: _PendingGroup) -> _PendingGroup:
        """Right before a commit, leave out what the broker has already resent or will resend.

        Messages from an earlier connection of the same broker session were not acked, so
        the broker resends them (DUP) on this connection: storing both copies would make a
        second point whenever the first was delivered and deleted in between. A DUP whose
        first copy committed meanwhile becomes a bare acknowledgement.
        """
        client = self._client
        connected = client is not None and client.is_connected() and self.connected.is_set()
        current = self._generation
        kept: list[_Entry] = []
        for entry in group.entries:
            ack, reading, rejected, dup = entry
            generation, qos, topic, payload = ack[2], ack[1], ack[3], ack[4]
            if connected and qos > 0 and self._session_first_generation <= generation < current:
                self.stats.resent_dropped += 1
                continue
            stored = reading is not None or rejected is not None
            if dup and stored and self._already_committed(topic, payload):
                self.stats.redelivered_acked += 1
                entry = (ack, None, None, dup)
            kept.append(entry)
        group.entries = kept
        return group

    def _acknowledge(self, group: _PendingGroup) -> None:
        client = self._client
        current = self._generation
        for mid, qos, generation, topic, payload in group.acks:
            if qos == 0:
                continue
            if generation == current and client is not None and client.is_connected():
                client.ack(mid, qos)
            elif generation >= self._session_first_generation:
                # The broker resends it on the next connection: recognise it then.
                self._committed_unacked[(topic, payload)] += 1
            if _has_own_timestamp(payload):
                self._remember(hash((topic, payload)))
        if len(self._committed_unacked) > RECENT_COMMITTED_MAX:
            self._committed_unacked.clear()

    def _remember(self, key_hash: int) -> None:
        if key_hash in self._recently_committed:
            return
        self._recently_committed.add(key_hash)
        self._recent_order.append(key_hash)
        if len(self._recent_order) > RECENT_COMMITTED_MAX:
            self._recently_committed.discard(self._recent_order.popleft())


def _has_unread_bytes(sock: Any) -> bool:
    if not isinstance(sock, socket.socket):
        return False
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError, ValueError):  # ValueError: TLS socket, no peek
        return False
    except OSError:
        return True  # let loop_read meet the error and report the disconnect


def _has_own_timestamp(payload: bytes) -> bool:
    return b'"ts"' in payload
