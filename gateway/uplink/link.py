"""The link to the cloud: online or not, how long to wait after a failure, when to probe.

Two kinds of trouble are told apart, because they end differently:

* **unreachable** (`ConnectFailed`: DNS, refused, unreachable, connect timeout, TLS): the
  request never left. Waiting out an exponential backoff would leave the gateway idle for
  minutes after the uplink returns, so while it lasts the link is probed with a bare TCP
  (and TLS) connect every `probe_interval_s`, jittered, and at once when the network
  watcher reports a change; the first probe that connects ends the wait.
* **answered badly** (5xx, 429, a timeout after sending): a connect would succeed and say
  nothing, so the wait is a capped exponential backoff with full jitter, at least as long as
  the cloud's Retry-After.

An outage is logged as a state change: `went_offline` once (with its kind),
`still_offline` at most once a minute, `cloud_reachable` when a probe connects, and one
`back_online` with the backlog and how long it lasted.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.aio import wait_any
from gateway.config import FlushSettings
from gateway.errors import (
    AuthFailed,
    CloudServerError,
    ConnectFailed,
    RateLimited,
    RetryableCloudError,
    WrongRegion,
)
from gateway.log import get_logger

log = get_logger("flush")

# The cloud's Retry-After is obeyed even beyond backoff_max_s, up to this sanity cap.
MAX_RETRY_AFTER_S = 3600.0
STILL_OFFLINE_LOG_INTERVAL_S = 60.0
# Probes are spread over [1 - j, 1 + j] x probe_interval_s so a fleet does not beat in step.
PROBE_JITTER = 0.2

UplinkFailure = RetryableCloudError | WrongRegion


@dataclass
class UplinkStats:
    failures: int = 0
    probes: int = 0
    # Backoff waits that a successful probe ended early (the cloud came back).
    probe_resumes: int = 0


class Uplink:
    def __init__(
        self,
        settings: FlushSettings,
        probe: Callable[[], Awaitable[None]],
        *,
        stop: asyncio.Event,
        backlog: Callable[[], int],
        network_changed: asyncio.Event | None = None,
    ) -> None:
        self._settings = settings
        self._probe = probe
        self._stop = stop
        self._backlog = backlog
        # Our own listener flag on the network watcher: probe now, not at the next tick.
        self._network_changed = network_changed or asyncio.Event()
        self.stats = UplinkStats()
        self.online = True
        self._offline_since: float | None = None
        self._failure_streak = 0
        self._last_failure_log = 0.0
        self._backoff_until = 0.0
        # The last failure was "cannot connect": probing may end the backoff early.
        self._unreachable = False

    def reconfigure(self, settings: FlushSettings) -> None:
        """New backoff and probe timings (a reload); a wait under way keeps its deadline."""
        self._settings = settings

    def in_backoff(self) -> bool:
        return time.monotonic() < self._backoff_until

    def failed(self, exc: UplinkFailure, *, slow: bool = False) -> None:
        """An upload failed in a way that says nothing about its data: wait, log once.

        Requests in flight together (`cloud.max_concurrent_requests`) fail together: one
        that fails while the backoff another started still runs is the same failure, and
        does not lengthen the next backoff."""
        if not self.online and self.in_backoff():
            return
        self.stats.failures += 1
        self._failure_streak += 1
        self._unreachable = isinstance(exc, ConnectFailed)
        delay = self._delay_s(exc, slow)
        now = time.monotonic()
        self._backoff_until = now + delay
        if self.online:
            self.online = False
            self._offline_since = now
            self._last_failure_log = now
            event, kind = _failure_names(exc)
            log.error(
                event,
                kind=kind,
                error=exc.message,
                status=exc.status,
                backlog=self._backlog(),
                retry_in_s=round(delay, 2),
                probing_every_s=self._settings.probe_interval_s if self._unreachable else None,
            )
        elif now - self._last_failure_log >= STILL_OFFLINE_LOG_INTERVAL_S:
            self._last_failure_log = now
            log.warning(
                "still_offline",
                kind=_failure_names(exc)[1],
                error=exc.message,
                status=exc.status,
                failures=self._failure_streak,
                probes=self.stats.probes,
                down_s=self._down_s(),
                backlog=self._backlog(),
            )

    def _delay_s(self, exc: UplinkFailure, slow: bool) -> float:
        cap = min(
            self._settings.backoff_max_s,
            self._settings.backoff_min_s * 2 ** min(self._failure_streak - 1, 30),
        )
        if isinstance(exc, AuthFailed | WrongRegion) or slow:
            delay = self._settings.auth_retry_s
        elif self._unreachable:
            # Jittered probes end this wait as soon as the cloud can be reached; the full
            # backoff is only the fallback should probes fail where requests would not.
            delay = cap
        else:
            delay = random.uniform(0, cap)
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        return delay

    def succeeded(self) -> bool:
        """An upload went through; True when that ends an outage (logged once)."""
        self._unreachable = False
        if self.online:
            self._failure_streak = 0
            return False
        self.online = True
        log.info(
            "back_online",
            backlog=self._backlog(),
            previous_errors=self._failure_streak,
            down_s=self._down_s(),
        )
        self._failure_streak = 0
        return True

    async def wait_out_backoff(self) -> None:
        """Until the backoff expires or stop; while unreachable, probe and end it early."""
        while not self._stop.is_set():
            remaining_s = self._backoff_until - time.monotonic()
            if remaining_s <= 0:
                return
            if not self._unreachable:
                await wait_any(self._stop, timeout_s=remaining_s)
                return
            self._network_changed.clear()
            interval_s = self._settings.probe_interval_s * random.uniform(
                1 - PROBE_JITTER, 1 + PROBE_JITTER
            )
            await wait_any(
                self._stop, self._network_changed, timeout_s=min(remaining_s, interval_s)
            )
            if self._stop.is_set():
                return
            if self.in_backoff() and await self.probe():
                self.stats.probe_resumes += 1
                self._backoff_until = 0.0
                return

    async def ready_for_final_flush(self) -> bool:
        """At shutdown there is no time to wait out a backoff: one probe may end it."""
        if not self.in_backoff():
            return True
        return self._unreachable and await self.probe()

    async def probe(self) -> bool:
        """One cheap connect; True (logged) when the cloud can be reached again."""
        self.stats.probes += 1
        try:
            await self._probe()
        except ConnectFailed:
            return False
        log.info(
            "cloud_reachable",
            probes=self.stats.probes,
            down_s=self._down_s(),
            action="uploading now",
        )
        return True

    def _down_s(self) -> float:
        now = time.monotonic()
        return round(now - (self._offline_since or now), 1)


# How each failure is named in the log: (type, event of the first line, kind).
_FAILURE_NAMES: tuple[tuple[type[Exception], str, str], ...] = (
    (ConnectFailed, "went_offline", "unreachable"),  # nothing answered: probe
    (CloudServerError, "went_offline", "server_error"),
    (RateLimited, "rate_limited", "rate_limited"),
    (AuthFailed, "auth_failed", "auth"),
    (WrongRegion, "wrong_region", "wrong_region"),
)


def _failure_names(exc: UplinkFailure) -> tuple[str, str]:
    """(event, kind): `unreachable` versus the ways the cloud answered badly."""
    for kind_of_error, event, kind in _FAILURE_NAMES:
        if isinstance(exc, kind_of_error):
            return event, kind
    return "went_offline", "no_answer"  # the request was sent; the answer broke off
