"""MQTT over TLS: why a connection attempt failed, in words an operator can act on.

The checks are OpenSSL's, configured by `MqttSettings.tls_context` (verification always
on); this module only names what they found, for the `mqtt_tls_failed` log line: a
`reason` (what happened, OpenSSL's own words where it has some) and a `hint` (what to
check). A TLS failure is never answered by trying plain text: the attempt fails, and the
connection loop retries TLS after its usual backoff.

Where a failure surfaces decides what it means. During the handshake the broker's
certificate is checked (wrong CA, expired, another host's name). With TLS 1.3 the
broker checks *our* certificate after our side of the handshake has finished, and a
broker that refuses it (Mosquitto) just closes the connection: the first read before
CONNACK then fails, which only `ChunkedClient` records (see `tls_failure`).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from gateway.config import TlsSetupError

# OpenSSL's X509_V_ERR_* codes (ssl.SSLCertVerificationError.verify_code) that mean
# "no CA we trust signed the broker's certificate".
_UNTRUSTED = {2, 18, 19, 20, 21, 27}
_NOT_YET_VALID, _EXPIRED = 9, 10
_NAME_MISMATCH = {62, 64}  # host name, IP address
_UNTRUSTED_HINT = (
    "the broker's certificate is not signed by a CA in mqtt.ca_file (or, without ca_file, "
    "in the system's CA store)"
)
# OpenSSL reasons (ssl.SSLError.reason) of alerts the broker sends about our certificate.
_ALERT_HINTS = (
    ("CERTIFICATE_REQUIRED", "the broker requires a client certificate: set mqtt.cert_file"),
    ("UNKNOWN_CA", "the broker does not trust the CA that signed mqtt.cert_file"),
    ("CERTIFICATE_EXPIRED", "the broker says mqtt.cert_file has expired"),
    ("CERTIFICATE_REVOKED", "the broker says mqtt.cert_file is revoked"),
    ("BAD_CERTIFICATE", "the broker refused mqtt.cert_file"),
    ("CERTIFICATE_UNKNOWN", "the broker refused mqtt.cert_file"),
    (
        "HANDSHAKE_FAILURE",
        "the broker refused the handshake: does it require a client "
        "certificate (mqtt.cert_file) or other TLS settings? Its log says why",
    ),
    ("PROTOCOL_VERSION", "no TLS version in common: the gateway needs TLS 1.2 or newer"),
    ("UNSUPPORTED_PROTOCOL", "no TLS version in common: the gateway needs TLS 1.2 or newer"),
)


@dataclass(frozen=True)
class TlsFailure:
    """What the log says about a failed TLS connection attempt.

    `reason` is what repeats count against (see the connect loop): `detail` may differ
    between attempts that fail for the same reason (whether the broker's alert or its
    close arrives first is a race), and must not make a line per attempt.
    """

    reason: str
    hint: str
    detail: str = ""


_REFUSED_AFTER_HANDSHAKE = "the broker ended the TLS connection before CONNACK"
_REFUSED_HINT = (
    "does the broker require a client certificate (mqtt.cert_file, key_file), or refuse "
    "the one sent (unknown CA, expired)? Its log says which"
)


def explain(error: BaseException, *, during_handshake: bool, port: int) -> TlsFailure | None:
    """The reason and hint for `error`, or None if it is not about TLS.

    `during_handshake`: the error ended the handshake (else: the first reads after it,
    where TLS 1.3 tells us that the broker refused our certificate).
    """
    not_tls_port = (
        f"is port {port} the broker's TLS listener? (MQTT over TLS usually listens on "
        "8883, plain MQTT on 1883)"
    )
    if isinstance(error, TlsSetupError):
        return TlsFailure(str(error), "fix the file; `blynk-gateway check-config` says the same")
    if isinstance(error, ssl.SSLCertVerificationError):
        return TlsFailure(
            f"certificate verify failed: {error.verify_message}", _verify_hint(error.verify_code)
        )
    if isinstance(error, ssl.SSLError):
        return _explain_ssl_error(error, during_handshake=during_handshake, port_hint=not_tls_port)
    if during_handshake and isinstance(error, OSError):
        if isinstance(error, TimeoutError):
            return TlsFailure("no answer to the TLS handshake in time", not_tls_port)
        if isinstance(error, ConnectionResetError):
            return TlsFailure("connection reset during the TLS handshake", not_tls_port)
        return TlsFailure(f"{type(error).__name__} during the TLS handshake: {error}", not_tls_port)
    return None


def _explain_ssl_error(
    error: ssl.SSLError, *, during_handshake: bool, port_hint: str
) -> TlsFailure:
    code = str(getattr(error, "reason", None) or "")  # absent on some (SSLEOFError)
    alert = ""
    if "_ALERT_" in code:  # TLSV13_ALERT_CERTIFICATE_REQUIRED -> certificate required
        alert = code.split("_ALERT_", 1)[1].replace("_", " ").lower()
    hint = next((text for key, text in _ALERT_HINTS if key in code), "")
    closed = isinstance(error, ssl.SSLEOFError | ssl.SSLZeroReturnError)
    if not during_handshake and (closed or alert):
        detail = f"TLS alert '{alert}'" if alert else "closed without a TLS alert"
        return TlsFailure(_REFUSED_AFTER_HANDSHAKE, hint or _REFUSED_HINT, detail)
    if closed:
        return TlsFailure("the broker closed the connection during the TLS handshake", port_hint)
    if code == "WRONG_VERSION_NUMBER":
        return TlsFailure("the broker did not answer in TLS", port_hint)
    if alert:
        return TlsFailure(
            f"the broker sent the TLS alert '{alert}'", hint or "see the broker's log"
        )
    return TlsFailure(code or str(error), "see the broker's log")


def _verify_hint(code: int) -> str:
    if code in _UNTRUSTED:
        return _UNTRUSTED_HINT
    if code == _EXPIRED:
        return (
            "the broker's certificate (or a CA above it) has expired, or this host's clock is wrong"
        )
    if code == _NOT_YET_VALID:
        return "the broker's certificate is not valid yet: is this host's clock right?"
    if code in _NAME_MISMATCH:
        return (
            "the broker's certificate does not name mqtt.host: connect by a name (or address) "
            "that it lists"
        )
    return "check the broker's certificate against mqtt.ca_file"
