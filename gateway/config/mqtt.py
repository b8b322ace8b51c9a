"""`[mqtt]`: the local broker, its session and, for a broker on another host, TLS with an
optional client certificate. The TLS files are loaded at validation time, so a wrong CA
file or a key that does not match its certificate stops `check-config` and start-up with
the key named, instead of failing every reconnect."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.config.base import Port, PositiveFloat, Section, require_order

MQTTS_PORT = 8883
TLS_FILE_KEYS = ("ca_file", "cert_file", "key_file")
# The unit's `LoadCredential=mqtt_client_key:...`: it becomes mqtt.key_file (load_settings).
MQTT_KEY_CREDENTIAL = "mqtt_client_key"


class MqttSettings(Section):
    host: str = "127.0.0.1"
    port: Port = 1883
    client_id: str = Field(default="blynk-gateway-1", min_length=1, max_length=64)
    username: str | None = None
    password: SecretStr | None = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 60
    # How many unacknowledged QoS 1 messages the broker sends us at once. MQTT 3.1.1 has no
    # way to ask: it is the broker's `max_inflight_messages` (Mosquitto: 20). With MQTT 5 the
    # gateway announces it as Receive Maximum.
    inflight_window: Annotated[int, Field(ge=1, le=65535)] = 20
    # MQTT 5 only: how long the broker keeps our session (and queues for us) while we are away.
    session_expiry_s: Annotated[int, Field(ge=0, le=4294967295)] = 7 * 24 * 3600
    reconnect_min_s: PositiveFloat = 0.5
    reconnect_max_s: PositiveFloat = 30.0
    max_payload_bytes: Annotated[int, Field(ge=16, le=1_048_576)] = 16_384
    # MQTT over TLS (mqtts; `port` then defaults to 8883). The broker's certificate must be
    # signed by a CA in ca_file (absent: the system's CA store) and name `host`; there is no
    # switch to skip either check, and a failed handshake is never retried in plain text.
    tls: bool = False
    ca_file: Path | None = None
    # A client certificate and its (unencrypted) key, for a broker that requires one. Under
    # systemd the key comes from `LoadCredential=mqtt_client_key:...` (see load_settings).
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _tls_port(cls, data: Any) -> Any:
        """`tls = true` without a port means mqtts' port, 8883, as mosquitto_sub does."""
        if isinstance(data, dict) and "port" not in data and _is_true(data.get("tls")):
            return {**data, "port": MQTTS_PORT}
        return data

    @field_validator("ca_file", "cert_file")
    @classmethod
    def _certificate_file(cls, path: Path | None) -> Path | None:
        if path is not None:
            _check_readable(path)
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(_certificate_problem(exc)) from exc
        return path

    @field_validator("key_file")
    @classmethod
    def _key_file(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if path is not None:
            _check_readable(path)
            cert_file = info.data.get("cert_file")
            if cert_file is not None:  # else: named by _tls_files (or cert_file's own error)
                try:
                    _load_client_certificate(
                        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert_file, path
                    )
                except TlsSetupError as exc:
                    raise ValueError(exc.problem) from exc
        return path

    @model_validator(mode="after")
    def _backoff_order(self) -> MqttSettings:
        require_order(self, "reconnect_min_s", "reconnect_max_s")
        return self

    @model_validator(mode="after")
    def _tls_files(self) -> MqttSettings:
        files = [name for name in TLS_FILE_KEYS if getattr(self, name) is not None]
        if files and not self.tls:
            source = (
                f" (key_file may come from the credential {MQTT_KEY_CREDENTIAL})"
                if "key_file" in files
                else ""
            )
            raise ValueError(
                f"{' and '.join(files)} {'needs' if len(files) == 1 else 'need'} tls = true "
                f"(without it the broker is reached in plain text and the files are unused)"
                f"{source}"
            )
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = (
                ("cert_file", "key_file") if self.key_file is None else ("key_file", "cert_file")
            )
            raise ValueError(f"{given} needs {missing}: a client certificate and its key")
        return self

    def tls_context(self) -> ssl.SSLContext:
        """A client context for this broker, from the files as they are now.

        Verification is always on (CERT_REQUIRED, the host name checked, TLS >= 1.2). A
        problem with a file is a `TlsSetupError` naming its key. The daemon builds the
        context again for every connection attempt, so renewed files count from the next
        reconnect (under systemd: the credential is copied once, at service start).
        """
        cafile = os.fspath(self.ca_file) if self.ca_file is not None else None
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (ssl.SSLError, OSError) as exc:
            raise TlsSetupError("ca_file", _certificate_problem(exc)) from exc
        if self.cert_file is not None and self.key_file is not None:
            _load_client_certificate(context, self.cert_file, self.key_file)
        return context


_BOOL = TypeAdapter(bool)


class TlsSetupError(ValueError):
    """A TLS file of `[mqtt]` that cannot be used (`key`: which one)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class _PassphraseNeeded(Exception):
    pass


def _no_passphrase() -> str:
    """OpenSSL would prompt on the terminal for an encrypted key; a daemon cannot answer."""
    raise _PassphraseNeeded


def _load_client_certificate(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    try:  # the certificate alone first, so that an error names the right key
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert_file)
    except (ssl.SSLError, OSError) as exc:
        raise TlsSetupError("cert_file", _certificate_problem(exc)) from exc
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except _PassphraseNeeded as exc:
        raise TlsSetupError(
            "key_file",
            "the key is encrypted with a passphrase, which the gateway cannot ask for: store "
            "it unencrypted (openssl pkey -in KEY -out NEW) and protect the file instead "
            "(mode 600, LoadCredential=)",
        ) from exc
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problem = f"not the key of cert_file {cert_file}"
        else:
            problem = "no PEM private key in the file" + (f" ({exc.reason})" if exc.reason else "")
        raise TlsSetupError("key_file", problem) from exc
    except OSError as exc:
        raise TlsSetupError("key_file", f"not readable ({exc.strerror or exc})") from exc


def _certificate_problem(exc: ssl.SSLError | OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
            return "no PEM certificate in the file"
        return f"not a usable PEM certificate ({exc.reason or exc})"
    return f"not readable ({exc.strerror or exc})"


def _check_readable(path: Path) -> None:
    """Exists, is a file, and this process may read it (what `open` says, also as root)."""
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except FileNotFoundError as exc:
        raise ValueError("no such file") from exc
    except IsADirectoryError as exc:
        raise ValueError("is a directory, not a file") from exc
    except OSError as exc:
        raise ValueError(f"not readable ({exc.strerror or exc})") from exc


def _is_true(value: Any) -> bool:
    """`value` as pydantic will read it into a bool field is True (TOML true, env "1")."""
    if value is None:
        return False
    try:
        return _BOOL.validate_python(value) is True
    except ValidationError:
        return False
