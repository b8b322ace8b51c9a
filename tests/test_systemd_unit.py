"""The shipped unit file: what the daemon relies on is in it, systemd accepts it, and its
hardening scores <= 2.0 on `systemd-analyze security` (8.4 EXPOSED before issue 10)."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import CLIENT_SECRET_CREDENTIAL, FlushSettings, StoreSettings
from gateway.ingest.ingest import MqttIngest
from gateway.ops import metrics, status_socket

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "blynk-gateway.service"
MAX_EXPOSURE = 2.0
# MqttIngest.stop(): commit and acknowledge what is held, at most this long by default.
INGEST_STOP_S = 10.0
# Descriptors besides the listeners' clients: the buffer (file, WAL, SHM, reserve), the
# broker, the cloud's pool, netlink, sd_notify, epoll and the loop's pipes, with room.
OTHER_DESCRIPTORS = 64
FD_SETSIZE = 1024

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package 'systemd'; scripts/bootstrap.sh "
    "installs it)",
)


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in order; a key may repeat, as systemd allows."""
    section = ""
    found = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def service(key: str) -> list[str]:
    return [v for s, k, v in directives(UNIT.read_text()) if s == "Service" and k == key]


def one(key: str) -> str:
    (value,) = service(key)
    return value


def seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def test_unit_has_what_the_daemon_relies_on() -> None:
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert seconds(one("WatchdogSec")) == 30
    assert one("Restart") == "on-failure"
    assert one("DynamicUser") == "yes"
    # The default store.path lives in the state directory.
    assert one("StateDirectory") == "blynk-gateway"
    assert StoreSettings().path.parent == Path("/var/lib/blynk-gateway")
    assert one("ConfigurationDirectory") == "blynk-gateway"
    assert one("RuntimeDirectory") == "blynk-gateway"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("ExecStart").endswith("run --config %E/blynk-gateway/config.toml")
    name, _, source = one("LoadCredential").partition(":")
    assert name == CLIENT_SECRET_CREDENTIAL
    assert source == "/etc/blynk-gateway/client_secret"
    # Shutdown: ingest's commit of what it holds, then the bounded final flush, must both
    # end before systemd's SIGKILL.
    assert seconds(one("TimeoutStopSec")) > INGEST_STOP_S + FlushSettings().shutdown_flush_s
    assert inspect.signature(MqttIngest.stop).parameters["timeout_s"].default == INGEST_STOP_S


def test_unit_limits_descriptors_with_room_for_full_listeners() -> None:
    """An explicit LimitNOFILE= (soft = hard): the listeners' caps and everything else fit
    twice over, and no descriptor can reach FD_SETSIZE. tests/test_listeners.py runs the
    daemon under this limit against 1,100 slow clients."""
    value = one("LimitNOFILE")
    assert value.isdigit(), f"one number, soft and hard alike: {value!r}"
    needed = metrics.MAX_CONNECTIONS + status_socket.MAX_CONNECTIONS + OTHER_DESCRIPTORS
    assert 2 * needed <= int(value) <= FD_SETSIZE


def test_unit_allows_the_socket_families_the_daemon_uses() -> None:
    families = set(one("RestrictAddressFamilies").split())
    # MQTT and HTTPS; sd_notify; the network watcher (rtnetlink).
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}


@needs_analyze
def test_security_exposure_is_at_most_2() -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


@needs_analyze
def test_verify_is_clean(tmp_path: Path) -> None:
    """`systemd-analyze verify` checks that ExecStart's binary exists: point it at this
    venv's entry point (the installed path is /usr/local/bin), change nothing else."""
    entry_point = Path(sys.executable).parent / "blynk-gateway"
    assert entry_point.exists(), entry_point
    text = UNIT.read_text()
    assert text.count("ExecStart=/usr/local/bin/blynk-gateway ") == 1
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("/usr/local/bin/blynk-gateway", str(entry_point)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
