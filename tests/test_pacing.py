"""Issue 18: when to pass through and when to write first, and when a stream goes up.

The rules alone, on an injected clock; the daemon-level promises they serve are tested
through Mosquitto and the sandbox in test_real_latency.py, test_request_budget.py and
test_pass_through.py.
"""

from __future__ import annotations

import io

import pytest

from gateway.ingest.pass_gate import RESUME_AFTER_S, PassGate
from gateway.models import StreamKey
from gateway.store.arrivals import Arrival
from gateway.store.streams import StreamState
from gateway.uplink.budget import RequestBudget
from gateway.uplink.pacing import SETTLE_S, Pacing
from harness import events


def key(n: int) -> StreamKey:
    return StreamKey(300 + n, 1)


def pending(*keys: StreamKey) -> list[StreamState]:
    return [StreamState(k, None, None) for k in keys]


def test_the_gate_pauses_at_a_full_window_and_resumes_at_half_after_a_quiet_spell(
    log_output: io.StringIO,
) -> None:
    clock = [0.0]
    gate = PassGate(commit_max=16, window=20, clock=lambda: clock[0])
    assert gate.allows(0.2)
    gate.sample(0)
    gate.pressure("window", held=20)
    assert gate.paused and not gate.allows(0.2)
    # 100 messages/s keep coming: each group fills again, so it stays paused
    for step in range(1, 60):
        clock[0] = step * 0.2
        gate.sample(step * 20)
        gate.pressure("window", held=16)
        assert not gate.allows(0.2)
    # then a trickle of 10/s: a 0.2 s group holds 2, under half of commit_max...
    start, received = clock[0], 59 * 20
    for step in range(1, 40):
        clock[0] = start + step * 0.2
        received += 2
        gate.sample(received)
        if clock[0] - start < RESUME_AFTER_S:
            assert not gate.allows(0.2)  # ...but only after the quiet spell
    assert gate.allows(0.2) and not gate.paused
    # 30/s would fill 6 of a 0.2 s group (under 8) but 18 of a 0.6 s one: paused stays
    gate.pressure("budget", held=3)
    start = clock[0]
    for step in range(1, 40):
        clock[0] = start + step * 0.2
        received += 6
        gate.sample(received)
    assert not gate.allows(0.6) and gate.allows(0.2)
    lines = [e for e in events(log_output, "pass_through_paused")]
    assert [e["reason"] for e in lines] == ["window", "budget"]  # one line per change
    assert [e["reason_was"] for e in events(log_output, "pass_through_resumed")] == [
        "window",
        "budget",
    ]


def test_a_stream_lingers_for_its_share_of_the_budget_then_goes_with_its_neighbours() -> None:
    clock = [1000.0]
    pacing = Pacing(RequestBudget(1000), clock=lambda: clock[0])
    streams = [key(n) for n in range(20)]
    for stream in streams:  # 20 streams uploaded lately: the active load
        pacing.leased(stream, 1, 10)
    assert pacing.linger_s(2.0) == pytest.approx(2.4)  # 20 x 60 s / (1000 x 0.5)
    assert pacing.linger_s(5.0) == 5.0  # flush.linger_s is the floor
    # readings of every stream, the first ones 0.1 s apart; ingest keeps committing
    for n, stream in enumerate(streams):
        pacing.absorb({stream: Arrival(1000.0 + n * 0.1, 3)}, last_rows_at=1000.0 + n * 0.1)
    clock[0] = 1002.3
    pacing.absorb({}, last_rows_at=1002.3)
    listed = pending(*streams)
    assert pacing.due(listed, clock[0], 1000, 2.0).streams == frozenset()
    assert pacing.next_due_in_s(1000, 2.0) == pytest.approx(0.1)
    clock[0] = 1002.41  # the first stream lingered 2.4 s: it goes, with those within 0.6 s
    due = pacing.due(listed, clock[0], 1000, 2.0)
    assert due.reason == "linger" and due.streams == frozenset(streams[:7])


def test_a_full_batch_goes_at_once_and_a_burst_goes_once_ingest_settles() -> None:
    clock = [0.0]
    pacing = Pacing(RequestBudget(1000), clock=lambda: clock[0])
    a, b = key(1), key(2)
    pacing.absorb({a: Arrival(0.0, 1000), b: Arrival(0.0, 40)}, last_rows_at=0.0)
    assert pacing.next_due_in_s(1000, 2.0) == 0.0
    assert pacing.due(pending(a, b), 0.0, 1000, 2.0).streams == {a}
    pacing.leased(a, 1000, 1000)  # a full lease: what is left of `a` is not hurried
    pacing.unsent({a})
    assert pacing.next_due_in_s(1000, 2.0) == pytest.approx(SETTLE_S)
    clock[0] = SETTLE_S  # nothing new for SETTLE_S: the burst is over
    due = pacing.due(pending(a, b), 0.0, 1000, 2.0)
    assert due.reason == "settled" and due.streams == {a, b}


def test_streams_that_could_not_go_linger_again_instead_of_spinning() -> None:
    clock = [0.0]
    pacing = Pacing(RequestBudget(1000), clock=lambda: clock[0])
    parked = key(1)
    pacing.absorb({parked: Arrival(0.0, 5000)}, last_rows_at=0.0)
    assert pacing.next_due_in_s(1000, 2.0) == 0.0  # a full batch...
    pacing.unsent({parked})  # ...that the pass could not send (parked, over quota)
    assert pacing.next_due_in_s(1000, 2.0) == pytest.approx(2.0)
    assert pacing.due(pending(parked), 0.0, 1000, 2.0).streams == frozenset()
    # unknown streams (a backlog from before a restart) are due at once
    assert pacing.due(pending(key(9)), 0.0, 1000, 2.0).reason == "backlog"


def test_pass_through_gathers_only_when_one_request_per_reading_is_too_many() -> None:
    clock = [0.0]
    pacing = Pacing(RequestBudget(1000), clock=lambda: clock[0])
    five = [key(n) for n in range(5)]
    for second in range(1, 31):  # 1 reading/s: one request each fits the budget's share
        clock[0] = float(second)
        pacing.passed(five[:1], 1)
    assert pacing.pass_through_hold_s() == 0.0
    for step in range(1, 301):  # then 20 readings/s over 5 streams
        clock[0] = 30.0 + step * 0.1
        pacing.passed(five, 2)
    assert pacing.pass_through_hold_s() == pytest.approx(0.6)  # 5 streams x 60 / 500
