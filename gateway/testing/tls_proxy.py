"""A TLS terminator in front of a plain MQTT listener, as stunnel or haproxy would be.

It forwards whatever it reads in one go, so several MQTT packets share one TLS record:
Mosquitto's own TLS listener writes one record per packet, a terminator does not, and a
client that reads a packet at a time then finds packets waiting inside its SSL object
with nothing left in the kernel to wake its event loop. Runs on the caller's event loop;
127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path

__all__ = ["TlsTerminator"]

READ_BYTES = 65536


class TlsTerminator:
    """`await start()`, then clients connect with TLS to `port`; `await stop()`."""

    host = "127.0.0.1"

    def __init__(self, upstream_port: int, certfile: Path, keyfile: Path) -> None:
        self.upstream_port = upstream_port
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(certfile, keyfile)
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        """Listen, on the port of the previous start if there was one."""
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, ssl=self._context, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and cut every connection (the client sees its broker go away)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._pumps):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pumps.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream_port)
            try:
                await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
            finally:
                up_writer.close()
        except (OSError, ssl.SSLError):
            pass  # a client or the broker went away: so does the other side
        finally:
            writer.close()
            self._pumps.discard(task)


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    while data := await source.read(READ_BYTES):
        sink.write(data)  # one write: the TLS layer packs it into as few records as it can
        await sink.drain()
    sink.close()
