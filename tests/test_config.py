"""Settings validation: the TOML file, environment overrides, operator-facing errors, the CLI."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel

from gateway.cli import main
from gateway.clock import ClockSettings
from gateway.config import (
    CloudSettings,
    FlushSettings,
    LogSettings,
    MqttSettings,
    Settings,
    StoreSettings,
    load_settings,
)
from gateway.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "config.example.toml"

SECRET = "very-s3cret-client-value"

MINIMAL = f"""
[cloud]
server = "http://127.0.0.1:8080"
client_id = "gw-client"
client_secret = "{SECRET}"

[[routes]]
topic = "sensors/boiler/temperature"
device_id = 101
datastream_id = 5
"""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator's BLYNK_GATEWAY_* variables must not change what these tests see."""
    for name in list(os.environ):
        if name.upper().startswith("BLYNK_GATEWAY_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


# --------------------------------------------------------------------------- the example file
def test_example_config_loads() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.cloud.server == "https://fra1.blynk.cloud"
    assert settings.cloud.client_id == "oauth-client-id"
    assert settings.mqtt.port == 1883
    assert [r.topic for r in settings.routes] == [
        "zigbee2mqtt/{device}",
        "tele/{device}/SENSOR",
        "stat/{device}/POWER",
        "{device}/sensor/{stream}/state",
        "shellies/shelly1-AB12CD/relay/0/power",
        "+/events/rpc",
        "senml/{device}",
        "home/OpenMQTTGateway/BTtoMQTT/+",
        "greenhouse/esp32-1/data",
        "custom/{device}/batch",
        "sensors/boiler/temperature",
    ]
    assert settings.devices["0x00158d0001a2b3c4"] == 102


def test_example_config_passes_check_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert "OK (11 routes" in out
    assert "127.0.0.1:1883" in out
    assert err == ""
    # check-config prints a summary, never the secret from the file.
    assert "oauth-client-secret" not in out


@pytest.mark.parametrize(
    ("section", "model"),
    [
        ("mqtt", MqttSettings),
        ("cloud", CloudSettings),
        ("store", StoreSettings),
        ("flush", FlushSettings),
        ("log", LogSettings),
        ("clock", ClockSettings),
    ],
)
def test_example_config_documents_every_key(section: str, model: type[BaseModel]) -> None:
    """README: "config.example.toml documents every key" (possibly commented out)."""
    text = EXAMPLE.read_text(encoding="utf-8")
    body = re.search(rf"^\[{section}\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    assert body is not None, f"no [{section}] table in the example"
    documented = set(re.findall(r"^#?\s*([a-z_0-9]+)\s*=", body.group(1), re.M))
    assert set(model.model_fields) - documented == set()


# --------------------------------------------------------------------------- environment
def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, MINIMAL + '\n[mqtt]\nhost = "10.0.0.5"\nport = 1883\n')
    monkeypatch.setenv("BLYNK_GATEWAY_CLOUD__CLIENT_SECRET", "from-the-environment")
    monkeypatch.setenv("BLYNK_GATEWAY_MQTT__PORT", "18830")
    settings = load_settings(path)
    assert settings.cloud.client_secret.get_secret_value() == "from-the-environment"
    assert settings.mqtt.port == 18830
    # Overriding one key keeps the other keys of the same section from the file.
    assert settings.mqtt.host == "10.0.0.5"
    assert settings.cloud.client_id == "gw-client"
    assert settings.cloud.server == "http://127.0.0.1:8080"


def test_secret_only_in_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recommended deployment: no secret in the file at all."""
    path = write(tmp_path, MINIMAL.replace(f'client_secret = "{SECRET}"', ""))
    monkeypatch.setenv("BLYNK_GATEWAY_CLOUD__CLIENT_SECRET", "env-only-secret")
    settings = load_settings(path)
    assert settings.cloud.client_secret.get_secret_value() == "env-only-secret"
    assert settings.secret_values() == ["env-only-secret"]


def test_bad_environment_value_names_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, MINIMAL)
    monkeypatch.setenv("BLYNK_GATEWAY_MQTT__PORT", "not-a-port")
    message = config_error(path)
    assert "mqtt.port" in message
    assert "'not-a-port'" in message


def test_unparsable_environment_section_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A whole-section variable must be JSON; garbage must be exit 2 with a message, no crash."""
    path = write(tmp_path, MINIMAL)
    monkeypatch.setenv("BLYNK_GATEWAY_MQTT", "{not json")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "mqtt" in str(info.value).lower()
    assert main(["check-config", "--config", str(path)]) == 2
    assert "mqtt" in capsys.readouterr().err.lower()


# --------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize(
    ("extra", "dotted"),
    [
        ("bogus = 1\n", "bogus"),
        ("[mqtt]\ncomit_interval = 3\n", "mqtt.comit_interval"),
        ("[store]\ncomit_interval_ms = 5\n", "store.comit_interval_ms"),
    ],
)
def test_unknown_key_is_named(tmp_path: Path, extra: str, dotted: str) -> None:
    # A top-level key must come before the first table to stay top-level in TOML.
    text = extra + MINIMAL if not extra.startswith("[") else MINIMAL + "\n" + extra
    message = config_error(write(tmp_path, text))
    assert re.search(rf"^{re.escape(dotted)}: unknown key", message, re.M), message


def test_unknown_key_in_a_route_is_named(tmp_path: Path) -> None:
    text = MINIMAL.replace('topic = "sensors/boiler/temperature"', 'topics = "sensors/#"')
    message = config_error(write(tmp_path, text))
    assert "routes[0].topics: unknown key" in message
    # ...and the real key it replaced is reported missing.
    assert "routes[0].topic: required key is missing" in message


def test_error_in_second_route_is_indexed(tmp_path: Path) -> None:
    text = MINIMAL + '\n[[routes]]\ntopic = "x/y"\ndevice_id = 1\ndatastream_idd = 2\n'
    message = config_error(write(tmp_path, text))
    assert "routes[1].datastream_idd: unknown key" in message
    # With the typo fixed by removal, the route's missing datastream is named instead.
    text = MINIMAL + '\n[[routes]]\ntopic = "x/y"\ndevice_id = 1\n'
    message = config_error(write(tmp_path, text))
    assert "routes[1]: " in message and "exactly one datastream source" in message
    assert "routes[0]" not in message


# --------------------------------------------------------------------------- wrong types
@pytest.mark.parametrize(
    ("extra", "key", "shown"),
    [
        ('[mqtt]\nport = "abc"\n', "mqtt.port", "'abc'"),
        ('[store]\nsynchronous = "FAST"\n', "store.synchronous", "'FAST'"),
        ('[flush]\nbatch_size = "lots"\n', "flush.batch_size", "'lots'"),
        ('[log]\nlevel = "verbose"\n', "log.level", "'verbose'"),
    ],
)
def test_wrong_type_names_key_and_value(tmp_path: Path, extra: str, key: str, shown: str) -> None:
    message = config_error(write(tmp_path, MINIMAL + "\n" + extra))
    line = next((ln for ln in message.splitlines() if ln.startswith(f"{key}:")), None)
    assert line is not None, message
    assert shown in line


def test_wrong_type_in_route(tmp_path: Path) -> None:
    text = MINIMAL.replace("device_id = 101", 'device_id = "boiler"')
    message = config_error(write(tmp_path, text))
    assert re.search(r"^routes\[0\]\.device_id: .*'boiler'", message, re.M), message


def test_message_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '\n[mqtt]\nport = "abc"\n')
    assert str(path) in config_error(path)


# --------------------------------------------------------------------------- missing keys
def test_missing_client_id(tmp_path: Path) -> None:
    text = MINIMAL.replace('client_id = "gw-client"', "")
    message = config_error(write(tmp_path, text))
    assert "cloud.client_id: required key is missing" in message


def test_missing_routes(tmp_path: Path) -> None:
    text = MINIMAL.split("[[routes]]")[0]
    message = config_error(write(tmp_path, text))
    assert "routes: required key is missing" in message


def test_missing_cloud_section(tmp_path: Path) -> None:
    text = '[[routes]]\ntopic = "a"\ndevice_id = 1\ndatastream_id = 1\n'
    message = config_error(write(tmp_path, text))
    assert "cloud: required key is missing" in message


def test_empty_routes_list(tmp_path: Path) -> None:
    # `routes = []` after [cloud] would belong to that table: put it at the top level.
    text = "routes = []\n" + MINIMAL.split("[[routes]]")[0]
    message = config_error(write(tmp_path, text))
    assert re.search(r"^routes: .*at least 1", message, re.M), message


# --------------------------------------------------------------------------- value checks
@pytest.mark.parametrize("topic", ["a/#/b", "a+/b", "a/b#", "#/x", "sensors/+x"])
def test_invalid_topic_filter(tmp_path: Path, topic: str) -> None:
    text = MINIMAL.replace('"sensors/boiler/temperature"', f'"{topic}"')
    message = config_error(write(tmp_path, text))
    assert re.search(r"^routes\[0\]\.topic: ", message, re.M), message
    assert repr(topic) in message


@pytest.mark.parametrize("topic", ["#", "+", "a/+/c", "a/#", "+/+/#", "$SYS/broker/#"])
def test_valid_topic_filters(tmp_path: Path, topic: str) -> None:
    text = MINIMAL.replace('"sensors/boiler/temperature"', f'"{topic}"')
    assert load_settings(write(tmp_path, text)).routes[0].topic == topic


@pytest.mark.parametrize("port", [0, 65536, -1, 70000])
def test_port_out_of_range(tmp_path: Path, port: int) -> None:
    message = config_error(write(tmp_path, MINIMAL + f"\n[mqtt]\nport = {port}\n"))
    assert re.search(rf"^mqtt\.port: .*\(got {port}\)$", message, re.M), message


@pytest.mark.parametrize("port", [1, 65535])
def test_port_bounds_accepted(tmp_path: Path, port: int) -> None:
    assert load_settings(write(tmp_path, MINIMAL + f"\n[mqtt]\nport = {port}\n")).mqtt.port == port


def test_bad_timezone(tmp_path: Path) -> None:
    text = MINIMAL.replace("[cloud]", '[cloud]\nday_timezone = "Mars/Olympus_Mons"')
    message = config_error(write(tmp_path, text))
    assert "cloud.day_timezone" in message
    assert "Mars/Olympus_Mons" in message


def test_good_timezone(tmp_path: Path) -> None:
    text = MINIMAL.replace("[cloud]", '[cloud]\nday_timezone = "Europe/Riga"')
    assert load_settings(write(tmp_path, text)).cloud.day_timezone == "Europe/Riga"


@pytest.mark.parametrize("server", ["ftp://fra1.blynk.cloud", "fra1.blynk.cloud", "https://"])
def test_bad_server_url(tmp_path: Path, server: str) -> None:
    text = MINIMAL.replace('"http://127.0.0.1:8080"', f'"{server}"')
    message = config_error(write(tmp_path, text))
    assert re.search(r"^cloud\.server: ", message, re.M), message
    assert repr(server) in message


def test_server_trailing_slash_is_dropped(tmp_path: Path) -> None:
    text = MINIMAL.replace('"http://127.0.0.1:8080"', '"https://lon1.blynk.cloud/"')
    assert load_settings(write(tmp_path, text)).cloud.server == "https://lon1.blynk.cloud"


def test_backoff_order_checked(tmp_path: Path) -> None:
    text = MINIMAL + "\n[flush]\nbackoff_min_s = 10.0\nbackoff_max_s = 1.0\n"
    message = config_error(write(tmp_path, text))
    assert "backoff_max_s (1.0) must be >= backoff_min_s (10.0)" in message


def test_commit_max_readings_derived_from_inflight_window(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL + "\n[mqtt]\ninflight_window = 100\n"))
    assert settings.commit_max_readings() == 80
    explicit = write(tmp_path, MINIMAL + "\n[store]\ncommit_max_readings = 7\n", "b.toml")
    assert load_settings(explicit).commit_max_readings() == 7


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL))
    assert isinstance(settings, Settings)
    with pytest.raises(ValueError, match="frozen"):
        settings.mqtt.port = 1


# --------------------------------------------------------------------------- secrets
@pytest.mark.parametrize("bad", ["12345", '["' + SECRET + '", 1]', '{ value = "' + SECRET + '" }'])
def test_secret_of_wrong_type_is_masked(tmp_path: Path, bad: str) -> None:
    text = MINIMAL.replace(f'client_secret = "{SECRET}"', f"client_secret = {bad}")
    message = config_error(write(tmp_path, text))
    line = next(ln for ln in message.splitlines() if ln.startswith("cloud.client_secret"))
    assert "(got ***)" in line
    assert "12345" not in message
    assert SECRET not in message


def test_secret_not_echoed_when_other_cloud_keys_are_wrong(tmp_path: Path) -> None:
    text = MINIMAL.replace("[cloud]", '[cloud]\ntimeout_s = "slow"\nday_timezone = "Nowhere/X"')
    message = config_error(write(tmp_path, text))
    assert "cloud.timeout_s" in message
    assert "cloud.day_timezone" in message
    assert SECRET not in message


def test_mqtt_password_not_echoed_by_a_section_level_error(tmp_path: Path) -> None:
    """A model-level check (reconnect order) reports the whole [mqtt] table as its input.

    That table holds the broker password, which must not appear in the message.
    """
    text = MINIMAL + (
        '\n[mqtt]\nusername = "gw"\npassword = "mqtt-pa55word"\n'
        "reconnect_min_s = 10.0\nreconnect_max_s = 1.0\n"
    )
    message = config_error(write(tmp_path, text))
    assert "reconnect_max_s (1.0) must be >= reconnect_min_s (10.0)" in message
    assert "mqtt-pa55word" not in message


def test_secret_values_for_the_log_scrubber(tmp_path: Path) -> None:
    text = MINIMAL + '\n[mqtt]\nusername = "gw"\npassword = "mqtt-pa55word"\n'
    settings = load_settings(write(tmp_path, text))
    assert settings.secret_values() == [SECRET, "mqtt-pa55word"]
    assert SECRET not in repr(settings)
    assert "mqtt-pa55word" not in repr(settings)


# --------------------------------------------------------------------------- check-config
def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, MINIMAL)
    assert main(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"{path}: OK (1 routes" in out
    assert "cloud http://127.0.0.1:8080" in out
    assert SECRET not in out + err


CATCH_ALL_ROUTE = """
[cloud]
server = "http://127.0.0.1:8080"
client_id = "gw-client"
client_secret = "s"

[[routes]]
topic = "sensors/boiler/temperature"
device_id = 101
datastream_id = 5

[[routes]]
topic = "{topic}"
device_id = 102
datastream_id = 6
"""


@pytest.mark.parametrize("topic", ["#", "+/#", "+/+/#"])
def test_check_config_warns_about_a_route_on_every_topic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], topic: str
) -> None:
    path = write(tmp_path, CATCH_ALL_ROUTE.replace("{topic}", topic))
    assert main(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert f"{path}: OK (2 routes" in out
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"blynk-gateway: warning: route {topic!r} subscribes to every")
    assert "other application's messages and retained values" in lines[0]
    assert '"sensors/#"' in lines[0]  # a narrower topic is suggested


def test_check_config_warns_about_a_device_level_over_every_topic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`{device}/#` subscribes to `+/#`: every topic, each first level taken as a name."""
    text = CATCH_ALL_ROUTE.replace("device_id = 102\n", "").replace("{topic}", "{device}/#")
    path = write(tmp_path, text)
    assert main(["check-config", "--config", str(path)]) == 0
    assert "route '{device}/#' subscribes to every topic" in capsys.readouterr().err


@pytest.mark.parametrize("topic", ["sensors/#", "+/events/rpc", "+/+", "home/+/#"])
def test_check_config_is_silent_about_narrower_wildcards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], topic: str
) -> None:
    path = write(tmp_path, CATCH_ALL_ROUTE.replace("{topic}", topic))
    assert main(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "OK (2 routes" in out
    assert err == ""


def test_check_config_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = MINIMAL.replace(f'client_secret = "{SECRET}"', "client_secret = 12345")
    path = write(tmp_path, text + "\n[mqtt]\nport = 99999\n")
    assert main(["check-config", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "configuration error" in err
    assert "mqtt.port" in err
    assert "99999" in err
    assert "cloud.client_secret" in err
    assert "12345" not in err
    assert "Traceback" not in err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope" / "config.toml"
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not found" in err
    assert str(path) in err


def test_check_config_invalid_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[cloud\nclient_id = "x"\n')
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not valid TOML" in err
    assert str(path) in err
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path)


def test_check_config_on_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--config /etc/blynk-gateway/` (a directory) is an operator mistake: exit 2, no traceback."""
    assert main(["check-config", "--config", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err


def test_check_config_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """TOML must be UTF-8; a Latin-1 file is a configuration error naming the file."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(MINIMAL.replace("gw-client", "gw-cli\xe9nt").encode("latin-1"))
    assert main(["check-config", "--config", str(path)]) == 2
    assert str(path) in capsys.readouterr().err
