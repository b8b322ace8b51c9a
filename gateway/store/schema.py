"""The buffer's tables, and the upgrades that bring an older file up to date.

A file records its schema version in `PRAGMA user_version`; `migrate` applies each missing
step in a transaction of its own. `create_schema` makes a new file (the recovery builds its
fresh file with it, and the benchmarks build files of any version with `migrate`).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from gateway.errors import StoreError
from gateway.log import get_logger
from gateway.store.progress import LongWorkObserver, WorkProgress

log = get_logger("store")

SCHEMA_VERSION = 6

# New files only (SQLite fixes the page size when the file is created). A commit writes
# every page it touches to the WAL, and small commits touch a few pages each: 1 KiB pages
# halve the bytes written per reading against 4 KiB (benchmarks/sd_wear.py). Values longer
# than about 200 bytes then spill into overflow pages, which costs space, not correctness.
DEFAULT_PAGE_SIZE = 1024

# Each entry upgrades the schema from version N-1 to N, in one transaction. Statements end
# with ';' and a newline (that is how they are split).
_MIGRATIONS: dict[int, str] = {
    1: """
        CREATE TABLE streams (
            id INTEGER PRIMARY KEY,
            device_id INTEGER NOT NULL,
            datastream_id INTEGER NOT NULL,
            parked_reason TEXT,
            parked_until_ms INTEGER,
            UNIQUE (device_id, datastream_id)
        );
        -- value is the JSON text sent to the cloud, integer stream ids keep rows small
        CREATE TABLE readings (
            id INTEGER PRIMARY KEY,
            stream_id INTEGER NOT NULL,
            ts_ms INTEGER NOT NULL,
            value TEXT NOT NULL
        );
        -- covering index: batch selection by stream and time, and duplicate suppression
        CREATE UNIQUE INDEX readings_by_stream_ts ON readings (stream_id, ts_ms, value);
        CREATE TABLE dead_letters (
            id INTEGER PRIMARY KEY,
            dead_at_ms INTEGER NOT NULL,
            reason TEXT NOT NULL,
            device_id INTEGER,
            datastream_id INTEGER,
            ts_ms INTEGER,
            value TEXT,
            topic TEXT,
            payload BLOB
        );
        CREATE INDEX dead_letters_by_reason ON dead_letters (reason);
        -- points accepted by the cloud per device per day (the day in the configured zone)
        CREATE TABLE quota_days (
            device_id INTEGER NOT NULL,
            day TEXT NOT NULL,
            points INTEGER NOT NULL DEFAULT 0,
            exhausted INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (device_id, day)
        ) WITHOUT ROWID;
    """,
    # Version 2: each reading is stored once instead of twice (table + covering index), which
    # halves the file and the pages a commit dirties (SD wear). Adds the clean-shutdown
    # record that makes start-up O(1) and the per-device eviction counters.
    2: """
        CREATE TABLE readings_v2 (
            stream_id INTEGER NOT NULL,
            ts_ms INTEGER NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (stream_id, ts_ms, value)
        ) WITHOUT ROWID;
        INSERT INTO readings_v2 (stream_id, ts_ms, value)
            SELECT stream_id, ts_ms, value FROM readings ORDER BY stream_id, ts_ms, value;
        DROP TABLE readings;
        ALTER TABLE readings_v2 RENAME TO readings;
        -- key/value facts about the file; 'pending_points' exists only after a clean close
        CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        ) WITHOUT ROWID;
        -- readings the capacity policy dropped, per device, since the file was created
        CREATE TABLE capacity_drops (
            device_id INTEGER PRIMARY KEY,
            evicted INTEGER NOT NULL DEFAULT 0,
            refused INTEGER NOT NULL DEFAULT 0,
            last_at_ms INTEGER NOT NULL
        );
    """,
    # Version 3: a dead letter's reason is a stable code; the value that varies per message
    # (the bad number, the cloud's wording) goes to `detail`, so grouping by reason works.
    3: """
        ALTER TABLE dead_letters ADD COLUMN detail TEXT;
    """,
    # Version 4: the streams the cloud has accepted a batch of. The flush loop serves them
    # before streams it never heard the cloud accept, which it tries at a bounded rate
    # (uplink/stream_order.py). Keyed by ids, not by stream row: pass-through uploads accept
    # streams that were never written. An older file did not record it: a stream counts as
    # accepted if its device has points in the quota ledger (the last few days) and the
    # cloud did not answer 404 for it.
    4: """
        CREATE TABLE accepted_streams (
            device_id INTEGER NOT NULL,
            datastream_id INTEGER NOT NULL,
            PRIMARY KEY (device_id, datastream_id)
        ) WITHOUT ROWID;
        INSERT INTO accepted_streams (device_id, datastream_id)
            SELECT device_id, datastream_id FROM streams
            WHERE device_id IN (SELECT device_id FROM quota_days WHERE points > 0)
            AND (parked_reason IS NULL OR parked_reason NOT LIKE '%not_found%');
    """,
    # Version 5 (issue 19, sampling): a windowed stream's rule, so the flush loop cuts a
    # backlog buffered before a restart as it was meant (written only when the rule
    # changes), and the end of the last window sent (a reading before it is late); the
    # last reading each deadband stream kept, so a restart does not forget it.
    5: """
        ALTER TABLE streams ADD COLUMN window_ms INTEGER;
        ALTER TABLE streams ADD COLUMN aggregate TEXT;
        ALTER TABLE streams ADD COLUMN grace_ms INTEGER;
        ALTER TABLE streams ADD COLUMN whole INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE streams ADD COLUMN sent_until_ms INTEGER;
        CREATE TABLE deadband (
            stream_id INTEGER PRIMARY KEY,
            ts_ms INTEGER NOT NULL,
            value TEXT NOT NULL
        );
    """,
}

# Version 6 (issue 20): readings stamped while the clock was not trusted wait apart from
# `readings` (so no upload, quota or age rule sees them), keyed by the boot and its
# CLOCK_BOOTTIME, until the clock synchronizes and gives them their wall time
# (provisional.py). `boots` remembers each boot's last trusted moment, to estimate the
# time of a boot that never synchronized, and the last correction, for `status`.
_CLOCK_TABLES = """
    CREATE TABLE boots (
        id INTEGER PRIMARY KEY,
        boot_id TEXT NOT NULL UNIQUE,
        trusted_wall_ms INTEGER,
        trusted_boottime_ms INTEGER,
        corrected INTEGER NOT NULL DEFAULT 0,
        corrected_at_ms INTEGER,
        offset_ms INTEGER,
        estimated INTEGER NOT NULL DEFAULT 0,
        dead_lettered INTEGER NOT NULL DEFAULT 0
    );
    -- boot first: a correction walks one boot's rows; (stream, stamp, value) as in readings
    CREATE TABLE provisional (
        boot INTEGER NOT NULL,
        stream_id INTEGER NOT NULL,
        boottime_ms INTEGER NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (boot, stream_id, boottime_ms, value)
    ) WITHOUT ROWID;
"""
_MIGRATIONS[6] = _CLOCK_TABLES


def migrate(connection: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Upgrade the file to schema version `target`, one transaction per step.

    `connection` must be in autocommit mode (`isolation_level=None`). Returns the version
    the file had. A file newer than this gateway is refused, never touched.
    """
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        path = connection.execute("PRAGMA database_list").fetchone()[2]
        raise StoreError(
            f"{path} has schema version {version}, newer than this gateway "
            f"understands ({SCHEMA_VERSION}); upgrade the gateway"
        )
    for step in range(version + 1, target + 1):
        started = time.perf_counter()
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in _MIGRATIONS[step].split(";\n"):
                if statement.strip():
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version={step}")
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        if version > 0:
            log.info(
                "store_migrated",
                schema_version=step,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
            )
    return int(version)


def create_schema(connection: sqlite3.Connection, page_size: int = DEFAULT_PAGE_SIZE) -> None:
    """Make the file a buffer of the current version (or upgrade it, if it already is one).

    The page size takes effect only on a new file; WAL mode is recorded in the file.
    """
    connection.execute(f"PRAGMA page_size={int(page_size)}")
    connection.execute("PRAGMA journal_mode=WAL")
    migrate(connection)


def prepare_file(path: Path, page_size: int, observer: LongWorkObserver | None = None) -> None:
    """`create_schema` on a connection of its own (the store runs this in a worker thread).

    Upgrading an old file rewrites its readings, which on a big backlog takes a while: the
    progress goes to `observer` (silent when there is nothing to upgrade).
    """
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        with WorkProgress(observer, "upgrading the buffer file", holds_store=True) as progress:
            progress.watch(connection)
            create_schema(connection, page_size)
    finally:
        connection.close()
