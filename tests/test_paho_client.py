"""ChunkedClient: paho with chunked reads and batched writes loses and reorders nothing.

The reads are tried where they matter, a broker replaying a queued backlog in one stream
(small packets many to a chunk, big ones spread over several chunks); the batched write
against a socket whose buffer fills, so that a send is cut short mid-packet.
"""

from __future__ import annotations

import asyncio
import socket
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import MqttSettings
from gateway.ingest import mqtt_loop
from gateway.ingest.mqtt_loop import MqttConnection
from gateway.ingest.paho_client import RECV_CHUNK_BYTES, ChunkedClient, supported
from gateway.testing.broker import MosquittoBroker
from gateway.testing.publisher import AckedPublisher
from harness import publish, wait_until

TOPIC = "sensors/chunked"


def test_the_installed_paho_gets_the_chunked_client() -> None:
    # If a paho upgrade stops matching, the daemon silently falls back to the slower
    # plain client: this test is what notices.
    assert supported()
    assert mqtt_loop.CLIENT_CLASS is ChunkedClient


def replay_payloads() -> list[bytes]:
    """3,000 small payloads with two larger than a read chunk among them."""
    payloads = [f'{{"value": {i}}}'.encode() for i in range(3_000)]
    payloads[1_000] = b"A" * (RECV_CHUNK_BYTES * 3 + 17)
    payloads[2_000] = b"B" * (RECV_CHUNK_BYTES + 1)
    return payloads


async def test_a_replayed_backlog_arrives_whole_and_in_order(
    broker: MosquittoBroker, publisher: AckedPublisher
) -> None:
    settings = MqttSettings(host=broker.host, port=broker.port, client_id="chunked-sub")
    received: list[tuple[int, bytes]] = []
    connection: MqttConnection | None = None

    def on_message(message: mqtt.MQTTMessage, generation: int) -> None:
        received.append((message.mid, bytes(message.payload)))
        assert connection is not None
        connection.acknowledge(message.mid, message.qos, generation)

    async def session() -> tuple[MqttConnection, asyncio.Task[None]]:
        nonlocal connection
        connection = MqttConnection(
            settings, [TOPIC], on_message=on_message, on_session_lost=lambda: None
        )
        task = asyncio.create_task(connection.run())
        await asyncio.wait_for(connection.connected.wait(), 10)
        return connection, task

    async def end(session: tuple[MqttConnection, asyncio.Task[None]]) -> None:
        await session[0].close()
        await asyncio.wait_for(session[1], 10)

    first = await session()  # the persistent session and its subscription
    await asyncio.sleep(0.2)  # its SUBACK, before the backlog is queued
    await end(first)
    payloads = replay_payloads()
    assert await publish(publisher, [(TOPIC, p) for p in payloads]) == len(payloads)

    replay = await session()  # the broker replays the whole queue in one stream
    await wait_until(lambda: len(received) >= len(payloads), 30, "the replay received")
    await end(replay)
    assert [payload for _, payload in received] == payloads
    assert leftover(broker, "chunked-sub") == 0


def leftover(broker: MosquittoBroker, client_id: str) -> int:
    """Messages the broker still holds for the session (each one was never PUBACKed)."""
    got: list[int] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.on_message = lambda c, u, m: got.append(m.mid)
    client.connect(broker.host, broker.port)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        client.loop(0.05)
    client.disconnect()
    return len(got)


def test_acks_cut_short_by_a_full_socket_leave_in_order() -> None:
    """A batched send the kernel takes only part of: the rest goes later, nothing twice."""
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)
    peer.setblocking(False)
    client = ChunkedClient(CallbackAPIVersion.VERSION2, client_id="w", manual_ack=True)
    client._sock = ours  # a connected client's socket, without the handshake
    # As in the daemon: writes wait for the event loop's writable callback.
    client.on_socket_register_write = lambda c, u, s: None
    mids = list(range(1, 40_001))
    # A 2-byte PINGREQ first, so that cuts fall inside the 4-byte PUBACKs.
    expected = b"\xc0\x00" + b"".join(b"\x40\x02" + mid.to_bytes(2, "big") for mid in mids)
    received = bytearray()
    short_writes = 0
    try:
        client._send_pingreq()
        for mid in mids:
            client.ack(mid, 1)
        while client.want_write():
            client.loop_write()
            if client.want_write():  # the kernel took only part of what was queued
                short_writes += 1
            with_data = True
            while with_data:
                try:
                    received += peer.recv(1 << 16)
                except BlockingIOError:
                    with_data = False
        assert bytes(received) == expected
        assert short_writes > 0  # the buffer did fill: the partial path ran
    finally:
        client._sock = None
        ours.close()
        peer.close()


def test_per_topic_callbacks_still_get_their_messages(broker: MosquittoBroker) -> None:
    """The matcher is skipped only while no per-topic callback exists."""
    filtered: list[str] = []
    general: list[str] = []
    client = ChunkedClient(CallbackAPIVersion.VERSION2, client_id="filtered")
    client.on_message = lambda c, u, m: general.append(m.topic)
    client.message_callback_add("a/#", lambda c, u, m: filtered.append(m.topic))
    client.connect(broker.host, broker.port)
    client.subscribe([("a/#", 1), ("b/#", 1)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (filtered and general):
        client.publish("a/x", b"1", qos=1)
        client.publish("b/y", b"2", qos=1)
        client.loop(0.05)
    client.disconnect()
    assert set(filtered) == {"a/x"} and set(general) == {"b/y"}


async def test_subscribed_means_a_publish_reaches_us_on_a_brand_new_session(
    broker: MosquittoBroker, publisher: AckedPublisher
) -> None:
    """`connected` is set at CONNACK, before the broker has our subscription: a reading
    published then is dropped by the broker. `subscribed` (and the `mqtt_connected` line)
    wait for the SUBACK, so a publish right after it always arrives. Ten fresh sessions."""
    for attempt in range(10):
        await _first_publish_arrives(broker, publisher, f"fresh-session-{attempt}")


async def _first_publish_arrives(
    broker: MosquittoBroker, publisher: AckedPublisher, client_id: str
) -> None:
    settings = MqttSettings(host=broker.host, port=broker.port, client_id=client_id)
    received: list[bytes] = []
    connection = MqttConnection(
        settings,
        [TOPIC],
        on_message=lambda message, _generation: received.append(bytes(message.payload)),
        on_session_lost=lambda: None,
    )
    task = asyncio.create_task(connection.run())
    await asyncio.wait_for(connection.subscribed.wait(), 10)
    assert connection.connected.is_set()
    assert await publish(publisher, [(TOPIC, client_id.encode())]) == 1
    await wait_until(lambda: received == [client_id.encode()], 5, "the first publish")
    await connection.close()
    await asyncio.wait_for(task, 10)


def test_a_client_outliving_its_event_loop_closes_quietly() -> None:
    """paho's `__del__` closes a leftover socket whenever the collector runs, which can be
    after `asyncio.run` returned: the close callback must not raise on the closed loop
    (a CI run printed that as an unraisable `RuntimeError: Event loop is closed`)."""
    connection = MqttConnection(
        MqttSettings(host="127.0.0.1", port=1, client_id="late"),
        [TOPIC],
        on_message=lambda message, generation: None,
        on_session_lost=lambda: None,
    )
    client = connection._new_client()
    ours, peer = socket.socketpair()

    async def adopt_socket() -> None:
        connection._loop = asyncio.get_running_loop()

    asyncio.run(adopt_socket())
    assert connection._loop is not None and connection._loop.is_closed()
    client._sock = ours
    try:
        client._reset_sockets()  # what __del__ does: raised RuntimeError before
        connection._on_socket_register_write(client, None, peer)
        connection._on_socket_unregister_write(client, None, peer)
        assert client.socket() is None
    finally:
        peer.close()
