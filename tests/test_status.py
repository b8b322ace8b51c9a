"""`blynk-gateway status` against the daemon as a subprocess, fed over MQTT.

The CLI runs as a process of its own too, as an operator would run it: it asks the daemon
over the status socket and reads the buffer on its own connection, while the daemon keeps
writing. The quota is set small so a backlog stays, and some readings are published so
close to the age limit that they must expire before the next quota day: the forecast
must say so.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.cli.status import REPORT_SECTIONS
from gateway.config import CloudSettings
from gateway.ops.status_socket import socket_path
from gateway.testing.process import GatewayProcess, write_config
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from gateway.uplink.quota import DailyQuota
from harness import cli, publish, settings_dict, status_json, ts_payload, wait_until

TOPIC = "sensors/boiler/temperature"
HUMIDITY = "sensors/cellar/humidity"
LIMIT = 40


async def test_status_reports_a_running_daemon_and_forecasts_expiry(
    make_gateway_process: Callable[..., GatewayProcess],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
    tmp_path: Path,
) -> None:
    gateway = make_gateway_process(cloud={"daily_points_limit": LIMIT})
    gateway.start()
    await asyncio.to_thread(gateway.wait_for_event, "mqtt_connected")
    now_ms = int(time.time() * 1000)
    # Fresh readings first: device 101 spends its whole day's quota on them.
    fresh = [(TOPIC, ts_payload(float(i), now_ms - 60_000 + i)) for i in range(LIMIT + 25)]
    assert await publish(publisher, fresh) == len(fresh)
    await asyncio.to_thread(gateway.wait_for_event, "quota_exhausted")
    await wait_until(lambda: sandbox.accepted_count(101) == LIMIT, message="a day's quota")
    # Then readings only minutes younger than the age limit: held back by the quota, they
    # will be too old before the next quota day begins.
    cloud = CloudSettings(client_id="x", client_secret="x")  # the defaults the daemon uses
    reset_ms = DailyQuota(LIMIT).next_reset_ms(now_ms)
    margin_ms = min(15 * 60_000, (reset_ms - now_ms) // 2)
    doomed_ts = cloud.oldest_sendable_ms(now_ms) + margin_ms
    doomed = [(TOPIC, ts_payload(100.0 + i, doomed_ts + i)) for i in range(10)]
    humid = [(HUMIDITY, ts_payload(50.0 + i, now_ms - 1000 + i)) for i in range(5)]
    assert await publish(publisher, doomed + humid) == 15
    await wait_until(lambda: sandbox.accepted_count(102) == 5, message="device 102's readings")

    report = await status_json(gateway.config_path)

    assert report["daemon"]["running"] is True
    assert report["daemon"]["pid"] == gateway.pid
    assert report["cloud"]["online"] is True
    assert report["cloud"]["last_upload_ok"] is not None
    assert report["cloud"]["uploads"]["ok"] >= 2
    # The request budget's use: every upload attempt and the token request, this minute.
    uploads = sum(report["cloud"]["uploads"].values())
    assert report["cloud"]["requests_last_minute"] == uploads + 1
    assert report["cloud"]["requests_per_minute_limit"] == 1000
    assert report["mqtt"]["connected"] is True
    backlog = report["backlog"]
    assert backlog["readings"] == 25 + 10
    assert [(s["device_id"], s["datastream_id"], s["readings"]) for s in backlog["streams"]] == [
        (101, 5, 35)
    ]
    assert backlog["oldest_age_s"] > 29 * 86_400
    quota = {d["device_id"]: d for d in report["quota"]["devices"]}
    assert (quota[101]["used"], quota[101]["left"]) == (LIMIT, 0)
    assert quota[102]["used"] == 5
    (forecast,) = report["forecast"]["devices"]
    assert forecast == forecast | {"device_id": 101, "backlog": 35, "will_expire": 10}
    assert forecast["will_send"] == 25
    assert report["forecast"]["will_expire"] == 10
    assert report["ingest"]["readings"]["received"] == len(fresh) + 15
    assert report["dead_letters"] == {"total": 0, "by_reason": {}}
    assert report["database"]["file_bytes"] > 0
    assert "sandbox-secret" not in json.dumps(report)

    table = await asyncio.to_thread(cli, "status", "--config", str(gateway.config_path))
    assert table.returncode == 0, table.stderr
    assert "10 readings WILL EXPIRE" in table.stdout
    assert "running, pid" in table.stdout and "online since" in table.stdout
    assert f"requests {uploads + 1} in the last minute (limit 1,000/min)" in table.stdout

    # Stopped: the database still answers, and the report says the daemon is not running.
    assert await asyncio.to_thread(gateway.terminate) == 0
    assert not socket_path(tmp_path / "buffer.db", runtime_dir="").exists()
    report = await status_json(gateway.config_path)
    assert report["daemon"] == {"running": False}
    assert report["cloud"]["online"] is None
    assert report["backlog"]["readings"] == 35
    assert report["forecast"]["will_expire"] == 10
    table = await asyncio.to_thread(cli, "status", "--config", str(gateway.config_path))
    assert "NOT RUNNING" in table.stdout


async def test_dead_letters_listed_retried_with_a_fixed_datastream_and_purged(
    make_gateway_process: Callable[..., GatewayProcess],
    sandbox: SandboxCloud,
    publisher: AckedPublisher,
) -> None:
    """Text sent to a Double datastream is refused by the cloud and dead-lettered; fixed
    to the String datastream 7 by `retry --datastream-to 7` while the daemon runs, it
    arrives. A payload that never became a reading cannot be retried."""
    routes = [
        {"topic": "sensors/boiler/temperature", "device_id": 101, "datastream_id": 5},
        {"topic": "sensors/boiler/state", "device_id": 101, "datastream_id": 5},
    ]
    gateway = make_gateway_process(routes)
    gateway.start()
    await asyncio.to_thread(gateway.wait_for_event, "mqtt_connected")
    now_ms = int(time.time() * 1000)
    states = [
        ("sensors/boiler/state", ts_payload(f"state-{i}", now_ms - 5000 + i)) for i in range(3)
    ]
    garbage = [("sensors/boiler/temperature", b"\xff\xfe")]
    good = [("sensors/boiler/temperature", ts_payload(21.5, now_ms - 4000))]
    assert await publish(publisher, [*states, *garbage, *good]) == 5
    await asyncio.to_thread(gateway.wait_for_event, "points_dead_lettered")
    await wait_until(lambda: sandbox.accepted_count(101) == 1, message="the good reading")
    config = str(gateway.config_path)

    listing = await asyncio.to_thread(cli, "dead-letters", "list", "--config", config, "--json")
    assert listing.returncode == 0, listing.stderr
    letters = [json.loads(line) for line in listing.stdout.splitlines()]
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for letter in letters:
        by_reason.setdefault(letter["reason"], []).append(letter)
    assert sorted(by_reason) == ["not_utf8", "rejected"]
    assert sorted(json.loads(letter["value"]) for letter in by_reason["rejected"]) == [
        "state-0",
        "state-1",
        "state-2",
    ]
    # No verb is `list`, and the filters narrow it.
    plain = await asyncio.to_thread(
        cli, "dead-letters", "--config", config, "--reason", "not_utf8", "--newer-than", "1h"
    )
    assert plain.returncode == 0, plain.stderr
    assert "not_utf8" in plain.stdout and "rejected" not in plain.stdout
    none = await asyncio.to_thread(
        cli, "dead-letters", "list", "--config", config, "--older-than", "1h"
    )
    assert "-- 0 dead letters" in none.stdout

    raw = await asyncio.to_thread(
        cli, "dead-letters", "retry", "--config", config, "--reason", "not_utf8"
    )
    assert raw.returncode == 0, raw.stderr
    assert "requeued 0 readings" in raw.stdout
    assert "1 left as they are: raw payloads that never became a reading (not_utf8 1)" in (
        raw.stdout
    )

    retry = await asyncio.to_thread(
        cli, "dead-letters", "retry", "--config", config, "--reason", "rejected",
        "--device", "101", "--datastream-to", "7",
    )  # fmt: skip
    assert retry.returncode == 0, retry.stderr
    assert "requeued 3 readings" in retry.stdout
    # The running daemon notices rows another process committed, and sends them.
    await wait_until(
        lambda: (
            sorted(p.value for p in sandbox.accepted if p.datastream_id == 7)
            == ["state-0", "state-1", "state-2"]
        ),
        message="the retried readings in datastream 7",
    )

    refused = await asyncio.to_thread(cli, "dead-letters", "purge", "--config", config)
    assert refused.returncode == 1 and "--all" in refused.stderr
    purge = await asyncio.to_thread(
        cli, "dead-letters", "purge", "--config", config, "--reason", "not_utf8"
    )
    assert "purged 1 dead letters" in purge.stdout
    report = await status_json(gateway.config_path)
    while report["backlog"]["readings"]:  # acknowledged in the store at the end of a pass
        await asyncio.sleep(0.1)
        report = await status_json(gateway.config_path)
    assert report["dead_letters"]["total"] == 0
    assert report["cloud"]["uploads"]["rejected"] >= 1
    assert await asyncio.to_thread(gateway.terminate) == 0


# --------------------------------------------------------------------------- no report
# `--json` prints JSON whatever happens: a monitoring script parses stdout every time.
# No daemon, broker or cloud is needed: status contacts neither of the latter two.


def config_without_a_daemon(tmp_path: Path) -> Path:
    config = settings_dict(1883, "http://127.0.0.1:9", tmp_path / "state" / "buffer.db")
    return write_config(tmp_path / "gateway.toml", config)


def json_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(result.stdout)
    assert list(report) == ["generated_at", "error", *REPORT_SECTIONS]
    return report


def test_status_json_before_the_gateway_ever_ran(tmp_path: Path) -> None:
    config = config_without_a_daemon(tmp_path)
    buffer = tmp_path / "state" / "buffer.db"

    result = cli("status", "--config", str(config), "--json")

    assert result.returncode == 1, result.stderr
    report = json_of(result)
    assert report["error"]["code"] == "no_buffer"
    assert str(buffer) in report["error"]["message"]
    assert report["daemon"] == {"running": False}
    assert report["cloud"] == {"server": "http://127.0.0.1:9", "online": None}
    assert report["mqtt"] == {"broker": "127.0.0.1:1883", "connected": None}
    assert report["backlog"] is report["quota"] is report["forecast"] is None
    assert report["database"] == {"path": str(buffer), "file_bytes": None}
    assert not buffer.exists()  # asking must not create the buffer
    # The table keeps its sentence, on stderr.
    table = cli("status", "--config", str(config))
    assert (table.returncode, table.stdout) == (1, "")
    assert table.stderr == (
        f"blynk-gateway: no buffer database at {buffer} (has the gateway run yet?)\n"
    )


def test_status_json_names_a_damaged_buffer_and_a_bad_config(tmp_path: Path) -> None:
    config = config_without_a_daemon(tmp_path)
    buffer = tmp_path / "state" / "buffer.db"
    buffer.parent.mkdir()
    buffer.write_bytes(b"this is not a database" * 100)

    damaged = json_of(cli("status", "--config", str(config), "--json"))
    assert damaged["error"]["code"] == "buffer_damaged"
    assert damaged["daemon"] == {"running": False}
    assert damaged["dead_letters"] is None
    assert buffer.read_bytes() == b"this is not a database" * 100  # only the daemon salvages

    bad = settings_dict(1883, "http://127.0.0.1:9", buffer, mqtt={"port": "many"})
    write_config(config, bad)
    result = cli("status", "--config", str(config), "--json")
    assert result.returncode == 2
    report = json_of(result)
    assert report["error"]["code"] == "config_invalid"
    assert "mqtt.port" in report["error"]["message"]
    assert all(report[section] is None for section in REPORT_SECTIONS)
    missing = cli("status", "--config", str(tmp_path / "absent.toml"), "--json")
    assert missing.returncode == 2
    assert json_of(missing)["error"]["code"] == "config_invalid"


def test_status_json_when_the_buffer_belongs_to_another_user(tmp_path: Path) -> None:
    """As under the unit's DynamicUser=: the buffer's directory is not ours to read."""
    config = config_without_a_daemon(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    (state / "buffer.db").write_bytes(b"")
    command = [sys.executable, "-m", "gateway", "status", "--config", str(config)]
    if os.geteuid() == 0:  # root reads anything unless it loses the capabilities for it
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *command]
    state.chmod(0o000)
    try:
        result = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=60)
        table = subprocess.run(command, capture_output=True, text=True, timeout=60)
    finally:
        state.chmod(0o700)
    assert result.returncode == 1, result.stderr
    report = json_of(result)
    assert report["error"]["code"] == "permission_denied"
    assert "run status with sudo" in report["error"]["message"]
    assert table.returncode == 1 and "Traceback" not in table.stderr
    assert "Permission denied" in table.stderr
