"""Network changes on Linux (rtnetlink), so an outage ends as soon as a link comes back.

While the cloud is unreachable the flush loop probes it every few seconds. A Wi-Fi or LTE
link that comes back, a DHCP lease, a new default route: each is announced by the kernel
on an rtnetlink socket, and the loop probes at once instead of at its next tick. Standard
library only; where the socket cannot be opened (not Linux, a sandbox without netlink) the
watcher stays silent and the periodic probes do the job alone.
"""

from __future__ import annotations

import asyncio
import socket

from gateway.aio import Notifier
from gateway.log import get_logger

log = get_logger("netwatch")

# Multicast groups of <linux/rtnetlink.h>: links, addresses and routes, IPv4 and IPv6.
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
)
RECV_BYTES = 65536


class NetworkWatcher:
    """`changed` is notified after every burst of link, address or route events."""

    def __init__(self) -> None:
        self.changed = Notifier()
        self.events = 0
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> bool:
        """Subscribe on the running loop; False (and one info line) where it is not possible."""
        family = getattr(socket, "AF_NETLINK", None)
        protocol = getattr(socket, "NETLINK_ROUTE", None)
        if family is None or protocol is None:
            return False
        try:
            sock = socket.socket(family, socket.SOCK_RAW | socket.SOCK_NONBLOCK, protocol)
        except OSError as exc:
            log.info("network_watch_unavailable", error=str(exc), action="probing on a timer only")
            return False
        try:
            sock.bind((0, GROUPS))
        except OSError as exc:
            sock.close()
            log.info("network_watch_unavailable", error=str(exc), action="probing on a timer only")
            return False
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        return True

    def _readable(self) -> None:
        """Drain everything queued (a link flap is many messages) and notify once."""
        sock = self._sock
        if sock is None:
            return
        received = 0
        while True:
            try:
                if not sock.recv(RECV_BYTES):
                    break
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ENOBUFS after a storm: events were lost, which is still a change
                received += 1
                break
            received += 1
        if received:
            self.events += received
            self.changed.notify()

    def close(self) -> None:
        if self._sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
