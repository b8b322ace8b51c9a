"""blynk-edge-gateway: local MQTT readings, durably buffered, uploaded to the Blynk cloud.

The public face, for embedding the daemon or driving it from tests and tools::

    from gateway import Gateway, load_settings

    await Gateway(load_settings(Path("/etc/blynk-gateway/config.toml"))).run()

One reading's way: `ingest` (MQTT, PUBACK only after commit) → `store` (SQLite, the only
SQL) ← `flush` (quota, age rule, uplink state) → `cloud` (Blynk import/batch). `app` wires
them; `cli` sits on top. Names are imported lazily, so `import gateway` (or the CLI's
`--help`) does not pull in paho, httpx and aiosqlite until they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "Gateway": "gateway.app",
    "run_until_signalled": "gateway.app",
    "Settings": "gateway.config",
    "load_settings": "gateway.config",
    "BlynkCloud": "gateway.uplink.cloud",
    "CloudClient": "gateway.uplink.cloud",
    "FlushLoop": "gateway.uplink.flush",
    "MqttIngest": "gateway.ingest",
    "RouteTable": "gateway.ingest",
    "Store": "gateway.store",
    "Reading": "gateway.models",
    "StreamKey": "gateway.models",
    "Batch": "gateway.models",
    "Point": "gateway.models",
    "GatewayError": "gateway.errors",
    "ConfigError": "gateway.errors",
    "PayloadError": "gateway.errors",
    "StoreError": "gateway.errors",
    "CloudError": "gateway.errors",
}

__all__ = [
    "Batch",
    "BlynkCloud",
    "CloudClient",
    "CloudError",
    "ConfigError",
    "FlushLoop",
    "Gateway",
    "GatewayError",
    "MqttIngest",
    "PayloadError",
    "Point",
    "Reading",
    "RouteTable",
    "Settings",
    "Store",
    "StoreError",
    "StreamKey",
    "__version__",
    "load_settings",
    "run_until_signalled",
]

if TYPE_CHECKING:
    from gateway.app import Gateway, run_until_signalled
    from gateway.config import Settings, load_settings
    from gateway.errors import CloudError, ConfigError, GatewayError, PayloadError, StoreError
    from gateway.ingest import MqttIngest, RouteTable
    from gateway.models import Batch, Point, Reading, StreamKey
    from gateway.store import Store
    from gateway.uplink.cloud import BlynkCloud, CloudClient
    from gateway.uplink.flush import FlushLoop


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
