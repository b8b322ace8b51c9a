"""A QoS-1 publisher (tests, demo) that knows exactly which messages the broker accepted.

Only a PUBACK received from the broker (paho's ``on_publish`` for QoS 1) counts as
"accepted". Messages that were never PUBACKed -- e.g. because the broker was killed
mid-stream -- stay in :attr:`AckedPublisher.unacked` and tests should assert only on
:attr:`AckedPublisher.acked`.

paho keeps unacked QoS>0 messages and re-sends them (DUP) after an automatic
reconnect; if the restarted broker then PUBACKs them they become acked (possibly
delivered twice to subscribers -- QoS 1 is at-least-once).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["AckedPublisher", "PublishTimeout"]

# paho's message ids are 16 bit and it refuses to reuse a mid that is still pending,
# so never keep more than this many unacked messages in the client.
_MAX_PENDING = 50_000


class PublishTimeout(TimeoutError):
    """Not every published message was PUBACKed in time."""

    def __init__(self, message: str, *, acked: int, unacked: int) -> None:
        super().__init__(message)
        self.acked = acked
        self.unacked = unacked


class AckedPublisher:
    """paho-mqtt 2.x client (CallbackAPIVersion.VERSION2, MQTTv311) with loop_start().

    Counts PUBACKs so tests know exactly what the broker accepted. Thread-safe.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str | None = None,
        max_inflight: int = 100,
        *,
        keepalive: int = 30,
    ) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id or f"acked-pub-{id(self):x}"
        self.keepalive = keepalive
        self.acked: list[tuple[str, bytes]] = []
        self.connect_count = 0
        self.disconnect_count = 0
        self.failed: list[tuple[str, bytes, str]] = []  # PUBACK with a failure reason (MQTT 5)

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._publish_lock = threading.Lock()  # serialises publish(): mid bookkeeping
        self._pending: dict[int, tuple[str, bytes]] = {}
        self._early_acks: dict[int, ReasonCode | None] = {}
        self._published = 0
        self._connected = False
        self._closed = False
        self._loop_started = False

        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self._client.max_inflight_messages_set(max_inflight)
        self._client.max_queued_messages_set(0)  # 0 = unlimited queue inside paho
        self._client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish

    # ---------------------------------------------------------------- state
    @property
    def client(self) -> mqtt.Client:
        return self._client

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected

    @property
    def published_count(self) -> int:
        with self._lock:
            return self._published

    @property
    def acked_count(self) -> int:
        with self._lock:
            return len(self.acked)

    @property
    def unacked(self) -> list[tuple[str, bytes]]:
        """Messages published but (so far) never PUBACKed, in publish order."""
        with self._lock:
            return list(self._pending.values())  # dicts keep insertion (= publish) order

    # ------------------------------------------------------------ callbacks
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._changed:
            if not reason_code.is_failure:
                self._connected = True
                self.connect_count += 1
            self._changed.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._changed:
            self._connected = False
            self.disconnect_count += 1
            self._changed.notify_all()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        # Called from paho's network thread while it holds its own out-message mutex:
        # never call into the client here, and never hold self._lock around
        # client.publish() in the other thread (deadlock).
        with self._changed:
            item = self._pending.pop(mid, None)
            if item is None:
                # PUBACK raced ahead of publish() registering the mid.
                self._early_acks[mid] = reason_code
            else:
                self._record_ack(item, reason_code)
            self._changed.notify_all()

    def _record_ack(self, item: tuple[str, bytes], reason_code: ReasonCode | None) -> None:
        if reason_code is not None and reason_code.is_failure:
            self.failed.append((item[0], item[1], str(reason_code)))
        else:
            self.acked.append(item)

    # -------------------------------------------------------------- actions
    def connect(self, timeout: float = 10) -> None:
        """Connect and start the network thread; wait for CONNACK."""
        if self._closed:
            raise RuntimeError("publisher is closed")
        if not self._loop_started:
            self._client.connect(self.host, self.port, keepalive=self.keepalive)
            self._client.loop_start()
            self._loop_started = True
        with self._changed:
            if not self._changed.wait_for(lambda: self._connected, timeout=timeout):
                raise TimeoutError(
                    f"no CONNACK from {self.host}:{self.port} within {timeout}s "
                    f"(client id {self.client_id})"
                )

    def wait_connected(self, timeout: float = 10) -> None:
        """Wait until the (auto-re)connection is up, e.g. after a broker restart."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._connected, timeout=timeout):
                raise TimeoutError(f"not reconnected to {self.host}:{self.port} within {timeout}s")

    def publish(
        self, topic: str, payload: str | bytes, qos: int = 1, *, retain: bool = False
    ) -> None:
        """Queue one message (non-blocking; only blocks if >50k messages are unacked).

        Works while disconnected too: paho keeps QoS>0 messages and sends them after the
        automatic reconnect.
        """
        if qos not in (1, 2):
            raise ValueError("AckedPublisher only tracks QoS 1/2 (QoS 0 has no PUBACK)")
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        with self._publish_lock:
            with self._changed:
                if self._closed:
                    raise RuntimeError("publisher is closed")
                # Don't let paho run out of 16-bit message ids.
                while len(self._pending) >= _MAX_PENDING:
                    self._changed.wait(timeout=1.0)
            info = self._client.publish(topic, data, qos=qos, retain=retain)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                raise RuntimeError(
                    f"paho refused publish to {topic!r}: {mqtt.error_string(info.rc)}"
                )
            with self._changed:
                self._published += 1
                if info.mid in self._early_acks:
                    self._record_ack((topic, data), self._early_acks.pop(info.mid))
                else:
                    self._pending[info.mid] = (topic, data)
                self._changed.notify_all()

    def publish_many(
        self, items: Iterable[tuple[str, str | bytes]], qos: int = 1, timeout: float = 60
    ) -> int:
        """Publish all ``items``, wait until every one of them is PUBACKed.

        Returns the number of these items that were acked; raises :class:`PublishTimeout`
        (a TimeoutError carrying ``acked``/``unacked`` counts) if they are not all acked
        within ``timeout`` seconds (measured from the last publish).
        """
        with self._lock:
            before = len(self.acked) + len(self.failed)
        count = 0
        for topic, payload in items:
            self.publish(topic, payload, qos=qos)
            count += 1
        deadline = time.monotonic() + timeout
        with self._changed:
            self._changed.wait_for(
                lambda: not self._pending and not self._early_acks,
                timeout=max(0.0, deadline - time.monotonic()),
            )
            done = len(self.acked) + len(self.failed) - before
        if done < count:
            raise PublishTimeout(
                f"only {done} of {count} messages PUBACKed within {timeout}s "
                f"(connected={self.connected})",
                acked=done,
                unacked=count - done,
            )
        return done

    def wait_all_acked(self, timeout: float = 60) -> None:
        """Wait until nothing published is still waiting for its PUBACK."""
        with self._changed:
            ok = self._changed.wait_for(
                lambda: not self._pending and not self._early_acks, timeout=timeout
            )
            if not ok:
                raise PublishTimeout(
                    f"{len(self._pending)} of {self._published} messages not PUBACKed "
                    f"within {timeout}s (connected={self._connected})",
                    acked=len(self.acked),
                    unacked=len(self._pending),
                )

    def close(self) -> None:
        """Disconnect and stop the network thread. Unacked messages stay unacked."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
        if self._loop_started:
            self._client.disconnect()
            self._client.loop_stop()
            self._loop_started = False
        # paho only closes its socket pair in __del__; close it now (no ResourceWarning).
        self._client._reset_sockets()

    def __enter__(self) -> AckedPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
