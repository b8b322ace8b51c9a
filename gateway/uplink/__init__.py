"""The upload side: from the buffer (or straight from ingest) to the Blynk cloud.

`cloud` is the HTTP client behind the `CloudClient` protocol; `flush` is the loop that
leases batches from the store and sends them under the quota (`quota`) and age (`age`)
rules: `pacing` decides when a stream's readings go up (batching by time), `budget` keeps
every request within `cloud.max_requests_per_minute`, `inflight` runs several uploads at
once (one per stream), `acks` deletes accepted batches together, `stream_order` serves
streams the cloud has accepted before first and tries new ones at a bounded rate,
`clockgate` holds uploads while the clock is untrusted, and `drain_progress` reports a
shrinking backlog. `passthrough` offers fresh readings for upload before they are written; `link`
keeps the cloud's online/offline state, backoff and reachability probe; `netwatch` wakes
it when the host's network changes. It meets ingest only in `store` and imports nothing
from `ops`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> module that defines it; imported on first use, so that `blynk-gateway status`
# (which needs only the quota arithmetic) does not load httpx.
_EXPORTS = {
    "BlynkCloud": "gateway.uplink.cloud",
    "CloudClient": "gateway.uplink.cloud",
    "DailyQuota": "gateway.uplink.quota",
    "FlushLoop": "gateway.uplink.flush",
    "NetworkWatcher": "gateway.uplink.netwatch",
}

__all__ = ["BlynkCloud", "CloudClient", "DailyQuota", "FlushLoop", "NetworkWatcher"]

if TYPE_CHECKING:
    from gateway.uplink.cloud import BlynkCloud, CloudClient
    from gateway.uplink.flush import FlushLoop
    from gateway.uplink.netwatch import NetworkWatcher
    from gateway.uplink.quota import DailyQuota


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway.uplink' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
