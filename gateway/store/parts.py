"""What the parts of `Store` share: one base class, so each mixin does not repeat it.

`Store` (buffer.py) is assembled from mixins, each in the module of its subject (ledger,
dead letters, views, accepted streams, windows, held readings, the flush side). They all
use the same connection and the same transaction helpers, and some call into each other.
`StoreParts` declares that contract once: the state more than one part reads, the helpers
`Store` implements (`_read`, `_write`, `_in_transaction`, ...), and the helpers one part
provides to another. A part keeps the annotations of state only it uses.

The helpers below are placeholders for the type checker and never run: `Store` and the
parts override them, and every part inherits from `StoreParts`, so it is last in `Store`'s
method resolution order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import aiosqlite

from gateway.aio import Notifier
from gateway.models import Batch, StreamKey

if TYPE_CHECKING:
    from gateway.store.reservations import QuotaReservations
    from gateway.store.windows import SamplingState, WindowsDone

T = TypeVar("T")


class StoreParts:
    """The state and helpers the mixins of `Store` rely on (see the module docstring)."""

    _db: aiosqlite.Connection
    _clock_ms: Callable[[], int]
    # (device, datastream) <-> the `streams` table's ids, as committed
    _stream_ids: dict[StreamKey, int]
    _stream_keys: dict[int, StreamKey]
    # Readings in the upload queue (not those held for the clock).
    pending_points: int
    # Announced after every commit that added rows: the flush loop listens.
    new_rows: Notifier
    sampling: SamplingState  # windows.py
    _reservations: QuotaReservations  # reservations.py

    # ---------------------------------------------------------------- Store provides

    async def _read(self, work: Callable[[], Awaitable[T]]) -> T:
        raise NotImplementedError  # pragma: no cover - Store provides it

    async def _write(self, work: Callable[[], Awaitable[object]]) -> None:
        raise NotImplementedError  # pragma: no cover - Store provides it

    async def _in_transaction(
        self, work: Callable[[], Awaitable[tuple[T, Callable[[], None] | None]]]
    ) -> T:
        raise NotImplementedError  # pragma: no cover - Store provides it

    async def _prune_dead_letters(self) -> None:
        raise NotImplementedError  # pragma: no cover - Store provides it

    @property
    def disk_full(self) -> bool:
        raise NotImplementedError  # pragma: no cover - Store provides it

    # ---------------------------------------------------------------- one part for another

    async def _expire_stream(self, stream_id: int, cutoff_ms: int, reason: str = "expired") -> int:
        raise NotImplementedError  # pragma: no cover - OutflowOps provides it

    def _rows_left(self, count: int) -> None:
        raise NotImplementedError  # pragma: no cover - OutflowOps provides it

    def windowed(self, stream: StreamKey) -> bool:
        raise NotImplementedError  # pragma: no cover - WindowOps provides it

    async def _lease_windows(
        self, stream: StreamKey, limit: int, expire_before_ms: int | None
    ) -> tuple[Batch, int]:
        raise NotImplementedError  # pragma: no cover - WindowOps provides it

    async def _window_rows_gone(
        self, batch: Batch, done: WindowsDone, reason: str | None = None, detail: str | None = None
    ) -> int:
        raise NotImplementedError  # pragma: no cover - WindowOps provides it

    def _windows_committed(self, done: WindowsDone) -> None:
        raise NotImplementedError  # pragma: no cover - WindowOps provides it

    def reserved_quota(self, device_id: int, day: str) -> int:
        raise NotImplementedError  # pragma: no cover - QuotaLedger provides it
