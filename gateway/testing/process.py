"""The daemon as a subprocess (`python -m gateway run`), as on a real box: killable with SIGKILL.

:func:`daemon_config` builds a complete config for a private broker, a sandbox cloud and a
buffer file; :func:`write_config` writes it as TOML; :class:`GatewayProcess` starts the
daemon on it, reads its JSON log lines from a pipe (so the daemon itself writes no log
file: its ``/proc/<pid>/io`` counts only the buffer), waits for a named log event, and
stops it with SIGTERM or SIGKILL. One :class:`GatewayProcess` can be started again after
it exited; its events accumulate across the starts.

    config = daemon_config(broker.port, sandbox.base_url, tmp / "buffer.db", routes)
    with GatewayProcess(write_config(tmp / "gateway.toml", config)) as gateway:
        gateway.start()
        gateway.wait_for_event("mqtt_connected")
        ...
        assert gateway.terminate() == 0
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = [
    "SANDBOX_CLIENT_ID",
    "SANDBOX_CLIENT_SECRET",
    "GatewayExited",
    "GatewayProcess",
    "daemon_config",
    "write_config",
]

# The credentials a `SandboxCloud` accepts unless it was given others.
SANDBOX_CLIENT_ID = "sandbox-client"
SANDBOX_CLIENT_SECRET = "sandbox-secret"


def daemon_config(
    broker_port: int,
    cloud_url: str,
    db_path: Path,
    routes: Sequence[Mapping[str, Any]],
    **sections: Mapping[str, Any],
) -> dict[str, Any]:
    """A complete config as a dict (also valid as ``Settings(**config)``).

    The defaults are the daemon's own except for what the test rig decides: the broker
    (on 127.0.0.1, like every `MosquittoBroker`), the sandbox's URL and credentials, the
    buffer path, JSON logs, the routes, and `[clock] trust = "always"`. ``sections`` are
    merged key by key over them, e.g. ``flush={"batch_size": 200}`` or
    ``mqtt={"client_id": "gw-2"}``.
    """
    config: dict[str, Any] = {
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "client_id": "gateway-under-test"},
        "cloud": {
            "server": cloud_url,
            "client_id": SANDBOX_CLIENT_ID,
            "client_secret": SANDBOX_CLIENT_SECRET,
        },
        "store": {"path": str(db_path)},
        "log": {"level": "info", "format": "json"},
        # The test machines have no NTP daemon (the kernel says unsynchronized): their
        # clock is taken as right, as before [clock] existed. Tests of the clock set it.
        "clock": {"trust": "always"},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    config["routes"] = [dict(route) for route in routes]
    return config


def _plain(value: Any) -> Any:
    """A config value as TOML will read it back: paths become strings, tuples lists."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    raise TypeError(f"no TOML encoding for config value {value!r}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return (
            "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    return json.dumps(value)  # a TOML basic string is a JSON string


def _toml_key(key: str) -> str:
    """Quoted, so dotted JSON paths (`AM2301.Temperature`) stay one key."""
    return json.dumps(key)


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    """Write ``config`` (tables of scalars and lists, plus ``routes``) as TOML; returns path.

    Raises ValueError if the text would not read back as ``config`` (a shape this writer
    does not handle), rather than start a daemon on a config nobody meant.
    """
    plain: dict[str, Any] = {
        section: [{k: _plain(v) for k, v in route.items()} for route in values]
        if section == "routes"
        else {k: _plain(v) for k, v in values.items()}
        for section, values in config.items()
    }
    lines: list[str] = []
    for section, values in plain.items():
        if section == "routes":
            continue
        lines.append(f"[{section}]")
        lines += [f"{_toml_key(key)} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    for route in plain.get("routes", []):
        lines.append("[[routes]]")
        lines += [f"{_toml_key(key)} = {_toml_value(value)}" for key, value in route.items()]
        lines.append("")
    text = "\n".join(lines)
    if tomllib.loads(text) != {k: v for k, v in plain.items() if k != "routes" or v}:
        raise ValueError(f"config does not survive TOML encoding: {config!r}")
    path.write_text(text)
    return path


class GatewayExited(AssertionError):
    """The daemon exited (or never logged the awaited event) while a test waited for it."""


class GatewayProcess:
    """``python -m gateway run --config <config_path>`` with its log lines collected.

    ``log_path``: also append every line the daemon prints there (written by this
    process, not the daemon). ``env``: extra environment variables for the daemon.
    ``python``: the interpreter command (default: this one). ``nofile``: the daemon's
    RLIMIT_NOFILE (soft and hard), e.g. 1024 as under the shipped unit's `LimitNOFILE=`,
    when a test is about running out of file descriptors; None: this process's limit.
    """

    def __init__(
        self,
        config_path: Path,
        log_path: Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        python: Sequence[str] | None = None,
        nofile: int | None = None,
    ) -> None:
        self.config_path = config_path
        self.nofile = nofile
        self.log_path = log_path
        self.env = dict(env or {})
        # The interpreter command; a benchmark runs another checkout's daemon with
        # [sys.executable, "-S", "-P"] and PYTHONPATH, bypassing this venv's editable install.
        self.python = list(python or [sys.executable])
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._lines: list[str] = []
        self._events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Start the daemon; raises RuntimeError if it is still running."""
        if self.running:
            raise RuntimeError(f"gateway already running (pid {self.pid})")
        self._join_reader()
        self.starts += 1
        self.process = subprocess.Popen(
            [*self.python, "-m", "gateway", "run", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        if self.nofile is not None:
            # Set from outside, not with preexec_fn (unsafe in a process with threads): the
            # interpreter is still starting, long before the daemon opens its sockets.
            resource.prlimit(self.process.pid, resource.RLIMIT_NOFILE, (self.nofile,) * 2)
        assert self.process.stdout is not None
        self._reader = threading.Thread(
            target=self._read, args=(self.process.stdout,), name="gateway-log", daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("gateway not started")
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def send_signal(self, signum: int) -> None:
        if self.process is None:
            raise RuntimeError("gateway not started")
        self.process.send_signal(signum)

    def wait(self, timeout_s: float = 30.0) -> int:
        """The exit code, once the daemon exited and its last log lines were read."""
        if self.process is None:
            raise RuntimeError("gateway not started")
        code = self.process.wait(timeout_s)
        self._join_reader()
        return code

    def kill(self) -> None:
        """SIGKILL, as a power cut would: no shutdown code runs."""
        self.send_signal(signal.SIGKILL)
        self.wait(10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and the exit code; raises subprocess.TimeoutExpired if it hangs."""
        self.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if the daemon has not exited within ``timeout_s``."""
        if self.process is None:
            raise RuntimeError("gateway not started")
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.wait(10)

    def close(self) -> None:
        """Kill the daemon if it still runs (teardown); safe to call more than once."""
        if self.running:
            assert self.process is not None
            self.process.kill()
        if self.process is not None:
            self.process.wait(10)
        self._join_reader()

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ the log

    def _read(self, stream: IO[bytes]) -> None:
        log_file = self.log_path.open("a") if self.log_path is not None else None
        try:
            for raw in stream:
                line = raw.decode(errors="replace").rstrip("\n")
                if log_file is not None:
                    log_file.write(line + "\n")
                    log_file.flush()
                event = None
                if line.startswith("{"):
                    try:
                        event = json.loads(line)
                    except json.JSONDecodeError:
                        event = None
                with self._changed:
                    self._lines.append(line)
                    if isinstance(event, dict):
                        self._events.append(event)
                    self._changed.notify_all()
        finally:
            stream.close()
            if log_file is not None:
                log_file.close()
            with self._changed:
                self._changed.notify_all()

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(10)
            self._reader = None

    def events(self) -> list[dict[str, Any]]:
        """The JSON log events so far, across every start, oldest first."""
        with self._changed:
            return list(self._events)

    def event_count(self) -> int:
        """How many events so far: pass it as ``after`` to wait for a later one."""
        with self._changed:
            return len(self._events)

    def wait_for_event(self, name: str, timeout_s: float = 20.0, after: int = 0) -> dict[str, Any]:
        """The first event called ``name`` among ``events()[after:]``, waiting if need be.

        Raises :class:`GatewayExited` (an AssertionError, with the log's tail) when the
        daemon exits or ``timeout_s`` passes first.
        """
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for event in self._events[after:]:
                    if event.get("event") == name:
                        return event
                reader_done = self._reader is None or not self._reader.is_alive()
                if reader_done and not self.running:
                    code = None if self.process is None else self.process.returncode
                    raise GatewayExited(
                        f"gateway exited ({code}) before logging {name}:\n{self._tail()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GatewayExited(f"no {name} event within {timeout_s} s:\n{self._tail()}")
                self._changed.wait(min(remaining, 0.5))

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines the daemon printed (JSON or not), for error messages."""
        with self._changed:
            return self._tail(lines)

    def line_count(self) -> int:
        """How many lines the daemon printed so far (JSON or not, tracebacks included)."""
        with self._changed:
            return len(self._lines)

    def _tail(self, lines: int = 40) -> str:
        return "\n".join(self._lines[-lines:])
