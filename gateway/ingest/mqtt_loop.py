"""paho-mqtt driven by the asyncio event loop: one connection, reconnected until stopped.

No paho network thread: paho's socket is registered with the event loop (`add_reader` /
`add_writer`) and a timer calls `loop_misc`, as aiomqtt 2.x does. Only the blocking
`connect()` (with `tls`: reading the TLS files and the handshake too) runs in an executor,
so only the socket callbacks it triggers are marshalled with `call_soon_threadsafe`; every
other callback already runs on the loop thread.

The broker keeps our session (fixed client id, clean session off) and messages are
acknowledged by hand (`manual_ack=True`), by whoever has made them safe. Each connection
has a generation number so that a PUBACK is only ever sent on the connection that carried
the message; for the others the broker resends them (see `acknowledge`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.aio import wait_any
from gateway.config import MqttSettings, TlsSetupError
from gateway.ingest import tls
from gateway.ingest.paho_client import ChunkedClient, supported, unread_bytes
from gateway.log import Throttle, clip, get_logger

log = get_logger("ingest")

MISC_INTERVAL_S = 1.0
CONNACK_TIMEOUT_S = 10.0
# Packets read per readable socket event before yielding to the event loop.
READ_BATCH_PACKETS = 64
CLIENT_CLASS: type[mqtt.Client] = ChunkedClient if supported() else mqtt.Client
# Unsubscribed (never subscribed) at shutdown: its UNSUBACK proves our PUBACKs were read.
ACK_BARRIER_TOPIC = "blynk-gateway/ack-barrier"
ACK_BARRIER_TIMEOUT_S = 2.0
# A failure to handle a message or read the socket is logged once per kind per interval.
FAILURE_LOG_INTERVAL_S = 60.0

# A message as it arrived, and the generation of the connection that carried it.
MessageHandler = Callable[[mqtt.MQTTMessage, int], None]


class MqttConnection:
    """Connects, subscribes, reconnects with capped jittered backoff, and hands messages on.

    `on_message` runs on the event loop for every message while reading is on;
    `on_session_lost` runs when the broker did not keep our session (it will resend nothing
    we did not acknowledge); `held_messages` only feeds the disconnect log line.
    """

    def __init__(
        self,
        settings: MqttSettings,
        subscriptions: Sequence[str],
        *,
        on_message: MessageHandler,
        on_session_lost: Callable[[], None],
        held_messages: Callable[[], int] = lambda: 0,
    ) -> None:
        self._settings = settings
        self._subscriptions = list(subscriptions)
        self._handle_message = on_message
        self._session_lost = on_session_lost
        self._held_messages = held_messages
        self.connected = asyncio.Event()
        # Set once the broker has confirmed this connection's subscriptions (SUBACK), or at
        # CONNACK when a resumed session needs none: from then on a publish reaches us.
        self.subscribed = asyncio.Event()
        self._connect_suback_mid: int | None = None
        self._connected_fields: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._generation = 0
        # The connection generation that started the broker's current session of ours.
        self._session_first_generation = 0
        self._disconnected = asyncio.Event()
        self._stopping = False
        self._reading = True
        self._resyncing = False
        self._last_refusal: str | None = None
        self._subscribed: set[str] = set()
        self._barrier_mid: int | None = None
        self._barrier_done = asyncio.Event()
        self._messages_read = 0  # PUBLISH packets paho handed us (ends read batches)
        self._paused = False  # flow control: see pause_reading
        self._failure_log = Throttle(FAILURE_LOG_INTERVAL_S)

    @property
    def generation(self) -> int:
        """The current connection's number; it grows with every connection attempt."""
        return self._generation

    def is_up(self) -> bool:
        client = self._client
        return client is not None and client.is_connected() and self.connected.is_set()

    # ------------------------------------------------------------------ acknowledgements

    def acknowledge(self, mid: int, qos: int, generation: int) -> bool:
        """PUBACK a QoS 1 message if its connection is still up; True if the broker resends it.

        A message of an earlier connection of the same session cannot be acknowledged any
        more: the broker resends it (DUP) on this one. One of an earlier session is gone.
        """
        client = self._client
        if generation == self._generation and client is not None and client.is_connected():
            client.ack(mid, qos)
            return False
        return generation >= self._session_first_generation

    def will_resend(self, generation: int, qos: int) -> bool:
        """Has the broker resent (or will it resend) this message on the current connection?"""
        return (
            qos > 0
            and self.is_up()
            and self._session_first_generation <= generation < self._generation
        )

    async def resync(self) -> None:
        """Reconnect once, so the broker resends what we left unacknowledged.

        MQTT 3.1.1 brokers resend unacknowledged messages only when the session resumes.
        The session outlives the disconnect (fixed client id, no clean start). The PUBACKs
        just sent must be read by the broker first (the ack barrier), or it resends those
        messages too.
        """
        client = self._client
        if client is not None and client.is_connected():
            await self._ack_barrier(client, reader_active=True)
        if client is not None and client.is_connected():
            self._resyncing = True
            client.disconnect()
        else:
            self._disconnected.set()

    async def wait_reconnected(self, generation: int, timeout_s: float) -> None:
        """Until a connection newer than `generation` is up (or the timeout, or stop)."""
        deadline = time.monotonic() + timeout_s
        while not self._stopping and time.monotonic() < deadline:
            if self._generation > generation and self.connected.is_set():
                return
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ lifecycle

    def stop_reading(self) -> None:
        """No more messages, and no reconnect: what is unread stays with the broker."""
        self._stopping = True
        self._reading = False
        client = self._client
        if client is not None:
            sock = client.socket()
            if sock is not None and self._loop is not None:
                self._loop.remove_reader(sock)

    def pause_reading(self) -> None:
        """Stop reading the socket for a while (flow control): what the broker sends waits
        in the kernel's buffers, then in the broker's queue for our session."""
        if self._paused:
            return
        self._paused = True
        client = self._client
        sock = client.socket() if client is not None else None
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock)

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        client = self._client
        sock = client.socket() if client is not None else None
        if client is None or sock is None or self._loop is None or not self._reading:
            return
        self._watch_socket(client, sock)
        # Bytes already read into our buffer or a TLS layer would not wake the reader.
        self._loop.call_soon(self._read_ready, client)

    @property
    def paused(self) -> bool:
        return self._paused

    async def close(self) -> None:
        """Make sure the broker has read our PUBACKs, then disconnect cleanly."""
        self.stop_reading()
        client = self._client
        if client is None or not client.is_connected():
            return
        await self._ack_barrier(client)
        client.disconnect()
        for _ in range(20):
            if client.socket() is None:
                break
            client.loop_write()
            await asyncio.sleep(0.01)

    async def run(self) -> None:
        """Connect, and reconnect after every loss, until `stop_reading`."""
        self._loop = asyncio.get_running_loop()
        attempt = 0
        failures_since_log = 0
        last_error = ""
        while not self._stopping:
            self._client = client = self._new_client()
            self._disconnected.clear()
            try:
                await self._connect(client)
            except (OSError, TimeoutError, ConnectionError, TlsSetupError) as exc:
                attempt += 1
                event, fields = self._connect_failure(client, exc)
                error = f"{event} {fields.get('reason') or fields.get('error')}"
                if attempt == 1 or error != last_error:
                    # A TLS failure is a configuration problem: it does not heal by waiting.
                    write = log.error if event == "mqtt_tls_failed" else log.warning
                    write(
                        event,
                        host=self._settings.host,
                        port=self._settings.port,
                        **fields,
                        attempt=attempt,
                        previous_failures=failures_since_log,
                    )
                    failures_since_log = 0
                else:
                    failures_since_log += 1
                last_error = error
                self._close_client(client)
                await self._sleep_backoff(attempt)
                continue
            except asyncio.CancelledError:  # shutdown mid-attempt: no half-open socket left
                self._close_client(client)
                raise
            if attempt > 1 and failures_since_log:
                log.info("mqtt_connect_recovered", failed_attempts=attempt)
            attempt = 0
            failures_since_log = 0
            last_error = ""
            misc = asyncio.create_task(self._misc_loop(client), name="ingest-mqtt-misc")
            try:
                await self._disconnected.wait()
            finally:
                misc.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await misc
                self._close_client(client)
            if not self._stopping:
                attempt = 1
                await self._sleep_backoff(attempt)

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

    # ------------------------------------------------------------------ connection

    def _connect_failure(
        self, client: mqtt.Client, exc: BaseException
    ) -> tuple[str, dict[str, str]]:
        """The log event and fields for a failed attempt: a TLS failure named as such.
        Repeats are recognised by `reason` (or `error`) alone.

        The TLS error the client noted comes first: after the handshake (the broker
        refusing our certificate) `exc` only says the connection closed before CONNACK.
        """
        if self._settings.tls and self._last_refusal is None:  # else TLS worked: a CONNACK
            noted = client.tls_error if isinstance(client, ChunkedClient) else None
            failure = None
            if noted is not None:
                failure = tls.explain(
                    noted.error, during_handshake=noted.during_handshake, port=self._settings.port
                )
            elif isinstance(exc, ssl.SSLError | TlsSetupError):
                failure = tls.explain(exc, during_handshake=True, port=self._settings.port)
            if failure is not None:
                fields = {"reason": failure.reason, "hint": failure.hint}
                if failure.detail:
                    fields["detail"] = failure.detail
                return "mqtt_tls_failed", fields
        return "mqtt_connect_failed", {"error": f"{type(exc).__name__}: {exc}"}

    def _new_client(self) -> mqtt.Client:
        protocol = (
            MQTTProtocolVersion.MQTTv5
            if self._settings.protocol == "5"
            else MQTTProtocolVersion.MQTTv311
        )
        client = CLIENT_CLASS(
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
        self.subscribed.clear()
        self._last_refusal = None  # this attempt's CONNACK, not an earlier one's
        properties: Properties | None = None
        clean_start: bool | Literal[3] = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if self._settings.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._settings.session_expiry_s
            properties.ReceiveMaximum = self._settings.inflight_window
            clean_start = False
        await self._loop.run_in_executor(
            None, lambda: self._open(client, clean_start=clean_start, properties=properties)
        )
        answered = await wait_any(self.connected, self._disconnected, timeout_s=CONNACK_TIMEOUT_S)
        if not answered:
            raise TimeoutError(f"no CONNACK within {CONNACK_TIMEOUT_S:.0f} s")
        if not self.connected.is_set():
            raise ConnectionError(self._last_refusal or "connection closed before CONNACK")

    def _open(
        self,
        client: mqtt.Client,
        *,
        clean_start: bool | Literal[3],
        properties: Properties | None,
    ) -> None:
        """In an executor thread: the TLS files, the TCP connect, the TLS handshake (with
        paho's connect timeout per blocking step), CONNECT. Never plain text when `tls`."""
        if self._settings.tls:
            client.tls_set_context(self._settings.tls_context())
        client.connect(
            self._settings.host,
            self._settings.port,
            keepalive=self._settings.keepalive_s,
            clean_start=clean_start,
            properties=properties,
        )

    def _close_client(self, client: mqtt.Client) -> None:
        self.subscribed.clear()
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

    # ------------------------------------------------------------------ socket callbacks

    def _call_in_loop(self, callback: Callable[..., None], *args: Any) -> None:
        """Hand a socket event to the event loop, from whichever thread paho raised it in.

        A client can outlive its loop: the garbage collector closes a leftover socket after
        `asyncio.run` returned (paho's `__del__`), and an exception there would be printed
        as an unraisable error. A closed loop watches no sockets, so there is nothing to do.
        """
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # closed between the check and the call
            loop.call_soon_threadsafe(callback, *args)

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._call_in_loop(self._watch_socket, client, sock)

    def _watch_socket(self, client: mqtt.Client, sock: Any) -> None:
        assert self._loop is not None
        if self._reading and not self._paused and client is self._client:
            self._loop.add_reader(sock, self._read_ready, client)

    def _read_ready(self, client: mqtt.Client) -> None:
        """Read up to READ_BATCH_PACKETS packets per readable event.

        paho's `loop_read` handles one packet; going back to the event loop between packets
        of a burst costs more than the packet itself (the ingest benchmark measured +12 % to
        +30 % readings/s with a batch), so keep reading while packets keep coming. A read
        that delivered no message, with nothing left in ChunkedClient's buffer, ends the
        batch: it found the socket drained (paho reports that as success too) or read a
        control packet; either way the event loop calls us again if more bytes are waiting
        in the kernel. Bytes already in our buffer would not wake it: if a batch ends with
        some (its limit, or a pause lifted later), a read is scheduled for them.
        """
        if client is not self._client:  # a read scheduled for a connection since closed
            return
        try:
            for _ in range(READ_BATCH_PACKETS):
                delivered_before = self._messages_read
                rc = client.loop_read()
                if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                    self._disconnected.set()
                    return
                if self._paused or not self._reading:
                    return
                if self._messages_read == delivered_before and not _buffered(client):
                    return
            if _buffered(client) and self._loop is not None:
                self._loop.call_soon(self._read_ready, client)
        except Exception as exc:  # a bug in paho or a callback must not kill the daemon
            allowed, suppressed = self._failure_log.allow(("read", type(exc)))
            if allowed:
                log.exception(
                    "mqtt_read_failed",
                    error=clip(f"{type(exc).__name__}: {exc}"),
                    action="reconnecting",
                    suppressed=suppressed,
                )
            self._disconnected.set()

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._call_in_loop(self._forget_socket, sock)

    def _forget_socket(self, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._call_in_loop(self._watch_writable, client, sock)

    def _watch_writable(self, client: mqtt.Client, sock: Any) -> None:
        assert self._loop is not None
        if sock.fileno() != -1:
            self._loop.add_writer(sock, client.loop_write)

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        if sock.fileno() != -1:
            self._loop.remove_writer(sock)

    # ------------------------------------------------------------------ protocol callbacks

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
            self._session_first_generation = self._generation
            self._session_lost()
        missing = [topic for topic in self._subscriptions if topic not in self._subscribed]
        self._connect_suback_mid = self._subscribe(client, missing)
        self.connected.set()
        self._connected_fields = {
            "host": self._settings.host,
            "port": self._settings.port,
            "client_id": self._settings.client_id,
            "tls": self._settings.tls,
            "session_present": session_present,
            "subscribed": len(missing),
        }
        if self._connect_suback_mid is None:
            self._ready_for_messages()

    def _ready_for_messages(self) -> None:
        """`mqtt_connected` once a publish would reach us: logging it at CONNACK, before
        the SUBACK, told operators (and tests) too early."""
        self._connect_suback_mid = None
        self.subscribed.set()
        log.info("mqtt_connected", **self._connected_fields)

    def _subscribe(self, client: mqtt.Client, topics: list[str]) -> int | None:
        """Subscribe `topics`; the SUBSCRIBE's message id, or None if none was sent."""
        if not topics:
            return None
        if self._settings.protocol == "5":
            # Retained messages only on a brand-new subscription, never on a resumed one.
            options = SubscribeOptions(
                qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
            )
            _, mid = client.subscribe([(topic, options) for topic in topics])
        else:
            _, mid = client.subscribe([(topic, 1) for topic in topics])
        self._subscribed.update(topics)
        return mid

    def set_subscriptions(self, subscriptions: Sequence[str]) -> tuple[list[str], list[str]]:
        """Subscribe what is new and unsubscribe what is gone, keeping the session.

        Returns (added, removed). While disconnected only the list changes: the next
        connect subscribes what is missing. A removed filter is unsubscribed from the
        broker's session too, or the broker would keep queueing its messages for us.
        """
        wanted = list(dict.fromkeys(subscriptions))
        added = [topic for topic in wanted if topic not in self._subscriptions]
        removed = [topic for topic in self._subscriptions if topic not in wanted]
        self._subscriptions = wanted
        client = self._client
        if client is not None and self.is_up():
            if removed:
                client.unsubscribe(removed)
                self._subscribed.difference_update(removed)
            self._subscribe(client, [t for t in wanted if t not in self._subscribed])
        return added, removed

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
        if mid == self._connect_suback_mid:
            self._ready_for_messages()

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
        self.subscribed.clear()
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
                pending=self._held_messages(),
            )

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._messages_read += 1
        if not self._reading:  # left unacknowledged: the broker resends it next session
            return
        try:
            self._handle_message(message, self._generation)
        except Exception as exc:  # one message must not cost the connection
            self._message_failed(message, exc)

    def _message_failed(self, message: mqtt.MQTTMessage, exc: Exception) -> None:
        """A message the handler could not take (a bug: admission refuses bad input itself).

        Not a reason to disconnect: a reconnect would only bring it back, again and again.
        It stays unacknowledged; the broker resends it on the next session.
        """
        allowed, suppressed = self._failure_log.allow(("message", type(exc)))
        if not allowed:
            return
        try:
            topic = message.topic
        except Exception:  # paho decodes the topic on access
            topic = repr(bytes(message._topic))
        log.error(
            "mqtt_message_failed",
            error=clip(f"{type(exc).__name__}: {exc}"),
            topic=topic,
            action="left unacknowledged; reading goes on",
            suppressed=suppressed,
            exc_info=True,
        )


def _buffered(client: mqtt.Client) -> int:
    return unread_bytes(client)  # ours and, over TLS, the SSL object's
