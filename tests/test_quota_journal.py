"""The RAM journal of unused pass-through reservations (store/quota_journal.py).

A crash used to leave every reservation counted: up to a minute of each busy device's
traffic, held back from its day. The next start in the same boot now gives back what the
journal says was unused, and nothing when the journal cannot be trusted (another boot, or
a commit the journal never saw). The crash here is the real thing for SQLite: the
connection is dropped without the clean shutdown's give-back.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from gateway.errors import DiskFull
from gateway.store import Store
from gateway.store.quota_journal import QuotaJournal, journal_path
from gateway.store.reservations import QuotaReservations

DAY = "2026-12-05"
LIMIT = 10_000


async def open_owner(tmp_path: Path, boot_id: str = "boot-a") -> Store:
    return await Store.open(
        tmp_path / "buffer.db",
        owner=True,
        boot_id=boot_id,
        quota_journal=tmp_path / "run" / "quota.json",
    )


async def crash(store: Store) -> None:
    """What a `kill -9` leaves: the file as committed, no give-back, no clean record."""
    await store._db.close()
    store._disk.close()


def ledger(tmp_path: Path) -> dict[int, int]:
    with sqlite3.connect(tmp_path / "buffer.db") as connection:
        rows = connection.execute(
            "SELECT device_id, points FROM quota_days WHERE day = ?", (DAY,)
        ).fetchall()
    return {int(device): int(points) for device, points in rows}


@pytest.fixture(autouse=True)
def run_dir(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()


async def reserve_and_use(store: Store, used: dict[int, int]) -> None:
    """Reserve 300 points per device (as a minute of traffic would), then use `used`."""
    needs = dict.fromkeys(used, 1)
    sizes = dict.fromkeys(used, 300)
    assert await store.reserve_quota(DAY, needs, sizes, LIMIT) == set(used)
    for device, points in used.items():
        store.use_reserved_quota(device, DAY, points)


async def test_a_crash_in_the_same_boot_strands_nothing(tmp_path: Path) -> None:
    store = await open_owner(tmp_path)
    await reserve_and_use(store, {101: 40, 102: 7})
    store.journal_reserved_use()  # the readings are about to be acknowledged
    await crash(store)
    assert ledger(tmp_path) == {101: 300, 102: 300}  # before: what a crash stranded

    store = await open_owner(tmp_path)
    try:
        assert ledger(tmp_path) == {101: 40, 102: 7}
    finally:
        await store.close()
    assert not (tmp_path / "run" / "quota.json").exists()


async def test_uses_not_journaled_yet_are_given_back_and_counted_when_resent(
    tmp_path: Path,
) -> None:
    """Accepted, not acknowledged yet: the broker sends those readings again after the
    crash, and they are counted when the cloud takes them again, so they are given back."""
    store = await open_owner(tmp_path)
    await reserve_and_use(store, {101: 40})
    store.journal_reserved_use()
    store.use_reserved_quota(101, DAY, 25)  # the crash comes before its PUBACK
    await crash(store)

    store = await open_owner(tmp_path)
    try:
        assert ledger(tmp_path) == {101: 40}
    finally:
        await store.close()


async def test_a_journal_of_another_boot_gives_nothing_back(tmp_path: Path) -> None:
    """A power cut: the RAM journal is gone, or (on a disk) may lag the file."""
    store = await open_owner(tmp_path, boot_id="boot-a")
    await reserve_and_use(store, {101: 40})
    store.journal_reserved_use()
    await crash(store)

    store = await open_owner(tmp_path, boot_id="boot-b")
    try:
        assert ledger(tmp_path) == {101: 300}  # the safe side: counted, never sent
    finally:
        await store.close()


async def test_a_journal_older_than_the_last_commit_gives_nothing_back(tmp_path: Path) -> None:
    """Killed between a reservation's commit and the journal's rewrite: the journal's
    epoch is behind the file's, its numbers belong to another state of the ledger."""
    store = await open_owner(tmp_path)
    await reserve_and_use(store, {101: 300})
    store.journal_reserved_use()
    journal = tmp_path / "run" / "quota.json"
    before = journal.read_bytes()
    await reserve_and_use(store, {101: 10})  # a top-up: a new epoch in the file
    await crash(store)
    journal.write_bytes(before)  # as if the kill came before the rewrite

    store = await open_owner(tmp_path)
    try:
        assert ledger(tmp_path) == {101: 600}
    finally:
        await store.close()


async def test_a_clean_close_gives_back_and_leaves_no_journal(tmp_path: Path) -> None:
    store = await open_owner(tmp_path)
    await reserve_and_use(store, {101: 40})
    await store.close()
    assert ledger(tmp_path) == {101: 40}
    assert not (tmp_path / "run" / "quota.json").exists()

    store = await open_owner(tmp_path)  # nothing to recover: no write at all
    await store.close()
    assert ledger(tmp_path) == {101: 40}


def test_an_unknown_boot_id_is_never_trusted(tmp_path: Path) -> None:
    journal = QuotaJournal(tmp_path / "quota.json", "unknown")
    journal.write(3, {(101, DAY): 10})
    assert not (tmp_path / "quota.json").exists()
    assert journal.read() is None


def test_each_buffer_has_its_own_journal(tmp_path: Path) -> None:
    first = journal_path(tmp_path / "a.db", "/run/blynk-gateway")
    second = journal_path(tmp_path / "b.db", "/run/blynk-gateway")
    assert first != second
    assert first.parent == Path("/run/blynk-gateway")
    assert journal_path(tmp_path / "a.db", None).parent == Path("/dev/shm")


async def test_a_journal_someone_else_owns_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/dev/shm is shared by every user: a journal put there by another one (owner not us)
    must not make the gateway give back quota."""
    store = await open_owner(tmp_path)
    await reserve_and_use(store, {101: 40})
    store.journal_reserved_use()
    await crash(store)

    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)  # the file's owner is not "us"
    store = await open_owner(tmp_path)
    try:
        assert ledger(tmp_path) == {101: 300}
    finally:
        await store.close()


async def test_a_give_back_that_cannot_be_written_does_not_stop_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at start: the gateway starts, the reservation stays counted (the safe
    side), and the journal is left for a later start to try again."""
    store = await open_owner(tmp_path)
    await reserve_and_use(store, {101: 40})
    store.journal_reserved_use()
    await crash(store)

    async def disk_full(*args: object) -> None:
        raise DiskFull("database or disk is full")

    monkeypatch.setattr(QuotaReservations, "recover", disk_full)
    store = await open_owner(tmp_path)
    await crash(store)
    assert ledger(tmp_path) == {101: 300}
    assert (tmp_path / "run" / "quota.json").exists()

    monkeypatch.undo()
    store = await open_owner(tmp_path)  # room again: given back now
    try:
        assert ledger(tmp_path) == {101: 40}
    finally:
        await store.close()
