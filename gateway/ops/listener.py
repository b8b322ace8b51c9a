"""Listeners that cannot be starved: what `/metrics` and the status socket accept with.

Both are served from the event loop through one accept loop, with:

- a **connection cap**. At the cap, a new client takes the place of the oldest one the
  server is still waiting on (a request header that has not come, an answer not read),
  so a flood of silent clients cannot keep a real scrape or `blynk-gateway status` out;
  only when every connection is being answered is the newcomer refused (a canned answer,
  then closed). Descriptors stay at the cap plus a few, whatever the clients do.
- a **deadline per connection**, accept to close, after which it is aborted whatever it
  was doing (reading, writing, closing), so a client that never reads cannot hold it.
- **accept errors summarised**. asyncio's own server (`loop.create_server`) logs a
  traceback through the loop's exception handler each time `accept()` fails for want of
  descriptors (issue 16 counted 12,229 of them); here they are counted, the loop waits
  `ACCEPT_RETRY_S` before trying again, and one line a minute says how many there were.

What clients did wrong (timed out, evicted, refused) is summarised the same way: the first
occurrence is logged at once, the rest at most once per `SUMMARY_INTERVAL_S` with counts,
so a flood costs a line a minute, never a line per client.

Nothing here touches the buffer: a `kill -9` at any moment costs the clients their
connection and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.log import get_logger

log = get_logger("listener")

# How long the accept loop pauses after accept() failed for want of a resource (EMFILE,
# ENFILE, ENOBUFS, ENOMEM): the condition does not clear in a microsecond, and the
# listening socket would otherwise wake the loop again at once.
ACCEPT_RETRY_S = 1.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# At most one summary line per kind per this many seconds.
SUMMARY_INTERVAL_S = 60.0
LISTEN_BACKLOG = 128


class Tally:
    """Counts of something that can happen thousands of times a second, logged as one
    warning line per interval at most: the first occurrence at once (after the current
    loop iteration, so a burst shares its line), later ones when the interval is over.

    Every count is reported eventually (`flush()` on the way out), so the summary lines
    add up to the true totals.
    """

    def __init__(self, event: str, interval_s: float = SUMMARY_INTERVAL_S, **fields: Any) -> None:
        self._event = event
        self._interval_s = interval_s
        self._fields = fields
        self._counts: Counter[str] = Counter()
        self._last_logged: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.totals: Counter[str] = Counter()

    def add(self, what: str) -> None:
        self._counts[what] += 1
        self.totals[what] += 1
        if self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        delay = 0.0
        if self._last_logged is not None:
            delay = max(0.0, self._last_logged + self._interval_s - loop.time())
        self._timer = loop.call_later(delay, self.flush)

    def flush(self) -> None:
        """Log what was counted since the last line, if anything."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._counts:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: a flush at exit
            self._last_logged = asyncio.get_running_loop().time()
        counts, self._counts = dict(self._counts), Counter()
        log.warning(self._event, **self._fields, **counts, interval_s=self._interval_s)


@dataclass(eq=False)
class Connection:
    """One accepted client. `waiting`: the server is waiting on the client (for its
    request, or for it to read the answer), so it may give its place to a newcomer."""

    sock: socket.socket
    waiting: bool = True
    evicted: bool = False
    task: asyncio.Task[None] | None = None


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Connection], Awaitable[None]]


def listening_socket(family: socket.AddressFamily, address: Any) -> socket.socket:
    """A non-blocking stream socket bound to `address` and listening (OSError if not)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class BoundedListener:
    """Serves `handler` to each client of `sock`, within the cap and the deadline.

    `refusal`: written (best effort) to a client refused at the cap before it is closed,
    e.g. an HTTP 503. `read_limit`: the StreamReader's buffer limit, which also bounds
    what a client can make the server hold before it stops reading from the socket.
    `complete`: tells from the bytes a client has sent (peeked, not consumed) that its
    request is all there, so the client is not evicted in the moment before its handler
    reads it: under a flood the loop runs behind, and a real scrape's whole request is
    often waiting in the socket while hundreds of silent clients queue beside it.
    """

    def __init__(
        self,
        name: str,
        sock: socket.socket,
        handler: Handler,
        *,
        max_connections: int,
        deadline_s: float,
        read_limit: int = 2**16,
        refusal: bytes = b"",
        complete: Callable[[bytes], bool] | None = None,
        summary_interval_s: float = SUMMARY_INTERVAL_S,
    ) -> None:
        self.name = name
        self._sock = sock
        self._handler = handler
        self._max_connections = max_connections
        self._deadline_s = deadline_s
        self._read_limit = read_limit
        self._refusal = refusal
        self._complete = complete
        # Oldest first (a dict keeps insertion order): who gives its place at the cap.
        self._open: dict[Connection, None] = {}
        self.dropped = Tally(f"{name}_clients_dropped", summary_interval_s)
        self.accept_failures = Tally(f"{name}_accept_failed", summary_interval_s)
        self.handler_failures = Tally(f"{name}_handler_failed", summary_interval_s)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def serve(self) -> None:
        """Until cancelled; the listening socket and every connection are closed on the
        way out, and the pending summaries logged."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.TaskGroup() as group:
                while True:
                    client = await self._accept(loop)
                    if client is not None:
                        self._admit(group, client)
                    # sock_accept does not yield while connections are queued: without
                    # this, a burst would be admitted (and evicted) before any handler ran.
                    await asyncio.sleep(0)
        finally:
            self._sock.close()
            for tally in (self.dropped, self.accept_failures, self.handler_failures):
                tally.flush()

    async def _accept(self, loop: asyncio.AbstractEventLoop) -> socket.socket | None:
        try:
            client, _ = await loop.sock_accept(self._sock)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            self.accept_failures.add(name)
            if exc.errno in _OUT_OF_RESOURCES:
                await asyncio.sleep(ACCEPT_RETRY_S)
            return None
        return client

    def _admit(self, group: asyncio.TaskGroup, client: socket.socket) -> None:
        if len(self._open) >= self._max_connections and not self._evict_oldest_waiting():
            self.dropped.add("refused")
            with contextlib.suppress(OSError):
                client.send(self._refusal)
            client.close()
            return
        connection = Connection(client)
        self._open[connection] = None
        connection.task = group.create_task(self._run(client, connection))
        # Also when the task is cancelled before it ever ran (no finally of its own runs).
        connection.task.add_done_callback(lambda _: self._forget(client, connection))

    def _evict_oldest_waiting(self) -> bool:
        for connection in self._open:
            if not connection.waiting or connection.task is None:
                continue
            if self._has_complete_request(connection.sock):
                connection.waiting = False  # its handler is about to answer it
                continue
            connection.evicted = True
            del self._open[connection]
            connection.task.cancel()
            self.dropped.add("evicted")
            return True
        return False

    def _has_complete_request(self, client: socket.socket) -> bool:
        if self._complete is None:
            return False
        try:
            sent = client.recv(self._read_limit, socket.MSG_PEEK)
        except OSError:  # nothing yet (EAGAIN), or gone
            return False
        return self._complete(sent)

    def _forget(self, client: socket.socket, connection: Connection) -> None:
        self._open.pop(connection, None)
        client.close()  # a no-op if its transport closed it already

    async def _run(self, client: socket.socket, connection: Connection) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self._deadline_s):
                reader, writer = await asyncio.open_connection(sock=client, limit=self._read_limit)
                await self._handler(reader, writer, connection)
                connection.waiting = True  # for the client to take the rest of the answer
                writer.close()
                await writer.wait_closed()
        except TimeoutError:
            self.dropped.add("timed_out")
        except asyncio.CancelledError:
            if not connection.evicted:
                raise
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: nothing to answer, nothing to report
        except Exception as exc:  # one client must never end the listener (or the daemon)
            self.handler_failures.add(type(exc).__name__)
        finally:
            if writer is not None:
                writer.transport.abort()  # what is left unsent goes: the client had its time
