"""The durable buffer (SQLite): the only package that speaks SQL.

`Store` (buffer.py) is what ingest and flush use; the rest is its parts: `outflow` (the
flush side: lease, ack, expire, dead-letter), `parts` (what `Store`'s mixins share),
`schema` (tables, `migrate`), `capacity` (limits and drop policies), `disk` (full-disk
reserve), `deadletters`, `ledger` (daily quota), `reservations` and `quota_journal`
(quota counted ahead for pass-through, and what a crash left unused), `inspection`
(read-only views), `recovery` and `rawpages` (salvaging a damaged file), `progress` (long
work tells its owner it moves), `provisional` and `timekeeping` (readings held until the
clock is trusted).
"""

from gateway.store.buffer import AppendResult, Store
from gateway.store.capacity import Capacity, FullPolicy
from gateway.store.deadletters import (
    DeadLetter,
    DeadLetterFilter,
    RejectedPayload,
    Retarget,
    RetryResult,
)
from gateway.store.disk import StoreFault
from gateway.store.inspection import StreamHead
from gateway.store.outflow import EXPIRE_CHUNK, Lease
from gateway.store.progress import LongWorkObserver, WorkProgress
from gateway.store.rawpages import check_header
from gateway.store.recovery import SalvageReport, quick_check
from gateway.store.schema import DEFAULT_PAGE_SIZE, SCHEMA_VERSION, create_schema, migrate
from gateway.store.streams import StreamState

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "EXPIRE_CHUNK",
    "SCHEMA_VERSION",
    "AppendResult",
    "Capacity",
    "DeadLetter",
    "DeadLetterFilter",
    "FullPolicy",
    "Lease",
    "LongWorkObserver",
    "RejectedPayload",
    "Retarget",
    "RetryResult",
    "SalvageReport",
    "Store",
    "StoreFault",
    "StreamHead",
    "StreamState",
    "WorkProgress",
    "check_header",
    "create_schema",
    "migrate",
    "quick_check",
]
