"""paho's `Client`, with fewer system calls per message: chunked reads, batched writes.

paho reads a packet with three `recv` calls (the command byte, the length byte by byte,
then the body) and writes every PUBACK with its own `send`. Draining a broker backlog, a
profile of the ingest spent 35 % of the event-loop thread inside those `recv` calls alone
(each one also hands the GIL to SQLite's thread and waits to get it back). Here `recv`
is served from a 64 KiB chunk read in one call, and a run of queued control packets
(PUBACKs, mostly) leaves in one `send`.

It also skips paho's per-message topic matcher when no per-topic callback exists.

Over TLS the socket is an `ssl.SSLSocket`. Its `recv` returns the plaintext of at most
one TLS record, and what it does not return waits decrypted inside the SSL object, where
no readable-socket event announces it. A 64 KiB chunk takes a whole record (16 KiB at
most), but the plain paho client reads a packet a few bytes at a time, and one record may
hold many packets (a TLS terminator in front of the broker packs them): `unread_bytes`
counts those bytes with our own buffer, and whoever drives `loop_read` keeps reading
while that is non-zero. A TLS failure is recorded in
`tls_error` for the connect-failure log line: during the handshake it is also raised by
`connect()`, but after it (TLS 1.3: the broker refusing our certificate) paho swallows the
read error and reports only a lost connection.

These override private paho methods (`_sock_recv`, `_sock_send`, `_packet_write`,
`_ssl_wrap_socket`, `_handle_on_message`), written against paho 2.1-2.2 (pyproject pins
<3); on any other paho `supported()` is False and the daemon uses the plain client (slower,
TLS failures after the handshake logged as a closed connection, otherwise the same).
tests/test_paho_client.py and tests/test_mqtt_tls.py pin each behaviour.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, NamedTuple

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

RECV_CHUNK_BYTES = 65536
# At most this much is joined for one send (a slow socket must not make each try
# copy the whole queue again).
SEND_BATCH_BYTES = 65536
_PUBLISH = 0x30


class TlsError(NamedTuple):
    """The first TLS error of a connection, and whether it ended the handshake."""

    error: OSError
    during_handshake: bool


class ChunkedClient(mqtt.Client):
    """A paho client whose socket reads come from a userspace buffer.

    The event loop is only told about bytes still in the kernel, so whoever drives
    `loop_read` must keep calling it while `buffered_bytes` is non-zero.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rx_chunk = b""
        self._rx_pos = 0
        self._filtered_callbacks = False
        self.tls_error: TlsError | None = None

    def message_callback_add(self, sub: str, callback: Any) -> None:
        self._filtered_callbacks = True
        super().message_callback_add(sub, callback)

    def _handle_on_message(self, message: mqtt.MQTTMessage) -> None:
        """Straight to `on_message` when no per-topic callback was ever added (the daemon
        adds none): paho would run its topic matcher for every message to find none."""
        if self._filtered_callbacks:
            super()._handle_on_message(message)
            return
        on_message = self.on_message
        if on_message is not None:
            with self._in_callback_mutex:
                on_message(self, self._userdata, message)

    @property
    def buffered_bytes(self) -> int:
        """Bytes out of the kernel that paho has not consumed yet: ours and the TLS layer's."""
        return len(self._rx_chunk) - self._rx_pos + _tls_pending(self._sock)

    def _sock_recv(self, bufsize: int) -> bytes:
        chunk, pos = self._rx_chunk, self._rx_pos
        if pos >= len(chunk):
            # Empty: one real read. b"" (the broker closed) and BlockingIOError pass on to
            # paho unchanged, as from the plain client.
            try:
                chunk = super()._sock_recv(RECV_CHUNK_BYTES)
            except ssl.SSLError as exc:  # want-read/write arrive as BlockingIOError
                self._note_tls_error(exc, during_handshake=False)
                raise
            if not chunk:
                return chunk
            pos = 0
            self._rx_chunk = chunk
        end = pos + bufsize
        self._rx_pos = end
        return chunk[pos:end]

    def _sock_send(self, buf: bytes | bytearray) -> int:
        try:
            return super()._sock_send(buf)
        except ssl.SSLError as exc:
            self._note_tls_error(exc, during_handshake=False)
            raise

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        """The handshake, as paho does it (in `connect()`, off the event loop), but a
        failed one closes its socket (paho leaves that to the garbage collector: one file
        descriptor per failed attempt until then) and is noted in `tls_error`.

        Only for contexts that check the host name themselves (the daemon's always do);
        paho's own code, which can also check it afterwards, handles any other.
        """
        context = self._ssl_context
        if context is None or not context.check_hostname:
            return super()._ssl_wrap_socket(tcp_sock)
        try:
            ssl_sock = context.wrap_socket(
                tcp_sock, server_hostname=self._host, do_handshake_on_connect=False
            )
        except OSError as exc:
            tcp_sock.close()
            self._note_tls_error(exc, during_handshake=True)
            raise
        try:
            ssl_sock.settimeout(self._connect_timeout)
            ssl_sock.do_handshake()
        except OSError as exc:  # a verify failure, a reset, a timeout: raised on by connect()
            ssl_sock.close()
            self._note_tls_error(exc, during_handshake=True)
            raise
        return ssl_sock

    def _note_tls_error(self, exc: OSError, *, during_handshake: bool) -> None:
        if self.tls_error is None:
            self.tls_error = TlsError(exc, during_handshake)

    def _sock_close(self) -> None:
        self._rx_chunk = b""
        self._rx_pos = 0
        super()._sock_close()

    def _packet_write(self) -> MQTTErrorCode:
        """Send the leading run of non-PUBLISH packets in one `send`, then as paho does.

        PUBLISH packets are left to paho: a QoS 0 one fires `on_publish` once written.
        What a short write leaves unsent goes back to the queue's head, in order.
        """
        queue = self._out_packet
        run = []
        run_bytes = 0
        for packet in queue:
            if packet["command"] & 0xF0 == _PUBLISH or run_bytes >= SEND_BATCH_BYTES:
                break
            run.append(packet)
            run_bytes += packet["to_process"]
        if len(run) > 1:
            joined = b"".join(bytes(p["packet"][p["pos"] :]) for p in run)
            for _ in run:
                queue.popleft()
            try:
                written = self._sock_send(joined)
            except BlockingIOError:
                written = 0
            except (AttributeError, ValueError):  # no socket any more: as paho does
                queue.extendleft(reversed(run))
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            except OSError:
                queue.extendleft(reversed(run))
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            unsent = []
            for packet in run:
                if written >= packet["to_process"]:
                    written -= packet["to_process"]
                    continue
                packet["pos"] += written
                packet["to_process"] -= written
                written = 0
                unsent.append(packet)
            if unsent:
                queue.extendleft(reversed(unsent))
                return MQTTErrorCode.MQTT_ERR_AGAIN
        return super()._packet_write()


def unread_bytes(client: mqtt.Client) -> int:
    """Bytes of `client`'s connection that a readable event would not announce."""
    if isinstance(client, ChunkedClient):
        return client.buffered_bytes
    return _tls_pending(client.socket())


def _tls_pending(sock: object) -> int:
    """Decrypted bytes waiting inside an SSL socket (0 for a plain or closed one)."""
    if not isinstance(sock, ssl.SSLSocket):
        return 0
    try:
        return sock.pending()
    except (OSError, ValueError):
        return 0


def supported() -> bool:
    """Is this the paho (2.x) whose private methods ChunkedClient overrides?"""
    version = getattr(paho.mqtt, "__version__", "")
    return version.startswith("2.") and all(
        callable(getattr(mqtt.Client, name, None))
        for name in (
            "_sock_recv",
            "_sock_send",
            "_sock_close",
            "_ssl_wrap_socket",
            "_packet_write",
            "_handle_on_message",
        )
    )
