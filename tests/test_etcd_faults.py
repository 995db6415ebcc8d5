"""What the election does when etcd itself fails: members die, quorum is lost."""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterator

import pytest

import tenure
from tenure.lab.etcd import LocalEtcd

from support import wait_for

log = logging.getLogger(__name__)


class Candidates:
    """Members campaigning for ever in threads of this process, each with its own client."""

    def __init__(self, etcd: LocalEtcd, service: str, n: int, ttl: int) -> None:
        self.terms: list[tuple[str, tenure.Leadership, float]] = []  # member, leadership, elected at
        self.lost_at: dict[int, float] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.clients = [tenure.connect(etcd.endpoints) for _ in range(n)]
        self.threads = [threading.Thread(target=self._run, args=(c, service, f"c{i}", ttl), daemon=True)
                        for i, c in enumerate(self.clients)]
        for t in self.threads:
            t.start()

    def _run(self, client: tenure.Client, service: str, member: str, ttl: int) -> None:
        election = tenure.Election(client, service, member=member, ttl=ttl)
        while not self._stop.is_set():
            try:
                leadership = election.campaign(timeout=1)
            except tenure.errors.TenureError:
                continue
            with self._lock:
                self.terms.append((member, leadership, time.monotonic()))
            leadership.on_lost(lambda l: self.lost_at.setdefault(l.token, time.monotonic()))
            while not self._stop.is_set() and not leadership.lost.wait(0.05):
                pass
        for _, leadership, _ in self.terms:
            if leadership.member == member:
                leadership.resign()

    def leaders(self) -> list[tenure.Leadership]:
        with self._lock:
            return [l for _, l, _ in self.terms if l.is_valid()]

    def leader(self, timeout: float) -> tenure.Leadership:
        ls = wait_for(self.leaders, timeout, "a leader")
        assert len(ls) == 1
        return ls[0]

    def check_one_writer(self) -> None:
        spans = sorted((at, min(self.lost_at.get(l.token, float("inf")), l.deadline), l.token)
                       for _, l, at in self.terms)
        for a, b in zip(spans, spans[1:]):
            assert a[1] <= b[0] and a[2] < b[2], f"terms overlap or tokens did not grow: {a} {b}"

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(10)
        for c in self.clients:
            c.close()


@pytest.fixture
def candidates(healthy_etcd: LocalEtcd, service: str) -> Iterator[object]:
    made: list[Candidates] = []

    def make(n: int = 3, ttl: int = 2) -> Candidates:
        made.append(Candidates(healthy_etcd, service, n, ttl))
        return made[-1]

    yield make
    for c in made:
        c.stop()
        c.check_one_writer()


def stays_leader(leadership: tenure.Leadership, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert leadership.is_valid(), f"leadership lost: {leadership.reason}"
        time.sleep(0.05)


def test_killing_an_etcd_follower_changes_nothing(healthy_etcd: LocalEtcd, candidates) -> None:  # type: ignore[no-untyped-def]
    cs = candidates(3, ttl=2)
    leadership = cs.leader(10)
    follower = next(i for i in range(3) if i != healthy_etcd.leader_index())
    healthy_etcd.kill(follower)
    stays_leader(leadership, 3 * leadership.ttl)
    assert cs.leaders() == [leadership]


def test_killing_the_etcd_leader_at_ttl_5_changes_nothing(healthy_etcd: LocalEtcd, candidates) -> None:  # type: ignore[no-untyped-def]
    cs = candidates(3, ttl=5)
    leadership = cs.leader(15)
    time.sleep(0.5)
    healthy_etcd.kill(healthy_etcd.leader_index())
    stays_leader(leadership, 2 * leadership.ttl)
    assert cs.leaders() == [leadership]


def test_killing_the_etcd_leader_at_ttl_2_stays_safe(healthy_etcd: LocalEtcd, candidates) -> None:  # type: ignore[no-untyped-def]
    """At ttl 2 s etcd's own re-election (~1-1.5 s) may use up the lease: safety must hold either way."""
    cs = candidates(3, ttl=2)
    leadership = cs.leader(10)
    t = time.monotonic()
    healthy_etcd.kill(healthy_etcd.leader_index())
    survived = leadership.lost.wait(3 * leadership.ttl) is False
    log.info("etcd leader killed at ttl 2: tenure leadership %s", "survived" if survived else
             f"was lost after {leadership.deadline - t:.2f} s ({leadership.reason})")
    if survived:
        assert leadership.is_valid() and cs.leaders() == [leadership], "the surviving term is the only one"
    else:
        # The new etcd leader re-grants every lease its full ttl plus an election timeout: allow for it.
        new = cs.leader(30)
        assert new.token > leadership.token
    cs.check_one_writer()


def test_losing_quorum_ends_leadership_by_its_deadline_then_recovers(healthy_etcd: LocalEtcd, candidates) -> None:  # type: ignore[no-untyped-def]
    cs = candidates(3, ttl=2)
    leadership = cs.leader(10)
    etcd_leader = healthy_etcd.leader_index()
    t_kill = time.monotonic()
    for i in range(3):
        if i != etcd_leader:
            healthy_etcd.kill(i)  # the leader alone is no majority
    # An etcd 3.5.1 leader that lost its followers keeps renewing leases until its CheckQuorum
    # steps it down (up to 2 election timeouts); the leadership ends by the deadline that follows.
    step_down = 2 * healthy_etcd.election_timeout_ms / 1000
    assert leadership.lost.wait(leadership.ttl + step_down + 1), "leadership outlived quorum"
    deadline = leadership.deadline
    log.info("quorum lost: leadership ended %.2f s after the kill", deadline - t_kill)
    assert deadline <= t_kill + step_down + leadership.ttl, "deadline must come from the last renewal"
    assert cs.lost_at[leadership.token] - deadline < 0.3, "loss callbacks fire at the deadline"
    assert not leadership.is_valid()
    assert cs.leaders() == []
    for i in range(3):
        healthy_etcd.restart(i)
    new = cs.leader(30)
    assert new.token > leadership.token
