"""systemd integration: sd_notify and the watchdog's liveness rule.

Standard library only (a datagram to `$NOTIFY_SOCKET`, as sd_notify(3) does), so the
daemon gains no dependency and runs unchanged outside systemd, where every call here is a
no-op. What the service manager is told:

* `READY=1` once the buffer is open and ingest has started. A broker that is down at boot
  does not hold READY back (the buffer still protects whatever arrives later); `STATUS=`
  says so instead.
* `WATCHDOG=1` every half `WATCHDOG_USEC`, but only while both long-running loops make
  progress. A loop reports liveness (gateway/aio.py) through a `Heartbeat` (it beats
  on every iteration and declares how long its next wait may legitimately take) or through
  a `ProgressWatch` (work is waiting and a counter should move). A loop that is
  blocked or deadlocked stops both, no WATCHDOG=1 is sent, and systemd restarts the
  service. If the event loop itself is blocked, nothing is sent either.
* `STATUS=` a one-line summary, at most every `STATUS_INTERVAL_S` and only when it changed.
* `RELOADING=1` … `READY=1` around a reload, `STOPPING=1` when shutdown begins.
* While the store salvages a damaged file, upgrades an old one or checks a whole one
  (work that can outlast `WatchdogSec=` and `TimeoutStartSec=`), and only while it
  reports progress: `EXTEND_TIMEOUT_USEC=`, `WATCHDOG=1` once READY, and `STATUS=` saying
  how far it got (:meth:`ServiceNotifier.long_work`). Otherwise systemd kills the gateway
  mid-salvage and the next start begins again: a restart loop.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping

from gateway.log import format_duration, get_logger

log = get_logger("systemd")

# systemctl shows STATUS=; more often than this is noise in the manager's state.
STATUS_INTERVAL_S = 5.0
# A status query that takes longer than this (a stuck store) is skipped, not awaited.
STATUS_QUERY_TIMEOUT_S = 2.0
# Long store work: EXTEND_TIMEOUT_USEC= asks for this much more time each time it is sent,
# at most every LONG_WORK_NOTIFY_S (and at least twice per watchdog interval). Work that
# stops reporting is given up on by systemd this long after its last report.
LONG_WORK_EXTEND_S = 30.0
LONG_WORK_NOTIFY_S = 5.0


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
        # READY=1 arms systemd's watchdog and STOPPING=1 ends it: WATCHDOG=1 only between.
        self._phase = "starting"
        # Long store work (`long_work`), reported from the thread that does it.
        self._long_work_lock = threading.Lock()
        self._long_work_active = False
        self._long_work_sent = -math.inf
        # When work that holds the store (ingest and flush wait) last reported, or ended.
        self._holding_store = False
        self._holding_store_at = -math.inf
        interval_s = self.watchdog_interval_s
        self.long_work_every_s = (
            min(LONG_WORK_NOTIFY_S, interval_s / 2) if interval_s else LONG_WORK_NOTIFY_S
        )

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
        self._phase = "running"
        return self.notify("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """A reload begins; MONOTONIC_USEC lets newer managers match it to its READY=1."""
        return self.notify(
            "RELOADING=1",
            f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
            *_status(status),
        )

    def stopping(self, status: str | None = None) -> bool:
        self._phase = "stopping"
        return self.notify("STOPPING=1", *_status(status))

    # ------------------------------------------------------------ long store work
    # The store's `LongWorkObserver` (gateway.store.progress): called from worker threads.

    def long_work(self, status: str, *, holds_store: bool) -> None:
        """Long store work still moves; tell systemd, at most every `long_work_every_s`.

        sd_notify(3): `EXTEND_TIMEOUT_USEC=` extends the timeout of the state the service
        is in: `TimeoutStartSec=` before READY=1 (the watchdog is not armed yet: WATCHDOG=1
        would arm it early), `TimeoutStopSec=` after STOPPING=1 (a salvage under way
        finishes before the store closes). Once READY, the watchdog is what could kill
        us, and `WATCHDOG=1` is what feeds it: sent from here too while the work
        `holds_store`, because the loops that normally earn it are waiting for the store
        (work beside them, the full check, leaves the pings to the monitor). Sent from
        the work's own thread, only when it reports: work that hangs stops the messages,
        and systemd's timeouts apply.
        """
        now = time.monotonic()
        with self._long_work_lock:
            self._long_work_active = True
            if holds_store:
                self._holding_store, self._holding_store_at = True, now
            if now - self._long_work_sent < self.long_work_every_s:
                return
            self._long_work_sent = now
        extend_usec = int(max(LONG_WORK_EXTEND_S, 4 * self.long_work_every_s) * 1_000_000)
        lines = [f"EXTEND_TIMEOUT_USEC={extend_usec}", *_status(status)]
        if holds_store and self._phase == "running" and self.watchdog_interval_s is not None:
            lines.insert(1, "WATCHDOG=1")
        self.notify(*lines)

    def long_work_done(self) -> None:
        """The long work ended; the next one is told at once. STATUS= is the monitor's
        again (its next summary replaces the work's line)."""
        with self._long_work_lock:
            self._long_work_active = False
            if self._holding_store:
                self._holding_store, self._holding_store_at = False, time.monotonic()
            self._long_work_sent = -math.inf

    @property
    def long_work_active(self) -> bool:
        return self._long_work_active

    def long_work_excuses_loops(self) -> bool:
        """Whether the loops may stand still for the store's long work: work that holds
        the store reported within one watchdog timeout (or ended that recently, giving
        them time to move again).

        Longer would keep a hung salvage alive with the monitor's pings; shorter would
        only log `watchdog_withheld` for loops that merely wait (the work's own pings
        keep systemd fed).
        """
        window_s = 2 * self.watchdog_interval_s if self.watchdog_interval_s else 0.0
        return time.monotonic() - self._holding_store_at < window_s

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
        if self._notifier.long_work_excuses_loops():
            # Ingest and flush wait for the store's salvage (it holds the store's lock);
            # the work reports its own progress, and its pings stop if it hangs.
            return True
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
            if self._notifier.long_work_active:
                # STATUS= tells how far the store's long work got; its end hands it back.
                await asyncio.sleep(self._status_interval_s)
                continue
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
    held_for_clock: int | None = None,
) -> str:
    """`online, backlog 12,345 (oldest 3h12m), quota 4,210/10,000 today` and what is wrong.

    `held_for_clock`: the clock is not trusted and this many readings wait for it."""
    parts = ["online" if cloud_online else "offline (buffering)"]
    if held_for_clock is not None:
        parts.append(f"waiting for the clock ({held_for_clock:,} readings held)")
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
