"""systemd integration: sd_notify and the watchdog's liveness rule.

Standard library only (a datagram to `$NOTIFY_SOCKET`, as sd_notify(3) does), so the
daemon gains no dependency and runs unchanged outside systemd, where every call here is a
no-op. What the service manager is told:

* `READY=1` once the buffer is open and ingest has started. A broker that is down at boot
  does not hold READY back (the buffer still protects whatever arrives later); `STATUS=`
  says so instead.
* `WATCHDOG=1` every half `WATCHDOG_USEC`, but only while both long-running loops make
  progress. A loop reports liveness (gateway/progress.py) through a `Heartbeat` (it beats
  on every iteration and declares how long its next wait may legitimately take) or through
  a `ProgressWatch` (work is waiting and a counter should move). A loop that is
  blocked or deadlocked stops both, no WATCHDOG=1 is sent, and systemd restarts the
  service. If the event loop itself is blocked, nothing is sent either.
* `STATUS=` a one-line summary, at most every `STATUS_INTERVAL_S` and only when it changed.
* `RELOADING=1` … `READY=1` around a reload, `STOPPING=1` when shutdown begins.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

from gateway.log import format_duration, get_logger

log = get_logger("systemd")

# systemctl shows STATUS=; more often than this is noise in the manager's state.
STATUS_INTERVAL_S = 5.0
# A status query that takes longer than this (a stuck store) is skipped, not awaited.
STATUS_QUERY_TIMEOUT_S = 2.0


class ServiceNotifier:
    """Sends sd_notify(3) messages; every method is a no-op without `NOTIFY_SOCKET`.

    The socket is non-blocking: a manager that does not read its queue must never stall
    the event loop, so a message that would block is dropped (and counted).
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address = address or None
        self.dropped = 0
        # The STATUS= text the manager shows now, whoever sent it (the monitor, a reload).
        self.last_status: str | None = None
        self._sock: socket.socket | None = None
        self._target: str | bytes | None = None
        if self.address is not None:
            # '@name' is an abstract socket: a leading NUL byte instead of a path.
            self._target = (
                b"\0" + self.address[1:].encode() if self.address.startswith("@") else self.address
            )
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        usec = watchdog_usec if self._sock is not None else None
        self.watchdog_interval_s = usec / 2_000_000 if usec else None

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> ServiceNotifier:
        """As systemd starts us: `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.

        The watchdog applies only if `WATCHDOG_PID` is unset or names this process (a
        child that inherited the variables must not ping for its parent).
        """
        env = os.environ if env is None else env
        usec: int | None = None
        pid = env.get("WATCHDOG_PID", "")
        if not pid or pid == str(os.getpid()):
            try:
                usec = int(env.get("WATCHDOG_USEC", "")) or None
            except ValueError:
                usec = None
        return cls(env.get("NOTIFY_SOCKET"), watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` lines as one datagram; True if the manager got it."""
        if self._sock is None or self._target is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            self._sock.sendto(message, self._target)
            for assignment in assignments:
                if assignment.startswith("STATUS="):
                    self.last_status = assignment.removeprefix("STATUS=")
        except (BlockingIOError, InterruptedError):
            self.dropped += 1
            return False
        except OSError as exc:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("sd_notify_failed", socket=self.address, error=str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) is complete."""
        return self.notify("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """A reload begins; MONOTONIC_USEC lets newer managers match it to its READY=1."""
        return self.notify(
            "RELOADING=1",
            f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
            *_status(status),
        )

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.notify(*_status(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> list[str]:
    return [] if text is None else [f"STATUS={' '.join(text.split())}"]


LivenessCheck = Callable[[], float]  # seconds stalled, 0.0 when alive


class ServiceMonitor:
    """The service's side of the conversation once READY: watchdog pings and STATUS=.

    Runs as one named task; with no `NOTIFY_SOCKET` it returns at once. A stalled loop is
    logged once (`watchdog_withheld`), and `watchdog_resumed` closes the episode if the
    loop recovers before systemd's timeout.
    """

    def __init__(
        self,
        notifier: ServiceNotifier,
        checks: Mapping[str, LivenessCheck],
        status: Callable[[], Awaitable[str]] | None = None,
        *,
        status_interval_s: float = STATUS_INTERVAL_S,
    ) -> None:
        self._notifier = notifier
        self._checks = dict(checks)
        self._status = status
        self._status_interval_s = status_interval_s
        self._status_failing = False
        self._withheld: dict[str, float] = {}
        self.pings = 0

    async def run(self) -> None:
        """Until cancelled. Pings and status run apart: a slow status query (a busy
        store) must not delay a ping."""
        if not self._notifier.enabled:
            return
        async with asyncio.TaskGroup() as tasks:
            if self._notifier.watchdog_interval_s is not None:
                tasks.create_task(
                    self._watchdog_loop(self._notifier.watchdog_interval_s), name="sd-watchdog"
                )
            if self._status is not None:
                tasks.create_task(self._status_loop(self._status), name="sd-status")

    async def _watchdog_loop(self, interval_s: float) -> None:
        while True:
            if self._all_alive():
                self._notifier.watchdog()
                self.pings += 1
            await asyncio.sleep(interval_s)

    def _all_alive(self) -> bool:
        alive = True
        for name, check in self._checks.items():
            stalled_s = check()
            if stalled_s > 0:
                alive = False
                if name not in self._withheld:
                    self._withheld[name] = time.monotonic()
                    log.error(
                        "watchdog_withheld",
                        loop=name,
                        overdue_s=round(stalled_s, 1),
                        action="no WATCHDOG=1 until it moves again; systemd restarts the "
                        "service at WatchdogSec",
                    )
            elif name in self._withheld:
                since = self._withheld.pop(name)
                log.warning(
                    "watchdog_resumed", loop=name, withheld_s=round(time.monotonic() - since, 1)
                )
        return alive

    async def _status_loop(self, status: Callable[[], Awaitable[str]]) -> None:
        while True:
            text: str | None = None
            try:
                async with asyncio.timeout(STATUS_QUERY_TIMEOUT_S):
                    text = await status()
            except TimeoutError:
                pass  # the store is busy or stuck: the watchdog deals with stuck
            except Exception as exc:
                # A summary for systemctl must never take the daemon down with it.
                if not self._status_failing:
                    log.warning("service_status_failed", error=f"{type(exc).__name__}: {exc}")
                self._status_failing = True
            else:
                self._status_failing = False
            # Compared with what the manager shows, so a reload's own STATUS= is replaced.
            if text is not None and text != self._notifier.last_status:
                self._notifier.status(text)
            await asyncio.sleep(self._status_interval_s)


# --------------------------------------------------------------------------- STATUS= text


def status_line(
    *,
    cloud_online: bool,
    mqtt_connected: bool,
    backlog: int,
    oldest_age_s: float | None = None,
    quota_used: int | None = None,
    quota_limit: int | None = None,
    extra: str | None = None,
) -> str:
    """`online, backlog 12,345 (oldest 3h12m), quota 4,210/10,000 today` and what is wrong."""
    parts = ["online" if cloud_online else "offline (buffering)"]
    backlog_text = f"backlog {backlog:,}"
    if backlog and oldest_age_s is not None:
        backlog_text += f" (oldest {format_duration(oldest_age_s)})"
    parts.append(backlog_text)
    if quota_used is not None and quota_limit is not None:
        parts.append(f"quota {quota_used:,}/{quota_limit:,} today")
    if not mqtt_connected:
        parts.append("MQTT broker not connected")
    if extra:
        parts.append(extra)
    return ", ".join(parts)
