"""Recognising the broker's redeliveries of messages we already committed. Pure: no I/O.

A QoS 1 message comes again, with the DUP flag, when the broker did not process our PUBACK.
Storing it twice would make a second point whenever the first copy was uploaded and deleted
in between, so a redelivery of something committed is only acknowledged. Memory is bounded:
each kind of knowledge is an LRU that forgets the least recently used entry first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from gateway.ingest.routes import has_own_timestamp

# How many committed messages are remembered, for each of the two cases. Redeliveries come
# from what was unacknowledged at a disconnect: at most the messages held before a commit
# (ingest.READ_PAUSE_MESSAGES, 2,000) plus one group, so 5,000 covers them (~0.8 MiB).
MAX_REMEMBERED = 5_000

K = TypeVar("K", bound=Hashable)


class LruCounter(Generic[K]):
    """A count per key for at most `max_keys` keys; a new key beyond that evicts the least
    recently used one. Adding or finding a key makes it the most recently used."""

    def __init__(self, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        self._counts: OrderedDict[K, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._counts)

    def keys(self) -> list[K]:
        """Least recently used first."""
        return list(self._counts)

    def add(self, key: K) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1
        self._counts.move_to_end(key)
        if len(self._counts) > self.max_keys:
            self._counts.popitem(last=False)

    def touch(self, key: K) -> bool:
        """Is the key known? If so it becomes the most recently used."""
        if key not in self._counts:
            return False
        self._counts.move_to_end(key)
        return True

    def take(self, key: K) -> bool:
        """Count one off the key (forgetting it at zero); False if it was unknown."""
        count = self._counts.get(key)
        if count is None:
            return False
        if count > 1:
            self._counts[key] = count - 1
            self._counts.move_to_end(key)
        else:
            del self._counts[key]
        return True

    def clear(self) -> None:
        self._counts.clear()


class RedeliveryFilter:
    """Tells whether a DUP message is one we have already committed.

    Two cases. We committed it but could not PUBACK it (the connection dropped first): known
    exactly, once per commit. Or we did send the PUBACK but the broker did not process it
    before it restarted (Mosquitto then redelivers from its persistence file): recognisable
    only when the payload carries its own `ts`, since then it names one exact point. A
    receive-stamped payload like `21.5` may legitimately repeat, so it is stored again rather
    than risk dropping a real reading.
    """

    def __init__(self, max_remembered: int = MAX_REMEMBERED) -> None:
        self._unacked: LruCounter[tuple[str, bytes]] = LruCounter(max_remembered)
        self._recent: LruCounter[int] = LruCounter(max_remembered)

    def committed(self, topic: str, payload: bytes, *, will_be_resent: bool) -> None:
        """A QoS 1 message is in the buffer; `will_be_resent` if it could not be PUBACKed."""
        if will_be_resent:
            self._unacked.add((topic, payload))
        if has_own_timestamp(payload):
            key = hash((topic, payload))
            if not self._recent.touch(key):
                self._recent.add(key)

    def is_redelivery(self, topic: str, payload: bytes) -> bool:
        """For a message with the DUP flag: was it committed already? (Consumes the match.)"""
        key = (topic, payload)
        if self._unacked.take(key):
            return True
        return has_own_timestamp(payload) and self._recent.touch(hash(key))

    def session_lost(self) -> None:
        """The broker forgot our session: it resends nothing, so expect nothing."""
        self._unacked.clear()
