"""The sidecar's pure decisions: what to do each tick, and whether a node clears the newest term's fence."""

from __future__ import annotations

from tenure.records import Term
from tenure.sidecar.decide import Action, Observed, clears_fence, decide, newest_fence


def obs(**kw: object) -> Observed:
    base = dict(holds_term=False, term_valid=False, leader_seen=True, leader=None, member="a", role="standby",
                running=True)
    base.update(kw)
    return Observed(**base)  # type: ignore[arg-type]


def test_decide_each_branch() -> None:
    assert decide(obs(holds_term=True, term_valid=True)) is Action.LEAD
    assert decide(obs(holds_term=True, term_valid=False)) is Action.STEP_DOWN
    assert decide(obs(leader_seen=False)) is Action.WAIT
    assert decide(obs(leader="b")) is Action.FOLLOW
    assert decide(obs(role="down", running=False)) is Action.START
    assert decide(obs()) is Action.CAMPAIGN
    assert decide(obs(leader="a")) is Action.WAIT


def test_newest_fence_skips_terms_that_recorded_no_start() -> None:
    terms = [Term(5, "a", 1.0, timeline=2, start_position=100), Term(9, "b", 2.0), Term(7, "c", 1.5, timeline=3,
                                                                                      start_position=50)]
    fence = newest_fence(terms)
    assert fence is not None and fence.token == 7
    assert newest_fence([Term(1, "a", 0.0)]) is None


def test_fence_fails_closed_and_rejects_stale_nodes() -> None:
    fence = Term(7, "b", 0.0, timeline=3, start_position=1000)
    assert clears_fence(3, 1000, fence) == (True, "holds term 7's start")
    assert clears_fence(4, 5000, fence)[0]
    assert not clears_fence(2, 9999, fence)[0]  # an older timeline, however far it got
    assert not clears_fence(3, 999, fence)[0]
    assert not clears_fence(None, 5000, fence)[0]
    ok, why = clears_fence(4, 5000, None, error="etcd unavailable")
    assert not ok and "cannot read" in why
    assert clears_fence(1, 0, None)[0]  # a new service: nothing recorded yet
