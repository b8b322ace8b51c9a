"""MQTT → store: messages become readings that are committed before they are acknowledged.

We use `manual_ack=True` and a persistent session (see mqtt_loop.py): a QoS 1 message is
PUBACKed only after the transaction that holds its reading has committed. Messages are
grouped so one commit (one fsync) covers many, and a group is committed early when it nears
the broker's in-flight window — the broker sends at most that many unacknowledged
messages, so waiting longer would only stall it. While the buffer cannot take a group
(backpressure, a full disk, a read-only store) the acknowledgements are held and the broker
keeps the messages for us.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from gateway.aio import wait_any
from gateway.clock import Clock
from gateway.config import MqttSettings
from gateway.errors import BufferFull, StoreError
from gateway.ingest.admission import KEPT_PAYLOAD_BYTES, Admission, kept_topic, reading_dead_letter
from gateway.ingest.mqtt_loop import MqttConnection
from gateway.ingest.pass_gate import FAST_ANSWER_S, PassGate
from gateway.ingest.redelivery import RedeliveryFilter
from gateway.ingest.routes import RouteTable
from gateway.ingest.routes.table import describe_exception
from gateway.ingest.sampler import Sampler, kept_of
from gateway.ingest.stats import IngestStats
from gateway.log import get_logger
from gateway.models import ProvisionalReading, Reading, StreamKey
from gateway.sampling import Rule
from gateway.store import AppendResult, RejectedPayload, Store
from gateway.store.bindable import reading_problem, storable_rejected
from gateway.store.staging import StagedGroup

log = get_logger("ingest")

# A failed commit (disk full, read-only) is retried with capped backoff, and at once when
# the flush loop frees rows: a full disk often has room again after an upload.
STORE_RETRY_MIN_S = 0.5
STORE_RETRY_MAX_S = 10.0
# backpressure: while the buffer is full, look again at least this often.
BUFFER_FULL_RECHECK_S = 5.0
# At most this many uncommitted messages are kept in memory. The broker should stop at its
# in-flight window anyway, but Mosquitto 2.0.x does not always (eclipse-mosquitto#2301), and
# while commits are held it would push its whole queue to us: beyond this, messages are left
# unacknowledged and not kept (the broker still has them in our session) and are fetched
# again by one reconnect after the next successful commit.
PENDING_MAX_MESSAGES = 5000
# The same cap while commits work: only a broker pushing far past its window faster than
# commits complete reaches it. Deferring has a cost (a resync reconnect, after which the
# broker may resend messages whose PUBACK it had not read yet), so it is a last resort.
PENDING_HARD_MAX_MESSAGES = 100_000
# Flow control: with this many messages received and not yet committed, stop reading the
# socket until a commit brings them below it. Mosquitto does not hold a resumed session to
# its in-flight window, so a replay of a long outage would otherwise push its whole queue
# into memory (measured: 146,000-171,000 messages held, 180 MiB peak RSS for a 1,000,000
# replay; with the pause at 2,000: 61 MiB, and no deferrals; benchmarks/README.md).
READ_PAUSE_MESSAGES = 2000
# After that reconnect is asked for, commits wait (at most this long) for the new
# connection, so that what the broker resends is not also committed from memory.
RESYNC_WAIT_S = 10.0


@dataclass(slots=True)
class _Message:
    """One received message, what it became (a reading, a dead letter, or neither)."""

    mid: int
    qos: int
    generation: int  # of the connection that carried it: a PUBACK can only go back there
    topic: str
    payload: bytes
    dup: bool
    readings: Sequence[Reading] = ()
    rejected: Sequence[RejectedPayload] = ()
    # sampling applied (ingest/sampler.py), and the deadband memory its readings leave
    sampled: bool = False
    kept: dict[StreamKey, tuple[int, str]] = field(default_factory=dict)


@dataclass(slots=True)
class _PendingGroup:
    """What the next commit will hold, and which messages it will acknowledge.

    In arrival order, so a held group can be committed in slices.
    """

    messages: list[_Message] = field(default_factory=list)
    first_at: float = 0.0

    def __len__(self) -> int:
        return len(self.messages)

    @property
    def readings(self) -> list[Reading]:
        return [reading for m in self.messages for reading in m.readings]

    def split(self, count: int) -> tuple[_PendingGroup, _PendingGroup]:
        return (
            _PendingGroup(self.messages[:count], self.first_at),
            _PendingGroup(self.messages[count:], self.first_at),
        )


class MqttIngest:
    """Subscribes to the routes' topics and turns messages into committed readings."""

    def __init__(
        self,
        settings: MqttSettings,
        routes: RouteTable,
        store: Store,
        *,
        commit_interval_s: float,
        commit_max_readings: int,
        oldest_sendable_ms: Callable[[int], int],
        pass_through_wait_s: float = 0.0,
        clock_ms: Callable[[], int] | None = None,
        clock: Clock | None = None,
    ) -> None:
        """`clock`: hold readings without a time of their own while it is not trusted
        (admission.py); None: the wall clock is always trusted."""
        self._store = store
        self._space_freed = store.space_freed.listen()
        self._commit_interval_s = commit_interval_s
        self._commit_max = commit_max_readings
        # 0: every reading is written before its PUBACK (see _pass_through)
        self._pass_through_wait_s = pass_through_wait_s
        self.stats = IngestStats()
        self._admission = Admission(
            routes,
            self.stats,
            oldest_sendable_ms=oldest_sendable_ms,
            clock_ms=clock_ms or (lambda: time.time_ns() // 1_000_000),
            clock=clock,
        )
        self._sampler = Sampler(store, self.stats, self._admission.refusals)
        self._admission.noted = self._sampler.note
        self._redelivery = RedeliveryFilter()
        self._mqtt = MqttConnection(
            settings,
            routes.subscriptions,
            on_message=self._on_message,
            on_session_lost=self._redelivery.session_lost,
            held_messages=lambda: self.held_messages,
        )
        # Offer a group for pass-through, or write it first (see pass_gate.py).
        self._gate = PassGate(commit_max_readings, settings.inflight_window)
        self._passing = False  # a group waits for the cloud
        self._window_filled = asyncio.Event()  # ... and the broker's window filled meanwhile
        self._pending = _PendingGroup()
        self._committing = 0  # messages in the commit under way
        self._group_ready = asyncio.Event()
        self._group_full = asyncio.Event()
        self._stopping = False
        self._committer_idle = asyncio.Event()
        self._committer_idle.set()
        # Set while commits fail or the buffer is full: acks are being held.
        self.holding = False
        self._failures = 0  # in this streak of failed commits (for the log)
        self._failures_in_a_row = 0  # since the last successful slice (for the backoff)
        self._store_failing_since: float | None = None
        self._full_since: float | None = None  # backpressure: holding since
        self._deferred_since_resync = 0
        self._resync_generation: int | None = None

    @property
    def connected(self) -> asyncio.Event:
        """Set while the broker connection is up."""
        return self._mqtt.connected

    @property
    def subscribed(self) -> asyncio.Event:
        """Set once the broker confirmed our subscriptions on this connection."""
        return self._mqtt.subscribed

    @property
    def routes(self) -> RouteTable:
        return self._admission.routes

    def replace_routes(self, routes: RouteTable) -> tuple[list[str], list[str]]:
        """Route from now on with `routes` (a reload): messages already received keep what
        they became; subscriptions change on the same session. Returns (added, removed)."""
        routes.keep_receive_stamps(self._admission.routes)
        self._admission.routes = routes
        self.stats.sampled_devices.clear()  # which devices are sampled: seen anew
        return self._mqtt.set_subscriptions(routes.subscriptions)

    def sampling_in_force(self) -> dict[StreamKey, tuple[Rule, bool]]:
        """Each sampled stream's rule as its readings meet it, and whether `fit` chose it."""
        return self._sampler.in_force()

    @property
    def held_messages(self) -> int:
        """Messages received but neither committed nor acknowledged yet."""
        return len(self._pending) + self._committing

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Connect, reconnect with capped jittered backoff, and commit groups until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._commit_loop(), name="ingest-commit")
            tasks.create_task(self._mqtt.run(), name="ingest-connection")
            tasks.create_task(self._summary_loop(), name="ingest-refusal-summary")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking messages, commit and acknowledge what we hold, then disconnect."""
        self._stopping = True
        self._mqtt.stop_reading()
        self._group_ready.set()
        self._group_full.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while len(self._pending) or not self._committer_idle.is_set():
                    if self.holding:
                        break  # cannot commit now: the broker keeps these for our session
                    self._group_full.set()
                    await asyncio.sleep(0.01)
        await self._mqtt.close()
        self._admission.refusals.summarise()

    async def _summary_loop(self) -> None:
        refusals = self._admission.refusals
        while True:
            await asyncio.sleep(refusals.interval_s)
            refusals.summarise()

    # ------------------------------------------------------------------ receiving

    def _on_message(self, message: mqtt.MQTTMessage, generation: int) -> None:
        stats = self.stats
        stats.received += 1
        group = self._pending
        if len(group) >= (PENDING_MAX_MESSAGES if self.holding else PENDING_HARD_MAX_MESSAGES):
            # Not acknowledged, not kept: the broker keeps it in our session (see _resync).
            stats.deferred += 1
            self._deferred_since_resync += 1
            return
        if not group.messages:
            group.first_at = time.monotonic()
            self._group_ready.set()
        topic = message.topic
        payload = bytes(message.payload)
        entry = _Message(message.mid, message.qos, generation, topic, payload, bool(message.dup))
        if entry.dup and self._redelivery.is_redelivery(topic, payload):
            stats.redelivered_acked += 1
        else:
            entry.readings, entry.rejected = self._admission.admit(topic, payload, message.retain)
        group.messages.append(entry)
        if len(group) >= self._commit_max:
            self._group_full.set()
        if self._passing and len(group) + self._committing >= self._gate.window:
            self._window_filled.set()
        if len(group) + self._committing >= READ_PAUSE_MESSAGES and not self.holding:
            self._mqtt.pause_reading()

    # ------------------------------------------------------------------ group commit

    async def _commit_loop(self) -> None:
        while True:
            await self._group_ready.wait()
            group = await self._next_group()
            if group is None:
                continue
            self._committing = len(group)
            try:
                self._sampler.thin(group.messages)
                if self._offers_pass_through(group):
                    await self._pass_through(group)
                result = await self._append(group.messages)
            except BufferFull as full:
                self._committing = 0
                await self._buffer_full(full, group)
                continue
            except StoreError as exc:
                self._committing = 0
                await self._store_failed(exc, group)
                continue
            except Exception as exc:  # a bug: hold and retry, never end the daemon
                self._committing = 0
                await self._store_failed(StoreError(describe_exception(exc)), group)
                continue
            finally:
                self._committer_idle.set()
            self._committed(group, result)
            if self._deferred_since_resync and not self.holding:
                await self._resync()

    def _offers_pass_through(self, group: _PendingGroup) -> bool:
        """Pass-through for this group, or write it first (pass_gate.py decides)."""
        if not self._pass_through_wait_s or self.holding:
            return False
        gate, gather_s = self._gate, self._gather_s()
        gate.sample(self.stats.received)
        if len(group) >= self._commit_max:  # the window closed it, not its gathering time
            if gather_s > self._commit_interval_s:
                gate.pressure("budget", held=self.held_messages)  # cannot gather enough
            elif not gate.fast(self._store.staging.round_trip_s):
                gate.pressure("window", held=self.held_messages)  # a round trip per window
        allowed = gate.allows(gather_s)
        self._store.staging.paused = gate.paused
        return allowed

    def _gather_s(self) -> float:
        """How long a pass-through group gathers: the commit interval, or longer when the
        request budget asks for several readings per request (store.staging.hold_s)."""
        return max(self._commit_interval_s, self._store.staging.hold_s)

    def _passes_through(self) -> bool:
        """The next group may be offered for pass-through (as far as can be told now), so
        it gathers as pass-through gathers.

        Also while rows are buffered: the flush loop then uploads them without lingering
        (the buffer must empty before pass-through may offer again, or a reading would
        overtake an older one of its stream), and a group that gathers meanwhile finds it
        empty. Committed at the commit interval instead, each group would add rows faster
        than a far cloud's round trips take them away: the buffer never empties, and the
        drain goes on in tiny batches (0.64 requests per reading at 100 readings/s over 20
        datastreams, 100 ms away, with MQTT 5's larger window). The window still closes a
        group at `commit_max` (pass_gate.py)."""
        return bool(
            self._pass_through_wait_s
            and not self.holding
            and not self._gate.paused
            and self._store.staging.open
        )

    async def _pass_through(self, group: _PendingGroup) -> None:
        """Offer the group's readings for upload before writing them (store/staging.py);
        what the cloud accepted leaves the group, so it is acknowledged without a write.

        Only while nothing is buffered (but windows' raw readings): a reading must never
        overtake an older one of its stream that waits in the buffer. A windowed stream's
        readings are always written: its windows are made from the buffer. The wait ends
        early when the broker's window fills meanwhile (pass_gate.py): the group is then
        written, unless it is being uploaded.
        """
        staging = self._store.staging
        if not staging.open or not self._store.only_windows_buffered():
            return
        readings = group.readings
        if self.stats.provisional and any(type(r) is ProvisionalReading for r in readings):
            return  # stamped before the clock was trusted: they have no wall time to send
        offered = [r for r in readings if not self._sampler.stored_only(r)]
        staged = staging.offer(offered)
        if staged is None:
            return
        self._window_filled.clear()
        if self.held_messages >= self._gate.window:
            self._window_filled.set()  # full already: the broker sends nothing more meanwhile
        self._passing = True
        try:
            deadline = time.monotonic() + self._pass_through_wait_s
            await wait_any(staged.settled, self._window_filled, timeout_s=self._pass_through_wait_s)
            window_full = self._window_filled.is_set() and not staged.settled.is_set()
            if window_full and not await self._answered_fast(staged, deadline):
                self._gate.pressure("window", held=self.held_messages)
                staged.hurry = True  # no more requests of it start: the rest is written
            if not staged.settled.is_set() and not staging.reclaim(staged):
                await staged.settled.wait()  # an upload is under way: its answer decides
        finally:
            self._passing = False
        if staged.declined is not None:
            self._gate.pressure(staged.declined, held=self.held_messages)
        passed = sum(staged.delivered)
        if not passed:
            return
        self.stats.passed_through += passed
        if passed == len(readings):  # the usual case: the cloud took them all
            for message in group.messages:
                message.readings = []
            return
        delivered = {id(r) for r, done in zip(offered, staged.delivered, strict=True) if done}
        for message in group.messages:
            if message.readings:
                message.readings = [r for r in message.readings if id(r) not in delivered]

    async def _answered_fast(self, staged: StagedGroup, deadline: float) -> bool:
        """The window is full while `staged` waits: a near cloud's answer costs nothing, so
        wait for it; a far one's (or, its distance unknown, one not in by FAST_ANSWER_S)
        holds the broker: False."""
        round_trip_s = self._store.staging.round_trip_s
        if round_trip_s is not None and not self._gate.fast(round_trip_s):
            return False
        wait_s = deadline - time.monotonic() if round_trip_s is not None else FAST_ANSWER_S
        return await wait_any(staged.settled, timeout_s=wait_s)

    async def _next_group(self) -> _PendingGroup | None:
        """The group to commit now, once it is full or old enough; None if there is none."""
        group = self._pending
        if not group.messages:
            self._group_ready.clear()
            if self._stopping:
                self._committer_idle.set()
                await asyncio.sleep(0.05)
            return None
        if self._resync_generation is not None:
            await self._mqtt.wait_reconnected(self._resync_generation, RESYNC_WAIT_S)
            self._resync_generation = None
            group = self._pending
        interval_s = self._gather_s() if self._passes_through() else self._commit_interval_s
        wait_s = group.first_at + interval_s - time.monotonic()
        if wait_s > 0 and not self._group_full.is_set() and not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._group_full.wait()
        self._committer_idle.clear()
        self._pending = _PendingGroup()
        degraded = self.holding or self._store.disk_full
        if degraded and len(group) > self._commit_max:
            # Room comes back a little at a time (uploads free pages): retry in slices.
            group, self._pending = group.split(self._commit_max)
        self._group_full.clear()
        self._group_ready.clear()
        if self._pending.messages:
            self._group_ready.set()
        return self._without_redeliveries(group)

    async def _append(self, messages: list[_Message]) -> AppendResult:
        """Commit the messages' readings and dead letters in one transaction.

        A failure that is not the store's (`UnstorableValue`: a value SQLite cannot hold,
        or a bug) must not stop ingest nor hold every acknowledgement behind one message:
        the offending readings are dead-lettered and the rest committed.
        """
        readings, rejected = _contents(messages)
        kept = kept_of(messages)
        if not readings and not rejected and not kept:
            return AppendResult(inserted=0, duplicates=0)  # all passed through or suppressed
        try:
            return await self._store.append(readings, rejected, kept)
        except StoreError:
            raise
        except Exception as exc:  # not the disk: see _isolate
            return await self._isolate(messages, exc)

    async def _isolate(self, messages: list[_Message], exc: Exception) -> AppendResult:
        """Set aside the readings SQLite cannot hold, then commit; if the commit still
        fails, commit halves (down to one message) so that only the culprit is lost.

        Halves already committed are emptied in place, so if a later half meets a full
        disk the held group is retried without them (they are acknowledged, not re-added).
        """
        for message in messages:
            self._set_aside_unstorable(message, exc)
        try:
            return await self._append_now(messages)
        except StoreError:
            raise
        except Exception as again:
            if len(messages) == 1:
                return await self._dead_letter_whole(messages[0], again)
            middle = len(messages) // 2
            first = await self._isolate(messages[:middle], again)
            second = await self._isolate(messages[middle:], again)
            return _sum_results(first, second)

    async def _append_now(self, messages: list[_Message]) -> AppendResult:
        readings, rejected = _contents(messages)
        kept = kept_of(messages)
        if not readings and not rejected and not kept:
            return AppendResult(inserted=0, duplicates=0)
        result = await self._store.append(readings, rejected, kept)
        for message in messages:  # committed: a held retry must not write them again
            message.readings = message.rejected = ()
            message.kept = {}
        return result

    def _set_aside_unstorable(self, message: _Message, exc: Exception) -> None:
        """Readings SQLite cannot hold become dead letters (`unstorable`), with an excerpt."""
        bad = [(r, problem) for r in message.readings if (problem := reading_problem(r))]
        rejected = [storable_rejected(item) for item in message.rejected]
        if not bad:
            message.rejected = rejected
            return
        message.readings = [r for r in message.readings if reading_problem(r) is None]
        for reading, problem in bad:
            rejected.append(
                storable_rejected(
                    reading_dead_letter(
                        "unstorable", message.topic, message.payload, reading, problem
                    )
                )
            )
            self._count_refusal("unstorable", message, f"{problem} ({type(exc).__name__})")
        message.rejected = rejected

    async def _dead_letter_whole(self, message: _Message, exc: Exception) -> AppendResult:
        """The last resort for one message that still cannot be committed: keep it as one
        bare dead letter (`internal_error`). If even that fails, the store is at fault,
        not the message: hold, as for any store failure."""
        detail = describe_exception(exc)
        message.readings = ()
        message.rejected = [
            RejectedPayload(
                "internal_error",
                kept_topic(message.topic),
                message.payload[:KEPT_PAYLOAD_BYTES],
                detail=detail,
            )
        ]
        self._count_refusal("internal_error", message, detail)
        try:
            return await self._append_now([message])
        except StoreError:
            raise
        except Exception as again:
            raise StoreError(
                f"the buffer refuses even a bare dead letter: {describe_exception(again)}"
            ) from again

    def _count_refusal(self, code: str, message: _Message, detail: str) -> None:
        stats = self.stats
        stats.rejected += 1
        stats.rejected_by_reason[code] += 1
        self._admission.refusals.refused(
            "payload_rejected",
            code,
            detail=detail,
            topic=message.topic,
            payload_bytes=len(message.payload),
            rejected_total=stats.rejected + stats.unmapped,
        )

    def _committed(self, group: _PendingGroup, result: AppendResult) -> None:
        self._committing = 0
        self._failures_in_a_row = 0
        # Held messages are committed slice by slice; the hold ends when they are done.
        # On a full disk the streak lasts until the store has room again (it logs that
        # condition itself): one line each way, however often freed pages run out.
        self.holding = self.holding and len(self._pending) > self._commit_max
        if self._full_since is not None and not self.holding:
            log.info(
                "buffer_full_ended",
                policy="backpressure",
                buffered=self._store.pending_points,
                held_s=round(time.monotonic() - self._full_since, 1),
            )
            self._full_since = None
        if self._failures and not self.holding and not self._store.disk_full:
            log.info(
                "store_recovered",
                failed_attempts=self._failures,
                down_s=round(time.monotonic() - (self._store_failing_since or 0), 1),
            )
            self._failures = 0
            self._store_failing_since = None
        stats = self.stats
        stats.commits += 1
        stats.stored += result.inserted
        stats.duplicates += result.duplicates
        stats.evicted += result.evicted
        stats.refused += result.refused
        stats.late += result.late
        self._acknowledge(group)
        self._resume_if_room()

    def _resume_if_room(self) -> None:
        if self._mqtt.paused and len(self._pending) < READ_PAUSE_MESSAGES:
            self._mqtt.resume_reading()

    def _acknowledge(self, group: _PendingGroup) -> None:
        for message in group.messages:
            if message.qos == 0:
                continue
            resent = self._mqtt.acknowledge(message.mid, message.qos, message.generation)
            self._redelivery.committed(message.topic, message.payload, will_be_resent=resent)

    def _requeue(self, group: _PendingGroup) -> None:
        """Put a group that failed to commit back in front of what arrived since."""
        group.messages.extend(self._pending.messages)
        self._pending = group
        self._group_ready.set()

    def _hold(self, group: _PendingGroup) -> None:
        self._requeue(group)
        self.holding = True
        self.stats.held_commits += 1
        # While held, reading goes on and defers beyond PENDING_MAX_MESSAGES (see _resync).
        self._mqtt.resume_reading()

    async def _buffer_full(self, full: BufferFull, group: _PendingGroup) -> None:
        """backpressure: no PUBACK, so the broker stops sending once its in-flight window is
        used up and queues the rest for our session."""
        self._space_freed.clear()  # wake only for room freed after this refusal
        attempted = len(group)
        self._hold(group)
        if attempted > self._commit_max:
            await asyncio.sleep(0)  # a big group: retry at once, in a slice
            return
        if self._full_since is None:
            self._full_since = time.monotonic()
            log.warning(
                "buffer_full",
                policy="backpressure",
                buffered=full.buffered,
                limit=full.limit,
                held=len(self._pending),
                action="holding MQTT acknowledgements; the broker queues for us "
                "until uploads free room",
            )
        await self._wait_for_space(BUFFER_FULL_RECHECK_S)

    async def _store_failed(self, exc: StoreError, group: _PendingGroup) -> None:
        """Log once per failure streak; retry with backoff, or as soon as rows are freed."""
        self._space_freed.clear()
        self._failures += 1
        self._failures_in_a_row += 1
        self._hold(group)
        if self._failures == 1:
            self._store_failing_since = time.monotonic()
            log.error(
                "store_write_failed",
                error=str(exc),
                action="holding MQTT acknowledgements; the broker keeps the messages; "
                "uploads continue and free space; retrying by itself",
                held=len(self._pending),
            )
        backoff_s = STORE_RETRY_MIN_S * 2 ** (self._failures_in_a_row - 1)
        await self._wait_for_space(min(STORE_RETRY_MAX_S, backoff_s))

    async def _wait_for_space(self, timeout_s: float) -> None:
        """Until the flush loop deletes rows, or the timeout. `stop` does not wait for us."""
        await wait_any(self._space_freed, timeout_s=timeout_s)
        self._space_freed.clear()

    # ------------------------------------------------------------------ redeliveries

    async def _resync(self) -> None:
        """Reconnect once, so the broker resends what we left unacknowledged while holding."""
        log.info(
            "mqtt_resync",
            deferred=self._deferred_since_resync,
            reason="messages left unacknowledged while the buffer was unavailable",
        )
        self._deferred_since_resync = 0
        self._resync_generation = self._mqtt.generation
        await self._mqtt.resync()

    def _without_redeliveries(self, group: _PendingGroup) -> _PendingGroup:
        """Right before a commit, leave out what the broker has already resent or will resend.

        Messages from an earlier connection of the same broker session were not acked, so
        the broker resends them (DUP) on this connection: storing both copies would make a
        second point whenever the first was delivered and deleted in between. A DUP whose
        first copy committed meanwhile becomes a bare acknowledgement.
        """
        kept: list[_Message] = []
        for message in group.messages:
            if self._mqtt.will_resend(message.generation, message.qos):
                self.stats.resent_dropped += 1
                continue
            stored = bool(message.readings or message.rejected)
            if (
                message.dup
                and stored
                and self._redelivery.is_redelivery(message.topic, message.payload)
            ):
                self.stats.redelivered_acked += 1
                message.readings = message.rejected = ()
            kept.append(message)
        group.messages = kept
        return group


def _sum_results(first: AppendResult, second: AppendResult) -> AppendResult:
    """Two commits' outcomes as one (the per-device maps are only for the store's log)."""
    return AppendResult(
        inserted=first.inserted + second.inserted,
        duplicates=first.duplicates + second.duplicates,
        evicted=first.evicted + second.evicted,
        refused=first.refused + second.refused,
    )


def _contents(messages: Sequence[_Message]) -> tuple[list[Reading], list[RejectedPayload]]:
    """The readings and dead letters of these messages, in arrival order."""
    readings = [reading for m in messages for reading in m.readings]
    return readings, [item for m in messages for item in m.rejected]
