"""The Solr policy: how the sidecar loop makes one Solr core the indexing leader or a follower.

Roles are switched at run time through the ReplicationHandler
(:class:`~tenure.services.solr.SolrNode`), so the core must be configured as a
repeater (docs/solr.md):

* role: ``primary`` while the core offers its index (replication enabled),
  ``standby`` otherwise; ``position`` is the index generation;
* following: the sidecar itself polls -- one ``fetchindex`` with the
  current leader's URL every ``poll_interval`` -- so a follower never copies
  from a leader of an earlier term; it counts as replicating (``streaming``)
  while its last fetch left it at the leader's generation within
  ``max_replication_age`` seconds and at most ``max_lag_generations`` behind;
* promoted: ``disablepoll`` + ``enablereplication``; demoted:
  ``disablereplication`` (followers can no longer copy it). Solr itself keeps
  accepting updates on any core: the single writer is the updater, which
  posts only to the published leader of the current term.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import ServiceError
from ..services.solr import ReplicationDetails, SolrNode, core_url
from .config import SolrConfig
from .policy import Host, NodeState

if TYPE_CHECKING:
    from ..election import Leadership
    from ..records import MemberRecord, PrimaryRecord

log = logging.getLogger("tenure.sidecar")


class SolrPolicy:
    """One Solr core, driven by the sidecar loop."""

    kind = "solr"

    def __init__(self, member: str, cfg: SolrConfig, *, ttl: int, node: SolrNode | None = None) -> None:
        self.cfg = cfg
        self.ttl = ttl
        self.node = node or SolrNode(cfg.base_url, cfg.core, timeout=cfg.timeout)
        self.address = core_url(cfg.advertise_url or self.node.url)
        self.member = member
        self.last: ReplicationDetails | None = None
        self._following: str | None = None
        self._in_sync_at = 0.0  # monotonic time of the last fetch that left it at the leader's generation
        self._next_fetch = 0.0

    def preflight(self) -> None:
        """Nothing to check before the first probe: a core that is down is judged by the probes like any outage."""

    def term_timeline(self, st: NodeState) -> int | None:
        """Solr has no timelines: its terms are ranked by index generation alone."""
        return None

    def final_position(self) -> int | None:
        """No position to wait for on a clean stop: followers copy whole committed indexes."""
        return None

    def hand_over(self, host: Host, leadership: "Leadership", target: str, deadline: float) -> bool:
        """Planned handover is not offered for Solr: refused, nothing changed (stop the leader's sidecar instead)."""
        host.note("switchover refused: not supported for Solr; stop the leader's sidecar to hand over", target=target)
        return False

    def status(self) -> NodeState:
        try:
            self.node.ping()
            d = self.node.details()
        except ServiceError as e:
            self.last = None
            return NodeState(role="down", healthy=False, error=str(e))
        self.last = d
        role = "primary" if d.replication_enabled else "standby"
        in_sync_age = time.monotonic() - self._in_sync_at
        streaming = role == "standby" and self._following is not None and in_sync_age <= self.cfg.max_replication_age
        details = {"generation": d.generation, "index_version": d.index_version,
                   "replicated_at": d.replicated_at, "in_sync_age": round(in_sync_age, 3) if self._in_sync_at else None}
        return NodeState(role=role, healthy=True, writable=role == "primary", streaming=streaming,
                         upstream=self._following if role == "standby" else None, position=d.generation,
                         details=details)

    def is_running(self) -> bool:
        return True  # the JVM is run by its own service manager; an unanswered ping is "down", not "stopped"

    def start(self) -> None:
        pass

    def upstream_of(self, leader_address: str) -> str | None:
        return core_url(leader_address)

    def eligible(self, st: NodeState, primary_position: int) -> tuple[bool, str]:
        lag = primary_position - st.position
        if lag > self.cfg.max_lag_generations:
            return False, f"lag {lag} generations > max_lag_generations {self.cfg.max_lag_generations}"
        return True, "caught-up follower"

    def record_fields(self, st: NodeState, leading: bool) -> dict[str, Any]:
        return dict(st.details)

    def learn(self, records: Mapping[str, "MemberRecord"]) -> None:
        pass

    def promote(self, host: Host, leadership: "Leadership", st: NodeState) -> None:
        self.node.make_leader()
        self._following = None
        host.note("leading", token=leadership.token, generation=st.position)

    def lead(self, host: Host, leadership: "Leadership", st: NodeState) -> None:
        pass

    def refuse_writes(self) -> None:
        try:
            self.node.disable_replication()
        except ServiceError as e:
            log.info("could not disable replication (Solr may be down): %s", e)

    def demote(self) -> None:
        self.refuse_writes()

    def stop(self) -> None:
        self.refuse_writes()

    def follow(self, host: Host, st: NodeState, primary: "PrimaryRecord") -> None:
        leader = core_url(primary.dsn)
        now = time.monotonic()
        if now < self._next_fetch and self._following == leader and st.role == "standby":
            return
        self._next_fetch = now + self.cfg.poll_interval
        try:
            if self._following != leader or st.role != "standby":
                host.note("following", leader=leader, role=st.role)
                self.node.make_follower(leader)
                self._following = leader
            else:
                self.node.fetch(leader)
            version, generation = SolrNode.from_url(leader, timeout=self.cfg.timeout).index_version()
            mine = self.node.details()
            if generation and mine.generation >= generation:
                self._in_sync_at = time.monotonic()
            elif generation == 0 and mine.generation == 0:
                self._in_sync_at = time.monotonic()  # an empty leader: nothing to copy
        except ServiceError as e:
            log.warning("replication from %s failed: %s", leader, e)

    def snapshot(self) -> dict[str, Any]:
        d = self.last
        return {"solr": None if d is None else {"generation": d.generation, "index_version": d.index_version,
                                                "replication_enabled": d.replication_enabled,
                                                "leader_url": d.leader_url}, "following": self._following}
