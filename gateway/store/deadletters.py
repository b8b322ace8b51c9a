"""The dead letters: what will never be delivered, kept with a reason for the operator.

A reading lands here when the cloud refuses it for good or it is too old to send; an MQTT
message that cannot become a reading lands here at ingest. `reason` is a stable code
(`expired`, `rejected`, `not_a_number`, ...), `detail` what was wrong with this one. The
table keeps the newest `max_dead_letters`; what pruning removes is reported by
`PruneReporter`, at most one line per interval. The operator lists, retries (puts back in
the buffer, ids fixed if need be) and purges them with `blynk-gateway dead-letters`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiosqlite

from gateway.log import get_logger
from gateway.models import StreamKey
from gateway.store import streams
from gateway.store.parts import StoreParts
from gateway.store.sql import changes, changes_many, fetch_one

log = get_logger("store")

# Dead letters put back per transaction by `retry`.
RETRY_CHUNK = 5000
# One `dead_letters_pruned` line per interval while the table is at its limit.
PRUNE_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class RejectedPayload:
    """An MQTT message that did not become a buffered reading, kept for the operator.

    `ts_ms` and `value_json` are set when it did decode but is refused anyway (too old to
    send on arrival), so its dead letter reads like one the flush loop expired.
    """

    reason: str
    topic: str
    payload: bytes
    device_id: int | None = None
    datastream_id: int | None = None
    detail: str | None = None
    ts_ms: int | None = None
    value_json: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    dead_at_ms: int
    reason: str
    device_id: int | None
    datastream_id: int | None
    ts_ms: int | None
    value_json: str | None
    topic: str | None
    detail: str | None = None


async def add_rejected(
    db: aiosqlite.Connection, now_ms: int, rejected: Sequence[RejectedPayload]
) -> None:
    await db.executemany(
        "INSERT INTO dead_letters (dead_at_ms, reason, device_id, datastream_id, topic, "
        "payload, detail, ts_ms, value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                now_ms,
                item.reason,
                item.device_id,
                item.datastream_id,
                item.topic,
                item.payload,
                item.detail,
                item.ts_ms,
                item.value_json,
            )
            for item in rejected
        ],
    )


async def add_points(
    db: aiosqlite.Connection,
    now_ms: int,
    stream: StreamKey,
    points: Iterable[tuple[int, str]],
    reason: str,
    detail: str | None = None,
) -> None:
    """Dead-letter (ts_ms, value JSON) readings of one stream (the caller deletes them)."""
    await db.executemany(
        "INSERT INTO dead_letters (dead_at_ms, reason, device_id, datastream_id, ts_ms, "
        "value, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (now_ms, reason, stream.device_id, stream.datastream_id, ts_ms, value, detail)
            for ts_ms, value in points
        ],
    )


async def expire(
    db: aiosqlite.Connection,
    stream_id: int,
    stream: StreamKey,
    cutoff_ms: int,
    limit: int,
    clock_ms: Callable[[], int],
    reason: str = "expired",
) -> int:
    """Move up to `limit` of a stream's readings older than `cutoff_ms`, oldest first.

    Walks the primary key, so the cost is the rows moved, not the table.
    """
    rows = [
        (int(ts_ms), str(value))
        for ts_ms, value in await db.execute_fetchall(
            "SELECT ts_ms, value FROM readings WHERE stream_id = ? AND ts_ms < ? "
            "ORDER BY ts_ms, value LIMIT ?",
            (stream_id, cutoff_ms, limit),
        )
    ]
    if not rows:
        return 0
    await add_points(db, clock_ms(), stream, rows, reason)
    last_ts, last_value = rows[-1]
    return await changes(
        db,
        "DELETE FROM readings WHERE stream_id = ? AND (ts_ms, value) <= (?, ?)",
        (stream_id, last_ts, last_value),
    )


async def prune(db: aiosqlite.Connection, max_dead_letters: int) -> int:
    """Keep the newest `max_dead_letters` (ids only grow, so this is two index seeks)."""
    (newest,) = await fetch_one(db, "SELECT max(id) FROM dead_letters")
    if newest is None:
        return 0
    return await changes(
        db, "DELETE FROM dead_letters WHERE id <= ?", (int(newest) - max_dead_letters,)
    )


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters an operator means (`blynk-gateway dead-letters ... --device 101`).

    Times are when the reading was dead-lettered (`dead_at_ms`), not its own timestamp:
    "purge what has been lying there for a month" is the question operators ask.
    """

    device_id: int | None = None
    datastream_id: int | None = None
    reason: str | None = None
    dead_before_ms: int | None = None  # dead-lettered before this (--older-than)
    dead_after_ms: int | None = None  # dead-lettered at or after this (--newer-than)

    def where(self) -> tuple[str, tuple[Any, ...]]:
        """A WHERE clause (or "") and its parameters; only fixed column names go in the text."""
        terms: list[tuple[str, Any]] = [
            ("device_id = ?", self.device_id),
            ("datastream_id = ?", self.datastream_id),
            ("reason = ?", self.reason),
            ("dead_at_ms < ?", self.dead_before_ms),
            ("dead_at_ms >= ?", self.dead_after_ms),
        ]
        used = [(sql, value) for sql, value in terms if value is not None]
        if not used:
            return "", ()
        return "WHERE " + " AND ".join(sql for sql, _ in used), tuple(v for _, v in used)


ALL = DeadLetterFilter()

_COLUMNS = "id, dead_at_ms, reason, device_id, datastream_id, ts_ms, value, topic, detail"


async def read(
    db: aiosqlite.Connection,
    limit: int,
    reason: str | None = None,
    selection: DeadLetterFilter = ALL,
) -> list[DeadLetter]:
    """The oldest `limit` dead letters that match (and are of `reason`, if given)."""
    if reason is not None:
        selection = replace(selection, reason=reason)
    where, params = selection.where()
    rows = await db.execute_fetchall(
        f"SELECT {_COLUMNS} FROM dead_letters {where} ORDER BY id LIMIT ?", (*params, limit)
    )
    return [DeadLetter(*row) for row in rows]


async def count_by_reason(
    db: aiosqlite.Connection, selection: DeadLetterFilter = ALL
) -> dict[str, int]:
    where, params = selection.where()
    rows = await db.execute_fetchall(
        f"SELECT reason, count(*) FROM dead_letters {where} GROUP BY reason ORDER BY reason",
        params,
    )
    return {str(reason): int(count) for reason, count in rows}


async def purge(db: aiosqlite.Connection, selection: DeadLetterFilter) -> int:
    where, params = selection.where()
    return await changes(db, f"DELETE FROM dead_letters {where}", params)


@dataclass
class RetryResult:
    """What `retry` did with the dead letters it looked at."""

    requeued: int = 0  # back in the buffer
    already_buffered: int = 0  # the same (stream, ts, value) is buffered: letter removed
    # older than the cloud's age limit now: it would only be dead-lettered again; left as is
    too_old: int = 0
    # raw payloads that never became a reading (no ts or value), by reason: left as is
    not_retryable: Counter[str] = field(default_factory=Counter)
    new_streams: dict[StreamKey, int] = field(default_factory=dict)

    def add(self, other: RetryResult) -> None:
        self.requeued += other.requeued
        self.already_buffered += other.already_buffered
        self.too_old += other.too_old
        self.not_retryable.update(other.not_retryable)


@dataclass(frozen=True, slots=True)
class Retarget:
    """Fix the ids while retrying (`--device-to`, `--datastream-to`): None keeps the row's."""

    device_id: int | None = None
    datastream_id: int | None = None


async def retry_chunk(
    db: aiosqlite.Connection,
    selection: DeadLetterFilter,
    after_id: int,
    limit: int,
    *,
    retarget: Retarget,
    oldest_sendable_ms: int,
    stream_ids: Mapping[StreamKey, int],
) -> tuple[RetryResult, int | None]:
    """Inside a transaction: put up to `limit` matching letters with id > `after_id` back in
    `readings`; returns what happened and the last id looked at (None when none was left).

    Only letters with a timestamp, a value and both ids can go back; raw payload rejections
    stay where they are, and so do readings the cloud would now refuse for age.
    """
    where, params = selection.where()
    where = f"{where} AND id > ?" if where else "WHERE id > ?"
    rows = list(
        await db.execute_fetchall(
            "SELECT id, reason, device_id, datastream_id, ts_ms, value FROM dead_letters "
            f"{where} ORDER BY id LIMIT ?",
            (*params, after_id, limit),
        )
    )
    result = RetryResult()
    if not rows:
        return result, None
    readings: list[tuple[int, int, str]] = []
    moved: list[tuple[int]] = []
    for letter_id, reason, device_id, datastream_id, ts_ms, value in rows:
        device_id = device_id if retarget.device_id is None else retarget.device_id
        datastream_id = datastream_id if retarget.datastream_id is None else retarget.datastream_id
        if None in (device_id, datastream_id, ts_ms, value):
            result.not_retryable[str(reason)] += 1
            continue
        if ts_ms < oldest_sendable_ms:
            result.too_old += 1
            continue
        key = StreamKey(int(device_id), int(datastream_id))
        stream_id = stream_ids.get(key) or result.new_streams.get(key)
        if stream_id is None:
            stream_id = result.new_streams[key] = await streams.create(db, key)
        readings.append((stream_id, int(ts_ms), str(value)))
        moved.append((int(letter_id),))
    inserted = await changes_many(
        db, "INSERT OR IGNORE INTO readings (stream_id, ts_ms, value) VALUES (?, ?, ?)", readings
    )
    await db.executemany("DELETE FROM dead_letters WHERE id = ?", moved)
    result.requeued = inserted
    result.already_buffered = len(readings) - inserted
    return result, int(rows[-1][0])


class PruneReporter:
    """`dead_letters_pruned` at once, then at most once per interval with the count since.

    Once the table is full every commit that adds a dead letter prunes one, so a line per
    prune would flood the log exactly when something is wrong. Lines come from commits
    (there is no timer); `flush` reports what is left at close.
    """

    def __init__(
        self,
        max_dead_letters: int,
        interval_s: float = PRUNE_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_dead_letters = max_dead_letters
        self._interval_s = interval_s
        self._clock = clock
        self._last_line: float | None = None
        self._unreported = 0

    def pruned(self, count: int) -> None:
        self._unreported += count
        if not self._unreported:
            return
        if self._last_line is None or self._clock() - self._last_line >= self._interval_s:
            self.flush()

    def flush(self) -> None:
        if not self._unreported:
            return
        log.warning(
            "dead_letters_pruned",
            count=self._unreported,
            max_dead_letters=self._max_dead_letters,
            interval_s=self._interval_s,
        )
        self._last_line = self._clock()
        self._unreported = 0


class DeadLetterOps(StoreParts):
    """The store's dead-letter commands (`blynk-gateway dead-letters purge|retry`), mixed
    into `Store`; each runs in the store's transactions, safe beside the running daemon."""

    async def purge_dead_letters(self, selection: DeadLetterFilter) -> int:
        async def work() -> tuple[int, None]:
            return await purge(self._db, selection), None

        return await self._in_transaction(work)

    async def retry_dead_letters(
        self, selection: DeadLetterFilter, retarget: Retarget, oldest_sendable_ms: int
    ) -> RetryResult:
        """Put matching dead letters back in the buffer, RETRY_CHUNK per transaction.

        They then take the normal path: the flush loop applies the age and quota rules when
        it sends them. Not subject to the capacity policy: at most `max_dead_letters` rows.
        """
        total = RetryResult()
        after_id: int | None = 0
        while after_id is not None:

            async def work(start: int = after_id) -> tuple[int | None, Callable[[], None]]:
                result, last = await retry_chunk(
                    self._db,
                    selection,
                    start,
                    RETRY_CHUNK,
                    retarget=retarget,
                    oldest_sendable_ms=oldest_sendable_ms,
                    stream_ids=self._stream_ids,
                )
                total.add(result)

                def on_commit() -> None:
                    for key, stream_id in result.new_streams.items():
                        self._stream_ids[key] = stream_id
                        self._stream_keys[stream_id] = key
                    self.pending_points += result.requeued
                    if result.requeued:
                        self.new_rows.notify()

                return last, on_commit

            after_id = await self._in_transaction(work)
        return total
