"""Prometheus metrics, off unless `[metrics]` is configured.

`listen = "127.0.0.1:9108"` serves the text format on `/metrics` (prometheus-client's
threaded server), `textfile = ".../blynk_gateway.prom"` writes the same text for
node_exporter's textfile collector, atomically (temporary file + rename) and at most every
`textfile_interval_s`. Both come from one custom collector over `gateway.ops.observe`'s
snapshot, the same numbers `blynk-gateway status` prints, so the two never disagree; no
metric object is updated on the hot path. Nothing secret is exported.

A scrape runs in the server's thread: it asks the event loop for a snapshot and waits for
it, so the database is read by the daemon's own connection, under its lock, like any read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway.log import get_logger
from gateway.ops.observe import Observer, Snapshot

if TYPE_CHECKING:
    from gateway.config import MetricsSettings

log = get_logger("metrics")

# A scrape waits this long for the event loop's snapshot before it gives up (empty answer).
SCRAPE_TIMEOUT_S = 10.0
PREFIX = "blynk_gateway"


def families(snapshot: Snapshot) -> list[Metric]:
    """Every metric, built from one snapshot."""
    live = snapshot.live
    now_ms = live.now_ms
    metrics: list[Metric] = []

    def gauge(name: str, help_text: str, value: float) -> None:
        metrics.append(GaugeMetricFamily(f"{PREFIX}_{name}", help_text, value=value))

    def labelled(
        family: GaugeMetricFamily | CounterMetricFamily,
        samples: Iterable[tuple[str, float]],
    ) -> None:
        for label, value in samples:
            family.add_metric([label], value)
        metrics.append(family)

    gauge("buffered_points", "Readings in the buffer, waiting for the cloud.", live.buffered_points)
    oldest = snapshot.oldest_ts_ms
    gauge(
        "oldest_buffered_age_seconds",
        "Age of the oldest buffered reading (0 when the buffer is empty).",
        0.0 if oldest is None else max(0.0, (now_ms - oldest) / 1000),
    )
    labelled(
        CounterMetricFamily(
            f"{PREFIX}_readings",
            "Readings since start, by outcome (received, stored, duplicate, rejected, expired, "
            "evicted, refused, delivered, dead_lettered).",
            labels=["outcome"],
        ),
        sorted(live.readings.items()),
    )
    labelled(
        CounterMetricFamily(
            f"{PREFIX}_uploads", "Upload requests since start, by outcome.", labels=["outcome"]
        ),
        sorted(live.uploads.items()),
    )
    metrics.append(
        HistogramMetricFamily(
            f"{PREFIX}_upload_duration_seconds",
            "Time for one import/batch request, answered or failed.",
            buckets=live.upload_duration,
            sum_value=live.upload_duration_sum_s,
        )
    )
    labelled(
        GaugeMetricFamily(
            f"{PREFIX}_quota_used_points",
            f"Points the cloud accepted today ({snapshot.quota_day}), per device.",
            labels=["device_id"],
        ),
        sorted((str(device), points) for device, points in snapshot.quota_used.items()),
    )
    gauge(
        "quota_limit_points",
        "cloud.daily_points_limit: points per device per day.",
        snapshot.daily_points_limit,
    )
    labelled(
        GaugeMetricFamily(
            f"{PREFIX}_dead_letters",
            "Readings in the dead-letter table, by reason.",
            labels=["reason"],
        ),
        sorted(snapshot.dead_letters.items()),
    )
    metrics.append(
        CounterMetricFamily(
            f"{PREFIX}_evicted",
            "Readings the drop-oldest policy removed to make room, since the buffer was created.",
            value=sum(snapshot.evicted_by_device.values()),
        )
    )
    gauge("mqtt_connected", "1 while the broker connection is up.", int(live.mqtt_connected))
    gauge("cloud_online", "1 unless uploads are failing.", int(live.cloud_online))
    gauge(
        "cloud_requests_last_minute",
        "Requests to the cloud started in the last 60 s (the request budget's use).",
        live.cloud_requests_last_minute,
    )
    gauge(
        "cloud_requests_per_minute_limit",
        "cloud.max_requests_per_minute: the budget never exceeded.",
        live.cloud_requests_per_minute_limit,
    )
    gauge(
        "parked_streams",
        "Streams held back after the cloud did not know them (data kept).",
        sum(1 for head in snapshot.streams if head.parked_reason is not None),
    )
    gauge("db_file_bytes", "The buffer's file, WAL and shared memory.", snapshot.db_file_bytes)
    info = GaugeMetricFamily(f"{PREFIX}_info", "The running version.", labels=["version"])
    info.add_metric([live.version], 1)
    metrics.append(info)
    return metrics


class SnapshotCollector(Collector):
    """A collector that renders whatever snapshot `source` returns (None: nothing)."""

    def __init__(self, source: Callable[[], Snapshot | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        snapshot = self._source()
        if snapshot is not None:
            yield from families(snapshot)


def render(snapshot: Snapshot) -> bytes:
    """The text format for one snapshot (the textfile, and tests)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot))
    return generate_latest(registry)


def parse_listen(listen: str) -> tuple[str, int]:
    """`127.0.0.1:9108` or `[::1]:9108` -> (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsExporter:
    """The `/metrics` server and the textfile writer; a named task of the daemon."""

    def __init__(self, settings: MetricsSettings, observer: Observer) -> None:
        self._settings = settings
        self._observer = observer
        self.address: tuple[str, int] | None = None

    async def run(self) -> None:
        """Until cancelled; the server is shut down and its port freed on the way out."""
        loop = asyncio.get_running_loop()
        server = None
        if self._settings.listen is not None:
            host, port = parse_listen(self._settings.listen)
            registry = CollectorRegistry(auto_describe=False)
            registry.register(SnapshotCollector(lambda: self._scrape(loop)))
            try:
                server, _thread = start_http_server(port, host, registry=registry)
            except OSError as exc:
                # Metrics are for watching the gateway, never a reason to stop buffering.
                log.error("metrics_listen_failed", listen=self._settings.listen, error=str(exc))
            else:
                self.address = (host, int(server.server_address[1]))
                shown = f"[{host}]" if ":" in host else host
                log.info("metrics_listening", url=f"http://{shown}:{self.address[1]}/metrics")
        textfile = self._settings.textfile
        try:
            if textfile is None:
                await asyncio.Event().wait()
            while textfile is not None:
                await self._write_textfile(textfile)
                await asyncio.sleep(self._settings.textfile_interval_s)
        finally:
            if server is not None:
                await asyncio.to_thread(_shutdown, server)

    def _scrape(self, loop: asyncio.AbstractEventLoop) -> Snapshot | None:
        """In the server's thread: the snapshot, taken on the event loop."""
        future = asyncio.run_coroutine_threadsafe(self._observer.snapshot(), loop)
        try:
            return future.result(SCRAPE_TIMEOUT_S)
        except Exception as exc:  # a scrape must never take the daemon down
            future.cancel()
            log.warning("metrics_scrape_failed", error=f"{type(exc).__name__}: {exc}")
            return None

    async def _write_textfile(self, path: Path) -> None:
        try:
            text = render(await self._observer.snapshot())
            await asyncio.to_thread(write_atomically, path, text)
        except (OSError, RuntimeError) as exc:
            log.warning("metrics_textfile_failed", path=str(path), error=str(exc))


def write_atomically(path: Path, data: bytes) -> None:
    """node_exporter must never read half a file: write beside it, then rename over it."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _shutdown(server: WSGIServer) -> None:
    server.shutdown()
    server.server_close()
