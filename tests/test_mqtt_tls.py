"""MQTT over TLS against a real Mosquitto with a TLS listener and certificates made here.

The daemon's promises: readings arrive over TLS (with a CA file, with a client
certificate); every TLS failure is one `mqtt_tls_failed` line naming the reason, retried
with the usual backoff in the same process, never a fall-back to plain text; and no
decrypted bytes are left unread inside the SSL object while the event loop waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from gateway.app import Gateway
from gateway.config import MqttSettings, Settings
from gateway.ingest import mqtt_loop, tls
from gateway.ingest.mqtt_loop import MqttConnection
from gateway.ingest.paho_client import ChunkedClient
from gateway.testing.broker import BrokerFactory, MosquittoBroker, TlsListener
from gateway.testing.certs import CertPair, TlsPki
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from gateway.testing.tls_proxy import TlsTerminator
from harness import (
    InProcessGateway,
    accepted_set,
    events,
    publish,
    settings_dict,
    ts_payload,
    wait_until,
)

TOPIC = "sensors/boiler/temperature"  # harness.ROUTES: device 101, datastream 5
FAST_RECONNECT = {"reconnect_min_s": 0.1, "reconnect_max_s": 0.2}


def tls_settings(
    broker: MosquittoBroker, sandbox: SandboxCloud, tmp_path: Path, **mqtt_keys: Any
) -> Settings:
    """The daemon's settings for `broker`'s TLS listener (`port=` to point elsewhere)."""
    mqtt_section = {"tls": True, "port": broker.tls_port, **FAST_RECONNECT, **mqtt_keys}
    mqtt_section = {key: str(v) if isinstance(v, Path) else v for key, v in mqtt_section.items()}
    return Settings(
        **settings_dict(broker.port, sandbox.base_url, tmp_path / "buffer.db", mqtt=mqtt_section)
    )


@contextlib.contextmanager
def plain_publisher(broker: MosquittoBroker) -> Iterator[AckedPublisher]:
    publisher = AckedPublisher(broker.host, broker.port, client_id="tls-test-publisher")
    publisher.connect()
    try:
        yield publisher
    finally:
        publisher.close()


def readings(count: int, first_ts: int) -> tuple[list[tuple[str, str]], set[Any]]:
    messages = [(TOPIC, ts_payload(20.0 + i, first_ts + i)) for i in range(count)]
    return messages, {(101, 5, first_ts + i, 20.0 + i) for i in range(count)}


@contextlib.asynccontextmanager
async def gateway_running(settings: Settings) -> AsyncIterator[tuple[Gateway, asyncio.Task[None]]]:
    """The daemon in-process, without waiting for the broker (which may never let it in)."""
    gateway = Gateway(settings)
    task = asyncio.create_task(gateway.run(), name="gateway-under-test")
    try:
        yield gateway, task
    finally:
        gateway.request_stop()
        async with asyncio.timeout(30):
            await task


def tls_connections(broker: MosquittoBroker) -> int:
    """TCP connections Mosquitto accepted on its TLS listener (its log says each)."""
    text = broker.log_path.read_text(errors="replace")
    return len(re.findall(rf"New connection from \S+ on port {broker.tls_port}\.", text))


def gateway_logged_in(broker: MosquittoBroker) -> bool:
    """Did an MQTT CONNECT of the gateway's client id reach the broker, on any listener?"""
    text = broker.log_path.read_text(errors="replace")
    return re.search(r"New client connected from \S+ as gateway-under-test", text) is not None


@pytest.fixture
def mtls_broker(broker_factory: BrokerFactory, tls_pki: TlsPki) -> MosquittoBroker:
    """A TLS listener that requires a client certificate from `tls_pki.ca`."""
    listener = TlsListener(
        tls_pki.server.cert, tls_pki.server.key, cafile=tls_pki.ca.cert, require_certificate=True
    )
    return broker_factory("mtls", tls=listener)


async def wait_for_tls_failure(log_output: io.StringIO, task: asyncio.Task[None]) -> None:
    """Until the first `mqtt_tls_failed` line; the daemon must still be running then."""
    await wait_until(
        lambda: bool(events(log_output, "mqtt_tls_failed")) or task.done(),
        message="mqtt_tls_failed",
    )
    assert not task.done(), task


async def wait_subscribed(broker: MosquittoBroker) -> None:
    """Until the broker has the gateway's subscription: what is published before is not
    the gateway's to take (CONNACK comes before the SUBSCRIBE is processed)."""
    pattern = re.compile(rf"gateway-under-test 1 {TOPIC}$", re.M)
    await wait_until(
        lambda: pattern.search(broker.log_path.read_text(errors="replace")) is not None,
        message="the gateway's subscription",
    )


async def one_tls_failure_then_retries(
    broker: MosquittoBroker, task: asyncio.Task[None], log_output: io.StringIO, host: str
) -> dict[str, Any]:
    """Wait for the `mqtt_tls_failed` line, then for two more attempts: the same process
    keeps trying (no crash), and the repeats are not logged again."""
    await wait_for_tls_failure(log_output, task)
    seen = tls_connections(broker)
    await wait_until(lambda: tls_connections(broker) >= seen + 2, message="two more attempts")
    assert not task.done()
    [failure] = events(log_output, "mqtt_tls_failed")
    assert failure["level"] == "error"
    assert failure["host"] == host
    assert failure["attempt"] == 1
    assert not events(log_output, "mqtt_connected")
    return failure


# --------------------------------------------------------------------------- working TLS
async def test_readings_arrive_over_tls_with_a_ca_file(
    tls_broker: MosquittoBroker,
    sandbox: SandboxCloud,
    tmp_path: Path,
    tls_pki: TlsPki,
    log_output: io.StringIO,
) -> None:
    settings = tls_settings(tls_broker, sandbox, tmp_path, ca_file=tls_pki.ca.cert)
    messages, expected = readings(200, sandbox.now_ms() - 60_000)
    with plain_publisher(tls_broker) as publisher:
        async with InProcessGateway(settings):
            assert await publish(publisher, messages) == 200
            await wait_until(lambda: len(sandbox.accepted) >= 200, message="200 points")
    assert accepted_set(sandbox) == expected
    [connected] = events(log_output, "mqtt_connected")
    assert connected["tls"] is True
    assert connected["port"] == tls_broker.tls_port
    assert tls_connections(tls_broker) >= 1


async def test_a_client_certificate_lets_the_gateway_in_where_one_is_required(
    mtls_broker: MosquittoBroker,
    sandbox: SandboxCloud,
    tmp_path: Path,
    tls_pki: TlsPki,
    log_output: io.StringIO,
) -> None:
    broker = mtls_broker
    settings = tls_settings(
        broker,
        sandbox,
        tmp_path,
        ca_file=tls_pki.ca.cert,
        cert_file=tls_pki.client.cert,
        key_file=tls_pki.client.key,
    )
    messages, expected = readings(50, sandbox.now_ms() - 60_000)
    with plain_publisher(broker) as publisher:
        async with InProcessGateway(settings):
            assert await publish(publisher, messages) == 50
            await wait_until(lambda: len(sandbox.accepted) >= 50, message="50 points")
    assert accepted_set(sandbox) == expected
    assert not events(log_output, "mqtt_tls_failed")


# --------------------------------------------------------------------------- failures
@pytest.mark.parametrize("client_cert", ["none", "from another CA"])
async def test_a_broker_that_requires_a_client_certificate_refuses_loudly(
    mtls_broker: MosquittoBroker,
    sandbox: SandboxCloud,
    tmp_path: Path,
    tls_pki: TlsPki,
    log_output: io.StringIO,
    client_cert: str,
) -> None:
    broker = mtls_broker
    pair = {"from another CA": {"cert_file": tls_pki.other_client.cert,
                                "key_file": tls_pki.other_client.key}}  # fmt: skip
    settings = tls_settings(
        broker, sandbox, tmp_path, ca_file=tls_pki.ca.cert, **pair.get(client_cert, {})
    )
    async with gateway_running(settings) as (gateway, task):
        failure = await one_tls_failure_then_retries(broker, task, log_output, "127.0.0.1")
        assert gateway.ingest is not None and gateway.ingest.stats.received == 0
    # TLS 1.3: the broker checks our certificate after our side of the handshake, sends an
    # alert and closes; the alert is read unless the close reset the connection first.
    alert = {"none": "certificate required", "from another CA": "unknown ca"}[client_cert]
    assert failure["reason"] == "the broker ended the TLS connection before CONNACK"
    assert failure["detail"] in (f"TLS alert '{alert}'", "closed without a TLS alert")
    assert "mqtt.cert_file" in failure["hint"]
    assert not gateway_logged_in(broker)
    assert sandbox.accepted == []


async def test_a_wrong_ca_is_named_retried_and_fixed_without_a_restart(
    tls_broker: MosquittoBroker,
    sandbox: SandboxCloud,
    tmp_path: Path,
    tls_pki: TlsPki,
    log_output: io.StringIO,
) -> None:
    ca_file = tmp_path / "ca.pem"
    shutil.copyfile(tls_pki.other_ca.cert, ca_file)  # a CA that did not sign the broker's
    settings = tls_settings(tls_broker, sandbox, tmp_path, ca_file=ca_file)
    early, _ = readings(20, sandbox.now_ms() - 120_000)
    messages, expected = readings(30, sandbox.now_ms() - 60_000)
    with plain_publisher(tls_broker) as publisher:
        async with gateway_running(settings) as (gateway, task):
            failure = await one_tls_failure_then_retries(tls_broker, task, log_output, "127.0.0.1")
            assert failure["port"] == tls_broker.tls_port
            assert failure["reason"].startswith("certificate verify failed: ")
            assert "certificate" in failure["reason"].removeprefix("certificate verify failed")
            assert "not signed by a CA in mqtt.ca_file" in failure["hint"]
            await publish(publisher, early)  # nobody is subscribed: nothing to take
            assert gateway.ingest is not None and gateway.ingest.stats.received == 0
            assert not gateway_logged_in(tls_broker)

            # The operator installs the right CA: the next attempt reads it (same process).
            shutil.copyfile(tls_pki.ca.cert, ca_file)
            assert gateway.ingest is not None
            ingest = gateway.ingest
            await wait_until(lambda: ingest.connected.is_set(), message="connected over TLS")
            await wait_subscribed(tls_broker)
            assert await publish(publisher, messages) == 30
            await wait_until(lambda: len(sandbox.accepted) >= 30, message="30 points")
    assert accepted_set(sandbox) == expected
    assert len(events(log_output, "mqtt_tls_failed")) == 1  # summarised, not repeated
    [recovered] = events(log_output, "mqtt_connect_recovered")
    assert recovered["failed_attempts"] >= 3


async def test_a_key_file_broken_after_start_is_named_and_retried(
    mtls_broker: MosquittoBroker,
    sandbox: SandboxCloud,
    tmp_path: Path,
    tls_pki: TlsPki,
    log_output: io.StringIO,
) -> None:
    """The files are read again for every attempt: one that broke since the config was
    checked is a named failure and a retry, and its repair is picked up, not a crash."""
    broker = mtls_broker
    key_file = tmp_path / "client.key"
    shutil.copyfile(tls_pki.client.key, key_file)
    settings = tls_settings(
        broker,
        sandbox,
        tmp_path,
        ca_file=tls_pki.ca.cert,
        cert_file=tls_pki.client.cert,
        key_file=key_file,
    )
    shutil.copyfile(tls_pki.server.key, key_file)  # replaced by another key after the check
    async with gateway_running(settings) as (gateway, task):
        await wait_for_tls_failure(log_output, task)
        shutil.copyfile(tls_pki.client.key, key_file)
        assert gateway.ingest is not None
        ingest = gateway.ingest
        await wait_until(lambda: ingest.connected.is_set(), message="connected after the repair")
    [failure] = events(log_output, "mqtt_tls_failed")
    assert failure["reason"] == f"key_file: not the key of cert_file {tls_pki.client.cert}"
    assert "check-config" in failure["hint"]


@pytest.mark.parametrize(
    ("certificate", "host", "reason", "hint"),
    [
        (
            "wrong_name",
            "127.0.0.1",
            "certificate verify failed: IP address mismatch, certificate is not valid for "
            "'127.0.0.1'.",
            "does not name mqtt.host",
        ),
        (
            "wrong_name",
            "localhost",
            "certificate verify failed: Hostname mismatch, certificate is not valid for "
            "'localhost'.",
            "does not name mqtt.host",
        ),
        ("expired", "127.0.0.1", "certificate verify failed: certificate has expired", "expired"),
    ],
)
async def test_a_bad_broker_certificate_is_named(
    broker_factory: BrokerFactory,
    sandbox: SandboxCloud,
    tmp_path: Path,
    tls_pki: TlsPki,
    log_output: io.StringIO,
    certificate: str,
    host: str,
    reason: str,
    hint: str,
) -> None:
    served: CertPair = getattr(tls_pki, certificate)
    broker = broker_factory("bad-cert", tls=TlsListener(served.cert, served.key))
    settings = tls_settings(broker, sandbox, tmp_path, host=host, ca_file=tls_pki.ca.cert)
    async with gateway_running(settings) as (gateway, task):
        failure = await one_tls_failure_then_retries(broker, task, log_output, host)
        assert gateway.ingest is not None and gateway.ingest.stats.received == 0
    assert failure["reason"] == reason
    assert hint in failure["hint"]
    assert not gateway_logged_in(broker)


async def test_tls_to_a_plain_listener_never_falls_back_to_plain_text(
    tls_broker: MosquittoBroker,
    sandbox: SandboxCloud,
    tmp_path: Path,
    tls_pki: TlsPki,
    log_output: io.StringIO,
) -> None:
    settings = tls_settings(
        tls_broker, sandbox, tmp_path, port=tls_broker.port, ca_file=tls_pki.ca.cert
    )
    async with gateway_running(settings) as (_, task):
        await wait_for_tls_failure(log_output, task)
        await asyncio.sleep(1.0)  # several attempts
        assert not task.done()
    [failure] = events(log_output, "mqtt_tls_failed")
    assert failure["reason"] == "connection reset during the TLS handshake"
    assert f"is port {tls_broker.port} the broker's TLS listener?" in failure["hint"]
    assert not gateway_logged_in(tls_broker)  # no CONNECT ever went out in plain text
    assert not events(log_output, "mqtt_connected")


async def test_a_refused_login_over_tls_is_not_called_a_tls_failure(
    broker_factory: BrokerFactory,
    sandbox: SandboxCloud,
    tmp_path: Path,
    tls_pki: TlsPki,
    log_output: io.StringIO,
) -> None:
    """TLS worked and the broker answered CONNACK "not authorized", then closed: that is
    a login problem (mqtt_connect_failed), whatever the TLS layer read after it."""
    passwords = tmp_path / "passwords"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "gateway", "right"],
        check=True, capture_output=True,
    )  # fmt: skip
    broker = broker_factory(
        "login",
        tls=TlsListener(tls_pki.server.cert, tls_pki.server.key),
        extra_config=["allow_anonymous false", f"password_file {passwords}"],
    )
    settings = tls_settings(
        broker, sandbox, tmp_path, ca_file=tls_pki.ca.cert, username="gateway", password="wrong"
    )
    async with gateway_running(settings) as (_, task):
        await wait_until(
            lambda: bool(events(log_output, "mqtt_connect_failed")) or task.done(),
            message="mqtt_connect_failed",
        )
        seen = tls_connections(broker)
        await wait_until(lambda: tls_connections(broker) >= seen + 2, message="more attempts")
    assert not events(log_output, "mqtt_tls_failed")
    failures = events(log_output, "mqtt_connect_failed")
    assert {f["error"] for f in failures} == {
        "ConnectionError: broker refused connection: Not authorized"
    }


def test_the_alert_and_the_close_after_the_handshake_are_one_reason() -> None:
    """Which of the broker's alert and its close the client reads first is a race (seen
    about once in 50 attempts): both must be the same `reason`, or the retry loop would log
    a line at every flip."""
    alert = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert")
    alert.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    closed = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    first = tls.explain(alert, during_handshake=False, port=8883)
    second = tls.explain(closed, during_handshake=False, port=8883)
    assert first is not None and second is not None
    assert first.reason == second.reason
    assert (first.detail, second.detail) == (
        "TLS alert 'certificate required'",
        "closed without a TLS alert",
    )
    assert "requires a client certificate" in first.hint


# --------------------------------------------------------------------------- SSL buffer
@pytest.mark.parametrize("client_class", [ChunkedClient, mqtt.Client], ids=["chunked", "paho"])
async def test_packets_sharing_a_tls_record_are_all_read(
    tls_broker: MosquittoBroker,
    tls_pki: TlsPki,
    monkeypatch: pytest.MonkeyPatch,
    client_class: type[mqtt.Client],
) -> None:
    """Behind a TLS terminator a resumed session's CONNACK and the messages queued for it
    arrive in one TLS record. The plain paho client reads the CONNACK a few bytes at a time
    and leaves the messages decrypted inside the SSL object, where no readable-socket event
    announces them: the reader must drain them, or they wait for the broker's next bytes
    (a keepalive away). ChunkedClient's 64 KiB reads take whole records; both are run."""
    monkeypatch.setattr(mqtt_loop, "CLIENT_CLASS", client_class)
    terminator = TlsTerminator(tls_broker.port, tls_pki.server.cert, tls_pki.server.key)
    await terminator.start()
    settings = MqttSettings(
        host=terminator.host,
        port=terminator.port,
        client_id="tls-reader",
        tls=True,
        ca_file=tls_pki.ca.cert,
        **FAST_RECONNECT,
    )
    received: list[bytes] = []

    def on_message(message: mqtt.MQTTMessage, generation: int) -> None:
        received.append(bytes(message.payload))
        connection.acknowledge(message.mid, message.qos, generation)

    connection = MqttConnection(
        settings, ["bulk/#"], on_message=on_message, on_session_lost=lambda: None
    )
    task = asyncio.create_task(connection.run())
    subscribed = re.compile(r"tls-reader 1 bulk/#$", re.M)
    payloads = [f"reading {i}".encode() for i in range(15)]
    try:
        await wait_until(
            lambda: (
                connection.is_up()
                and subscribed.search(tls_broker.log_path.read_text(errors="replace")) is not None
            ),
            message="subscribed over TLS",
        )
        # Away (the terminator is down): the broker queues for the session it keeps.
        await terminator.stop()
        await wait_until(lambda: not connection.is_up(), message="the connection lost")
        with plain_publisher(tls_broker) as publisher:
            await publish(publisher, [("bulk/x", p.decode()) for p in payloads])
        await terminator.start()
        await wait_until(lambda: len(received) >= len(payloads), timeout_s=5, message="backlog")
    finally:
        await connection.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await terminator.stop()
    assert received == payloads
