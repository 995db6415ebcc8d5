"""What the sidecar does next, as a pure function of what it observed this tick.

Kept apart from the loop so that every branch can be read in one place and
tested without servers. Uncertainty never promotes: without a view of the
election the answer is :data:`Action.WAIT`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

from ..records import Term


class Action(enum.Enum):
    LEAD = "lead"  # holds a valid term: keep leading
    STEP_DOWN = "step_down"  # held a term that has ended: refuse writes, demote
    WAIT = "wait"  # no view of the election yet: do nothing rather than guess
    FOLLOW = "follow"  # another member leads: follow it
    START = "start"  # nobody leads and the local server is stopped: start it as it was
    CAMPAIGN = "campaign"  # nobody leads: campaign if eligible (after the rank wait)


@dataclass(frozen=True)
class Observed:
    """The facts one tick decides on."""

    holds_term: bool  # this sidecar holds a leadership object
    term_valid: bool  # ... and it is valid now (local deadline not passed)
    leader_seen: bool  # the election's watch has delivered its first view
    leader: str | None  # the current leader's member name, None if nobody leads
    member: str  # this member's name
    role: str  # the local server's role
    running: bool  # the local server's process exists


def decide(o: Observed) -> Action:
    """The one thing to do this tick."""
    if o.holds_term:
        return Action.LEAD if o.term_valid else Action.STEP_DOWN
    if not o.leader_seen:
        return Action.WAIT
    if o.leader is not None and o.leader != o.member:
        return Action.FOLLOW
    if o.leader is None and o.role == "down" and not o.running:
        return Action.START
    if o.leader is None:
        return Action.CAMPAIGN
    # The election names this member but the sidecar holds no term (it was lost a moment ago):
    # wait for the key to go rather than act on it.
    return Action.WAIT


def newest_fence(terms: Sequence[Term]) -> Term | None:
    """The newest term that recorded where it started (timeline and position): the bar a new leader must clear."""
    fenced = [t for t in terms if t.timeline is not None and t.start_position is not None]
    return max(fenced, key=lambda t: t.token) if fenced else None


def clears_fence(timeline: int | None, position: int, fence: Term | None, error: str | None = None) -> tuple[bool, str]:
    """Whether a server at ``timeline``/``position`` holds all the newest term started with.

    ``error`` is why the history could not be read: then the answer is no (fail closed).
    No fenced term at all (a new service) is no bar.
    """
    if error is not None:
        return False, f"cannot read the term history: {error}"
    if fence is None:
        return True, "no earlier term recorded a start"
    assert fence.timeline is not None and fence.start_position is not None
    if timeline is None:
        return False, "own timeline unknown"
    if timeline < fence.timeline:
        return False, f"stale: timeline {timeline} < {fence.timeline} of term {fence.token} ({fence.member})"
    if position < fence.start_position:
        return False, f"stale: position {position} < {fence.start_position} where term {fence.token} started"
    return True, f"holds term {fence.token}'s start"


def may_campaign(member: str, *, paused: bool, switchover_target: str | None) -> tuple[bool, str]:
    """Whether operator requests let this member campaign now, and why not.

    A switchover in force lets only its target campaign (paused or not: a
    planned handover is the operator's own act); maintenance mode lets nobody.
    """
    if switchover_target is not None:
        if switchover_target == member:
            return True, "switchover target"
        return False, f"switchover to {switchover_target} in progress"
    if paused:
        return False, "paused: no automatic failover"
    return True, ""
