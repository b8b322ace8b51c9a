"""`blynk-gateway demo`: the whole store-and-forward story on one machine, in under a minute.

It starts a private Mosquitto, the sandbox cloud and the real gateway (as a subprocess, so
its log lines are exactly what an operator would see), publishes simulated sensor
readings, takes the cloud down for a while, brings it back and shows the backlog drain.
It ends by comparing what the broker accepted with what the cloud received.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from gateway.testing.broker import MosquittoBroker, find_mosquitto
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud

SENSORS = (
    ("demo/boiler/temperature", 101, 5),
    ("demo/livingroom/humidity", 102, 1),
)
CLIENT_ID = "demo-client"
CLIENT_SECRET = "demo-secret-not-for-production"


def say(message: str) -> None:
    print(f"\033[1mdemo:\033[0m {message}" if sys.stdout.isatty() else f"demo: {message}")
    sys.stdout.flush()


def _config_text(workdir: Path, broker_port: int, cloud_url: str) -> str:
    routes = "\n".join(
        f'[[routes]]\ntopic = "{topic}"\ndevice_id = {device}\ndatastream_id = {stream}\n'
        for topic, device, stream in SENSORS
    )
    return f"""# written by `blynk-gateway demo`
[mqtt]
host = "127.0.0.1"
port = {broker_port}
client_id = "blynk-gateway-demo"

[cloud]
server = "{cloud_url}"
client_id = "{CLIENT_ID}"
# the secret comes from the environment: BLYNK_GATEWAY_CLOUD__CLIENT_SECRET

[store]
path = "{workdir / "buffer.db"}"

[flush]
interval_s = 1.0
backoff_min_s = 0.5
backoff_max_s = 2.0

[log]
format = "console"

[clock]
# the demo's readings are uploaded at once, whether or not this machine runs NTP
trust = "always"

{routes}"""


def run_demo(workdir: Path, seconds: float) -> int:
    try:
        find_mosquitto()
    except RuntimeError as exc:
        say(str(exc))
        return 1
    return asyncio.run(_demo(workdir.resolve(), max(9.0, seconds)))


async def _demo(workdir: Path, seconds: float) -> int:
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    broker = MosquittoBroker(workdir / "broker")
    broker.start()
    cloud = SandboxCloud(
        {device: {stream: "double"} for _, device, stream in SENSORS},
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
    )
    cloud_url = await cloud.start()
    config = workdir / "gateway.toml"
    config.write_text(_config_text(workdir, broker.port, cloud_url))
    say(f"private Mosquitto on 127.0.0.1:{broker.port}, sandbox Blynk cloud at {cloud_url}")
    say(f"starting: blynk-gateway run --config {config}")
    env = {**os.environ, "BLYNK_GATEWAY_CLOUD__CLIENT_SECRET": CLIENT_SECRET}
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(config)], env=env
    )
    publisher = AckedPublisher("127.0.0.1", broker.port, client_id="demo-sensors")
    try:
        await asyncio.sleep(1.5)
        publisher.connect()
        outage = (seconds / 3, 2 * seconds / 3)
        say(
            f"sensors publish every 50 ms for {seconds:.0f} s; cloud down from "
            f"{outage[0]:.0f} s to {outage[1]:.0f} s"
        )
        await _publish(publisher, cloud, seconds, outage)
        await asyncio.to_thread(publisher.wait_all_acked, 30)
        say(f"broker accepted {publisher.acked_count} readings; waiting for the backlog to drain")
        deadline = time.monotonic() + 60
        while cloud.accepted_count() < publisher.acked_count and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
    finally:
        publisher.close()
        gateway.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(gateway.wait, 30)
        await cloud.stop()
        broker.stop()
    delivered = cloud.accepted_count()
    lost = publisher.acked_count - delivered
    say(f"gateway exited with code {exit_code}")
    say(
        f"published (PUBACKed by the broker): {publisher.acked_count}, "
        f"received by the cloud: {delivered}, lost: {max(0, lost)}"
    )
    if lost > 0 or exit_code != 0:
        say("FAILED: not every acknowledged reading reached the cloud")
        return 1
    say("OK: every reading survived the outage and reached the cloud")
    return 0


async def _publish(
    publisher: AckedPublisher, cloud: SandboxCloud, seconds: float, outage: tuple[float, float]
) -> None:
    started = time.monotonic()
    cloud_down = False
    tick = 0
    while (elapsed := time.monotonic() - started) < seconds:
        if not cloud_down and outage[0] <= elapsed < outage[1]:
            await cloud.set_fault("down")
            cloud_down = True
            say("cloud is DOWN (connections refused): the gateway keeps buffering")
        elif cloud_down and elapsed >= outage[1]:
            await cloud.set_fault("none")
            cloud_down = False
            say(f"cloud is back: {cloud.accepted_count()} readings delivered so far")
        for index, (topic, _, _) in enumerate(SENSORS):
            value = round(20 + 5 * math.sin(tick / 20 + index), 2)
            publisher.publish(topic, f"{value}")
        tick += 1
        await asyncio.sleep(0.05)
    if cloud_down:
        await cloud.set_fault("none")
