"""Reading a damaged SQLite file without SQLite: header repair and a raw page scan.

The store's recovery (`gateway.store.recovery`) first asks SQLite to read what it can, skipping
damaged page ranges. It comes here only when SQLite cannot even read the schema:

1. `repair_header` writes a copy of the file with a fresh 100-byte header (page size taken
   from the WAL, the page layout, or our default), so SQLite can open it again when only
   the header was hit (`check_header` is the cheap test that sends it there).
2. `RawPages` walks every page of the file (with the WAL's committed frames laid over
   it, as SQLite would) and decodes the cells of b-tree pages by their shape: table-leaf
   rows of `streams`, index rows of `readings`. Pages on the freelist are skipped when
   the freelist can be recognised, so rows that were already delivered (their pages
   freed) are not resurrected; this is a heuristic, and the last resort.

This module knows the file format (https://www.sqlite.org/fileformat.html) and nothing of
SQL; the store inserts what it yields.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.store.files import create_private_file

SQLITE_MAGIC = b"SQLite format 3\x00"
_WAL_MAGICS = (0x377F0682, 0x377F0683)
_PAGE_TYPES = {0x02, 0x05, 0x0A, 0x0D}
_SIZES = tuple(1 << bits for bits in range(9, 17))
# Copied per read when a header is repaired: the salvage reports progress between chunks.
_COPY_CHUNK = 1 << 20

# Called once per page read, frame checked or chunk copied: the salvage's progress report.
OnPage = Callable[[], object]


def _nothing() -> None:
    pass


# ---------------------------------------------------------------------- header check


def check_header(path: Path) -> str | None:
    """A problem with the file's 100-byte header, or None. O(1): one read, one stat."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    try:
        with path.open("rb") as handle:
            header = handle.read(100)
    except OSError as exc:
        return f"cannot read the database file: {exc}"
    if len(header) < 100 or header[:16] != SQLITE_MAGIC:
        return "not an SQLite database (bad header magic)"
    page_size = _page_size_field(header)
    if page_size is None:
        return f"bad page size in header: {header[16:18].hex()}"
    if size % page_size:
        return f"file size {size} is not a multiple of the page size {page_size}"
    return None


# ---------------------------------------------------------------------- header repair


def repair_header(path: Path, *, default_page_size: int, on_page: OnPage = _nothing) -> Path | None:
    """A copy of `path` (and its WAL) with a rebuilt header, or None if hopeless."""
    try:
        size = path.stat().st_size
    except OSError:
        return None
    wal = Path(f"{path}-wal")
    page_size = _wal_page_size(wal) or _guess_page_size(path, size, default_page_size)
    if page_size is None or size < 2 * page_size:
        return None
    repaired = path.with_name(path.name + ".repaired")
    _private_copy(path, repaired, on_page)
    if wal.exists():
        _private_copy(wal, Path(f"{repaired}-wal"), on_page)
    with repaired.open("r+b") as handle:
        handle.write(_header(page_size, size // page_size))
    return repaired


def _private_copy(source: Path, target: Path, on_chunk: OnPage) -> None:
    """A copy by chunks (a big file on an SD card takes a while) that only the daemon's
    user can read: it holds the same payloads."""
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    create_private_file(target)
    with source.open("rb") as reader, target.open("wb") as writer:
        while chunk := reader.read(_COPY_CHUNK):
            writer.write(chunk)
            on_chunk()


def _header(page_size: int, page_count: int) -> bytes:
    return (
        SQLITE_MAGIC
        + struct.pack(">H", 1 if page_size == 65536 else page_size)
        + bytes([2, 2, 0, 64, 32, 32])  # WAL read/write versions, no reserved bytes
        + struct.pack(">IIII", 1, page_count, 0, 0)  # change counter, size, no freelist
        + struct.pack(">IIIIIIII", 1, 4, 0, 0, 1, 0, 0, 0)  # cookie, format 4, UTF-8
        + bytes(20)
        + struct.pack(">II", 1, 3_040_001)
    )


def _wal_page_size(wal: Path) -> int | None:
    try:
        with wal.open("rb") as handle:
            head = handle.read(32)
    except OSError:
        return None
    if len(head) < 32:
        return None
    magic, _, page_size = struct.unpack(">III", head[:12])
    if magic in _WAL_MAGICS and page_size in _SIZES:
        return int(page_size)
    return None


def _guess_page_size(path: Path, size: int, default: int) -> int | None:
    """The page size, judged from pages at odd multiples of each candidate size.

    An odd multiple of a candidate is a page start only if the candidate is at least the
    true size (else it falls mid-page), so the true size is the smallest candidate whose
    odd multiples often start like b-tree pages. Sampled across the whole file, because
    freed pages may be zeroed in runs.
    """
    ratios: dict[int, float] = {}
    with path.open("rb") as handle:
        for candidate in _SIZES:
            pages = size // candidate
            if size % candidate or pages < 3:
                continue
            odd = range(1, pages, 2)
            step = max(1, len(odd) // 200)
            samples = odd[::step]
            hits = 0
            for index in samples:
                handle.seek(index * candidate)
                hits += _looks_like_btree(handle.read(12), 0, candidate)
            ratios[candidate] = hits / len(samples)
    if not ratios or max(ratios.values()) == 0:
        return default if size % default == 0 else None
    best = max(ratios.values())
    return min(c for c, ratio in ratios.items() if ratio >= 0.5 * best)


def _looks_like_btree(page: bytes, offset: int, page_size: int) -> bool:
    if len(page) < offset + 8 or page[offset] not in _PAGE_TYPES:
        return False
    cells = struct.unpack(">H", page[offset + 3 : offset + 5])[0]
    content = struct.unpack(">H", page[offset + 5 : offset + 7])[0] or 65536
    return cells * 2 + 8 <= page_size and content <= page_size


# ---------------------------------------------------------------------- raw page scan


@dataclass
class RawPages:
    """Every page of a database file as SQLite would see it, decoded by shape."""

    path: Path
    page_size: int
    page_count: int
    wal_frames: dict[int, int]  # page number -> offset of its newest committed frame
    free_pages: set[int]
    on_page: OnPage = _nothing

    @classmethod
    def open(
        cls, path: Path, default_page_size: int, on_page: OnPage = _nothing
    ) -> RawPages | None:
        size = path.stat().st_size
        wal = Path(f"{path}-wal")
        page_size = _header_page_size(path) or _wal_page_size(wal)
        page_size = page_size or _guess_page_size(path, size, default_page_size)
        if page_size is None:
            return None
        frames, wal_pages = _committed_frames(wal, page_size, on_page)
        count = max(size // page_size, wal_pages)
        pages = cls(path, page_size, count, frames, set(), on_page)
        free = pages._freelist_from_header()
        pages.free_pages = free if free is not None else pages._freelist_like_pages()
        return pages

    def _freelist_from_header(self) -> set[int] | None:
        """The freelist as page 1 records it, or None when page 1 is not trustworthy."""
        first = self.page(1)
        if first is None or first[:16] != SQLITE_MAGIC:
            return None
        trunk, total = struct.unpack(">II", first[32:40])
        free: set[int] = set()
        limit = self.page_size // 4 - 2
        while trunk:
            if trunk in free or not 1 < trunk <= self.page_count:
                return None
            data = self.page(trunk)
            if data is None:
                return None
            free.add(trunk)
            next_trunk, count = struct.unpack(">II", data[:8])
            if count > limit:
                return None
            free.update(struct.unpack(f">{count}I", data[8 : 8 + 4 * count]))
            trunk = next_trunk
        return free if len(free) == total else None

    def pages(self) -> Iterator[tuple[int, bytes]]:
        yield from self._some_pages(range(1, self.page_count + 1))

    def page(self, number: int) -> bytes | None:
        for found, data in self._some_pages({number}):
            if found == number:
                return data
        return None

    def _some_pages(self, wanted: Iterable[int]) -> Iterator[tuple[int, bytes]]:
        """Pages in ascending order, each from the WAL when it holds a newer copy."""
        wal = Path(f"{self.path}-wal")
        with self.path.open("rb") as db, _open_or_none(wal) as log:
            for number in sorted(wanted):
                if not 1 <= number <= self.page_count:
                    continue
                offset = self.wal_frames.get(number)
                if offset is not None and log is not None:
                    log.seek(offset)
                    data = log.read(self.page_size)
                else:
                    db.seek((number - 1) * self.page_size)
                    data = db.read(self.page_size)
                self.on_page()
                if len(data) == self.page_size:
                    yield number, data

    def _freelist_like_pages(self) -> set[int]:
        """Leaves listed by pages that look like freelist trunks (never b-tree pages).

        A trunk page is (next trunk, count, count page numbers), all within the file. Its
        first byte is 0 in any file under 16 million pages, which no b-tree page starts
        with; random bytes almost never pass the count and range checks.
        """
        free: set[int] = set()
        limit = self.page_size // 4 - 2
        for number, data in self.pages():
            if number == 1 or data[0] in _PAGE_TYPES:
                continue
            next_trunk, count = struct.unpack(">II", data[:8])
            if next_trunk > self.page_count or not 0 < count <= limit:
                continue
            leaves = struct.unpack(f">{count}I", data[8 : 8 + 4 * count])
            if all(1 < leaf <= self.page_count for leaf in leaves):
                free.update(leaves)
                free.add(number)
        return free

    def records(
        self, kinds: set[int], only: set[int] | None = None
    ) -> Iterator[tuple[int, int | None, list[Any]]]:
        """(page type, rowid or None, decoded columns) of every readable cell."""
        usable = self.page_size
        pages = self.pages() if only is None else self._some_pages(only)
        for number, data in pages:
            if number in self.free_pages:
                continue
            offset = 100 if number == 1 else 0
            if not _looks_like_btree(data, offset, self.page_size) or data[offset] not in kinds:
                continue
            kind = data[offset]
            cells = struct.unpack(">H", data[offset + 3 : offset + 5])[0]
            header = 12 if kind in (0x02, 0x05) else 8
            for index in range(cells):
                pointer_at = offset + header + 2 * index
                (cell_at,) = struct.unpack(">H", data[pointer_at : pointer_at + 2])
                try:
                    rowid, payload = self._cell(kind, data, cell_at, usable)
                    yield kind, rowid, _decode_record(payload)
                except (ValueError, IndexError, struct.error, UnicodeDecodeError):
                    continue

    def _cell(self, kind: int, page: bytes, at: int, usable: int) -> tuple[int | None, bytes]:
        if at < 8 or at >= len(page):
            raise ValueError("cell pointer out of range")
        if kind == 0x02:
            at += 4  # left child pointer
        size, at = _varint(page, at)
        rowid = None
        if kind == 0x0D:
            rowid, at = _varint(page, at)
        if size > 1 << 24:
            raise ValueError("implausible payload size")
        max_local = usable - 35 if kind == 0x0D else (usable - 12) * 64 // 255 - 23
        if size <= max_local:
            return rowid, page[at : at + size]
        min_local = (usable - 12) * 32 // 255 - 23
        local = min_local + (size - min_local) % (usable - 4)
        if local > max_local:
            local = min_local
        payload = bytearray(page[at : at + local])
        (overflow,) = struct.unpack(">I", page[at + local : at + local + 4])
        seen: set[int] = set()
        while len(payload) < size:
            if overflow in seen or not 1 < overflow <= self.page_count:
                raise ValueError("broken overflow chain")
            seen.add(overflow)
            data = self.page(overflow)
            if data is None:
                raise ValueError("overflow page unreadable")
            (overflow,) = struct.unpack(">I", data[:4])
            payload += data[4:usable]
        return rowid, bytes(payload[:size])


def _header_page_size(path: Path) -> int | None:
    with path.open("rb") as handle:
        header = handle.read(100)
    if header[:16] != SQLITE_MAGIC:
        return None
    return _page_size_field(header)


def _page_size_field(header: bytes) -> int | None:
    (raw,) = struct.unpack(">H", header[16:18])
    size = 65536 if raw == 1 else raw
    return size if size in _SIZES else None


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _open_or_none(path: Path) -> Any:
    try:
        return path.open("rb")
    except OSError:
        return _NullContext()


def _committed_frames(
    wal: Path, page_size: int, on_frame: OnPage = _nothing
) -> tuple[dict[int, int], int]:
    """Offsets of the newest version of each page in the WAL's committed, checksummed prefix."""
    try:
        data_size = wal.stat().st_size
        handle = wal.open("rb")
    except OSError:
        return {}, 0
    with handle:
        head = handle.read(32)
        if len(head) < 32:
            return {}, 0
        magic, _, wal_page_size, _, salt1, salt2 = struct.unpack(">IIIIII", head[:24])
        if magic not in _WAL_MAGICS or wal_page_size != page_size:
            return {}, 0
        big_endian = magic & 1
        s0, s1 = _checksum(head[:24], 0, 0, big_endian)
        if (s0, s1) != struct.unpack(">II", head[24:32]):
            return {}, 0
        committed: dict[int, int] = {}
        pending: dict[int, int] = {}
        pages_after_commit = 0
        offset = 32
        while offset + 24 + page_size <= data_size:
            handle.seek(offset)
            frame = handle.read(24 + page_size)
            number, commit_size, f_salt1, f_salt2, c0, c1 = struct.unpack(">IIIIII", frame[:24])
            if (f_salt1, f_salt2) != (salt1, salt2):
                break
            s0, s1 = _checksum(frame[:8], s0, s1, big_endian)
            s0, s1 = _checksum(frame[24:], s0, s1, big_endian)
            if (s0, s1) != (c0, c1):
                break
            on_frame()
            pending[number] = offset + 24
            if commit_size:
                committed.update(pending)
                pending.clear()
                pages_after_commit = commit_size
            offset += 24 + page_size
    return committed, pages_after_commit


def _checksum(data: bytes, s0: int, s1: int, big_endian: int) -> tuple[int, int]:
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for index in range(0, len(words), 2):
        s0 = (s0 + words[index] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[index + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = 0
    for index in range(9):
        byte = data[at + index]
        if index == 8:
            return (value << 8) | byte, at + 9
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, at + index + 1
    raise ValueError("bad varint")  # pragma: no cover


def _decode_record(payload: bytes) -> list[Any]:
    header_size, at = _varint(payload, 0)
    if header_size > len(payload):
        raise ValueError("record header beyond payload")
    types = []
    while at < header_size:
        serial, at = _varint(payload, at)
        types.append(serial)
    body = header_size
    values: list[Any] = []
    for serial in types:
        if serial == 0:
            values.append(None)
        elif 1 <= serial <= 6:
            width = (1, 2, 3, 4, 6, 8)[serial - 1]
            values.append(int.from_bytes(payload[body : body + width], "big", signed=True))
            body += width
        elif serial == 7:
            (number,) = struct.unpack(">d", payload[body : body + 8])
            values.append(number)
            body += 8
        elif serial in (8, 9):
            values.append(serial - 8)
        elif serial >= 12:
            width = (serial - 12) // 2
            raw = payload[body : body + width]
            if len(raw) != width:
                raise ValueError("value beyond payload")
            values.append(raw.decode("utf-8") if serial % 2 else bytes(raw))
            body += width
        else:
            raise ValueError(f"reserved serial type {serial}")
    if body > len(payload):
        raise ValueError("record body beyond payload")
    return values


def raw_streams(pages: RawPages) -> dict[int, tuple[int, int]]:
    """stream id -> (device, datastream) from table-leaf cells shaped like `streams` rows
    (five columns; ten once written by schema v5, whose sampling columns are not kept)."""
    found: dict[int, tuple[int, int]] = {}
    for _, rowid, columns in pages.records({0x0D}):
        if (
            rowid is not None
            and (len(columns) == 5 or (len(columns) == 10 and _sampling_columns(columns[5:])))
            and columns[0] is None
            and isinstance(columns[1], int)
            and isinstance(columns[2], int)
            and (columns[3] is None or isinstance(columns[3], str))
            and (columns[4] is None or isinstance(columns[4], int))
            and columns[1] >= 0
            and columns[2] >= 0
        ):
            found[rowid] = (columns[1], columns[2])
    return found


def _sampling_columns(columns: list[Any]) -> bool:
    """window_ms, aggregate, grace_ms, whole, sent_until_ms: integers and text, or NULL."""
    kinds = (int, str, int, int, int)
    return all(
        value is None or isinstance(value, kind) for value, kind in zip(columns, kinds, strict=True)
    )


def raw_readings(pages: RawPages, only: set[int] | None = None) -> Iterator[tuple[int, int, str]]:
    """(stream id, ts, value) from index cells shaped like `readings` keys (v2, or v1's index)."""
    for _, _, columns in pages.records({0x0A, 0x02}, only):
        if len(columns) in (3, 4) and isinstance(columns[2], str):
            stream_id, ts_ms = columns[0], columns[1]
            if isinstance(stream_id, int) and isinstance(ts_ms, int):
                if len(columns) == 4 and not isinstance(columns[3], int):
                    continue
                yield stream_id, ts_ms, columns[2]


def remove_copy(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{path}{suffix}")
