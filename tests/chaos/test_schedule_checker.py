"""The seeded schedule replays, and the checker refutes what it must (pure: no servers)."""

from __future__ import annotations

from tenure.lab.chaos import checker
from tenure.lab.chaos.faults import KINDS, schedule
from tenure.lab.chaos.workload import ReadRecord, WriteRecord


def test_same_seed_same_schedule_and_every_kind_drawn():
    a, b = schedule(42, 200), schedule(42, 200)
    assert a == b
    assert schedule(43, 200) != a
    assert {f.kind for f in a} == set(KINDS)


def w(i, sent, acked, server, token, outcome="ok"):
    return WriteRecord("c", f"c-{i}", sent, acked, server, token, outcome, server, token)


def test_clean_handover_passes():
    ws = [w(1, 0.0, 0.1, "n1", 5), w(2, 0.2, 0.3, "n1", 5), w(3, 1.0, 1.1, "n2", 9), w(4, 1.2, 1.3, "n2", 9)]
    rows = [(1, "c-1", 5, "n1"), (2, "c-2", 5, "n1"), (40, "c-3", 9, "n2"), (41, "c-4", 9, "n2")]
    v = checker.check(ws, [ReadRecord(0.5, True, "n3", 0.01)], rows, synchronous=True, start=0, end=1.5)
    assert v.ok, v.violations
    assert v.failovers == [0.8] or abs(v.failovers[0] - 0.8) < 1e-9
    assert v.lost == []


def test_old_term_acknowledged_after_a_newer_one_is_a_violation():
    ws = [w(1, 0.0, 0.1, "n2", 9), w(2, 0.2, 0.3, "n1", 5)]  # sent after token 9 was acked, committed under 5
    assert checker.one_writer(ws)


def test_a_token_on_two_servers_is_a_violation():
    assert checker.one_writer([w(1, 0.0, 0.1, "n1", 5), w(2, 0.0, 0.2, "n2", 5)])


def test_lost_write_fails_in_synchronous_mode_only():
    ws = [w(1, 0.0, 0.1, "n1", 5), w(2, 0.2, 0.3, "n1", 5)]
    rows = [(1, "c-1", 5, "n1")]
    assert not checker.check(ws, [], rows, synchronous=True, start=0, end=1).ok
    v = checker.check(ws, [], rows, synchronous=False, start=0, end=1)
    assert v.ok and v.lost == ["c-2"]


def test_rows_going_back_in_token_are_a_violation():
    assert checker.rows_in_order([(1, "a", 9, "n2"), (2, "b", 5, "n1")])


def test_synchronous_ack_without_a_synchronous_standby_is_a_violation():
    ws = [WriteRecord("c", "c-1", 0.0, 0.1, "n1", 5, "ok", "n1", 5, "")]
    v = checker.check(ws, [], [(1, "c-1", 5, "n1")], synchronous=True, start=0, end=1)
    assert not v.ok and v.unreplicated == ["c-1"]
    assert checker.check(ws, [], [(1, "c-1", 5, "n1")], synchronous=False, start=0, end=1).ok
