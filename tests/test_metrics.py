"""`/metrics` scraped over HTTP while readings flow through Mosquitto to the sandbox cloud,
and the textfile for node_exporter, from the same snapshot as `blynk-gateway status`."""

from __future__ import annotations

import asyncio
import io
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from gateway.config import Settings
from gateway.ops.status_socket import query, socket_path
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from harness import InProcessGateway, events, publish, ts_payload, wait_for_passes, wait_until

TOPIC = "sensors/boiler/temperature"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(client: httpx.AsyncClient, gateway: Gateway) -> Samples:
    assert gateway.metrics is not None and gateway.metrics.address is not None
    host, port = gateway.metrics.address
    response = await client.get(f"http://{host}:{port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "sandbox-secret" not in response.text
    return parse(response.text)


async def test_metrics_scraped_while_readings_flow(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    tmp_path: Path,
) -> None:
    textfile = tmp_path / "node-exporter" / "blynk_gateway.prom"
    textfile.parent.mkdir()
    settings = make_settings(
        metrics={"listen": "127.0.0.1:0", "textfile": textfile, "textfile_interval_s": 1.0},
        flush={"batch_size": 50},
    )
    now_ms = int(time.time() * 1000)
    count = 600
    messages = [(TOPIC, ts_payload(float(i), now_ms - 60_000 + i)) for i in range(count)]
    async with InProcessGateway(settings) as gateway, httpx.AsyncClient() as client:
        await wait_until(
            lambda: gateway.metrics is not None and gateway.metrics.address is not None
        )
        publishing = asyncio.create_task(publish(publisher, messages))
        seen: list[Samples] = []
        while not publishing.done() or not seen:
            seen.append(await scrape(client, gateway))
        assert await publishing == count
        await wait_until(lambda: sandbox.accepted_count(101) == count, message="all delivered")
        await wait_for_passes(gateway)
        final = await scrape(client, gateway)

        received = [value(s, "blynk_gateway_readings_total", outcome="received") for s in seen]
        assert received == sorted(received), "a counter went backwards"
        assert value(final, "blynk_gateway_readings_total", outcome="received") == count
        assert value(final, "blynk_gateway_readings_total", outcome="delivered") == count
        assert value(final, "blynk_gateway_buffered_points") == 0
        assert value(final, "blynk_gateway_oldest_buffered_age_seconds") == 0
        uploads = value(final, "blynk_gateway_uploads_total", outcome="ok")
        assert uploads >= 1
        assert value(final, "blynk_gateway_upload_duration_seconds_count") == uploads
        assert value(final, "blynk_gateway_upload_duration_seconds_bucket", le="+Inf") == uploads
        assert value(final, "blynk_gateway_upload_duration_seconds_sum") > 0
        assert value(final, "blynk_gateway_quota_used_points", device_id="101") == count
        assert value(final, "blynk_gateway_mqtt_connected") == 1
        assert value(final, "blynk_gateway_cloud_online") == 1
        # Every request counts against the budget: the uploads, and the token request.
        assert value(final, "blynk_gateway_cloud_requests_last_minute") == uploads + 1
        assert value(final, "blynk_gateway_cloud_requests_per_minute_limit") == 1000
        assert value(final, "blynk_gateway_evicted_total") == 0
        assert not [k for k in final if k[0] == "blynk_gateway_dead_letters"]

        # The status socket serves the same numbers.
        live = await asyncio.to_thread(query, socket_path(settings.store.path))
        assert live is not None
        assert live["readings"]["delivered"] == count
        assert live["uploads"]["ok"] == uploads

        # The textfile catches up within its interval, and is never seen half-written.
        def textfile_done() -> bool:
            if not textfile.exists():
                return False
            samples = parse(textfile.read_text())
            return value(samples, "blynk_gateway_readings_total", outcome="delivered") == count

        await wait_until(textfile_done, message="the textfile with every delivery")
        assert [p.name for p in textfile.parent.iterdir()] == ["blynk_gateway.prom"]

        # The cloud failing shows at once.
        await sandbox.set_fault("error500")
        assert await publish(publisher, [(TOPIC, ts_payload(1.0, now_ms))]) == 1
        await wait_until(lambda: gateway.flush is not None and not gateway.flush.uplink.online)
        failing = await scrape(client, gateway)
        assert value(failing, "blynk_gateway_cloud_online") == 0
        assert value(failing, "blynk_gateway_uploads_total", outcome="server_error") >= 1
        assert value(failing, "blynk_gateway_buffered_points") == 1
        assert value(failing, "blynk_gateway_oldest_buffered_age_seconds") > 0
        await sandbox.set_fault("none")
    assert gateway.metrics is not None and gateway.metrics.address is not None
    host, port = gateway.metrics.address
    async with httpx.AsyncClient() as client:
        try:
            await client.get(f"http://{host}:{port}/metrics")
        except httpx.ConnectError:
            pass
        else:
            raise AssertionError("the metrics server outlived the gateway")


async def test_metrics_are_off_unless_configured(
    make_settings: Callable[..., Settings],
) -> None:
    async with InProcessGateway(make_settings()) as gateway:
        assert gateway.metrics is None
        assert [t for t in asyncio.all_tasks() if t.get_name() == "metrics"] == []


async def test_a_busy_metrics_port_does_not_stop_the_gateway(
    make_settings: Callable[..., Settings],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    log_output: io.StringIO,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = make_settings(metrics={"listen": f"127.0.0.1:{port}"})
        async with InProcessGateway(settings) as gateway:
            assert (
                await publish(publisher, [(TOPIC, ts_payload(1.5, int(time.time() * 1000)))]) == 1
            )
            await wait_until(lambda: sandbox.accepted_count(101) == 1, message="the reading")
            assert gateway.metrics is not None and gateway.metrics.address is None
    (failed,) = events(log_output, "metrics_listen_failed")
    assert failed["listen"] == f"127.0.0.1:{port}"
