"""The redelivery filter and its bounded memory (pure: no broker, no store)."""

from __future__ import annotations

import json

import pytest

from gateway.ingest.redelivery import LruCounter, RedeliveryFilter

TOPIC = "sensors/boiler/temperature"


def own_ts(index: int) -> bytes:
    return json.dumps({"value": index, "ts": 1_700_000_000_000 + index}).encode()


# --------------------------------------------------------------------------- the LRU


def test_lru_evicts_the_least_recently_used_first() -> None:
    lru: LruCounter[str] = LruCounter(3)
    for key in "abcd":
        lru.add(key)
    assert lru.keys() == ["b", "c", "d"]
    lru.add("e")
    assert lru.keys() == ["c", "d", "e"]


def test_lru_hit_refreshes_recency() -> None:
    lru: LruCounter[str] = LruCounter(3)
    for key in "abc":
        lru.add(key)
    assert lru.touch("a")
    lru.add("d")  # evicts b, not the a just used
    assert lru.keys() == ["c", "a", "d"]
    lru.add("c")  # adding again is a use too
    lru.add("e")
    assert lru.keys() == ["d", "c", "e"]
    assert not lru.touch("a") and not lru.touch("b")


def test_lru_counts_per_key_and_take_consumes_one() -> None:
    lru: LruCounter[str] = LruCounter(3)
    lru.add("a")
    lru.add("a")
    lru.add("b")
    assert lru.take("a") and lru.keys() == ["b", "a"]  # taking is a use as well
    assert lru.take("a") and lru.keys() == ["b"]
    assert not lru.take("a")


def test_lru_bound_is_respected_under_many_keys() -> None:
    lru: LruCounter[int] = LruCounter(1000)
    for key in range(50_000):
        lru.add(key)
        assert len(lru) <= 1000
    assert lru.keys() == list(range(49_000, 50_000))


def test_lru_needs_room_for_one_key() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        LruCounter(0)


# --------------------------------------------------------------------------- the filter


def test_unacked_commit_is_recognised_once_per_commit() -> None:
    """Committed but not PUBACKed (connection dropped): each copy the broker resends is
    acknowledged without storing, exactly as many times as it was committed."""
    seen = RedeliveryFilter()
    seen.committed(TOPIC, b"21.5", will_be_resent=True)
    seen.committed(TOPIC, b"21.5", will_be_resent=True)
    assert seen.is_redelivery(TOPIC, b"21.5")
    assert seen.is_redelivery(TOPIC, b"21.5")
    assert not seen.is_redelivery(TOPIC, b"21.5")  # a third copy is a new reading


def test_acked_plain_value_is_stored_again() -> None:
    """A receive-stamped value may legitimately repeat: never dropped on a guess."""
    seen = RedeliveryFilter()
    seen.committed(TOPIC, b"21.5", will_be_resent=False)
    assert not seen.is_redelivery(TOPIC, b"21.5")


def test_acked_own_ts_payload_is_recognised_after_a_broker_restart() -> None:
    seen = RedeliveryFilter()
    seen.committed(TOPIC, own_ts(1), will_be_resent=False)
    assert seen.is_redelivery(TOPIC, own_ts(1))
    assert seen.is_redelivery(TOPIC, own_ts(1))  # it names one point: always the same
    assert not seen.is_redelivery(TOPIC, own_ts(2))
    assert not seen.is_redelivery("other/topic", own_ts(1))


def test_lost_session_forgets_what_the_broker_will_not_resend() -> None:
    seen = RedeliveryFilter()
    seen.committed(TOPIC, b"21.5", will_be_resent=True)
    seen.session_lost()
    assert not seen.is_redelivery(TOPIC, b"21.5")


def test_memory_is_bounded_and_forgets_the_oldest_not_everything() -> None:
    """Bug: past 20,000 unacknowledged commits the whole memory was wiped at once, so the
    broker's next resends were all stored a second time. Now only the oldest go."""
    seen = RedeliveryFilter(max_remembered=100)
    for index in range(150):
        seen.committed(TOPIC, f"{index}".encode(), will_be_resent=True)
        seen.committed(TOPIC, own_ts(index), will_be_resent=False)
    assert all(seen.is_redelivery(TOPIC, f"{index}".encode()) for index in range(50, 150))
    assert not any(seen.is_redelivery(TOPIC, f"{index}".encode()) for index in range(50))
    assert all(seen.is_redelivery(TOPIC, own_ts(index)) for index in range(50, 150))
    assert not any(seen.is_redelivery(TOPIC, own_ts(index)) for index in range(50))


def test_a_recognised_redelivery_is_remembered_longer() -> None:
    seen = RedeliveryFilter(max_remembered=3)
    for index in range(3):
        seen.committed(TOPIC, own_ts(index), will_be_resent=False)
    assert seen.is_redelivery(TOPIC, own_ts(0))  # used: now the most recent
    seen.committed(TOPIC, own_ts(3), will_be_resent=False)
    assert seen.is_redelivery(TOPIC, own_ts(0))
    assert not seen.is_redelivery(TOPIC, own_ts(1))
