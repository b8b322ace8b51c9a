"""The private-mosquitto and acked-publisher test helpers really do what they claim."""

from __future__ import annotations

import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.testing.broker import BrokerFactory, MosquittoBroker
from gateway.testing.publisher import AckedPublisher, PublishTimeout


class Subscriber:
    """Minimal paho subscriber that records every received message."""

    def __init__(
        self,
        broker: MosquittoBroker,
        topic: str,
        *,
        client_id: str = "",
        clean_session: bool = True,
        qos: int = 1,
    ) -> None:
        self.topic = topic
        self.qos = qos
        self.messages: list[tuple[str, bytes]] = []
        self.session_present: bool | None = None
        self._cond = threading.Condition()
        self._subscribed = False
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port, keepalive=30)
        self._client.loop_start()
        with self._cond:
            assert self._cond.wait_for(lambda: self._subscribed, timeout=10), "no SUBACK"

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.session_present = flags.session_present
        client.subscribe(self.topic, qos=self.qos)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._subscribed = True
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 30) -> list[tuple[str, bytes]]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.messages) >= count, timeout=timeout)
            return list(self.messages)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._client._reset_sockets()


def test_500_qos1_messages_acked_and_delivered(
    broker: MosquittoBroker, publisher: AckedPublisher
) -> None:
    sub = Subscriber(broker, "sensors/#")
    try:
        items = [(f"sensors/dev{i % 7}/temp", f"{i}") for i in range(500)]
        assert publisher.publish_many(items, timeout=30) == 500
        assert len(publisher.acked) == 500
        assert sorted(publisher.acked) == sorted((t, p.encode()) for t, p in items)
        assert publisher.unacked == []
        got = sub.wait_for(500)
        assert sorted(got) == sorted(publisher.acked)
    finally:
        sub.close()


def test_restart_keeps_port_and_persistent_session(
    broker: MosquittoBroker, publisher: AckedPublisher
) -> None:
    port = broker.port
    # Persistent session: clean_session=False, fixed id, QoS 1 subscription, then go away.
    sub = Subscriber(broker, "queued/#", client_id="persistent-sub", clean_session=False)
    sub.close()

    items = [(f"queued/{i}", f"msg-{i}") for i in range(100)]
    assert publisher.publish_many(items, timeout=30) == 100

    broker.restart()  # graceful: the queued messages are written to mosquitto.db
    assert broker.port == port
    assert broker.db_path.exists()

    sub = Subscriber(broker, "queued/#", client_id="persistent-sub", clean_session=False)
    try:
        assert sub.session_present is True
        got = sub.wait_for(100)
        assert sorted(set(got)) == sorted((t, p.encode()) for t, p in items)
    finally:
        sub.close()

    # The publisher reconnected by itself and keeps working.
    publisher.wait_connected(timeout=15)
    assert publisher.publish_many([("after/restart", "x")], timeout=15) == 1


def test_kill_then_start(broker: MosquittoBroker, publisher: AckedPublisher) -> None:
    port = broker.port
    pid = broker.pid
    broker.kill()
    assert not broker.is_running()
    broker.start()
    assert broker.port == port
    assert broker.pid != pid
    publisher.wait_connected(timeout=15)
    sub = Subscriber(broker, "k/#")
    try:
        assert publisher.publish_many([("k/1", "a"), ("k/2", "b")], timeout=15) == 2
        assert sorted(sub.wait_for(2)) == [("k/1", b"a"), ("k/2", b"b")]
    finally:
        sub.close()


def test_unacked_messages_are_reported_while_broker_is_down(
    broker: MosquittoBroker, publisher: AckedPublisher
) -> None:
    assert publisher.publish_many([("d/0", "before")], timeout=15) == 1
    broker.kill()
    deadline = time.monotonic() + 10
    while publisher.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(PublishTimeout) as exc_info:
        publisher.publish_many([(f"d/{i}", f"down-{i}") for i in range(1, 11)], timeout=1)
    assert exc_info.value.acked == 0
    assert exc_info.value.unacked == 10
    assert publisher.acked == [("d/0", b"before")]
    assert len(publisher.unacked) == 10

    # paho keeps them and re-sends after the reconnect; then they are acked.
    broker.start()
    publisher.wait_all_acked(timeout=20)
    assert len(publisher.acked) == 11
    assert publisher.unacked == []


def test_kill_mid_stream_only_acked_are_counted(
    broker: MosquittoBroker, publisher: AckedPublisher
) -> None:
    n = 5000
    killed = threading.Event()

    def killer() -> None:
        while publisher.acked_count < 500:
            time.sleep(0.001)
        broker.kill()
        killed.set()

    t = threading.Thread(target=killer)
    t.start()
    for i in range(n):
        publisher.publish("m/x", f"{i}")
    t.join(timeout=30)
    assert killed.is_set()
    deadline = time.monotonic() + 10
    while publisher.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not publisher.connected
    acked_while_up = publisher.acked_count
    assert 500 <= acked_while_up <= n
    assert acked_while_up + len(publisher.unacked) == n

    broker.start()
    publisher.wait_all_acked(timeout=60)
    assert publisher.acked_count == n
    assert {p for _, p in publisher.acked} == {f"{i}".encode() for i in range(n)}


def test_broker_factory_custom_settings(broker_factory: BrokerFactory) -> None:
    b = broker_factory("small", max_inflight_messages=1, persistence=False)
    assert b.is_running()
    text = b.config_path.read_text()
    assert "max_inflight_messages 1\n" in text
    assert "persistence false\n" in text
    assert "mosquitto version 2" in b.log_tail()
