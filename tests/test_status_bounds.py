"""`blynk-gateway status` stays small and on one line per fact, whatever the outside sends
(issue 16): device names from topics and the cloud's messages are clipped to ~120
characters with their control characters escaped, and the per-stream and per-device
lists keep their largest entries only.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.cli.status import MAX_ROWS, TABLE_ROWS
from gateway.log import MAX_FIELD_CHARS as SHOWN_CHARS
from gateway.log import clip, clip_keys
from gateway.models import Reading, StreamKey
from gateway.ops.status_socket import query, socket_path
from gateway.store import Store
from gateway.testing.process import GatewayProcess, write_config
from gateway.testing.publisher import AckedPublisher
from harness import cli, publish, settings_dict, ts_payload

PLAIN_ROUTE = {"topic": "plain/{device}", "datastream_id": 5}
# Below the 128-byte name limit issue 16 asks ingest for, above what status shows.
LONG_NAME = "sensor-" + "x" * 120


async def status(config: Path) -> tuple[dict[str, Any], str]:
    """(`status --json` parsed, `status` as text)."""
    as_json, as_text = await asyncio.gather(
        asyncio.to_thread(cli, "status", "--config", str(config), "--json"),
        asyncio.to_thread(cli, "status", "--config", str(config)),
    )
    assert as_json.returncode == 0, as_json.stderr
    assert as_text.returncode == 0, as_text.stderr
    report: dict[str, Any] = json.loads(as_json.stdout)
    return report, as_text.stdout


# --------------------------------------------------------------------------- clip


@given(st.text(max_size=400), st.integers(min_value=20, max_value=300))
def test_clip_is_short_printable_and_stable(text: str, limit: int) -> None:
    shown = clip(text, limit)
    assert len(shown) <= limit
    assert shown.isprintable()
    assert clip(shown, limit) == shown
    if len(text) <= limit and text.isprintable():
        assert shown == text
    if len(text) > limit:
        assert shown.endswith(f"…[{len(text)} chars]")


def test_clip_escapes_what_could_forge_a_line() -> None:
    assert clip("kitchen\ndaemon      running") == "kitchen\\ndaemon      running"
    assert clip("\x1b[2Jred") == "\\x1b[2Jred"
    assert clip("a" * 60_000) == "a" * (SHOWN_CHARS - 14) + "…[60000 chars]"
    assert clip_keys([("a" * 200 + "1", 2), ("a" * 200 + "2", 3), ("b", 1)]) == {
        "a" * (SHOWN_CHARS - 12) + "…[201 chars]": 5,
        "b": 1,
    }


# --------------------------------------------------------------------------- names over MQTT


async def test_status_clips_unmapped_device_names_from_topics(
    make_gateway_process: Callable[..., GatewayProcess],
    publisher: AckedPublisher,
) -> None:
    gateway = make_gateway_process(routes=[PLAIN_ROUTE], devices={"kitchen": 101})
    gateway.start()
    await asyncio.to_thread(gateway.wait_for_event, "mqtt_connected")
    now_ms = int(time.time() * 1000)
    # Mosquitto refuses control characters in topics; a line separator it lets through.
    forged = "evil\u2028daemon      NOT RUNNING"
    messages = [
        (f"plain/{LONG_NAME}", ts_payload(1.0, now_ms)),
        (f"plain/{forged}", ts_payload(2.0, now_ms)),
        ("plain/kitchen", ts_payload(3.0, now_ms)),
    ]
    sock = socket_path(gateway.config_path.parent / "buffer.db")
    live: dict[str, Any] | None = None
    # Again until seen: `mqtt_connected` is logged as the SUBSCRIBE goes out, not acked.
    for _ in range(20):
        assert await publish(publisher, messages) == 3
        await asyncio.sleep(0.5)
        live = await asyncio.to_thread(query, sock)
        if live is not None and live["unmapped_devices_total"] == 2:
            break
    assert live is not None and live["unmapped_devices_total"] == 2, live
    report, text = await status(gateway.config_path)
    # The daemon's own answer is clipped already (it is what a 60 KB name made 1.2 MB).
    assert set(live["unmapped_devices"]) == set(report["ingest"]["unmapped_devices"])

    unmapped = report["ingest"]["unmapped_devices"]
    assert set(unmapped) == {clip(LONG_NAME), "evil\\u2028daemon      NOT RUNNING"}
    assert all(len(name) <= SHOWN_CHARS for name in unmapped)
    assert clip(LONG_NAME).endswith(f"…[{len(LONG_NAME)} chars]")
    # One line per fact: the forged name cannot start a line of its own.
    (daemon_line,) = [line for line in text.splitlines() if line.startswith("daemon")]
    assert daemon_line.startswith(f"daemon      running, pid {gateway.pid}")
    assert LONG_NAME not in text and "evil\\u2028daemon" in text


# --------------------------------------------------------------------------- many streams


async def test_status_keeps_the_largest_rows_and_clips_the_clouds_words(tmp_path: Path) -> None:
    """1,005 streams (as all-digit device names once made them) and a parked reason of
    5,000 characters: `--json` keeps the 1,000 largest streams, the table 50."""
    db_path = tmp_path / "buffer.db"
    config = write_config(
        tmp_path / "gateway.toml", settings_dict(1883, "http://127.0.0.1:9", db_path)
    )
    now_ms = int(time.time() * 1000)
    streams = MAX_ROWS + 5
    big = {StreamKey(100_000 + i, 1) for i in range(0, streams, streams // TABLE_ROWS + 1)}
    readings = [
        Reading(key.device_id, 1, now_ms - 60_000 + n, "1.5")
        for key in (StreamKey(100_000 + i, 1) for i in range(streams))
        for n in range(3 if key in big else 1)
    ]
    store = await Store.open(db_path)
    try:
        for start in range(0, len(readings), 500):
            await store.append(readings[start : start + 500])
        await store.park(StreamKey(100_000, 1), "device_not_found: " + "y" * 5_000, now_ms)
    finally:
        await store.close()

    report, text = await status(config)

    backlog = report["backlog"]
    assert backlog["readings"] == len(readings)
    assert len(backlog["streams"]) == MAX_ROWS and backlog["streams_omitted"] == 5
    assert {s["device_id"] for s in backlog["streams"] if s["readings"] == 3} == {
        key.device_id for key in big
    }
    (parked,) = [s["parked"] for s in backlog["streams"] if s["parked"]]
    assert len(parked) <= SHOWN_CHARS and parked.startswith("device_not_found: yyy")
    assert len(report["forecast"]["devices"]) == MAX_ROWS
    assert report["forecast"]["devices_omitted"] == 5
    assert report["forecast"]["will_expire"] == 0

    table = [line for line in text.splitlines() if re.match(r"    1\d{5}  ", line)]
    assert len(table) == TABLE_ROWS + TABLE_ROWS  # the backlog and the forecast tables
    assert f"... and {streams - TABLE_ROWS:,} more streams" in text
    assert max(len(line) for line in text.splitlines()) < 300
    assert len(text) < 20_000
