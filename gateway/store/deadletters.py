"""The dead letters: what will never be delivered, kept with a reason for the operator.

A reading lands here when the cloud refuses it for good or it is too old to send; an MQTT
message that cannot become a reading lands here at ingest. `reason` is a stable code
(`expired`, `rejected`, `not_a_number`, ...), `detail` what was wrong with this one. The
table keeps the newest `max_dead_letters`; what pruning removes is reported by
`PruneReporter`, at most one line per interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import aiosqlite

from gateway.log import get_logger
from gateway.models import StreamKey
from gateway.store.sql import changes, fetch_one

log = get_logger("store")

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


async def read(db: aiosqlite.Connection, limit: int, reason: str | None) -> list[DeadLetter]:
    """The oldest `limit` dead letters (of one reason, if given)."""
    where, params = ("WHERE reason = ?", (reason, limit)) if reason else ("", (limit,))
    rows = await db.execute_fetchall(
        "SELECT id, dead_at_ms, reason, device_id, datastream_id, ts_ms, value, topic, "
        f"detail FROM dead_letters {where} ORDER BY id LIMIT ?",
        params,
    )
    return [DeadLetter(*row) for row in rows]


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
