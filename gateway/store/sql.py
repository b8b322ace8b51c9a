"""Small helpers over the store's aiosqlite connection, shared by the store's modules."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import aiosqlite

from gateway.errors import StoreError


async def fetch_one(
    db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()
) -> tuple[Any, ...]:
    async with db.execute(sql, params) as cursor:
        row = await cursor.fetchone()
    if row is None:
        raise StoreError(f"no row for {sql!r}")
    return tuple(row)


async def changes(db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> int:
    """Run one statement; how many rows it inserted, updated or deleted."""
    before = db.total_changes
    await db.execute(sql, params)
    return db.total_changes - before


async def changes_many(db: aiosqlite.Connection, sql: str, params: Iterable[Sequence[Any]]) -> int:
    """`executemany`; how many rows it inserted, updated or deleted in all."""
    before = db.total_changes
    await db.executemany(sql, params)
    return db.total_changes - before


async def used_bytes(db: aiosqlite.Connection, page_size: int) -> int:
    """Bytes in the file's pages that hold data (the file less its free pages)."""
    (pages,) = await fetch_one(
        db,
        "SELECT (SELECT page_count FROM pragma_page_count()) "
        "- (SELECT freelist_count FROM pragma_freelist_count())",
    )
    return int(pages) * page_size
