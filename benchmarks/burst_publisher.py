"""The burst publisher of `memory_burst.py`: N QoS 1 readings as fast as paho can send them.

Run by `memory_burst.publish_process` as a script of its own (it imports paho and nothing
of ours), so it shares the cores with the daemon as little as it can:

    python benchmarks/burst_publisher.py HOST PORT CLIENT_ID N BASE_TS

Readings go to `burst/s0` ... `burst/s19` (`memory_burst.ROUTES`), each with its own `ts`
(BASE_TS + i). Exits 0 once the broker has acknowledged all N, non-zero otherwise.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

SENSORS = 20  # memory_burst.SENSORS


def fast_publish(host: str, port: int, client_id: str, n: int, base_ts: int) -> None:
    """Publish n QoS 1 readings as fast as paho can and wait for every PUBACK.

    A process of its own: `AckedPublisher` keeps a record of every message and tops out
    at a few thousand a second here, too slow to outrun the daemon, which is the situation
    `memory_burst.py` is about.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    acked = 0
    connected = threading.Event()
    done = threading.Event()

    def on_connect(*args: Any) -> None:
        connected.set()

    def on_publish(*args: Any) -> None:
        nonlocal acked
        acked += 1
        if acked >= n:
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(host, port)
    client.loop_start()
    if not connected.wait(10):
        raise SystemExit("publisher could not connect")
    for i in range(n):
        payload = b'{"value": %.1f, "ts": %d}' % (20 + (i % 50) / 10, base_ts + i)
        client.publish(f"burst/s{i % SENSORS}", payload, qos=1)
        if i % 5000 == 4999:
            while i - acked > 50_000:  # keep paho's own queue (and our RSS) bounded
                time.sleep(0.01)
    if not done.wait(600):
        raise SystemExit(f"only {acked} of {n} PUBACKed")
    client.disconnect()
    client.loop_stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("client_id")
    parser.add_argument("n", type=int)
    parser.add_argument("base_ts", type=int)
    args = parser.parse_args()
    fast_publish(args.host, args.port, args.client_id, args.n, args.base_ts)


if __name__ == "__main__":
    main()
