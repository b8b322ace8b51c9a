"""A private Mosquitto broker, for the demo and the tests.

Each :class:`MosquittoBroker` runs its own ``mosquitto`` process on 127.0.0.1 and a free
port, with its config, persistence database and log inside ``workdir``. The port is kept
across :meth:`MosquittoBroker.restart` / :meth:`MosquittoBroker.kill` + :meth:`start`, so
clients configured with ``broker.host``/``broker.port`` can reconnect to the "same" broker.

With ``tls=TlsListener(...)`` it also listens for MQTT over TLS on ``broker.tls_port`` (the
plain listener stays, for publishers); certificates for it: `gateway.testing.certs`.

Never talks to the system broker on 127.0.0.1:1883.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["BrokerFactory", "MosquittoBroker", "TlsListener", "find_free_port", "find_mosquitto"]

_FALLBACK_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto")

DEFAULT_LOG_TYPES: tuple[str, ...] = (
    "error",
    "warning",
    "notice",
    "information",
    "subscribe",
    "unsubscribe",
)


def find_mosquitto() -> str:
    """Return the path of the mosquitto binary or raise a RuntimeError telling how to get it."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _FALLBACK_PATHS:
        if os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(
        "mosquitto broker binary not found (looked in PATH and "
        f"{', '.join(_FALLBACK_PATHS)}). Install it, e.g. on Debian/Ubuntu: "
        "`sudo apt-get install -y mosquitto` (or run ./scripts/bootstrap.sh)."
    )


def find_free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a currently free TCP port on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class _PortInUse(RuntimeError):
    pass


@dataclass(frozen=True)
class TlsListener:
    """A second listener, for MQTT over TLS: the broker's certificate and key, and the CA
    that client certificates must come from (needed with ``require_certificate``)."""

    certfile: Path
    keyfile: Path
    cafile: Path | None = None
    require_certificate: bool = False

    def config_lines(self, host: str, port: int) -> list[str]:
        lines = [f"listener {port} {host}", f"certfile {self.certfile}", f"keyfile {self.keyfile}"]
        if self.cafile is not None:
            lines.append(f"cafile {self.cafile}")
        if self.require_certificate:
            lines.append("require_certificate true")
        return lines


class MosquittoBroker:
    """A mosquitto subprocess with its config, persistence and log in ``workdir``."""

    host: str = "127.0.0.1"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        max_inflight_messages: int = 20,
        max_queued_messages: int = 100_000,
        persistence: bool = True,
        autosave_interval: int = 1,
        log_types: Sequence[str] = DEFAULT_LOG_TYPES,
        extra_config: Sequence[str] = (),
        start_timeout: float = 10.0,
        tls: TlsListener | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self._auto_port = port is None
        self.port: int = port if port is not None else find_free_port(self.host)
        # May be replaced before a (re)start: the listener keeps its port, the files change.
        self.tls = tls
        self.tls_port: int = find_free_port(self.host)
        self.max_inflight_messages = max_inflight_messages
        self.max_queued_messages = max_queued_messages
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self.log_types = tuple(log_types)
        self.extra_config = tuple(extra_config)
        self.start_timeout = start_timeout
        self.binary = find_mosquitto()
        self._proc: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self._ever_started = False

    # ------------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def stdout_path(self) -> Path:
        """stdout/stderr of the process (mosquitto only writes there before logging is set up)."""
        return self.workdir / "mosquitto.stdout"

    @property
    def db_path(self) -> Path:
        return self.workdir / "mosquitto.db"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ----------------------------------------------------------------- config
    def config_text(self) -> str:
        lines = [
            "# Generated by tests/broker.py -- private test broker",
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"max_inflight_messages {self.max_inflight_messages}",
            f"max_queued_messages {self.max_queued_messages}",
            f"log_dest file {self.log_path}",
            *(f"log_type {t}" for t in self.log_types),
            "log_timestamp true",
            "log_timestamp_format %H:%M:%S",
            "connection_messages true",
        ]
        if self.persistence:
            lines += [
                "persistence true",
                # mosquitto concatenates location + file name: keep the trailing slash.
                f"persistence_location {self.workdir}/",
                f"persistence_file {self.db_path.name}",
                f"autosave_interval {self.autosave_interval}",
            ]
        else:
            lines.append("persistence false")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # Started as root mosquitto drops privileges to user "mosquitto", which cannot
            # write the log/persistence into a root-owned (0700) pytest tmp dir.
            lines.append("user root")
        lines += list(self.extra_config)
        if self.tls is not None:  # last: listener options apply to the listener above them
            lines += self.tls.config_lines(self.host, self.tls_port)
        return "\n".join(lines) + "\n"

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self.is_running():
            raise RuntimeError(f"mosquitto already running (pid {self.pid}) on port {self.port}")
        self._reap()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            try:
                self._start_once()
                self._ever_started = True
                return
            except _PortInUse:
                # A port we picked ourselves was grabbed before mosquitto bound it: pick
                # another (only before the first successful start -- then the port is kept).
                if self._ever_started or not self._auto_port or attempt == 2:
                    raise
                self.port = find_free_port(self.host)
                self.tls_port = find_free_port(self.host)

    def _start_once(self) -> None:
        ports = [self.port] + ([self.tls_port] if self.tls is not None else [])
        for port in ports:
            if _port_accepts(self.host, port):
                raise _PortInUse(
                    f"port {self.host}:{port} is already in use by another process; "
                    f"cannot start mosquitto there (workdir {self.workdir})"
                )
        self.config_path.write_text(self.config_text())
        self._starts += 1
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.stdout_path.open("ab") as out:
            out.write(f"--- start #{self._starts} ---\n".encode())
            out.flush()
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # Ctrl-C in the terminal must not hit the broker
            )
        # "running" is logged (notice level) once the listeners are bound; without notice
        # logging fall back to "port open and the process still alive a moment later".
        watch_log = bool({"all", "notice"} & set(self.log_types))
        started_at = time.monotonic()
        deadline = started_at + self.start_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                message = (
                    f"mosquitto exited with code {code} during startup on port {self.port}.\n"
                    f"{self._diagnostics()}"
                )
                if "Address already in use" in message:
                    raise _PortInUse(message)
                raise RuntimeError(message)
            if watch_log:
                ready = " running" in self._log_since(log_offset)
            else:
                ready = time.monotonic() > started_at + 0.3
            if ready and all(_port_accepts(self.host, port) for port in ports):
                return
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"mosquitto did not accept connections on {self.host}:{self.port} "
                    f"within {self.start_timeout:.0f}s.\n{self._diagnostics()}"
                )
            time.sleep(0.02)

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM: mosquitto writes its persistence db), SIGKILL fallback."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """Crash the broker (SIGKILL): whatever was not autosaved is lost."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        proc.wait()
        self._reap()

    def restart(self) -> None:
        """Graceful stop() then start() on the same port."""
        self.stop()
        self.start()

    def save(self) -> None:
        """Ask mosquitto to write its persistence database now (SIGUSR1)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGUSR1)

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            self._proc = None

    # ------------------------------------------------------------ diagnostics
    def log_tail(self, n: int = 50) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n:])

    def _diagnostics(self) -> str:
        try:
            out = self.stdout_path.read_text(errors="replace").splitlines()[-20:]
        except FileNotFoundError:
            out = []
        return (
            f"config {self.config_path}:\n{self.config_text()}"
            f"--- {self.stdout_path.name} (tail) ---\n" + "\n".join(out) + "\n"
            f"--- {self.log_path.name} (tail) ---\n{self.log_tail()}"
        )

    # -------------------------------------------------------- context manager
    def __enter__(self) -> MosquittoBroker:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        return f"<MosquittoBroker {self.host}:{self.port} {state} workdir={self.workdir}>"


# What the ``broker_factory`` fixture returns: ``make(name=None, *, start=True, **kwargs)``.
BrokerFactory = Callable[..., MosquittoBroker]
