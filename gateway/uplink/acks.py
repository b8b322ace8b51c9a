"""Batches the cloud accepted and the buffer still holds: deleted several at a time.

Each transaction costs an fsync and a few page writes whatever its size, so accepted
batches are held and deleted together (`Store.ack_many`), for at most `ACK_HOLD_MAX_S`.
Until they are deleted they count against their device's quota, and a stream is not
leased again before its held batches are gone, so no row is uploaded twice by one process.
A `kill -9` while batches are held makes the next start upload them again: the cloud then
has those points twice (and counts them twice against the day's quota), at most
`ACK_HOLD_MAX_S` of deliveries.
"""

from __future__ import annotations

import time

from gateway.models import Batch, StreamKey
from gateway.store import Store

# Accepted batches wait at most this long for company before their delete transaction.
ACK_HOLD_MAX_S = 1.0


class HeldAcks:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._held: list[tuple[Batch, str]] = []  # (batch, quota day it counts against)
        self._deleting: dict[int, list[tuple[Batch, str]]] = {}  # transactions under way
        self._since = 0.0

    def __len__(self) -> int:
        """Batches held (not counting those being deleted right now)."""
        return len(self._held)

    @property
    def busy(self) -> bool:
        """Something is held or being deleted."""
        return bool(self._held or self._deleting)

    def accepted(self, batch: Batch, day: str) -> None:
        if not self._held:
            self._since = time.monotonic()
        self._held.append((batch, day))

    def rebase(self, today: str) -> None:
        """Batches held on days after `today` (a clock that ran ahead, then stepped back)
        count against today, as the ledger's rows do after `Store.rebase_quota_days`."""
        for batches in (self._held, *self._deleting.values()):
            batches[:] = [(batch, min(day, today)) for batch, day in batches]

    def holds(self, stream: StreamKey) -> bool:
        return any(batch.stream == stream for batch, _ in self._held)

    def points(self, device_id: int, day: str) -> int:
        """The device's points held or being deleted, counted against `day`."""
        return sum(
            len(batch)
            for batches in (self._held, *self._deleting.values())
            for batch, held_day in batches
            if held_day == day and batch.stream.device_id == device_id
        )

    def due_in_s(self) -> float | None:
        """Seconds until the held batches must be deleted; None when none are held."""
        if not self._held:
            return None
        return self._since + ACK_HOLD_MAX_S - time.monotonic()

    def due(self, *, hurry: bool) -> bool:
        """Delete now: held long enough, `hurry` (draining, stopping), or they are all the
        buffer holds (pass-through reopens once they are gone)."""
        if not self._held:
            return False
        held_points = sum(len(batch) for batch, _ in self._held)
        return (
            hurry
            or time.monotonic() - self._since >= ACK_HOLD_MAX_S
            or self._store.pending_points <= held_points
        )

    async def delete(self) -> None:
        """Delete every held batch in one transaction (they count against the quota while
        it runs); kept for the next try if the store fails."""
        if not self._held:
            return
        batches, self._held = self._held, []
        self._deleting[id(batches)] = batches
        try:
            await self._store.ack_many(batches)
        except Exception:
            if not self._held:
                self._since = time.monotonic()
            self._held[:0] = batches
            raise
        finally:
            del self._deleting[id(batches)]
