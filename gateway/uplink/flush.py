"""store → cloud: the upload loop.

Each pass visits every stream that is due (pacing.py: batching by time, sized from the
request budget) once, in rotation, up to `cloud.max_concurrent_requests` at once
(inflight.py), one batch each: a 50,000-point backlog cannot starve ten new points.
Streams the cloud has accepted before go first; new and parked ones are
tried at a bounded rate after them (stream_order.py), so thousands of ids the cloud does not
know cannot delay a device it does. Before sending, a batch is trimmed to the device's
remaining daily quota, and the age rule is applied at the moment of sending (age.py: to
every batch and every half of a bisected one): points older than the cloud accepts are
dead-lettered as `expired`, so no request carries a point the cloud will refuse for age.
The outcome of every upload is one of: delivered (acked in the store, charged to the quota
day in which the cloud accepted it), buffered (retried later), or dead-lettered with the
cloud's reason.

Two kinds of trouble are told apart. When the cloud cannot be reached at all, the loop
probes it with a bare TCP (and TLS) connect every `probe_interval_s` and uploads as soon as
one succeeds, however long the outage. When the cloud answers badly (5xx, 429, a timeout
after sending), it backs off exponentially and obeys Retry-After.

The loop waits on (stop, tick, a stream due, backoff expiry), like litestream's replica
loop; failures are logged once per state change, a streak of them closed by one
`back_online` line; while a large backlog drains, a `draining` line every 30 s. It beats
a `Heartbeat` on every iteration, every request and before every wait (naming the wait's
bound), so systemd's watchdog can tell a loop that waits from one that is stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.aio import Heartbeat, wait_any
from gateway.clock import Clock
from gateway.config import CloudSettings, FlushSettings
from gateway.errors import (
    BatchRejected,
    PermanentCloudError,
    QuotaRefused,
    RetryableCloudError,
    StoreError,
    TooOld,
    UnknownTarget,
    WrongRegion,
)
from gateway.log import get_logger
from gateway.models import Batch, StreamKey
from gateway.store import Store, StreamState
from gateway.uplink.acks import HeldAcks
from gateway.uplink.age import AgeRule
from gateway.uplink.budget import RequestBudget
from gateway.uplink.clockgate import ClockGate
from gateway.uplink.cloud import CloudClient
from gateway.uplink.drain_progress import DRAIN_MIN_BATCHES, DrainProgress
from gateway.uplink.inflight import InFlight, run_round
from gateway.uplink.link import Uplink
from gateway.uplink.pacing import Pacing
from gateway.uplink.passthrough import PassThrough
from gateway.uplink.quota import DailyQuota
from gateway.uplink.stream_order import StreamEvents, StreamOrder

log = get_logger("flush")

STORE_RETRY_MIN_S = 0.5
STORE_RETRY_MAX_S = 30.0
# The watchdog's budget between two heartbeats: a cloud exchange (a token request and the
# upload, each up to connect + write + read timeouts) plus store calls.
HEARTBEAT_REQUEST_TIMEOUTS = 6
HEARTBEAT_MARGIN_S = 10.0


class PassOutcome(enum.Enum):
    SENT = "sent"  # something was delivered or dead-lettered: go again at once
    IDLE = "idle"  # nothing sendable: wait for new rows or the tick
    BACKOFF = "backoff"  # the cloud is failing: wait for the backoff to expire


@dataclass
class FlushStats:
    passes: int = 0
    requests: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    expired: int = 0


class FlushLoop:
    # Told of every upload attempt (batch, seconds, the error or None): `status`, metrics.
    upload_observer: Callable[[Batch, float, BaseException | None], None] | None = None

    def __init__(
        self,
        store: Store,
        cloud: CloudClient,
        settings: FlushSettings,
        cloud_settings: CloudSettings,
        *,
        clock_ms: Callable[[], int] | None = None,
        network_changed: asyncio.Event | None = None,
        clock: Clock | None = None,
        budget: RequestBudget | None = None,
    ) -> None:
        """`clock`: upload only while it is trusted, re-evaluate after its steps
        (clockgate.py); None: `clock_ms` is always trusted."""
        self._store = store
        self._clock_gate = None if clock is None else ClockGate(clock, store)
        self._new_rows = store.new_rows.listen()
        self.budget = budget or RequestBudget(cloud_settings.max_requests_per_minute)
        self.inflight = InFlight(cloud_settings.max_concurrent_requests)
        self.pacing = Pacing(self.budget)  # batching by time, planned with the budget
        self._cloud = cloud
        self._settings = settings
        self._cloud_settings = cloud_settings
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._quota = DailyQuota(cloud_settings.daily_points_limit, cloud_settings.day_timezone)
        self.stats = FlushStats()
        self._stop = asyncio.Event()
        self._rotation = 0
        self.uplink = Uplink(
            settings,
            cloud.probe,
            stop=self._stop,
            backlog=lambda: store.pending_points,
            network_changed=network_changed,
        )
        self._recovering = store.pending_points > 0
        self._final_flush_active = False
        self._drain_requested = False  # run_pass(drain=True)
        self._exhausted_logged: set[tuple[int, str]] = set()
        # Proven streams first, the others at a bounded rate (stream_order.py).
        self._stream_order = StreamOrder(settings.new_stream_tries_per_min)
        # Streams that were parked when this pass began: parking them again is not news.
        self._parked_before: set[StreamKey] = set()
        self._refused_now: set[StreamKey] = set()  # parked in this pass: refused tries
        self._untried = 0  # new streams waiting for a try, as of the last pass
        self._parked_log = StreamEvents("stream_parked", "streams_parked", "error")
        self._unparked_log = StreamEvents("stream_unparked", "streams_unparked", "info")
        self._store_failures = 0
        # The cloud's age rule at send time: expiry, the sweep, a clock skew (age.py).
        self._age = AgeRule(store, cloud_settings, clock_ms=self._clock_ms, stats=self.stats)
        # Batches the cloud accepted that the store has not deleted yet (acks.py).
        self._acks = HeldAcks(store)
        self.heartbeat = Heartbeat(
            HEARTBEAT_MARGIN_S + HEARTBEAT_REQUEST_TIMEOUTS * cloud_settings.timeout_s
        )
        self.drain = DrainProgress(DRAIN_MIN_BATCHES * settings.batch_size)
        # Upload-before-write while the cloud is reachable and nothing is buffered.
        self.pass_through = PassThrough(
            store,
            upload=self._timed_upload,
            quota=lambda: self._quota,
            clock_ms=self._clock_ms,
            cutoff_ms=self._age.cutoff_ms,
            inflight=self.inflight,
            pacing=self.pacing,
            trials=self._stream_order,
        )
        self._staged = store.staging.offered.listen()

    def stop(self) -> None:
        self._stop.set()
        self.pass_through.close()

    def reconfigure(self, settings: FlushSettings, cloud_settings: CloudSettings) -> None:
        """New flush and cloud settings (a reload), in force from the next pass."""
        self._settings = settings
        self._cloud_settings = cloud_settings
        self._quota = DailyQuota(cloud_settings.daily_points_limit, cloud_settings.day_timezone)
        self._age.reconfigure(cloud_settings)
        self.budget.reconfigure(cloud_settings.max_requests_per_minute)
        self.inflight.reconfigure(cloud_settings.max_concurrent_requests)
        self.uplink.reconfigure(settings)
        self._stream_order.allowance.reconfigure(settings.new_stream_tries_per_min)
        self._new_rows.set()

    async def unpark_all(self) -> None:
        """Retry every parked stream: after a config reload the ids may have been fixed.

        They become new streams again, tried at the bounded rate (no burst of requests).
        """
        await self._store.unpark()
        self._new_rows.set()

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        if self._pass_through_allowed():
            # Open before the first pass's queries: ingest's first group may come first,
            # and an empty buffer with the cloud presumed reachable is all it needs.
            self.pass_through.open()
        if (prepare := getattr(self._cloud, "prepare", None)) is not None:
            await prepare()  # BlynkCloud: a token ahead of the first upload; never raises
        while not self._stop.is_set():
            self._follow_settings()
            self.heartbeat.beat()
            try:
                outcome = await self.run_pass()
            except StoreError as exc:
                await self._store_unavailable(exc)
                continue
            self._store_available()
            self.drain.update(self._store.pending_points, self.stats.delivered)
            if outcome is PassOutcome.SENT:
                self.pass_through.close()
                continue
            if outcome is PassOutcome.BACKOFF:
                self.pass_through.close()
                self.heartbeat.beat_while(self.uplink.in_backoff)
                await self.uplink.wait_out_backoff()
                continue
            if self._pass_through_allowed():
                self.pass_through.open()
            else:
                self.pass_through.close()
            await self._until_due()
            if self._staged.is_set():
                self._staged.clear()
                await self._send_staged()

    async def _until_due(self) -> None:
        """Until a stream is due (pacing.py), a group is offered for pass-through, held
        acks are due, the tick, or stop. A commit alone only updates the pacing notes,
        except while the buffer drains to reopen pass-through."""
        deadline = time.monotonic() + self._settings.interval_s
        while not self._staged.is_set():
            self._follow_load()
            if self.pacing.drain and self._new_rows.is_set():
                return
            settings = self._settings
            waits = [deadline - time.monotonic(), self._acks.due_in_s()]
            if not self.pacing.drain:
                waits.append(self.pacing.next_due_in_s(settings.batch_size, settings.linger_s))
            wait_s = min(wait for wait in waits if wait is not None)
            if wait_s <= 0:
                return
            self._new_rows.clear()
            if await self._wait(wait_s, wake_on_new_rows=True, wake_on_staged=True):
                return
            if not self._new_rows.is_set():
                return  # the time came, or a group was offered

    def _follow_load(self) -> None:
        """Take the store's arrival notes; drain (no lingering) while shutting down or while
        ingest would pass through if only the buffer were empty; tell ingest how long to
        gather a pass-through group."""
        store, arrivals = self._store, self._store.arrivals
        self.pacing.absorb(arrivals.take(), arrivals.last_at, arrivals.gap_s)
        # Emptying the buffer so pass-through can reopen: without lingering, but only
        # within the budget's batching share; a drain that cannot catch up (readings keep
        # coming) must not spend the whole minute's budget in seconds.
        reopening = (
            self._settings.pass_through
            and self.uplink.online
            and not store.staging.paused
            and self.pacing.budget_room() > 0
        )
        self.pacing.drain = self._final_flush_active or self._drain_requested or reopening
        store.staging.hold_s = self.pacing.pass_through_hold_s()

    def _pass_through_allowed(self) -> bool:
        return (
            self._settings.pass_through
            and (self._clock_gate is None or self._clock_gate.open)
            and self.uplink.online
            and self._store.only_windows_buffered()  # sampling: windows wait in the buffer
            and not self._acks.busy
            and self.inflight.count == 0
            and not self._stop.is_set()
        )

    async def _send_staged(self) -> None:
        """Upload what ingest offered before writing it (see passthrough.py)."""
        stats = self.pass_through.stats
        requests, delivered = stats.requests, stats.delivered
        error = await self.pass_through.send_queued()
        self.stats.requests += stats.requests - requests
        self.stats.delivered += stats.delivered - delivered
        if self.uplink.online and stats.delivered > delivered:
            self.uplink.succeeded()
        if isinstance(error, RetryableCloudError | WrongRegion):
            # The same failure the buffered path would have met: the same backoff or
            # probing, then the buffered path retries what ingest wrote meanwhile.
            self.uplink.failed(error, slow=isinstance(error, WrongRegion))
            self.heartbeat.beat_while(self.uplink.in_backoff)
            await self.uplink.wait_out_backoff()
        # Any other refusal (unknown datastream, quota, age, a bad point) is met again by
        # the buffered path, which parks, counts or dead-letters as it always does.

    def _follow_settings(self) -> None:
        """A reload may change the cloud timeout and the batch size: the watchdog's budget
        and the `draining` threshold follow them."""
        timeout_s = self._cloud_settings.timeout_s
        self.heartbeat.budget_s = HEARTBEAT_MARGIN_S + HEARTBEAT_REQUEST_TIMEOUTS * timeout_s
        self.drain.min_backlog = DRAIN_MIN_BATCHES * self._settings.batch_size

    async def _store_unavailable(self, exc: StoreError) -> None:
        """The buffer cannot be written (full disk, read-only): keep trying, log once."""
        self._store_failures += 1
        if self._store_failures == 1:
            log.error(
                "flush_store_unavailable",
                error=str(exc),
                unacked_batches=len(self._acks),
                action="retrying; batches the cloud accepted are acknowledged locally later",
            )
        delay = min(STORE_RETRY_MAX_S, STORE_RETRY_MIN_S * 2 ** min(self._store_failures - 1, 10))
        await self._wait(delay, wake_on_new_rows=False)

    def _store_available(self) -> None:
        if self._store_failures:
            log.info("flush_store_recovered", failed_attempts=self._store_failures)
            self._store_failures = 0

    def _acks_due(self) -> bool:  # acks.py
        return self._acks.due(hurry=self.pacing.drain or self._stop.is_set())

    async def _wait(
        self, timeout_s: float, *, wake_on_new_rows: bool, wake_on_staged: bool = False
    ) -> bool:
        """Until stop (True), new rows or staged readings if asked, or the timeout."""
        self.heartbeat.beat(timeout_s)
        events = [self._stop]
        if wake_on_new_rows:
            events.append(self._new_rows)
        if wake_on_staged:
            events.append(self._staged)
        await wait_any(*events, timeout_s=timeout_s)
        return self._stop.is_set()

    async def final_flush(self, timeout_s: float) -> None:
        """Bounded last effort at shutdown; whatever is left stays buffered for next start."""
        try:
            await self._final_flush(timeout_s)
        finally:
            self._report_stream_events(force=True)

    async def _final_flush(self, timeout_s: float) -> None:
        try:
            await self._acks.delete()
        except StoreError as exc:
            log.error("final_flush_store_unavailable", error=str(exc))
            return
        if timeout_s <= 0 or self._store.pending_points == 0:
            return
        if not await self.uplink.ready_for_final_flush():
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
            with contextlib.suppress(StoreError):
                await self._acks.delete()
                await self._stream_order.remember(self._store)

    # ------------------------------------------------------------------ one pass

    async def run_pass(self, *, drain: bool = False) -> PassOutcome:
        """Upload one batch of every stream that is due (pacing.py), several at once;
        `drain`: of every stream with buffered readings, however short it lingered."""
        self.stats.passes += 1
        self._drain_requested = drain
        gate = self._clock_gate
        allowed = gate is None or await gate.allows(self._quota, self._acks.rebase)
        if self._acks_due():
            await self._acks.delete()
        await self._stream_order.remember(self._store)
        self._report_stream_events()
        self._new_rows.clear()
        if not allowed:
            return PassOutcome.IDLE  # the clock is not trusted: no quota day, no age rule
        await self._age.expire_if_due()
        listed_at = time.monotonic()
        streams = await self._store.pending_streams()
        self._follow_load()
        if not streams:
            self._note_drained()
            return PassOutcome.IDLE
        due = self.pacing.due(
            streams, listed_at, self._settings.batch_size, self._settings.linger_s
        )
        streams = [stream for stream in streams if stream.key in due.streams]
        if not streams:
            return PassOutcome.IDLE
        self._age.start_pass()
        try:
            return await self._visit(streams)
        finally:
            self.pacing.unsent(due.streams)
            self._age.end_pass()
            if self._acks_due():
                await self._acks.delete()
            await self._stream_order.remember(self._store)

    async def _visit(self, streams: list[StreamState]) -> PassOutcome:
        """Every proven stream (in rotation), then trials while the allowance lasts; up to
        `cloud.max_concurrent_requests` of them at once (inflight.py)."""
        plan = self._stream_order.plan(streams, self._clock_ms())
        self._parked_before = {s.key for s in streams if s.parked_reason is not None}
        self._refused_now = set()
        served = plan.rotated(self._rotation)
        self._rotation += 1
        allowance = self._stream_order.allowance
        order = [(stream, False) for stream in served] + [(s, True) for s in plan.trials]

        def may_start(item: tuple[StreamState, bool]) -> bool:
            if self._stop.is_set() and not self._final_flush_active:
                return False
            if item[1] and not allowance.take():
                return False  # the rest wait for the allowance to refill
            self.heartbeat.beat()
            return True

        async def send(item: tuple[StreamState, bool]) -> PassOutcome:
            stream, trial = item
            outcome = await self._send_stream(stream)
            if trial and stream.key not in self._refused_now:
                allowance.give_back()  # not refused: the try cost nothing
            return outcome

        outcomes = await run_round(
            self.inflight,
            order,
            send,
            stream_of=lambda item: item[0].key,
            may_start=may_start,
            finished=lambda _item, outcome: outcome is not PassOutcome.BACKOFF,
            beat=self.heartbeat.beat,
        )
        self._untried = plan.untried
        if PassOutcome.BACKOFF in outcomes:
            return PassOutcome.BACKOFF
        return PassOutcome.SENT if PassOutcome.SENT in outcomes else PassOutcome.IDLE

    def _report_stream_events(self, *, force: bool = False) -> None:
        """End the parked/unparked summary intervals that are over (every pass)."""
        self._parked_log.flush(
            force=force,
            untried_streams=self._untried,
            tries_per_min=self._settings.new_stream_tries_per_min,
        )
        self._unparked_log.flush(force=force)

    async def _sent_today(self, device_id: int, day: str) -> tuple[int, bool]:
        """The ledger's count plus what was accepted but not yet deleted or is in flight."""
        sent, exhausted = await self._store.points_sent(device_id, day)
        held = self._acks.points(device_id, day)
        return sent + held + self.inflight.points(device_id), exhausted

    async def _send_stream(self, stream: StreamState) -> PassOutcome:
        device_id = stream.key.device_id
        if self._acks.holds(stream.key):
            await self._acks.delete()  # its accepted rows leave before the next lease
        now_ms = self._clock_ms()
        day = self._quota.day_of(now_ms)
        async with self.inflight.device_lock(device_id):
            sent_today, exhausted = await self._sent_today(device_id, day)
            allowance = self._quota.allowance(sent_today, exhausted)
            if allowance <= 0:
                self._note_exhausted(device_id, day, now_ms, sent_today)
                return PassOutcome.IDLE
            wanted = min(self._settings.batch_size, allowance)
            self.inflight.hold_points(device_id, wanted)  # the quota counts them meanwhile
        try:
            return await self._lease_and_deliver(stream, wanted, now_ms)
        finally:
            self.inflight.hold_points(device_id, -wanted)

    async def _lease_and_deliver(
        self, stream: StreamState, wanted: int, now_ms: int
    ) -> PassOutcome:
        lease = await self._store.lease(
            stream.key,
            wanted,
            newest_first=self._settings.order == "newest",
            expire_before_ms=self._age.cutoff_ms(now_ms),
        )
        self.pacing.leased(stream.key, len(lease.batch), wanted)
        self._age.count_expired(lease.expired)
        batch = lease.batch
        if not batch.points:
            return PassOutcome.SENT if lease.expired else PassOutcome.IDLE
        outcome = await self._deliver(batch)
        if self._acks.due(hurry=False):
            await self._acks.delete()
        if outcome is PassOutcome.SENT and stream.parked_reason is not None:
            await self._store.unpark(stream.key)
            self._unparked_log.note(stream.key)
        return outcome

    async def _deliver(self, batch: Batch) -> PassOutcome:
        """Upload one batch, bisecting it when the cloud refuses some of its points."""
        batch = await self._age.without_expired(batch)
        if not batch.points:
            return PassOutcome.SENT
        self.heartbeat.beat()
        self.stats.requests += 1
        try:
            await self._timed_upload(batch)
        except RetryableCloudError as exc:
            self.uplink.failed(exc)
            return PassOutcome.BACKOFF
        except WrongRegion as exc:
            self.uplink.failed(exc, slow=True)
            return PassOutcome.BACKOFF
        except UnknownTarget as exc:
            await self._park(batch.stream, f"{exc.kind}_not_found: {exc.message}")
            return PassOutcome.IDLE
        except QuotaRefused as exc:
            now_ms = self._clock_ms()
            day = self._quota.day_of(now_ms)
            await self._store.mark_exhausted(batch.stream.device_id, day)
            self._note_exhausted(batch.stream.device_id, day, now_ms, None, exc.message)
            return PassOutcome.IDLE
        except TooOld as exc:
            rest = await self._age.refused_for_age(batch, exc)
            if rest is None:
                await self._park(batch.stream, f"refused_for_age: {exc.message}")
                return PassOutcome.IDLE
            return await self._deliver(rest) if rest.points else PassOutcome.SENT
        except BatchRejected as exc:
            return await self._bisect(batch, exc)
        except PermanentCloudError as exc:  # pragma: no cover - every subclass handled above
            await self._dead_letter(batch, "rejected", exc.message)
            return PassOutcome.SENT
        # Charged to the day in which the cloud accepted it, which may be past midnight.
        self._accepted(batch, self._quota.day_of(self._clock_ms()))
        if self.uplink.succeeded():
            self._recovering = True
        return PassOutcome.SENT

    async def _timed_upload(self, batch: Batch) -> None:
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            await self._cloud.upload(batch)
            self._stream_order.accepted(batch.stream)
        except BaseException as exc:
            error = exc
            raise
        finally:
            elapsed_s = time.perf_counter() - started
            self._store.staging.note_round_trip(elapsed_s)
            if self.upload_observer is not None:
                self.upload_observer(batch, elapsed_s, error)

    def _accepted(self, batch: Batch, day: str) -> None:
        self._acks.accepted(batch, day)
        self.stats.delivered += len(batch)

    async def _bisect(self, batch: Batch, exc: BatchRejected) -> PassOutcome:
        if len(batch) == 1:
            await self._dead_letter(batch, "rejected", exc.message)
            return PassOutcome.SENT
        for half in batch.split():
            outcome = await self._deliver(half)
            if outcome is not PassOutcome.SENT:
                return outcome
        return PassOutcome.SENT

    async def _dead_letter(self, batch: Batch, reason: str, detail: str) -> None:
        await self._store.dead_letter(batch, reason, detail)
        self.stats.dead_lettered += len(batch)
        log.warning(
            "points_dead_lettered",
            device_id=batch.stream.device_id,
            datastream_id=batch.stream.datastream_id,
            count=len(batch),
            reason=reason,
            detail=detail,
        )

    async def _park(self, stream: StreamKey, reason: str) -> None:
        """Hold the stream back for `parked_retry_s` (its data kept); logged when it was
        not parked already, many streams in one line per interval."""
        until_ms = self._clock_ms() + int(self._settings.parked_retry_s * 1000)
        await self._store.park(stream, reason, until_ms)
        self._refused_now.add(stream)
        if stream not in self._parked_before:
            self._parked_before.add(stream)
            self._parked_log.note(
                stream,
                reason,
                retry_in_s=self._settings.parked_retry_s,
                action="data kept; check the ids in the route, or create them in Blynk",
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
        # Only today's entries matter: forget earlier days so the set stays small.
        self._exhausted_logged = {key for key in self._exhausted_logged if key[1] == day}
        self._exhausted_logged.add((device_id, day))
        log.warning(
            "quota_exhausted",
            device_id=device_id,
            day=day,
            sent_today=sent_today,
            limit=self._quota.limit,
            resumes_at=_iso(self._quota.next_reset_ms(now_ms)),
            refused_by_cloud=cloud_message,
        )

    def _note_drained(self) -> None:
        if self._recovering:
            self._recovering = False
            log.info("backlog_drained", delivered_total=self.stats.delivered)


def _iso(epoch_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_ms / 1000))
