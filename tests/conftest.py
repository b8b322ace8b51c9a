"""Shared pytest fixtures: private brokers, publishers, the sandbox cloud, the gateway
(settings for it in-process, or the daemon as a subprocess)."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import log as gateway_log
from gateway.config import Settings
from gateway.testing.broker import BrokerFactory, MosquittoBroker, TlsListener
from gateway.testing.certs import TlsPki, make_test_pki
from gateway.testing.process import GatewayProcess, write_config
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import DEVICES, settings_dict


# --------------------------------------------------------------------------- MQTT broker
@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    """Create (and start) extra private brokers: ``broker_factory(name="b2", **kwargs)``.

    kwargs go to :class:`MosquittoBroker` (port, max_inflight_messages, persistence, ...).
    Every broker created is stopped at teardown.
    """
    brokers: list[MosquittoBroker] = []

    def make(name: str | None = None, *, start: bool = True, **kwargs: object) -> MosquittoBroker:
        workdir = tmp_path / (name or f"broker{len(brokers) + 1}")
        b = MosquittoBroker(workdir, **kwargs)  # type: ignore[arg-type]
        brokers.append(b)
        if start:
            b.start()
        return b

    yield make
    for b in reversed(brokers):
        b.stop()


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> MosquittoBroker:
    """A started private mosquitto in tmp_path/"broker" (persistence on, autosave 1 s)."""
    return broker_factory("broker")


@pytest.fixture(scope="session")
def tls_pki(tmp_path_factory: pytest.TempPathFactory) -> TlsPki:
    """Test certificates (gateway/testing/certs.py), made once per session."""
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_broker(broker_factory: BrokerFactory, tls_pki: TlsPki) -> MosquittoBroker:
    """A private mosquitto with a plain listener on ``port`` and a TLS one on ``tls_port``
    (certificate for 127.0.0.1/localhost from ``tls_pki.ca``; no client certificate needed)."""
    listener = TlsListener(tls_pki.server.cert, tls_pki.server.key, cafile=tls_pki.ca.cert)
    return broker_factory("tls-broker", tls=listener)


@pytest.fixture
def publisher(broker: MosquittoBroker) -> Iterator[AckedPublisher]:
    """A connected QoS-1 publisher on ``broker`` that counts PUBACKs."""
    pub = AckedPublisher(broker.host, broker.port, client_id="test-publisher")
    try:
        pub.connect()
        yield pub
    finally:
        pub.close()


# --------------------------------------------------------------------------- sandbox cloud
@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxCloud]:
    """The Blynk-compatible cloud on a free 127.0.0.1 port, in the test's event loop."""
    cloud = SandboxCloud(DEVICES)
    await cloud.start()
    yield cloud
    await cloud.stop()


@pytest.fixture
def make_settings(
    broker: MosquittoBroker, sandbox: SandboxCloud, tmp_path: Path
) -> Callable[..., Settings]:
    """`make_settings(routes=None, mqtt={...}, flush={...})` → validated Settings."""

    def make(routes: list[dict[str, Any]] | None = None, **sections: Any) -> Settings:
        config = settings_dict(
            broker.port, sandbox.base_url, tmp_path / "buffer.db", routes, **sections
        )
        return Settings(**config)

    return make


# --------------------------------------------------------------------------- the daemon
@pytest.fixture
def make_gateway_process(
    broker: MosquittoBroker, sandbox: SandboxCloud, tmp_path: Path
) -> Iterator[Callable[..., GatewayProcess]]:
    """`make_gateway_process(flush={...}, cloud={...})`: the daemon as a subprocess.

    Writes tmp_path/"gateway.toml" (test timings, ``broker``, ``sandbox``, tmp_path/"buffer.db")
    and returns an unstarted :class:`GatewayProcess` whose log also goes to tmp_path/"gw.log".
    Every process made is killed at teardown.
    """
    processes: list[GatewayProcess] = []

    def make(routes: list[dict[str, Any]] | None = None, **sections: Any) -> GatewayProcess:
        config = settings_dict(
            broker.port, sandbox.base_url, tmp_path / "buffer.db", routes, **sections
        )
        config_path = write_config(tmp_path / "gateway.toml", config)
        processes.append(GatewayProcess(config_path, tmp_path / "gw.log"))
        return processes[-1]

    yield make
    for process in processes:
        process.close()


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """Captures the gateway's JSON log lines for assertions on events."""
    stream = io.StringIO()
    gateway_log.configure("debug", "json", stream=stream, secrets=["sandbox-secret"])
    yield stream
    gateway_log.configure("info", "json")
