"""How big the buffer may grow and what happens at the limit (storage rule 5).

Enforced on every append from the in-memory row count and the file's page counts, never
by scanning the table: `drop-oldest` evicts the oldest readings (by timestamp, across all
streams), `drop-newest` refuses the new ones, `backpressure` raises `BufferFull` so ingest
holds its MQTT acknowledgements. `max_bytes` becomes a row limit (`byte_cap`) from the
file's own bytes per row. Whatever is dropped is counted per device in `capacity_drops`
and reported by `CapacityReporter`, one line per interval, never silently.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import aiosqlite

from gateway.errors import BufferFull
from gateway.log import get_logger
from gateway.store.sql import changes_many, used_bytes

log = get_logger("store")

FullPolicy = Literal["drop-oldest", "drop-newest", "backpressure"]
# (stream id, ts_ms, value JSON): a reading as the `readings` table keys it.
Row = tuple[int, int, str]

# One `buffer_full` summary line per interval while the policy is dropping readings.
CAPACITY_LOG_INTERVAL_S = 60.0
# The byte cap is lifted again once the file's used pages fall below this share of it.
BYTES_RESUME_FRACTION = 0.9
# Evictions are done in chunks of at most this many rows (one query per chunk).
EVICT_CHUNK = 5000


@dataclass(frozen=True, slots=True)
class Capacity:
    """How big the buffer may grow and what happens at the limit (see config.example.toml)."""

    max_points: int = 20_000_000
    max_bytes: int = 2 * 1024**3
    policy: FullPolicy = "drop-oldest"
    max_dead_letters: int = 100_000
    # Released on a full disk so deletes and checkpoints can still be written.
    disk_reserve_bytes: int = 8 * 1024**2


@dataclass(frozen=True, slots=True)
class Drops:
    """What the policy did inside one append's transaction, applied in memory on commit."""

    evicted: Mapping[int, int]  # per device: stored readings removed (drop-oldest)
    refused: Mapping[int, int]  # per device: new readings not stored (drop-newest)
    oldest_kept_ts: int | None
    used_bytes: int
    byte_cap: int | None
    limit: int


class CapacityPolicy:
    """The capacity rules, applied with SQL inside the store's append transaction."""

    def __init__(
        self,
        capacity: Capacity,
        clock_ms: Callable[[], int],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self._clock_ms = clock_ms
        # `max_bytes` as a row limit, while the file is at (or just under) it.
        self.byte_cap: int | None = None
        self._reporter = CapacityReporter(CAPACITY_LOG_INTERVAL_S, monotonic)

    def limit(self) -> int:
        """The row limit in force: `max_points`, or less while the byte cap applies."""
        return _row_limit(self.capacity, self.byte_cap)

    def reason(self) -> str:
        if self.byte_cap is not None and self.byte_cap < self.capacity.max_points:
            return f"max_bytes={self.capacity.max_bytes}"
        return f"max_points={self.capacity.max_points}"

    def check_room(self, buffered: int, incoming: int) -> None:
        """backpressure: refuse the commit; ingest holds the acks (and logs that state)."""
        if (
            self.capacity.policy == "backpressure"
            and incoming
            and buffered > 0  # a group always fits into an empty buffer
            and buffered + incoming > self.limit()
        ):
            raise BufferFull(
                f"buffer full ({buffered} readings, limit {self.limit()}, {self.reason()})",
                buffered=buffered,
                limit=self.limit(),
            )

    async def insert(
        self, db: aiosqlite.Connection, rows: list[Row], buffered: int
    ) -> tuple[int, int, list[Row]]:
        """Store new rows: (inserted, duplicates, rows refused by drop-newest)."""
        refused: list[Row] = []
        if self.capacity.policy == "drop-newest":
            inserted, refused = await _insert_within(db, rows, self.limit() - buffered)
        else:
            inserted = await insert_readings(db, rows) if rows else 0
        duplicates = len(rows) - inserted - len(refused)
        refused, already = await _split_present(db, refused)
        return inserted, duplicates + already, refused

    async def make_room(
        self,
        db: aiosqlite.Connection,
        *,
        buffered: int,
        page_size: int,
        stream_ids: Sequence[int],
        device_of: Callable[[int], int],
        refused_rows: Sequence[Row],
    ) -> Drops:
        """After the inserts: measure the file, evict (drop-oldest), count what was dropped."""
        used = await used_bytes(db, page_size)
        byte_cap = self._next_byte_cap(used, buffered)
        limit = _row_limit(self.capacity, byte_cap)
        evicted: Counter[int] = Counter()
        oldest_kept: int | None = None
        if self.capacity.policy == "drop-oldest" and buffered > limit:
            evicted, oldest_kept = await _evict_oldest(db, buffered - limit, stream_ids, device_of)
        refused: Counter[int] = Counter(device_of(stream_id) for stream_id, _, _ in refused_rows)
        if evicted or refused:
            await _count_drops(db, self._clock_ms(), evicted, refused)
        return Drops(dict(evicted), dict(refused), oldest_kept, used, byte_cap, limit)

    def committed(self, drops: Drops, *, buffered: int) -> None:
        """The append committed: adopt its byte cap and report drops (or room)."""
        self.byte_cap = drops.byte_cap
        policy = self.capacity.policy
        if drops.evicted or drops.refused:
            self._reporter.dropped(
                policy,
                drops.evicted or drops.refused,
                buffered=buffered,
                limit=drops.limit,
                oldest_kept_ts=drops.oldest_kept_ts if drops.evicted else None,
                reason=self.reason(),
            )
        else:
            self._reporter.room(policy, buffered=buffered)

    def _next_byte_cap(self, used: int, pending: int) -> int | None:
        """Turn `max_bytes` into a row limit, from the file's own bytes per row.

        Rows and pages grow together, so when the used pages pass `max_bytes` the row
        count is capped at what fits; freed pages are reused, so the file then stays put.
        The cap is lifted once uploads have freed a margin of pages again.
        """
        max_bytes = self.capacity.max_bytes
        if used > max_bytes:
            per_row = used / max(pending, 1)
            return max(0, pending - math.ceil((used - max_bytes) / per_row))
        if self.byte_cap is not None and used > max_bytes * BYTES_RESUME_FRACTION:
            return max(self.byte_cap, 0)
        return None


def _row_limit(capacity: Capacity, byte_cap: int | None) -> int:
    return capacity.max_points if byte_cap is None else min(capacity.max_points, byte_cap)


async def insert_readings(db: aiosqlite.Connection, rows: Sequence[Row]) -> int:
    """Insert rows, skipping those already stored (broker redeliveries); how many were new."""
    return await changes_many(
        db, "INSERT OR IGNORE INTO readings (stream_id, ts_ms, value) VALUES (?, ?, ?)", rows
    )


async def _insert_within(
    db: aiosqlite.Connection, rows: list[Row], room: int
) -> tuple[int, list[Row]]:
    """drop-newest: store new rows while there is room; return the rows left over."""
    inserted = 0
    while rows and room > 0:
        chunk, rows = rows[:room], rows[room:]
        added = await insert_readings(db, chunk)
        inserted += added
        room -= added
    return inserted, rows


async def _split_present(db: aiosqlite.Connection, rows: list[Row]) -> tuple[list[Row], int]:
    """Refused rows that are already stored (broker redeliveries) are not refusals."""
    missing = []
    present = 0
    for row in rows:
        found = await db.execute_fetchall(
            "SELECT 1 FROM readings WHERE stream_id = ? AND ts_ms = ? AND value = ?", row
        )
        if found:
            present += 1
        else:
            missing.append(row)
    return missing, present


async def _evict_oldest(
    db: aiosqlite.Connection,
    count: int,
    stream_ids: Sequence[int],
    device_of: Callable[[int], int],
) -> tuple[Counter[int], int | None]:
    """Delete the `count` readings with the oldest timestamps, across all streams.

    Reads at most `count + 1` keys per stream from the primary key (no scan), merges
    them, deletes a key prefix per stream. Returns the evictions per device and the
    timestamp of the oldest reading kept.
    """
    evicted: Counter[int] = Counter()
    oldest_kept: int | None = None
    while count > 0 and stream_ids:
        chunk = min(count, EVICT_CHUNK)
        heads = await _oldest_keys(db, stream_ids, chunk + 1)
        if not heads:
            break
        victims, kept = heads[:chunk], heads[chunk:]
        cut: dict[int, tuple[int, str]] = {}
        for ts_ms, stream_id, value in victims:
            cut[stream_id] = (ts_ms, value)
        deleted = await changes_many(
            db,
            "DELETE FROM readings WHERE stream_id = ? AND (ts_ms, value) <= (?, ?)",
            [(stream_id, ts_ms, value) for stream_id, (ts_ms, value) in cut.items()],
        )
        for _, stream_id, _ in victims:
            evicted[device_of(stream_id)] += 1
        oldest_kept = kept[0][0] if kept else None
        count -= deleted
        if deleted < len(victims):  # pragma: no cover - keys come from the same snapshot
            break
    return evicted, oldest_kept


async def _oldest_keys(
    db: aiosqlite.Connection, stream_ids: Sequence[int], per_stream: int
) -> list[tuple[int, int, str]]:
    """The `per_stream` oldest (ts, stream, value) of the streams, merged, oldest first."""
    merged: list[tuple[int, int, str]] = []
    for start in range(0, len(stream_ids), 100):
        part = stream_ids[start : start + 100]
        sql = " UNION ALL ".join(
            "SELECT * FROM (SELECT ts_ms, stream_id, value FROM readings "
            "WHERE stream_id = ? ORDER BY ts_ms, value LIMIT ?)"
            for _ in part
        )
        params: list[int] = []
        for stream_id in part:
            params += [stream_id, per_stream]
        rows = await db.execute_fetchall(sql, params)
        merged.extend((int(r[0]), int(r[1]), str(r[2])) for r in rows)
    return heapq.nsmallest(per_stream, merged, key=lambda row: (row[0], row[1], row[2]))


async def _count_drops(
    db: aiosqlite.Connection,
    now_ms: int,
    evicted: Mapping[int, int],
    refused: Mapping[int, int],
) -> None:
    await db.executemany(
        "INSERT INTO capacity_drops (device_id, evicted, refused, last_at_ms) "
        "VALUES (?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
        "evicted = evicted + excluded.evicted, refused = refused + excluded.refused, "
        "last_at_ms = excluded.last_at_ms",
        [
            (device, evicted.get(device, 0), refused.get(device, 0), now_ms)
            for device in {*evicted, *refused}
        ],
    )


class CapacityReporter:
    """One `buffer_full` line when the policy starts dropping, then one summary per interval.

    Lines are emitted from append (there is no timer): a streak is closed by
    `buffer_full_ended` at the first append that finds room after a quiet interval.
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self.active = False
        self._last_line = 0.0
        self._window: Counter[int] = Counter()
        self._window_total = 0
        self._streak_total = 0
        self._oldest_kept_ts: int | None = None
        self._last_drop = 0.0

    def dropped(
        self,
        policy: FullPolicy,
        by_device: Mapping[int, int],
        *,
        buffered: int,
        limit: int,
        oldest_kept_ts: int | None,
        reason: str,
    ) -> None:
        count = sum(by_device.values())
        now = self._clock()
        self._window.update(by_device)
        self._window_total += count
        self._streak_total += count
        self._last_drop = now
        if oldest_kept_ts is not None:
            self._oldest_kept_ts = oldest_kept_ts
        if not self.active or now - self._last_line >= self._interval_s:
            self._emit(policy, buffered=buffered, limit=limit, reason=reason, first=not self.active)
            self.active = True

    def room(self, policy: FullPolicy, *, buffered: int) -> None:
        """An append found room: close the streak once the policy has been quiet a while."""
        if not self.active or self._clock() - self._last_drop < self._interval_s:
            return
        if self._window_total:
            self._emit(policy, buffered=buffered, limit=None, reason=None, first=False)
        log.info(
            "buffer_full_ended",
            policy=policy,
            buffered=buffered,
            dropped_total=self._streak_total,
        )
        self.active = False
        self._streak_total = 0

    def _emit(
        self,
        policy: FullPolicy,
        *,
        buffered: int,
        limit: int | None,
        reason: str | None,
        first: bool,
    ) -> None:
        field_name = "evicted" if policy == "drop-oldest" else "refused"
        oldest = self._oldest_kept_ts
        log.warning(
            "buffer_full",
            policy=policy,
            **{field_name: self._window_total},
            by_device={str(device): n for device, n in sorted(self._window.items())},
            oldest_kept_ts=oldest,
            oldest_kept_at=(
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(oldest / 1000))
                if oldest is not None
                else None
            ),
            buffered=buffered,
            limit=limit,
            reason=reason,
            first=first,
            interval_s=self._interval_s,
        )
        self._last_line = self._clock()
        self._window.clear()
        self._window_total = 0
