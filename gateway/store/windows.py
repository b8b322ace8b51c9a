"""Sampled streams in the buffer (issue 19): window rules, windows sent, deadband memory.

A windowed stream's readings are stored raw, like any other (committed before their
PUBACK). The flush loop leases such a stream's *closed windows*: one point per window,
aggregated from the raw rows (`gateway.sampling`), stamped with the window's start. When
the cloud accepts the points, the raw rows of those windows are deleted in the transaction
that also records the end of the last window sent (`streams.sent_until_ms`). So a
`kill -9` at any moment costs at most a second upload of the points in flight, never a
reading: until that transaction, every raw row is there and makes the same points again.

A window closes when the clock is past its end plus the rule's grace and no reading for
it arrived for that grace (arrivals are tracked in memory; after a restart, counted from
the start), so a burst of old readings closes each window only once all of it is in.
Once leased, a window stays closed: a reading for it is refused as late (in memory until
its point is sent, then by `sent_until_ms`), checked in the same transaction that would
store it, so nothing can join a window between its aggregation and the deletion of its
rows. The rule itself is a column of `streams`, written only when it changes, so a backlog
buffered before a restart is cut as it was meant to be.

The deadband (ingest decides what it keeps) leaves here the last reading each stream kept,
written in the transaction that commits it, so a restart remembers it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import aiosqlite

from gateway.log import get_logger
from gateway.models import Batch, Point, ProvisionalReading, Reading, StreamKey
from gateway.sampling import Aggregator, Rule, WindowRule, window_start
from gateway.store import deadletters, streams
from gateway.store.parts import StoreParts
from gateway.store.sql import changes_many

log = get_logger("store")

LATE_REASON = "late_for_window"
# Rows fetched per round trip while a lease folds windows.
FOLD_FETCH_ROWS = 2000
# Windows remembered per stream as "a reading arrived lately"; beyond this, older entries
# whose grace has passed are dropped at once (they no longer hold anything back).
MAX_ARRIVALS = 4096
NO_BOUND = -(2**63)


@dataclass
class SamplingState:
    """What the store knows of sampled streams, in memory (the persisted parts mirror their
    committed rows)."""

    started_ms: int
    # persisted: the window rule each stream's buffered rows are cut with
    rules: dict[StreamKey, WindowRule] = field(default_factory=dict)
    # the configuration's rule per stream, as ingest last saw it (None: sent as is)
    wanted: dict[StreamKey, Rule | None] = field(default_factory=dict)
    # persisted: the end of the last window sent; readings before it are late
    sent_until: dict[StreamKey, int] = field(default_factory=dict)
    # >= sent_until: windows leased (aggregated) and not sent yet are closed too
    closed_until: dict[StreamKey, int] = field(default_factory=dict)
    # persisted: the last reading a deadband stream kept (ts_ms, value JSON)
    kept: dict[StreamKey, tuple[int, str]] = field(default_factory=dict)
    # per stream, window start -> when a reading for it last arrived (gateway clock)
    arrivals: dict[StreamKey, dict[int, int]] = field(default_factory=dict)
    # streams that may have buffered rows (a superset between flush passes)
    buffered: set[StreamKey] = field(default_factory=set)
    # readings folded into window points the cloud accepted; late readings found here
    aggregated: int = 0
    late: int = 0

    def want(self, key: StreamKey, rule: Rule | None) -> None:
        """The configuration's rule for a stream (ingest, for every reading of a sampled
        stream, and for a stream that had one)."""
        self.wanted[key] = rule

    def window_rule(self, key: StreamKey) -> WindowRule | None:
        """The window rule in force for new readings: the configuration's, else the file's."""
        rule = self.wanted.get(key, self.rules.get(key))
        return rule if isinstance(rule, WindowRule) else None

    def closed_before(self, key: StreamKey) -> int:
        """Readings of this stream older than this are late (NO_BOUND: none are)."""
        return self.closed_until.get(key, NO_BOUND)

    def note_arrival(self, key: StreamKey, rule: WindowRule, ts_ms: int, now_ms: int) -> None:
        """A reading for one of the stream's windows arrived: that window waits a grace."""
        recent = self.arrivals.setdefault(key, {})
        recent[window_start(ts_ms, rule.window_ms)] = now_ms
        if len(recent) > MAX_ARRIVALS:
            self._forget_arrivals(recent, now_ms - rule.grace_ms)

    @staticmethod
    def _forget_arrivals(recent: dict[int, int], before_ms: int) -> None:
        for start in [start for start, at_ms in recent.items() if at_ms <= before_ms]:
            del recent[start]

    def lease_bound(self, key: StreamKey, rule: WindowRule, now_ms: int) -> int:
        """Windows starting before this (aligned to the rule) may be leased now.

        Closed: the clock is past the window's end plus grace, no reading for it arrived
        within grace, and the store has been open for grace (arrivals before a restart are
        unknown). Windows leased before stay leasable.
        """
        width, grace = rule.window_ms, rule.grace_ms
        closed = self.closed_until.get(key)
        bound = NO_BOUND if closed is None else window_start(closed, width)
        if now_ms < self.started_ms + grace:
            return bound
        by_time = window_start(now_ms - grace, width)
        recent = self.arrivals.get(key)
        if recent:
            self._forget_arrivals(recent, now_ms - grace)
            if recent:
                by_time = min(by_time, window_start(min(recent), width))
        return max(bound, by_time)

    def leased(self, key: StreamKey, until_ms: int) -> None:
        self.closed_until[key] = max(until_ms, self.closed_until.get(key, NO_BOUND))

    def sent(self, key: StreamKey, until_ms: int) -> None:
        self.sent_until[key] = max(until_ms, self.sent_until.get(key, NO_BOUND))
        self.leased(key, until_ms)

    def split_late(self, readings: Sequence[Reading]) -> tuple[list[Reading], list[Reading]]:
        """(readings to store, readings for windows already closed)."""
        if not self.closed_until:
            return list(readings), []
        keep: list[Reading] = []
        late: list[Reading] = []
        for reading in readings:
            key = StreamKey(reading.device_id, reading.datastream_id)
            if type(reading) is ProvisionalReading:  # boot time, not wall time: not judged
                keep.append(reading)
            elif reading.ts_ms < self.closed_before(key) and self.window_rule(key) is not None:
                late.append(reading)
            else:
                keep.append(reading)
        return keep, late


# --------------------------------------------------------------------------- SQL


async def load(
    db: aiosqlite.Connection, keys: Mapping[int, StreamKey], state: SamplingState
) -> None:
    """The persisted rules, windows sent and deadband memory (at open, and after a salvage:
    what the file says replaces what memory held)."""
    for table in (state.rules, state.sent_until, state.closed_until, state.kept):
        table.clear()
    rows = await db.execute_fetchall(
        "SELECT id, window_ms, aggregate, grace_ms, whole, sent_until_ms FROM streams "
        "WHERE window_ms IS NOT NULL OR sent_until_ms IS NOT NULL"
    )
    for stream_id, window_ms, aggregate, grace_ms, whole, sent_until_ms in rows:
        key = keys[int(stream_id)]
        if window_ms is not None:
            state.rules[key] = WindowRule(
                int(window_ms), str(aggregate), int(grace_ms), bool(whole)
            )
        if sent_until_ms is not None:
            state.sent(key, int(sent_until_ms))
    for stream_id, ts_ms, value in await db.execute_fetchall(
        "SELECT stream_id, ts_ms, value FROM deadband"
    ):
        if int(stream_id) in keys:
            state.kept[keys[int(stream_id)]] = (int(ts_ms), str(value))
    # An index seek per stream (never a scan: start-up must not read the backlog).
    state.buffered = {found.key for found in await streams.with_readings(db)}


async def write_rule(db: aiosqlite.Connection, stream_id: int, rule: WindowRule | None) -> None:
    if rule is None:
        await db.execute(
            "UPDATE streams SET window_ms = NULL, aggregate = NULL, grace_ms = NULL, whole = 0 "
            "WHERE id = ?",
            (stream_id,),
        )
        return
    await db.execute(
        "UPDATE streams SET window_ms = ?, aggregate = ?, grace_ms = ?, whole = ? WHERE id = ?",
        (rule.window_ms, rule.aggregate, rule.grace_ms, int(rule.whole), stream_id),
    )


async def write_kept(db: aiosqlite.Connection, rows: Iterable[tuple[int, int, str]]) -> None:
    await db.executemany(
        "INSERT INTO deadband (stream_id, ts_ms, value) VALUES (?, ?, ?) "
        "ON CONFLICT (stream_id) DO UPDATE SET ts_ms = excluded.ts_ms, value = excluded.value",
        rows,
    )


async def fold_windows(
    db: aiosqlite.Connection, stream_id: int, rule: WindowRule, bound_ms: int, limit: int
) -> list[tuple[int, str, int]]:
    """The first `limit` whole windows below `bound_ms`: (start, point value, readings).

    Streams through the rows (a window of a million readings costs no memory), in primary
    key order, so the same rows always make the same point.
    """
    points: list[tuple[int, str, int]] = []
    current: Aggregator | None = None
    start = 0
    async with db.execute(
        "SELECT ts_ms, value FROM readings WHERE stream_id = ? AND ts_ms < ? ORDER BY ts_ms, value",
        (stream_id, bound_ms),
    ) as cursor:
        while rows := await cursor.fetchmany(FOLD_FETCH_ROWS):
            for ts_ms, value in rows:
                window = window_start(ts_ms, rule.window_ms)
                if current is None or window != start:
                    if current is not None:
                        points.append((start, current.result(), current.count))
                        if len(points) == limit:
                            return points
                    current, start = Aggregator(rule.aggregate, rule.whole), window
                current.add(value)
    if current is not None:
        points.append((start, current.result(), current.count))
    return points


def _ranges(stream_id: int, batch: Batch) -> list[tuple[int, int, int]]:
    return [(stream_id, p.ts_ms, p.ts_ms + batch.window_ms) for p in batch.points]


async def delete_windows(db: aiosqlite.Connection, stream_id: int, batch: Batch) -> int:
    """The raw rows of the batch's windows (whole windows: nothing joins a leased one)."""
    return await changes_many(
        db,
        "DELETE FROM readings WHERE stream_id = ? AND ts_ms >= ? AND ts_ms < ?",
        _ranges(stream_id, batch),
    )


async def dead_letter_windows(
    db: aiosqlite.Connection,
    stream_id: int,
    batch: Batch,
    now_ms: int,
    reason: str,
    detail: str | None,
) -> int:
    """Move the raw rows of the batch's windows to the dead letters (the cloud refused
    their points, or they are too old): what was measured stays inspectable."""
    key = batch.stream
    for _, low, high in _ranges(stream_id, batch):
        await db.execute(
            "INSERT INTO dead_letters (dead_at_ms, reason, device_id, datastream_id, ts_ms, "
            "value, detail) SELECT ?, ?, ?, ?, ts_ms, value, ? FROM readings "
            "WHERE stream_id = ? AND ts_ms >= ? AND ts_ms < ? ORDER BY ts_ms, value",
            (now_ms, reason, key.device_id, key.datastream_id, detail, stream_id, low, high),
        )
    return await delete_windows(db, stream_id, batch)


async def write_sent(db: aiosqlite.Connection, stream_id: int, until_ms: int) -> None:
    await db.execute(
        "UPDATE streams SET sent_until_ms = max(coalesce(sent_until_ms, ?1), ?1) WHERE id = ?2",
        (until_ms, stream_id),
    )


# --------------------------------------------------------------------------- Store's part


@dataclass
class WindowsDone:
    """What one transaction did to windows, applied to memory after its COMMIT."""

    sent: dict[StreamKey, int] = field(default_factory=dict)
    folded: int = 0


class WindowOps(StoreParts):
    """The store's sampled-stream methods, mixed into `Store` (kept here so buffer.py
    stays about moving rows); they run in the store's reads and transactions."""

    def windowed(self, stream: StreamKey) -> bool:
        """Does the flush loop send this stream's buffered readings as window points?"""
        return stream in self.sampling.rules

    def only_windows_buffered(self) -> bool:
        """No buffered reading could be overtaken by one uploaded before it is written:
        whatever waits in the buffer belongs to windows (pass-through's condition)."""
        if self.pending_points == 0:
            return True
        rules = self.sampling.rules
        return bool(rules) and all(key in rules for key in self.sampling.buffered)

    async def _lease_windows(
        self, stream: StreamKey, limit: int, expire_before_ms: int | None
    ) -> tuple[Batch, int]:
        """(a batch of closed windows' points, readings expired meanwhile).

        Readings before the last window sent (put back by `dead-letters retry`, or left by
        a rule changed under a backlog) are dead-lettered as `late_for_window` first, and
        with `expire_before_ms` the windows the cloud would refuse for age are expired,
        each a transaction of its own (EXPIRE_CHUNK rows at most) before the lease.
        """
        state = self.sampling
        rule = state.rules[stream]
        stream_id = self._stream_ids[stream]
        expire_ms = None
        if expire_before_ms is not None:
            expire_ms = -(-expire_before_ms // rule.window_ms) * rule.window_ms
        expired = 0

        async def read() -> tuple[str, list[tuple[int, str, int]]]:
            rows = await self._db.execute_fetchall(
                "SELECT ts_ms FROM readings WHERE stream_id = ? ORDER BY ts_ms LIMIT 1",
                (stream_id,),
            )
            if not rows:
                return "empty", []
            oldest = int(next(iter(rows))[0])
            if oldest < state.sent_until.get(stream, NO_BOUND):
                return "late", []
            if expire_ms is not None and oldest < expire_ms:
                return "expire", []
            bound = state.lease_bound(stream, rule, self._clock_ms())
            if oldest >= bound:
                return "open", []
            points = await fold_windows(self._db, stream_id, rule, bound, limit)
            if points:
                state.leased(stream, points[-1][0] + rule.window_ms)
            return "closed", points

        while True:
            found, points = await self._read(read)
            if found == "late":
                await self._move_late(stream, stream_id, state.sent_until[stream])
            elif found == "expire":
                assert expire_ms is not None
                expired += await self._expire_window_rows(stream_id, expire_ms)
            else:
                points_ = tuple(Point(start, value) for start, value, _ in points)
                return Batch(stream, points_, rule.window_ms), expired

    async def _expire_window_rows(self, stream_id: int, before_ms: int) -> int:
        async def work() -> tuple[int, Callable[[], None]]:
            moved = await self._expire_stream(stream_id, before_ms)
            return moved, lambda: self._rows_left(moved)

        return await self._in_transaction(work)

    async def _move_late(self, stream: StreamKey, stream_id: int, sent_until_ms: int) -> int:
        async def work() -> tuple[int, Callable[[], None]]:
            moved = await self._expire_stream(stream_id, sent_until_ms, LATE_REASON)

            def on_commit() -> None:
                self._rows_left(moved)
                self.sampling.late += moved

            return moved, on_commit

        moved = await self._in_transaction(work)
        log.warning(
            "late_readings_dead_lettered",
            device_id=stream.device_id,
            datastream_id=stream.datastream_id,
            count=moved,
            reason=LATE_REASON,
            detail="buffered readings for windows already sent",
        )
        return moved

    async def _window_rows_gone(
        self, batch: Batch, done: WindowsDone, reason: str | None = None, detail: str | None = None
    ) -> int:
        """Inside a transaction: the raw rows of a window batch leave the buffer, delivered
        (`reason` None) or dead-lettered; the end of its last window is recorded as sent."""
        stream_id = self._stream_ids.get(batch.stream)
        if stream_id is None or not batch.points:
            return 0
        if reason is None:
            gone = await delete_windows(self._db, stream_id, batch)
            done.folded += gone
        else:
            gone = await dead_letter_windows(
                self._db, stream_id, batch, self._clock_ms(), reason, detail
            )
        until_ms = max(point.ts_ms for point in batch.points) + batch.window_ms
        await write_sent(self._db, stream_id, until_ms)
        done.sent[batch.stream] = max(until_ms, done.sent.get(batch.stream, until_ms))
        return gone

    def _windows_committed(self, done: WindowsDone) -> None:
        for key, until_ms in done.sent.items():
            self.sampling.sent(key, until_ms)
        self.sampling.aggregated += done.folded

    async def _write_sampling(
        self,
        touched: set[StreamKey],
        kept: Mapping[StreamKey, tuple[int, str]],
        stream_id_of: Callable[[StreamKey], Awaitable[int]],
    ) -> Callable[[], None]:
        """Inside an append's transaction: the window rules of the streams it stores (`touched`),
        where they changed, and the deadband's last kept readings. Returns the in-memory
        update for after COMMIT."""
        state = self.sampling
        changed: dict[StreamKey, WindowRule | None] = {}
        if state.wanted:
            for key in touched:
                if key not in state.wanted:
                    continue
                wanted = state.wanted[key]
                rule = wanted if isinstance(wanted, WindowRule) else None
                if rule != state.rules.get(key):
                    await write_rule(self._db, await stream_id_of(key), rule)
                    changed[key] = rule
        rows = [(await stream_id_of(key), ts_ms, value) for key, (ts_ms, value) in kept.items()]
        if rows:
            await write_kept(self._db, rows)

        def on_commit() -> None:
            for key, rule in changed.items():
                if rule is None:
                    state.rules.pop(key, None)
                else:
                    state.rules[key] = rule
                log.info(
                    "stream_sampling_changed",
                    device_id=key.device_id,
                    datastream_id=key.datastream_id,
                    rule=rule.describe() if rule is not None else "raw",
                )
            state.kept.update(kept)
            state.buffered |= touched

        return on_commit


def _iso(epoch_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_ms / 1000))


def late_rows(
    readings: Sequence[Reading], state: SamplingState
) -> list[tuple[StreamKey, list[tuple[int, str]], str]]:
    """The late readings grouped by stream for `deadletters.add_points`."""
    grouped: dict[StreamKey, list[tuple[int, str]]] = {}
    for reading in readings:
        grouped.setdefault(StreamKey(reading.device_id, reading.datastream_id), []).append(
            (reading.ts_ms, reading.value_json)
        )
    return [
        (key, points, f"its window closed while it waited for its commit ({when})")
        for key, points in grouped.items()
        if (when := _iso(state.closed_before(key)))
    ]


async def add_late(
    db: aiosqlite.Connection, now_ms: int, readings: Sequence[Reading], state: SamplingState
) -> None:
    for key, points, detail in late_rows(readings, state):
        await deadletters.add_points(db, now_ms, key, points, LATE_REASON, detail)
