"""When SQLite fails: name the condition, and salvage a damaged file.

`store_error` turns an sqlite3 error into the `StoreError` the operator can act on (disk
full, read-only, damaged). A damaged file is never a reason to stop: `recover_file` moves it
aside as `<name>.corrupt-<UTC timestamp>` and copies every row SQLite can still read into a
fresh file, probing past damaged page ranges; when SQLite cannot even read the schema, the
raw page decoder (`rawpages`) takes over. `quick_check` is the full O(file) integrity check.
Both can outlast a service manager's patience on a big file: they report their progress
(`progress.WorkProgress`) so the owner can tell the manager they are still moving.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from gateway.errors import DiskFull, StoreCorrupt, StoreError
from gateway.log import get_logger
from gateway.store import provisional, rawpages
from gateway.store.files import create_private_file
from gateway.store.progress import LongWorkObserver, WorkProgress
from gateway.store.rawpages import check_header
from gateway.store.schema import create_schema

log = get_logger("store")


@dataclass(frozen=True, slots=True)
class SalvageReport:
    """What a recovery saved from a damaged file, for the `buffer_corrupt` line and tests."""

    moved_to: Path
    readings: int
    streams: int
    dead_letters: int
    quota_days: int
    orphaned: int
    skipped_ranges: int
    header_repaired: bool
    error: str

    def emit(self, *, buffered: int) -> None:
        """The `buffer_corrupt` line (after the fresh file is open: `buffered` is its count)."""
        log.error(
            "buffer_corrupt",
            error=self.error,
            moved_to=str(self.moved_to),
            salvaged_readings=self.readings,
            salvaged_streams=self.streams,
            salvaged_dead_letters=self.dead_letters,
            orphaned_readings=self.orphaned,
            skipped_ranges=self.skipped_ranges,
            header_repaired=self.header_repaired,
            buffered=buffered,
            action="the damaged file was moved aside and kept for inspection; "
            "readings in its unreadable pages are lost; the gateway carries on",
        )


def store_error(exc: sqlite3.Error) -> StoreError:
    """Name the condition the operator can act on (full disk, read-only fs, I/O)."""
    code = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if is_corruption(exc):
        return StoreCorrupt(f"database file is damaged: {code or type(exc).__name__}: {text}")
    if code.startswith("SQLITE_FULL") or "disk is full" in text:
        return DiskFull(f"disk full: {text}")
    if code.startswith("SQLITE_READONLY") or "readonly" in text:
        return StoreError(f"database is read-only: {text}")
    return StoreError(f"{code or type(exc).__name__}: {text}")


def is_corruption(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    return (
        code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
        or code in ("SQLITE_IOERR_READ", "SQLITE_IOERR_SHORT_READ")
        or "malformed" in text
        or "not a database" in text
    )


async def probe(db: aiosqlite.Connection, stream_ids: Iterable[int]) -> None:
    """Cheap start-up check: the small tables fully, the readings tree at its edges.

    Touches a few pages per stream whatever the size of the backlog; the full check
    (`quick_check`) runs in the background once the gateway is up. Damage it meets raises
    `StoreCorrupt` or the sqlite3 error.
    """
    for table in ("streams", "meta", "quota_days", "capacity_drops", "accepted_streams"):
        rows = [row[0] for row in await db.execute_fetchall(f"PRAGMA quick_check({table})")]
        if rows != ["ok"]:
            raise StoreCorrupt(f"quick_check({table}): {rows[0]}")
    for stream_id in stream_ids:
        # Two queries: min() and max() together would scan the stream's whole range.
        for direction in ("ASC", "DESC"):
            await db.execute_fetchall(
                "SELECT ts_ms FROM readings WHERE stream_id = ? "
                f"ORDER BY ts_ms {direction}, value {direction} LIMIT 1",
                (stream_id,),
            )
    await db.execute_fetchall("SELECT max(id) FROM dead_letters")


def _utc_stamp(now_s: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now_s))


def quick_check(path: Path, observer: LongWorkObserver | None = None) -> list[str]:
    """`PRAGMA quick_check` on a read-only connection: [] if the file is sound, else problems."""
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        checking = WorkProgress(observer, "checking the buffer's integrity", holds_store=False)
        with checking as progress:
            progress.watch(connection)
            rows = connection.execute("PRAGMA quick_check(20)").fetchall()
    finally:
        connection.close()
    problems = [str(row[0]) for row in rows]
    return [] if problems == ["ok"] else problems


# ---------------------------------------------------------------------- salvage


def recover_file(
    path: Path, error: str, page_size: int, observer: LongWorkObserver | None = None
) -> SalvageReport:
    """Move a damaged database aside and salvage what it still holds into a fresh file.

    Runs in a worker thread with plain sqlite3 connections: it is a one-off that loops
    with try/except around every read, which is simplest synchronously. Its progress
    goes to `observer` (rows saved, pages read) from this thread.
    """
    salvaging = WorkProgress(
        observer, "salvaging the damaged buffer", holds_store=True, unit="MiB copied"
    )
    with salvaging as progress:
        aside = _move_aside(path)
        source = aside
        header_repaired = False
        if check_header(aside) is not None or not _schema_readable(aside):
            repaired = rawpages.repair_header(
                aside, default_page_size=page_size, on_page=progress.step
            )
            if repaired is not None and _schema_readable(repaired):
                source, header_repaired = repaired, True
        create_private_file(path)  # SQLite would create it with the umask's mode
        fresh = sqlite3.connect(path, isolation_level=None)
        try:
            progress.watch(fresh)
            create_schema(fresh, page_size)
            if _schema_readable(source):
                counts = _salvage_rows(source, fresh, progress)
                if counts.skipped_ranges:
                    # SQLite cannot reach keys that sit in intact interior pages between
                    # damaged leaves; the page scan can.
                    union = _salvage_raw(aside, fresh, page_size, progress, union=True)
                    counts.readings += union.readings
            else:
                counts = _salvage_raw(aside, fresh, page_size, progress)
        finally:
            fresh.close()
            if source != aside:
                rawpages.remove_copy(source)
    return SalvageReport(
        moved_to=aside, header_repaired=header_repaired, error=error, **asdict(counts)
    )


def _move_aside(path: Path) -> Path:
    stamp = _utc_stamp(time.time())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    serial = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{serial}")
        serial += 1
    os.replace(path, aside)
    for suffix in ("-wal", "-shm"):
        companion = Path(f"{path}{suffix}")
        if companion.exists():
            if suffix == "-shm":
                companion.unlink()  # rebuilt from the WAL by whoever opens the copy
            else:
                os.replace(companion, Path(f"{aside}{suffix}"))
    return aside


def _schema_readable(path: Path) -> bool:
    try:
        connection = sqlite3.connect(path)
        try:
            names = {
                row[0] for row in connection.execute("SELECT name FROM sqlite_schema").fetchall()
            }
        finally:
            connection.close()
    except sqlite3.Error:
        return False
    return "readings" in names


@dataclass
class SalvageCounts:
    readings: int = 0
    streams: int = 0
    dead_letters: int = 0
    quota_days: int = 0
    orphaned: int = 0
    skipped_ranges: int = 0


def _valid_reading(stream_id: object, ts_ms: object, value: object) -> bool:
    if not (isinstance(stream_id, int) and isinstance(ts_ms, int) and isinstance(value, str)):
        return False
    if stream_id <= 0 or not 0 < ts_ms < 10**14:
        return False
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _scan(
    connection: sqlite3.Connection,
    sql: str,
    start: tuple[Any, ...],
    advance: Callable[[tuple[Any, ...], int], tuple[Any, ...] | None],
    counts: SalvageCounts,
) -> Iterable[tuple[Any, ...]]:
    """Yield rows of a keyset query `sql` (params: the key to start after), skipping damage.

    When a read fails, probe for the nearest readable key after the last good one: grow
    the step exponentially until a probe succeeds, then halve back towards the damage so
    that as few good rows as possible are skipped. Rows are yielded as they are read.
    """
    key = start
    while True:
        try:
            for row in connection.execute(sql, key):
                key = tuple(row[: len(start)])
                yield tuple(row)
            return
        except sqlite3.DatabaseError:
            counts.skipped_ranges += 1
            resume = _probe_past_damage(connection, sql, key, advance)
            if resume is None:
                return
            key = resume


def _has_column(connection: sqlite3.Connection, table: str, column: str) -> bool:
    """Whether a (possibly damaged) file's table has a column; False if that cannot be read."""
    try:
        rows = connection.execute(f"PRAGMA table_info({table})").fetchall()
    except sqlite3.DatabaseError:
        return False
    return any(row[1] == column for row in rows)


def _scan_by_id(
    connection: sqlite3.Connection, sql: str, counts: SalvageCounts
) -> Iterable[tuple[Any, ...]]:
    """`_scan` of a table keyed by an integer id (`sql` ends `WHERE id > ? ORDER BY id`)."""
    return _scan(connection, sql, (0,), lambda key, step: (key[0] + step,), counts)


def _probe_past_damage(
    connection: sqlite3.Connection,
    sql: str,
    key: tuple[Any, ...],
    advance: Callable[[tuple[Any, ...], int], tuple[Any, ...] | None],
) -> tuple[Any, ...] | None:
    def readable(candidate: tuple[Any, ...]) -> bool:
        try:
            connection.execute(sql, candidate).fetchone()
        except sqlite3.DatabaseError:
            return False
        return True

    good: tuple[Any, ...] | None = None
    step_bits = 0
    while step_bits < 62:
        candidate = advance(key, 1 << step_bits)
        if candidate is None:
            return None
        if readable(candidate):
            good = candidate
            break
        step_bits += 1
    if good is None:
        return None
    low, high = (1 << (step_bits - 1)) if step_bits else 0, 1 << step_bits
    while high - low > 1:
        middle = (low + high) // 2
        candidate = advance(key, middle)
        if candidate is not None and readable(candidate):
            high, good = middle, candidate
        else:
            low = middle
    return good


def _salvage_rows(
    source_path: Path, fresh: sqlite3.Connection, progress: WorkProgress
) -> SalvageCounts:
    counts = SalvageCounts()
    source = sqlite3.connect(source_path)
    progress.unit, progress.count, progress.total = "readings read", 0, None
    try:
        progress.watch(source)
        source.execute("PRAGMA query_only=1")
        columns = {row[1] for row in _safe_rows(source, "PRAGMA table_info(readings)", counts)}
        has_rowid_layout = "id" in columns
        fresh.execute("BEGIN IMMEDIATE")
        stream_ids: set[int] = set()
        # Schema v5 (sampling): each stream's window rule and the end of its windows sent.
        kept = "id, device_id, datastream_id, parked_reason, parked_until_ms"
        if _has_column(source, "streams", "sent_until_ms"):
            kept += ", window_ms, aggregate, grace_ms, whole, sent_until_ms"
        for row in _scan_by_id(
            source, f"SELECT {kept} FROM streams WHERE id > ? ORDER BY id", counts
        ):
            if isinstance(row[0], int) and isinstance(row[1], int) and isinstance(row[2], int):
                with contextlib.suppress(sqlite3.IntegrityError):
                    fresh.execute(
                        f"INSERT INTO streams ({kept}) VALUES ({', '.join('?' * len(row))})",
                        row,
                    )
                    stream_ids.add(row[0])
                    counts.streams += 1
        if _has_column(source, "deadband", "value"):
            with contextlib.suppress(sqlite3.Error):
                fresh.executemany(
                    "INSERT OR IGNORE INTO deadband (stream_id, ts_ms, value) VALUES (?, ?, ?)",
                    source.execute("SELECT stream_id, ts_ms, value FROM deadband").fetchall(),
                )
        if has_rowid_layout:
            reading_sql = (
                "SELECT id, stream_id, ts_ms, value FROM readings WHERE id > ? ORDER BY id"
            )
            reading_rows: Iterable[tuple[Any, ...]] = (
                row[1:] for row in _scan_by_id(source, reading_sql, counts)
            )
        else:
            reading_rows = _scan(
                source,
                "SELECT stream_id, ts_ms, value FROM readings WHERE (stream_id, ts_ms, value) "
                "> (?, ?, ?) ORDER BY stream_id, ts_ms, value",
                (0, 0, ""),
                _advance_reading_key,
                counts,
            )
        batch: list[tuple[Any, ...]] = []
        orphans: list[tuple[Any, ...]] = []
        for stream_id, ts_ms, value in reading_rows:
            progress.step()
            if not _valid_reading(stream_id, ts_ms, value):
                continue
            if stream_id in stream_ids:
                batch.append((stream_id, ts_ms, value))
            else:
                orphans.append((stream_id, ts_ms, value))
            if len(batch) >= 10_000:
                counts.readings += _insert_salvaged(fresh, batch)
                batch.clear()
        counts.readings += _insert_salvaged(fresh, batch)
        counts.orphaned = _dead_letter_orphans(fresh, orphans)
        # `detail` exists from schema v3 on; an older damaged file has none to keep.
        detail = "detail" if _has_column(source, "dead_letters", "detail") else "NULL"
        for row in _scan_by_id(
            source,
            "SELECT id, dead_at_ms, reason, device_id, datastream_id, ts_ms, value, topic, "
            f"payload, {detail} FROM dead_letters WHERE id > ? ORDER BY id",
            counts,
        ):
            with contextlib.suppress(sqlite3.Error):
                fresh.execute(
                    "INSERT INTO dead_letters (dead_at_ms, reason, device_id, datastream_id, "
                    "ts_ms, value, topic, payload, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row[1:],
                )
                counts.dead_letters += 1
        for row in _scan(
            source,
            "SELECT device_id, day, points, exhausted FROM quota_days "
            "WHERE (device_id, day) > (?, ?) ORDER BY device_id, day",
            (-1, ""),
            lambda k, step: (k[0] + step, ""),
            counts,
        ):
            with contextlib.suppress(sqlite3.Error):
                fresh.execute(
                    "INSERT INTO quota_days (device_id, day, points, exhausted) "
                    "VALUES (?, ?, ?, ?)",
                    row,
                )
                counts.quota_days += 1
        if not has_rowid_layout:
            with contextlib.suppress(sqlite3.Error):
                fresh.executemany(
                    "INSERT OR IGNORE INTO capacity_drops (device_id, evicted, refused, "
                    "last_at_ms) VALUES (?, ?, ?, ?)",
                    source.execute(
                        "SELECT device_id, evicted, refused, last_at_ms FROM capacity_drops"
                    ).fetchall(),
                )
        # Schema v4 on: which streams the cloud accepted (lost, they are only tried at the
        # bounded rate of new streams until the cloud accepts them again).
        with contextlib.suppress(sqlite3.Error):
            fresh.executemany(
                "INSERT OR IGNORE INTO accepted_streams (device_id, datastream_id) VALUES (?, ?)",
                source.execute("SELECT device_id, datastream_id FROM accepted_streams").fetchall(),
            )
        provisional.salvage(source, fresh)  # readings held for the clock, if any
        fresh.execute("COMMIT")
    finally:
        source.close()
    return counts


def _salvage_raw(
    aside: Path,
    fresh: sqlite3.Connection,
    page_size: int,
    progress: WorkProgress,
    *,
    union: bool = False,
) -> SalvageCounts:
    """Decode the pages ourselves: the last resort when SQLite cannot read the schema, or
    (`union`) a second pass adding keys the logical pass could not reach."""
    counts = SalvageCounts()
    progress.unit, progress.count, progress.total = "pages read", 0, None
    pages = rawpages.RawPages.open(aside, page_size, on_page=progress.step)
    if pages is None:
        return counts
    # Each pass below reads the file once more: the count restarts with each.
    progress.count, progress.total = 0, pages.page_count
    fresh.execute("BEGIN IMMEDIATE")
    if union:
        streams = {int(row[0]) for row in fresh.execute("SELECT id FROM streams")}
    else:
        found = rawpages.raw_streams(pages)
        for stream_id, (device_id, datastream_id) in found.items():
            with contextlib.suppress(sqlite3.IntegrityError):
                fresh.execute(
                    "INSERT INTO streams (id, device_id, datastream_id) VALUES (?, ?, ?)",
                    (stream_id, device_id, datastream_id),
                )
                counts.streams += 1
        streams = set(found)
    batch: list[tuple[int, int, str]] = []
    orphans: list[tuple[int, int, str]] = []
    progress.count = 0
    for row in rawpages.raw_readings(pages):
        if not _valid_reading(*row):
            continue
        (batch if row[0] in streams else orphans).append(row)
        if len(batch) >= 10_000:
            counts.readings += _insert_salvaged(fresh, batch)
            batch.clear()
    counts.readings += _insert_salvaged(fresh, batch)
    if not union:
        counts.orphaned = _dead_letter_orphans(fresh, orphans)
    fresh.execute("COMMIT")
    return counts


def _dead_letter_orphans(fresh: sqlite3.Connection, orphans: Sequence[tuple[Any, ...]]) -> int:
    """Readings whose stream mapping is gone: kept for the operator, never dropped silently."""
    unique = sorted(set(orphans))
    now_ms = int(time.time() * 1000)
    fresh.executemany(
        "INSERT INTO dead_letters (dead_at_ms, reason, ts_ms, value, topic) VALUES (?, ?, ?, ?, ?)",
        [
            (now_ms, "salvaged_unknown_stream", ts, value, f"stream:{sid}")
            for sid, ts, value in unique
        ],
    )
    return len(unique)


def _safe_rows(
    connection: sqlite3.Connection, sql: str, counts: SalvageCounts
) -> list[tuple[Any, ...]]:
    try:
        return [tuple(row) for row in connection.execute(sql).fetchall()]
    except sqlite3.DatabaseError:
        counts.skipped_ranges += 1
        return []


def _advance_reading_key(key: tuple[Any, ...], step: int) -> tuple[Any, ...] | None:
    """A probe key `step` milliseconds past `key`; beyond any timestamp, the next stream."""
    stream_id, ts_ms = int(key[0]), int(key[1])
    if ts_ms + step < 10**14:
        return (stream_id, ts_ms + step, "")
    # Past the last plausible timestamp: move on by whole streams.
    streams_ahead = max(1, (ts_ms + step) // 10**14)
    if stream_id + streams_ahead > 2**40:
        return None
    return (stream_id + streams_ahead, 0, "")


def _insert_salvaged(fresh: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> int:
    if not rows:
        return 0
    before = fresh.total_changes
    fresh.executemany(
        "INSERT OR IGNORE INTO readings (stream_id, ts_ms, value) VALUES (?, ?, ?)", rows
    )
    return fresh.total_changes - before
