"""`[mqtt]` TLS settings: checked at load (and by check-config) with the key named, the
client key from systemd's LoadCredential=, mqtts' default port."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import MQTT_KEY_CREDENTIAL, load_settings
from gateway.errors import ConfigError
from gateway.testing.certs import TlsPki

CONFIG = """
[cloud]
server = "http://127.0.0.1:8080"
client_id = "gw-client"
client_secret = "s3cret"

[[routes]]
topic = "sensors/boiler/temperature"
device_id = 101
datastream_id = 5

[mqtt]
host = "broker.example"
"""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("BLYNK_GATEWAY_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def config(tmp_path: Path, mqtt_lines: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(CONFIG) + textwrap.dedent(mqtt_lines), encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


def test_tls_takes_mqtts_port_unless_one_is_given(
    tmp_path: Path, tls_pki: TlsPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(config(tmp_path, f'tls = true\nca_file = "{tls_pki.ca.cert}"\n'))
    assert settings.mqtt.tls and settings.mqtt.port == 8883
    assert settings.mqtt.ca_file == tls_pki.ca.cert
    assert load_settings(config(tmp_path, "tls = true\nport = 18883\n")).mqtt.port == 18883
    assert load_settings(config(tmp_path, "")).mqtt.port == 1883
    monkeypatch.setenv("BLYNK_GATEWAY_MQTT__TLS", "true")
    assert load_settings(config(tmp_path, "")).mqtt.port == 8883


def test_every_tls_file_problem_names_its_key(tmp_path: Path, tls_pki: TlsPki) -> None:
    ca, client, server = tls_pki.ca, tls_pki.client, tls_pki.server
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(client.key), "-aes256", "-passout", "pass:x",
         "-out", str(encrypted)],
        check=True,
    )  # fmt: skip
    cases = {
        f'tls = true\nca_file = "{tmp_path}/missing.pem"\n': (
            "mqtt.ca_file: Value error, no such file"
        ),
        f'tls = true\nca_file = "{tmp_path}"\n': "mqtt.ca_file: Value error, is a directory",
        f'tls = true\nca_file = "{ca.key}"\n': (
            "mqtt.ca_file: Value error, no PEM certificate in the file"
        ),
        f'tls = true\ncert_file = "{client.key}"\nkey_file = "{client.key}"\n': (
            "mqtt.cert_file: Value error, no PEM certificate in the file"
        ),
        f'tls = true\ncert_file = "{client.cert}"\nkey_file = "{client.cert}"\n': (
            "mqtt.key_file: Value error, no PEM private key in the file"
        ),
        f'tls = true\ncert_file = "{client.cert}"\nkey_file = "{server.key}"\n': (
            f"mqtt.key_file: Value error, not the key of cert_file {client.cert}"
        ),
        f'tls = true\ncert_file = "{client.cert}"\nkey_file = "{encrypted}"\n': (
            "mqtt.key_file: Value error, the key is encrypted with a passphrase"
        ),
        f'tls = true\ncert_file = "{client.cert}"\n': (
            "mqtt: Value error, cert_file needs key_file"
        ),
        f'tls = true\nkey_file = "{client.key}"\n': "mqtt: Value error, key_file needs cert_file",
        f'ca_file = "{ca.cert}"\n': "mqtt: Value error, ca_file needs tls = true",
        f'cert_file = "{client.cert}"\nkey_file = "{client.key}"\n': (
            "mqtt: Value error, cert_file and key_file need tls = true"
        ),
    }
    for lines, expected in cases.items():
        assert expected in config_error(config(tmp_path, lines)), lines


def test_check_config_validates_the_tls_files(
    tmp_path: Path, tls_pki: TlsPki, capsys: pytest.CaptureFixture[str]
) -> None:
    client = tls_pki.client
    good = f'tls = true\ncert_file = "{client.cert}"\nkey_file = "{client.key}"\n'
    assert main(["check-config", "--config", str(config(tmp_path, good))]) == 0
    out = capsys.readouterr().out
    assert "broker broker.example:8883 over TLS with a client certificate" in out

    wrong = f'tls = true\ncert_file = "{client.cert}"\nkey_file = "{tls_pki.server.key}"\n'
    assert main(["check-config", "--config", str(config(tmp_path, wrong))]) == 2
    err = capsys.readouterr().err
    assert "mqtt.key_file" in err and "not the key of cert_file" in err


def test_the_client_key_comes_from_the_systemd_credential(
    tmp_path: Path, tls_pki: TlsPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like the client secret: the unit's `LoadCredential=mqtt_client_key:...` copy replaces
    key_file (the service user cannot read the root-only original); the environment
    still beats both."""
    client = tls_pki.client
    root_only = tmp_path / "client.key"  # what the config names; here: not even there
    path = config(tmp_path, f'tls = true\ncert_file = "{client.cert}"\nkey_file = "{root_only}"\n')
    assert "mqtt.key_file: Value error, no such file" in config_error(path)

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    shutil.copyfile(client.key, credentials / MQTT_KEY_CREDENTIAL)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    assert load_settings(path).mqtt.key_file == credentials / MQTT_KEY_CREDENTIAL

    monkeypatch.setenv("BLYNK_GATEWAY_MQTT__KEY_FILE", str(client.key))
    assert load_settings(path).mqtt.key_file == client.key


def test_a_wrong_key_credential_is_named(
    tmp_path: Path, tls_pki: TlsPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    shutil.copyfile(tls_pki.server.key, credentials / MQTT_KEY_CREDENTIAL)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    path = config(tmp_path, f'tls = true\ncert_file = "{tls_pki.client.cert}"\n')
    assert "mqtt.key_file: Value error, not the key of cert_file" in config_error(path)
    # Without tls the credential has nothing to do: an error, not silently unused.
    assert "key_file needs tls = true" in config_error(config(tmp_path, ""))
