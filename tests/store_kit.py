"""Shared by the store's tests: readings to append, the `db_path` and `make_store` fixtures
(import `db_path_fixture, make_store_fixture`), and a plain sqlite3 look at a file.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.models import Reading, StreamKey
from gateway.store import Store

BASE_TS = 1_760_000_000_000
BOILER = StreamKey(101, 5)
KITCHEN = StreamKey(102, 1)

MakeStore = Callable[..., Awaitable[Store]]


def readings(
    count: int, stream: StreamKey = BOILER, start: int = 0, step: int = 1, width: int = 0
) -> list[Reading]:
    """`count` readings of one stream at BASE_TS + start + i*step; value i (or a long text)."""
    out = []
    for i in range(start, start + count):
        value = f'"{i:0{width}d}"' if width else str(i)
        out.append(Reading(stream.device_id, stream.datastream_id, BASE_TS + i * step, value))
    return out


def as_rows(items: list[Reading]) -> set[tuple[int, int, int, str]]:
    return {(r.device_id, r.datastream_id, r.ts_ms, r.value_json) for r in items}


async def append_all(store: Store, items: list[Reading], group: int = 50) -> None:
    for start in range(0, len(items), group):
        await store.append(items[start : start + group])


@pytest.fixture(name="db_path")
def db_path_fixture(tmp_path: Path) -> Path:
    return tmp_path / "buffer.db"


@pytest.fixture(name="make_store")
async def make_store_fixture(db_path: Path) -> AsyncIterator[MakeStore]:
    """`make_store(**kwargs)` opens a store (owner, at `db_path` unless `path=`); all are
    closed at teardown, except those the test closed itself."""
    opened: list[Store] = []

    async def make(**kwargs: Any) -> Store:
        kwargs.setdefault("owner", True)
        store = await Store.open(kwargs.pop("path", db_path), **kwargs)
        opened.append(store)
        return store

    yield make
    for store in opened:
        with contextlib.suppress(ValueError):  # already closed by the test
            await store.close()


def sql(path: Path, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute(statement, params).fetchall()
    finally:
        connection.close()
