"""store → cloud: the upload loop.

Each pass visits every stream that has buffered readings once, in rotation, and sends at
most one batch per stream, so a device with a 50,000-point backlog cannot starve one with
ten new points. Before sending, a batch is trimmed to the device's remaining daily quota
and readings too old for the cloud are dead-lettered, so nothing is sent that the cloud
will refuse. The outcome of every upload is one of: delivered (acked in the store),
buffered (retried after a backoff), or dead-lettered with the cloud's reason.

The loop waits on (stop, tick, new rows, backoff expiry), like litestream's replica loop;
failures are logged once per state change, and a streak of them is closed by one
`back_online` line that says how many there were.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.aio import wait_any
from gateway.cloud import BlynkCloud
from gateway.config import CloudSettings, FlushSettings
from gateway.errors import (
    AuthFailed,
    BatchRejected,
    PermanentCloudError,
    QuotaRefused,
    RateLimited,
    RetryableCloudError,
    StoreError,
    UnknownTarget,
    WrongRegion,
)
from gateway.log import get_logger
from gateway.models import Batch, StreamKey
from gateway.quota import DailyQuota
from gateway.store import Store, StreamState

log = get_logger("flush")

EXPIRY_SWEEP_INTERVAL_S = 60.0
STORE_RETRY_MIN_S = 0.5
STORE_RETRY_MAX_S = 30.0
# The cloud's Retry-After is obeyed even beyond backoff_max_s, up to this sanity cap.
MAX_RETRY_AFTER_S = 3600.0


class PassOutcome(enum.Enum):
    SENT = "sent"  # something was delivered or dead-lettered: go again at once
    IDLE = "idle"  # nothing sendable: wait for new rows or the tick
    BACKOFF = "backoff"  # the cloud is failing: wait for the backoff to expire


@dataclass
class FlushStats:
    requests: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    expired: int = 0
    failures: int = 0


class FlushLoop:
    def __init__(
        self,
        store: Store,
        cloud: BlynkCloud,
        settings: FlushSettings,
        cloud_settings: CloudSettings,
        *,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self._store = store
        self._new_rows = store.new_rows.listen()
        self._cloud = cloud
        self._settings = settings
        self._cloud_settings = cloud_settings
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._quota = DailyQuota(cloud_settings.daily_points_limit, cloud_settings.day_timezone)
        self.stats = FlushStats()
        self._stop = asyncio.Event()
        self._rotation = 0
        self._offline_since: float | None = None
        self._failure_streak = 0
        self._last_failure_log = 0.0
        self._backoff_until = 0.0
        self._recovering = store.pending_points > 0
        self._final_flush_active = False
        self._exhausted_logged: set[tuple[int, str]] = set()
        self._parked_logged: set[StreamKey] = set()
        self._next_expiry_sweep = 0.0
        self._store_failures = 0
        self._unacked: list[tuple[Batch, str]] = []
        self.online = True

    def stop(self) -> None:
        self._stop.set()

    async def unpark_all(self) -> None:
        """Retry every parked stream now: after a config reload the ids may have been fixed."""
        await self._store.unpark()
        self._parked_logged.clear()
        self._new_rows.set()

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                outcome = await self.run_pass()
            except StoreError as exc:
                await self._store_unavailable(exc)
                continue
            self._store_available()
            if outcome is PassOutcome.SENT:
                continue
            if outcome is PassOutcome.BACKOFF:
                await self._wait(self._backoff_until - time.monotonic(), wake_on_new_rows=False)
                continue
            await self._wait(self._settings.interval_s, wake_on_new_rows=True)
            if self._new_rows.is_set() and self._store.pending_points < self._settings.batch_size:
                # Let a trickle of new readings gather into one request and one delete
                # transaction (fewer requests, less SD wear) instead of one per commit.
                await self._wait(self._settings.linger_s, wake_on_new_rows=False)

    async def _store_unavailable(self, exc: StoreError) -> None:
        """The buffer cannot be written (full disk, read-only): keep trying, log once."""
        self._store_failures += 1
        if self._store_failures == 1:
            log.error(
                "flush_store_unavailable",
                error=str(exc),
                unacked_batches=len(self._unacked),
                action="retrying; batches the cloud accepted are acknowledged locally later",
            )
        delay = min(STORE_RETRY_MAX_S, STORE_RETRY_MIN_S * 2 ** min(self._store_failures - 1, 10))
        await self._wait(delay, wake_on_new_rows=False)

    def _store_available(self) -> None:
        if self._store_failures:
            log.info("flush_store_recovered", failed_attempts=self._store_failures)
            self._store_failures = 0

    async def _ack_delivered(self) -> None:
        """Record batches the cloud accepted but the store could not yet acknowledge.

        Until they are recorded no new pass starts, so their rows are not uploaded twice.
        """
        while self._unacked:
            batch, day = self._unacked[0]
            await self._store.ack(batch, day)
            self._unacked.pop(0)

    async def _wait(self, timeout_s: float, *, wake_on_new_rows: bool) -> None:
        events = [self._stop]
        if wake_on_new_rows:
            events.append(self._new_rows)
        await wait_any(*events, timeout_s=timeout_s)

    async def final_flush(self, timeout_s: float) -> None:
        """Bounded last effort at shutdown; whatever is left stays buffered for next start."""
        if timeout_s <= 0 or self._store.pending_points == 0:
            return
        if time.monotonic() < self._backoff_until:
            return
        self._final_flush_active = True
        try:
            async with asyncio.timeout(timeout_s):
                while self._store.pending_points:
                    if await self.run_pass() is not PassOutcome.SENT:
                        break
        except TimeoutError:
            log.warning("final_flush_timed_out", left_buffered=self._store.pending_points)
        except StoreError as exc:
            log.error("final_flush_store_unavailable", error=str(exc))
        finally:
            self._final_flush_active = False

    # ------------------------------------------------------------------ one pass

    async def run_pass(self) -> PassOutcome:
        await self._ack_delivered()
        self._new_rows.clear()
        await self._expire_if_due()
        streams = await self._store.pending_streams()
        if not streams:
            self._note_drained()
            return PassOutcome.IDLE
        count = len(streams)
        start = self._rotation % count
        self._rotation += 1
        sent_any = False
        for stream in streams[start:] + streams[:start]:
            if self._stop.is_set() and not self._final_flush_active:
                break
            if not await self._sendable(stream):
                continue
            outcome = await self._send_stream(stream)
            if outcome is PassOutcome.BACKOFF:
                return outcome
            sent_any = sent_any or outcome is PassOutcome.SENT
        return PassOutcome.SENT if sent_any else PassOutcome.IDLE

    async def _sendable(self, stream: StreamState) -> bool:
        if stream.parked_reason is None:
            return True
        return stream.parked_until_ms is None or stream.parked_until_ms <= self._clock_ms()

    async def _send_stream(self, stream: StreamState) -> PassOutcome:
        now_ms = self._clock_ms()
        day = self._quota.day_of(now_ms)
        sent_today, exhausted = await self._store.points_sent(stream.key.device_id, day)
        allowance = self._quota.allowance(sent_today, exhausted)
        if allowance <= 0:
            self._note_exhausted(stream.key.device_id, day, now_ms, sent_today)
            return PassOutcome.IDLE
        batch = (
            await self._store.lease(
                stream.key,
                min(self._settings.batch_size, allowance),
                newest_first=self._settings.order == "newest",
            )
        ).batch
        if not batch.points:
            return PassOutcome.IDLE
        outcome = await self._deliver(batch, day)
        if outcome is PassOutcome.SENT and stream.parked_reason is not None:
            await self._store.unpark(stream.key)
            self._parked_logged.discard(stream.key)
            log.info(
                "stream_unparked",
                device_id=stream.key.device_id,
                datastream_id=stream.key.datastream_id,
            )
        return outcome

    async def _deliver(self, batch: Batch, day: str) -> PassOutcome:
        """Upload one batch, bisecting it when the cloud refuses some of its points."""
        self.stats.requests += 1
        try:
            await self._cloud.upload(batch)
        except RetryableCloudError as exc:
            self._went_wrong(exc)
            return PassOutcome.BACKOFF
        except WrongRegion as exc:
            self._went_wrong(exc, slow=True)
            return PassOutcome.BACKOFF
        except UnknownTarget as exc:
            await self._park(batch.stream, f"{exc.kind}_not_found: {exc.message}")
            return PassOutcome.IDLE
        except QuotaRefused as exc:
            await self._store.mark_exhausted(batch.stream.device_id, day)
            self._note_exhausted(batch.stream.device_id, day, self._clock_ms(), None, exc.message)
            return PassOutcome.IDLE
        except BatchRejected as exc:
            return await self._bisect(batch, day, exc)
        except PermanentCloudError as exc:  # pragma: no cover - every subclass handled above
            await self._dead_letter(batch, exc.message)
            return PassOutcome.SENT
        self.stats.delivered += len(batch)
        self._came_back()
        self._unacked.append((batch, day))
        await self._ack_delivered()
        return PassOutcome.SENT

    async def _bisect(self, batch: Batch, day: str, exc: BatchRejected) -> PassOutcome:
        if len(batch) == 1:
            await self._dead_letter(batch, f"rejected: {exc.message}")
            return PassOutcome.SENT
        for half in batch.split():
            outcome = await self._deliver(half, day)
            if outcome is not PassOutcome.SENT:
                return outcome
        return PassOutcome.SENT

    async def _dead_letter(self, batch: Batch, reason: str) -> None:
        await self._store.dead_letter(batch, reason)
        self.stats.dead_lettered += len(batch)
        log.warning(
            "points_dead_lettered",
            device_id=batch.stream.device_id,
            datastream_id=batch.stream.datastream_id,
            count=len(batch),
            reason=reason,
        )

    async def _park(self, stream: StreamKey, reason: str) -> None:
        until_ms = self._clock_ms() + int(self._settings.parked_retry_s * 1000)
        await self._store.park(stream, reason, until_ms)
        if stream not in self._parked_logged:
            self._parked_logged.add(stream)
            log.error(
                "stream_parked",
                device_id=stream.device_id,
                datastream_id=stream.datastream_id,
                reason=reason,
                retry_in_s=self._settings.parked_retry_s,
                action="data kept; check the ids in the route, or create them in Blynk",
            )

    async def _expire_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_expiry_sweep:
            return
        self._next_expiry_sweep = now + EXPIRY_SWEEP_INTERVAL_S
        max_age_ms = (
            self._cloud_settings.max_age_days * 86_400_000
            - self._cloud_settings.age_margin_hours * 3_600_000
        )
        cutoff_ms = self._clock_ms() - int(max_age_ms)
        moved = await self._store.expire(cutoff_ms)
        if moved:
            self.stats.expired += moved
            log.warning(
                "readings_expired",
                count=moved,
                cutoff_ms=cutoff_ms,
                max_age_days=self._cloud_settings.max_age_days,
            )

    # ------------------------------------------------------------------ state changes

    def _note_exhausted(
        self,
        device_id: int,
        day: str,
        now_ms: int,
        sent_today: int | None,
        cloud_message: str | None = None,
    ) -> None:
        if (device_id, day) in self._exhausted_logged:
            return
        self._exhausted_logged.add((device_id, day))
        resumes_at = self._quota.next_reset_ms(now_ms)
        log.warning(
            "quota_exhausted",
            device_id=device_id,
            day=day,
            sent_today=sent_today,
            limit=self._quota.limit,
            resumes_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(resumes_at / 1000)),
            refused_by_cloud=cloud_message,
        )

    def _went_wrong(self, exc: RetryableCloudError | WrongRegion, slow: bool = False) -> None:
        self.stats.failures += 1
        self._failure_streak += 1
        if isinstance(exc, AuthFailed | WrongRegion) or slow:
            delay = self._settings.auth_retry_s
        else:
            cap = min(
                self._settings.backoff_max_s,
                self._settings.backoff_min_s * 2 ** min(self._failure_streak - 1, 30),
            )
            delay = random.uniform(0, cap)
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S))
        self._backoff_until = time.monotonic() + delay
        event = "auth_failed" if isinstance(exc, AuthFailed) else "went_offline"
        if isinstance(exc, WrongRegion):
            event = "wrong_region"
        elif isinstance(exc, RateLimited):
            event = "rate_limited"
        now = time.monotonic()
        if self.online:
            self.online = False
            self._offline_since = now
            self._last_failure_log = now
            log.error(
                event,
                error=exc.message,
                status=exc.status,
                backlog=self._store.pending_points,
                retry_in_s=round(delay, 2),
            )
        elif now - self._last_failure_log >= 60.0:
            self._last_failure_log = now
            log.warning(
                "still_offline",
                error=exc.message,
                status=exc.status,
                failures=self._failure_streak,
                backlog=self._store.pending_points,
                retry_in_s=round(delay, 2),
            )

    def _came_back(self) -> None:
        if self.online:
            self._failure_streak = 0
            return
        self.online = True
        down_s = time.monotonic() - (self._offline_since or time.monotonic())
        log.info(
            "back_online",
            backlog=self._store.pending_points,
            previous_errors=self._failure_streak,
            down_s=round(down_s, 1),
        )
        self._failure_streak = 0
        self._recovering = True

    def _note_drained(self) -> None:
        if self._recovering:
            self._recovering = False
            log.info("backlog_drained", delivered_total=self.stats.delivered)
