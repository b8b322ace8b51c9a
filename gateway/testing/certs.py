"""Certificates for TLS tests, made with the `openssl` command (scripts/bootstrap.sh
installs Debian's `openssl` where it is missing).

`make_test_pki(directory)` writes a small PKI: a CA; a broker certificate for 127.0.0.1
and localhost (subjectAltName, as verification needs) and two broken ones (one naming
another host, one expired a day ago); a client certificate; and a second, unrelated CA
with a client certificate of its own. P-256 keys: fast to make. Nothing leaves the
directory, and nothing here is meant for production.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CertPair", "TlsPki", "make_test_pki"]

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class TlsPki:
    ca: CertPair
    server: CertPair  # 127.0.0.1 and localhost
    wrong_name: CertPair  # broker.example only
    expired: CertPair  # 127.0.0.1 and localhost, expired yesterday
    client: CertPair
    other_ca: CertPair  # signed nothing above
    other_client: CertPair  # a client certificate from other_ca


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError(
            "the openssl command is needed for TLS tests: `sudo apt-get install -y openssl` "
            "(or run ./scripts/bootstrap.sh)"
        )
    done = subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=30
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{done.stderr}")


def _make_ca(directory: Path, name: str) -> CertPair:
    pair = CertPair(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl(
        "req", "-x509", *_KEY, "-keyout", str(pair.key), "-out", str(pair.cert),
        "-days", "30", "-subj", f"/CN=blynk-gateway test {name}",
        cwd=directory,
    )  # fmt: skip
    return pair


def _make_signed(
    directory: Path, name: str, ca: CertPair, *, alt_names: str, days: int, client: bool = False
) -> CertPair:
    pair = CertPair(directory / f"{name}.pem", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    _openssl(
        "req", *_KEY, "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    usage = "clientAuth" if client else "serverAuth"
    extensions = directory / f"{name}.ext"
    extensions.write_text(f"subjectAltName={alt_names}\nextendedKeyUsage={usage}\n")
    # -days -1: valid from now until yesterday, i.e. already expired.
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-days", str(days), "-extfile", str(extensions),
        "-out", str(pair.cert),
        cwd=directory,
    )  # fmt: skip
    return pair


def make_test_pki(directory: Path) -> TlsPki:
    """Make every certificate and key in `directory` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(directory, "ca")
    other_ca = _make_ca(directory, "other-ca")
    local = "IP:127.0.0.1,DNS:localhost"
    return TlsPki(
        ca=ca,
        server=_make_signed(directory, "server", ca, alt_names=local, days=30),
        wrong_name=_make_signed(
            directory, "wrong-name", ca, alt_names="DNS:broker.example", days=30
        ),
        expired=_make_signed(directory, "expired", ca, alt_names=local, days=-1),
        client=_make_signed(
            directory, "client", ca, alt_names="DNS:gateway.example", days=30, client=True
        ),
        other_ca=other_ca,
        other_client=_make_signed(
            directory,
            "other-client",
            other_ca,
            alt_names="DNS:gateway.example",
            days=30,
            client=True,
        ),
    )
