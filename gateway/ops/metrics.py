"""Prometheus metrics, off unless `[metrics]` is configured.

`listen = "127.0.0.1:9108"` serves the text format on `/metrics`, `textfile =
".../blynk_gateway.prom"` writes the same text for
node_exporter's textfile collector, atomically (temporary file + rename) and at most every
`textfile_interval_s`. Both come from one custom collector over `gateway.ops.observe`'s
snapshot, the same numbers `blynk-gateway status` prints, so the two never disagree; no
metric object is updated on the hot path. Nothing secret is exported.

The HTTP server is the event loop's own (issue 16), not prometheus-client's
`start_http_server`, which spends a thread and a descriptor on every client and never
times one out: 1,100 clients that sent half a header took all 1,024 descriptors, and
`status` then said the daemon was not running. Here a `BoundedListener` holds at most
`MAX_CONNECTIONS` clients, each gets `HEADER_TIMEOUT_S` to send its request and
`CONNECTION_DEADLINE_S` in all; one request per connection (`Connection: close`), GET
or HEAD of `/metrics` (and `/`, a link to it), at most `MAX_REQUEST_BYTES` of request.
The snapshot is taken on the loop by the daemon's own connection, like any read; the text
is rendered in a worker thread so a large one never stalls ingest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from gateway.log import get_logger
from gateway.ops.listener import BoundedListener, Connection, Tally, listening_socket
from gateway.ops.observe import Observer, Snapshot

if TYPE_CHECKING:
    from gateway.config import MetricsSettings

log = get_logger("metrics")

# A scrape waits this long for the snapshot before it gives up (503).
SCRAPE_TIMEOUT_S = 10.0
PREFIX = "blynk_gateway"
# The HTTP server's bounds. Prometheus scrapes every 15-60 s and sends its request at
# once; a few dashboards or curl beside it stay far below the cap.
MAX_CONNECTIONS = 16
HEADER_TIMEOUT_S = 5.0
CONNECTION_DEADLINE_S = HEADER_TIMEOUT_S + SCRAPE_TIMEOUT_S
MAX_REQUEST_BYTES = 8192
# How long an error answer waits for the client to stop sending (see _linger).
LINGER_S = 1.0
INDEX_HTML = b'<html><body><a href="/metrics">metrics</a></body></html>\n'


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
    if live.clock is not None:  # issue 20: readings held until the clock synchronizes
        gauge(
            "clock_synchronized",
            "1 while the system clock is trusted ([clock] trust); 0: uploads wait for it.",
            float(live.clock["synchronized"]),
        )
        gauge(
            "provisional_readings",
            "Readings held until the clock synchronizes (stamped before it was trusted).",
            live.clock["provisional"],
        )
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
            "evicted, refused, delivered, dead_lettered; sampling: suppressed by a deadband, "
            "aggregated into window points sent, late for a window already sent).",
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


@dataclass(frozen=True)
class Request:
    method: str
    path: str


class HttpError(Exception):
    """A request answered with `status` and nothing else."""

    def __init__(self, status: HTTPStatus) -> None:
        super().__init__(status.phrase)
        self.status = status


async def read_request(reader: asyncio.StreamReader) -> Request:
    """The request line; the headers are read (within MAX_REQUEST_BYTES) and ignored.

    Raises HttpError (400, 431) for what cannot be answered, IncompleteReadError when the
    client hangs up before its header ends.
    """
    lines: list[bytes] = []
    total = 0
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # one line beyond the reader's limit
            raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE) from None
        if not line.endswith(b"\n"):
            raise asyncio.IncompleteReadError(line, None)
        total += len(line)
        if total > MAX_REQUEST_BYTES:
            raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        if line.strip():
            lines.append(line)
        elif lines:  # the blank line that ends the header (leading ones are ignored)
            break
    parts = lines[0].decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(HTTPStatus.BAD_REQUEST)
    method, target, _version = parts
    return Request(method, target.split("?", 1)[0])


def response(
    status: HTTPStatus,
    body: bytes = b"",
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
    headers: tuple[str, ...] = (),
) -> bytes:
    """A whole HTTP/1.1 response; the connection closes after it."""
    if not body and status != HTTPStatus.OK:
        body = f"{status.value} {status.phrase}\n".encode()
    lines = (
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *headers,
    )
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After an error answer to a request that may not have been read to its end: say we
    are done and read what is left for a moment, so closing with unread bytes does not
    reset the connection before the client has read why."""
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(LINGER_S):
            while await reader.read(MAX_REQUEST_BYTES):
                pass


class MetricsExporter:
    """The `/metrics` server and the textfile writer; a named task of the daemon."""

    def __init__(self, settings: MetricsSettings, observer: Observer) -> None:
        self._settings = settings
        self._observer = observer
        self.address: tuple[str, int] | None = None
        self.listener: BoundedListener | None = None
        self._scrape_failures = Tally("metrics_scrape_failed")

    async def run(self) -> None:
        """Until cancelled; the listener is closed and its port freed on the way out."""
        try:
            async with asyncio.TaskGroup() as tasks:
                if self._settings.listen is not None and (listener := self._listen()):
                    tasks.create_task(listener.serve(), name="metrics-http")
                if self._settings.textfile is not None:
                    tasks.create_task(self._textfile_forever(self._settings.textfile))
                await asyncio.Event().wait()
        finally:
            self._scrape_failures.flush()

    def _listen(self) -> BoundedListener | None:
        assert self._settings.listen is not None
        host, port = parse_listen(self._settings.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = listening_socket(family, (host, port))
        except OSError as exc:
            # Metrics are for watching the gateway, never a reason to stop buffering.
            log.error("metrics_listen_failed", listen=self._settings.listen, error=str(exc))
            return None
        self.address = (host, int(sock.getsockname()[1]))
        self.listener = BoundedListener(
            "metrics",
            sock,
            self._serve,
            max_connections=MAX_CONNECTIONS,
            deadline_s=CONNECTION_DEADLINE_S,
            read_limit=MAX_REQUEST_BYTES,
            refusal=response(HTTPStatus.SERVICE_UNAVAILABLE),
            complete=lambda sent: b"\r\n\r\n" in sent or b"\n\n" in sent,
        )
        shown = f"[{host}]" if ":" in host else host
        log.info("metrics_listening", url=f"http://{shown}:{self.address[1]}/metrics")
        return self.listener

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: Connection
    ) -> None:
        """One request, one answer. A TimeoutError from the header wait drops the client."""
        async with asyncio.timeout(HEADER_TIMEOUT_S):
            try:
                request: Request | HttpError = await read_request(reader)
            except HttpError as error:
                request = error
        connection.waiting = False  # a whole request: this one is ours to answer
        if isinstance(request, HttpError):
            answer = response(request.status)
        else:
            answer = await self._answer(request)
        writer.write(answer)
        await writer.drain()
        if isinstance(request, HttpError) or request.method not in ("GET", "HEAD"):
            connection.waiting = True  # on the client again: it may make way
            await _linger(reader, writer)

    async def _answer(self, request: Request) -> bytes:
        head_only = request.method == "HEAD"
        if request.method not in ("GET", "HEAD"):
            return response(HTTPStatus.METHOD_NOT_ALLOWED, headers=("Allow: GET, HEAD",))
        if request.path == "/":
            return response(HTTPStatus.OK, INDEX_HTML, "text/html", head_only=head_only)
        if request.path != "/metrics":
            return response(HTTPStatus.NOT_FOUND, head_only=head_only)
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT_S):
                snapshot = await self._observer.snapshot()
        except (TimeoutError, RuntimeError, OSError) as exc:  # a scrape never ends the daemon
            self._scrape_failures.add(type(exc).__name__)
            return response(HTTPStatus.SERVICE_UNAVAILABLE, head_only=head_only)
        body = await asyncio.to_thread(render, snapshot)
        return response(HTTPStatus.OK, body, CONTENT_TYPE_PLAIN_0_0_4, head_only=head_only)

    async def _textfile_forever(self, path: Path) -> None:
        while True:
            await self._write_textfile(path)
            await asyncio.sleep(self._settings.textfile_interval_s)

    async def _write_textfile(self, path: Path) -> None:
        try:
            snapshot = await self._observer.snapshot()
            await asyncio.to_thread(lambda: write_atomically(path, render(snapshot)))
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
