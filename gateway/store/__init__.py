"""The durable buffer (SQLite): the only package that speaks SQL."""

from gateway.store.buffer import (
    SCHEMA_VERSION,
    AppendResult,
    Capacity,
    DeadLetter,
    Lease,
    RejectedPayload,
    SalvageReport,
    Store,
    StreamState,
    check_header,
)

__all__ = [
    "SCHEMA_VERSION",
    "AppendResult",
    "Capacity",
    "DeadLetter",
    "Lease",
    "RejectedPayload",
    "SalvageReport",
    "Store",
    "StreamState",
    "check_header",
]
