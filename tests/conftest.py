"""Shared pytest fixtures: private brokers, publishers, the sandbox cloud, the gateway."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.mosquitto import BrokerFactory, MosquittoBroker
from gateway.publisher import AckedPublisher


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


@pytest.fixture
def publisher(broker: MosquittoBroker) -> Iterator[AckedPublisher]:
    """A connected QoS-1 publisher on ``broker`` that counts PUBACKs."""
    pub = AckedPublisher(broker.host, broker.port, client_id="test-publisher")
    try:
        pub.connect()
        yield pub
    finally:
        pub.close()
