"""What ingest has done since start, for the log, `status` and the tests."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

MAX_UNMAPPED_NAMES = 1000


@dataclass
class IngestStats:
    received: int = 0
    stored: int = 0
    # accepted by the cloud before any write (pass-through), acknowledged without a commit
    passed_through: int = 0
    duplicates: int = 0
    # payloads that cannot become a reading (dead-lettered), by their PayloadError code
    rejected: int = 0
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    # rejections and unmapped messages by route (its topic template), then reason code
    rejected_by_route: dict[str, Counter[str]] = field(default_factory=dict)
    unmapped: int = 0
    # device names captured by a route ({device} or device_field) but missing from [devices],
    # with how often each was seen (bounded: see MAX_UNMAPPED_NAMES)
    unmapped_devices: Counter[str] = field(default_factory=Counter)
    # readings whose own timestamp was not trusted (future, before 2020) and got receive time
    ts_replaced: int = 0
    # readings stamped with the receive time while the clock was not trusted: held apart
    # (provisional) until it synchronizes
    provisional: int = 0
    # values that said "no reading now" (null, nan, unavailable): skipped, not errors
    no_reading: int = 0
    # readings already too old for the cloud when they arrived (dead-lettered as `expired`)
    expired: int = 0
    retained_skipped: int = 0
    redelivered_acked: int = 0
    commits: int = 0
    # capacity policy outcomes (see Store.append): evicted = dropped oldest to make room,
    # refused = acknowledged but not stored (drop-newest)
    evicted: int = 0
    refused: int = 0
    # commits that found the buffer full (backpressure) or unwritable, and were held
    held_commits: int = 0
    # messages left unacknowledged (and not kept) while holding; the broker resends them
    deferred: int = 0
    # uncommitted messages of an earlier connection, left out because the broker resends them
    resent_dropped: int = 0
    # sampling (issue 19, ingest/sampler.py): readings a deadband suppressed (acknowledged,
    # neither stored nor dead-lettered) and readings for windows already sent (dead-lettered
    # as late_for_window, here and by the store)
    suppressed: int = 0
    late: int = 0
    # per device (at most ingest/sampler.MAX_COUNTED_DEVICES): readings admitted, and the
    # points they will become after sampling (a window counts once); status rates them
    arriving_by_device: Counter[int] = field(default_factory=Counter)
    sending_by_device: Counter[int] = field(default_factory=Counter)
    # devices with a reading a `sample` rule applied to (since start or the last reload)
    sampled_devices: set[int] = field(default_factory=set)
