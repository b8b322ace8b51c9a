"""The status socket: how `blynk-gateway status` asks the running daemon for its live state.

A unix socket rather than a state file rewritten every few seconds: nothing is written
unless someone asks (the SD card wears with every write), and the answer is as fresh as the
question. Under systemd it lives in `$RUNTIME_DIRECTORY` (tmpfs, `/run/blynk-gateway`);
without systemd, next to the buffer and named after it. The protocol is the smallest that
works: connect, read one JSON document, the daemon closes. The socket takes the process
umask (0077 under the unit), so only the daemon's user and root can ask.

Neither end can be held by the other (issue 16): the daemon serves through a
`BoundedListener` (at most `MAX_CONNECTIONS` clients, the oldest making way for a new
one; each connection aborted after `CONNECTION_DEADLINE_S` whether or not the client
read its answer), and `query()` gives up after `QUERY_TIMEOUT_S` in all and
`MAX_ANSWER_BYTES`, whatever the other end does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gateway.log import get_logger
from gateway.ops.listener import BoundedListener, Connection, listening_socket

log = get_logger("status")

SOCKET_NAME = "status.sock"
# Where the unit's RuntimeDirectory= puts it, for a `status` run from an operator's shell.
SYSTEMD_RUNTIME_DIR = Path("/run/blynk-gateway")
# sun_path is 108 bytes including the terminating NUL.
MAX_UNIX_PATH_BYTES = 107
QUERY_TIMEOUT_S = 5.0
# An answer is a few kilobytes (names in it are truncated); anything far larger is not one.
MAX_ANSWER_BYTES = 1 << 20
# The server: `status` runs now and then, by hand or from a monitoring check.
MAX_CONNECTIONS = 8
CONNECTION_DEADLINE_S = 5.0


def socket_path(db_path: Path, runtime_dir: str | None = None) -> Path:
    """Where the daemon serves: `$RUNTIME_DIRECTORY/status.sock`, else `<buffer>.sock`."""
    runtime_dir = runtime_dir if runtime_dir is not None else os.environ.get("RUNTIME_DIRECTORY")
    if runtime_dir:
        return Path(runtime_dir.split(":")[0]) / SOCKET_NAME
    return db_path.parent / f"{db_path.name}.sock"


def candidate_paths(db_path: Path) -> list[Path]:
    """Where `status` looks, in order; the daemon's answer names its buffer, so a socket of
    another gateway on the same box is recognised and skipped."""
    paths = [
        socket_path(db_path),
        SYSTEMD_RUNTIME_DIR / SOCKET_NAME,
        socket_path(db_path, runtime_dir=""),
    ]
    return list(dict.fromkeys(paths))


@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """An AF_UNIX address for `path`, even beyond the 107-byte limit (deep test directories):
    a long path is reached through its directory's `/proc/self/fd` entry."""
    if len(os.fsencode(path)) <= MAX_UNIX_PATH_BYTES:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def query(path: Path, timeout_s: float = QUERY_TIMEOUT_S) -> dict[str, Any] | None:
    """The daemon's live state from the socket at `path`; None if nobody answers there
    (within `timeout_s` in all, and `MAX_ANSWER_BYTES`)."""
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    received = 0
    try:
        with (
            _addressable(path) as address,
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock,
        ):
            sock.settimeout(timeout_s)
            sock.connect(address)
            while True:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += len(chunk)
                if received > MAX_ANSWER_BYTES:
                    return None
                chunks.append(chunk)
    except OSError:  # refused, reset, timed out
        return None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


class StatusServer:
    """Serves `answer()` as JSON to each connection; a named task of the daemon."""

    def __init__(self, path: Path, answer: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self._answer = answer
        self.listener: BoundedListener | None = None

    async def serve(self) -> None:
        """Until cancelled; the socket file is removed on the way out."""
        if not await asyncio.to_thread(self._claim):
            return
        try:
            with _addressable(self.path) as address:
                sock = listening_socket(socket.AF_UNIX, address)
        except OSError as exc:
            log.warning("status_socket_failed", path=str(self.path), error=str(exc))
            return
        self.listener = BoundedListener(
            "status_socket",
            sock,
            self._handle,
            max_connections=MAX_CONNECTIONS,
            deadline_s=CONNECTION_DEADLINE_S,
        )
        log.info("status_socket_listening", path=str(self.path))
        try:
            await self.listener.serve()
        finally:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _claim(self) -> bool:
        """Remove a socket left by a killed daemon; keep out of the way of a live one."""
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return True
        except OSError as exc:
            log.warning("status_socket_failed", path=str(self.path), error=str(exc))
            return False
        if not stat.S_ISSOCK(mode):
            log.warning("status_socket_failed", path=str(self.path), error="not a socket")
            return False
        if query(self.path, timeout_s=1.0) is not None:
            log.warning("status_socket_in_use", path=str(self.path))
            return False
        self.path.unlink()
        return True

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: Connection
    ) -> None:
        """The answer; the listener closes the connection (or aborts it at the deadline).
        The connection stays `waiting` (on the client to read): it may make way."""
        writer.write(json.dumps(self._answer()).encode() + b"\n")
        await writer.drain()
