"""Issue 16 item 4: streams the cloud does not know never delay the ones it does.

A config that maps 3,000 names to ids the cloud does not have (a typo'd id list, or
numeric topic names taken for ids) buffers 3,000 streams the cloud answers 404 for. The
gateway may not spend a request on each before it serves a device the cloud has accepted
before, nor log a line per stream, nor repeat the burst every `parked_retry_s`.

Everything here runs through the real path: QoS 1 publishes to a real Mosquitto, the
running gateway, the sandbox cloud over HTTP (which answers unknown device ids with the
real cloud's 404, /work/shared/blynk-import-api.md §1).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

from gateway.config import Settings
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import InProcessGateway, log_events, publish, ts_payload, wait_until

ROUTE = {"topic": "plain/{device}", "datastream_id": 5}  # 101/5 is a Double in the sandbox
UNKNOWN = range(100_000, 103_000)
DEVICES = {"kitchen": 101, **{f"serial{n}": n for n in UNKNOWN}}
# The known reading must arrive within this, where it took 88 s before.
KNOWN_WITHIN_S = 3.0
DEFAULT_TRIES_PER_MIN = 10


def flood() -> list[tuple[str, str]]:
    now_ms = int(time.time() * 1000)
    return [(f"plain/serial{n}", ts_payload(1.5, now_ms - 1000)) for n in UNKNOWN]


def not_found(sandbox: SandboxCloud) -> int:
    return sum(1 for r in sandbox.requests if r.status == 404)


def parked_lines(log: io.StringIO) -> list[dict[str, Any]]:
    return [e for e in log_events(log) if e["event"] in ("stream_parked", "streams_parked")]


async def known_reading_arrives(
    publisher: AckedPublisher, sandbox: SandboxCloud, value: float
) -> float:
    """Publish one reading of the known device; the seconds until the cloud holds it."""
    started = time.monotonic()
    assert await publish(publisher, [("plain/kitchen", ts_payload(value, int(time.time() * 1000)))])
    await wait_until(
        lambda: any(p.device_id == 101 and p.value == value for p in sandbox.accepted),
        KNOWN_WITHIN_S,
        f"the known device's reading {value} (unknown streams must not delay it)",
    )
    return time.monotonic() - started


async def test_thousands_of_unknown_streams_never_delay_a_known_device(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    settings = make_settings([ROUTE], devices=DEVICES, flush={"parked_retry_s": 5.0})
    runner = InProcessGateway(settings, clock_ms=sandbox.now_ms)
    async with runner as gateway:
        assert gateway.store is not None
        await known_reading_arrives(publisher, sandbox, 1.0)  # the cloud accepts 101/5
        started = time.monotonic()
        assert await publish(publisher, flood()) == len(UNKNOWN)
        await wait_until(lambda: not_found(sandbox) > 0, 10, "the first unknown stream tried")
        # Published after the flood, while the gateway works on it: it goes first.
        await known_reading_arrives(publisher, sandbox, 2.0)
        # Parked streams come due every 5 s here: their retries are rate-limited too.
        await wait_until(lambda: time.monotonic() - started > 7, 10, "a parked-retry period")
        await known_reading_arrives(publisher, sandbox, 3.0)
        elapsed_min = (time.monotonic() - started) / 60
        # At most the burst allowance plus the rate, never one request per stream.
        assert not_found(sandbox) <= DEFAULT_TRIES_PER_MIN * (1 + elapsed_min) + 1
        assert gateway.store.pending_points >= len(UNKNOWN) - not_found(sandbox)
    # A restart remembers which streams the cloud accepted: still first.
    async with InProcessGateway(settings, clock_ms=sandbox.now_ms):
        await known_reading_arrives(publisher, sandbox, 4.0)
    lines = log_events(log_output)
    assert len(parked_lines(log_output)) <= 4, "one line per interval, not one per stream"
    assert len(lines) < 80, [e["event"] for e in lines]
