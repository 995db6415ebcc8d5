"""The loop that runs beside one server and keeps it in its place, whatever kind of service it is.

Each tick (ttl/8, at most 250 ms) the sidecar probes the local server through
its :class:`~tenure.sidecar.policy.ServicePolicy`, publishes its member record
and then does the one thing :func:`~tenure.sidecar.decide.decide` says:

* leading: let the policy keep its term's state current (PostgreSQL: the
  in-database write guard, synchronous standbys); once the term is gone,
  refuse writes at once and demote;
* following: let the policy make the server a standby of the current primary;
* no leader: campaign if this member may (healthy, was streaming from the
  last primary recently, not ``nofailover``, and whatever the policy adds:
  lag within bounds, synchronous standby), after waiting ``grace`` seconds per
  better-placed candidate so that the most caught-up standby wins;
* elected: let the policy promote, then publish the primary's address under
  the primary key with the token, bound to the term's lease.

SIGTERM makes a leader refuse writes, resign (the next standby is elected at
once) and stop its server; a follower just withdraws.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any

from .. import connect, records
from ..election import Election, LeaderInfo, Leadership
from ..errors import CampaignTimeout, EtcdError, MalformedRecord, TenureError
from ..etcd import Client
from ..members import MemberPublisher, read_members
from ..records import MemberRecord, PrimaryRecord
from .config import SidecarConfig
from .decide import Action, Observed, decide
from .policy import NodeState, ServicePolicy

log = logging.getLogger("tenure.sidecar")


class Sidecar:
    """One server's sidecar; :meth:`run` blocks until :meth:`stop`.

    ``policy`` drives the server (default: :class:`~tenure.sidecar.postgres.PostgresPolicy`
    from the ``[postgres]`` section).
    """

    def __init__(self, config: SidecarConfig, *, client: Client | None = None,
                 policy: ServicePolicy | None = None) -> None:
        self.config = config
        self.service = config.service
        self.member = config.member
        self.ttl = config.ttl
        if policy is None and config.solr is not None:
            from .solr import SolrPolicy

            policy = SolrPolicy(config.member, config.solr, ttl=config.ttl)
        if policy is None:
            from .postgres import PostgresPolicy

            assert config.postgres is not None
            policy = PostgresPolicy(config.member, config.postgres, ttl=config.ttl)
        self.policy = policy
        self.address = policy.address
        e = config.etcd
        self.client = client or connect(
            e.endpoints, namespace=e.namespace, timeout=e.timeout, ca_cert=e.ca_cert, cert=e.cert, key=e.key,
            user=e.user, password=e.password, check=False)
        self.election = Election(self.client, config.service, member=config.member, ttl=config.ttl,
                                 value={"dsn": self.address, "zone": config.zone})
        self.publisher = MemberPublisher(self.client, config.service, config.member, ttl=max(2, config.ttl))
        self.interval = min(0.25, config.ttl / 8)
        self.leadership: Leadership | None = None
        self.status: NodeState | None = None
        self.leader: LeaderInfo | None = None
        self._leader_seen = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        # Monotonic time this node was last seen streaming from the leader of the day: only such a
        # standby may be promoted (a standby of a stale node can look caught up on another timeline).
        self._last_streaming = 0.0
        self._started = time.monotonic()
        self._primary_position = 0  # the newest primary position seen in the primary's member record
        self._members: dict[str, MemberRecord] = {}  # other members' records, as last read
        self._vacant_since: float | None = None
        self._wait_until = 0.0
        self._published_primary: int | None = None
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []  # recent decisions, for /status

    # -- what the policy sees of the loop (policy.Host) -------------------------

    def note(self, what: str, **fields: Any) -> None:
        log.info("%s/%s: %s %s", self.service, self.member, what, " ".join(f"{k}={v}" for k, v in fields.items()))
        with self._lock:
            self.events.append({"t": time.time(), "what": what, **fields})
            del self.events[:-50]

    def members(self) -> dict[str, MemberRecord]:
        return read_members(self.client, self.service)

    def publish_now(self) -> bool:
        st = self.status
        return st is not None and self.publisher.publish(self.record(st))

    # -- lifecycle ------------------------------------------------------------

    def run(self) -> None:
        """Run until :meth:`stop`; on the way out, step down cleanly."""
        self.election.on_change(self._on_leader)
        log.info("%s/%s: sidecar started (%s, ttl %d s, tick %.2f s)", self.service, self.member,
                 self.policy.kind, self.ttl, self.interval)
        try:
            while not self._stop.is_set():
                try:
                    self.tick()
                except TenureError as e:
                    log.warning("%s: %s", type(e).__name__, e)
                except Exception:
                    log.exception("sidecar tick failed")
                self._wake.wait(self.interval)
                self._wake.clear()
        finally:
            self._shutdown()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _shutdown(self) -> None:
        leadership = self.leadership
        if leadership is not None and not leadership.lost.is_set():
            self.note("shutdown: refusing writes and resigning")
            self.policy.refuse_writes()
            leadership.resign()
            with contextlib.suppress(TenureError):
                self.policy.stop()
        self.publisher.close()
        self.election.close()

    def _on_leader(self, info: LeaderInfo | None) -> None:
        self.leader = info
        self._leader_seen.set()
        self._wake.set()

    # -- one tick -------------------------------------------------------------

    def tick(self) -> None:
        st = self.policy.status()
        self.status = st
        leader = self.leader
        if (st.streaming and leader is not None and leader.member != self.member
                and st.upstream == self._upstream_of(leader)):
            self._last_streaming = time.monotonic()
        self.publisher.publish(self.record(st))

        leadership = self.leadership
        action = decide(Observed(
            holds_term=leadership is not None, term_valid=leadership is not None and leadership.is_valid(),
            leader_seen=self._leader_seen.is_set(), leader=leader.member if leader is not None else None,
            member=self.member, role=st.role,
            running=st.role != "down" or self.policy.is_running()))
        if action is Action.LEAD:
            assert leadership is not None
            return self._lead(leadership, st)
        if action is Action.STEP_DOWN:
            assert leadership is not None
            return self._demote(f"leadership ended: {leadership.reason or 'deadline passed'}")
        if action is Action.WAIT:
            return
        self._learn_from_primary()
        if action is Action.FOLLOW:
            self._vacant_since = None
            return self._follow(st)
        if action is Action.START:
            # Nobody leads and this server is stopped (e.g. demoted when etcd lost quorum):
            # start it as it was, read-only and guarded, so it can be judged and campaign.
            self.note("starting the local server: no leader anywhere")
            self.policy.start()
            return
        if action is Action.CAMPAIGN:
            return self._maybe_campaign(st)

    def _upstream_of(self, leader: LeaderInfo) -> str | None:
        address = (leader.value or {}).get("dsn")
        return self.policy.upstream_of(address) if isinstance(address, str) and address else None

    def record(self, st: NodeState) -> MemberRecord:
        """This member's record as published in etcd."""
        leadership = self.leadership
        leading = leadership is not None and leadership.is_valid()
        cfg = self.config
        # A leader needs no verdict (and judging a primary reads the history from etcd).
        eligible = leading or self._eligible(st)[0]
        return MemberRecord(
            member=self.member, role=st.role, healthy=st.healthy, dsn=self.address, zone=cfg.zone,
            priority=cfg.priority, nofailover=cfg.nofailover, streaming=st.streaming, eligible=eligible,
            leader=leading, timeline=st.timeline, position=st.position,
            extra=self.policy.record_fields(st, leading))

    # -- leading --------------------------------------------------------------

    def _lead(self, leadership: Leadership, st: NodeState) -> None:
        if not st.healthy:
            self.note("local server unhealthy while leading: resigning")
            leadership.resign()
            self._demote("local server unhealthy")
            return
        self.policy.lead(self, leadership, st)
        if self._published_primary != leadership.token:
            leadership.put(records.primary_key(self.service),
                           PrimaryRecord(self.member, self.address, leadership.token).encode(), ephemeral=True)
            self._published_primary = leadership.token
            self.note("published primary", token=leadership.token)

    def _demote(self, why: str) -> None:
        self.note("demoting", why=why)
        self.policy.demote()
        self.leadership = None
        self._published_primary = None

    # -- following ------------------------------------------------------------

    def _learn_from_primary(self) -> None:
        """Remember how far the primary got (and what else the policy wants of it), while it lives."""
        try:
            members = read_members(self.client, self.service)
        except EtcdError:
            return
        self._members = members
        for rec in members.values():
            if rec.leader:
                self._primary_position = max(self._primary_position, rec.position or 0)
        self.policy.learn(members)

    def _primary(self) -> PrimaryRecord | None:
        kv = self.client.get(records.primary_key(self.service))
        if kv is None:
            return None
        try:
            return PrimaryRecord.decode(kv.value)
        except MalformedRecord as e:
            log.warning("%s: %s", self.service, e)
            return None

    def _follow(self, st: NodeState) -> None:
        primary = self._primary()
        if primary is None:
            return  # elected but not yet promoted and published
        self.policy.follow(self, st, primary)

    # -- campaigning ----------------------------------------------------------

    def _eligible(self, st: NodeState) -> tuple[bool, str]:
        cfg = self.config
        if cfg.nofailover:
            return False, "nofailover is set"
        if not st.healthy:
            return False, "local server is not healthy"
        if st.role == "primary":
            last = self._last_term_member()
            if last is not None and last != cfg.member:
                return False, f"stale primary: the last term was {last}'s"
            return True, "current primary"
        if st.role != "standby":
            return False, f"role {st.role}"
        ok, why = self.policy.eligible(st, self._primary_position)
        if not ok:
            return ok, why
        if time.monotonic() - self._last_streaming > 2 * cfg.ttl + 1:
            return False, "not streaming from the last primary recently"
        return True, why

    def _last_term_member(self) -> str | None:
        try:
            terms = self.election.history(1)
        except EtcdError:
            return None
        return terms[-1].member if terms else None

    def _rank(self, st: NodeState) -> int:
        """How many eligible members are better placed than this one."""
        mine = (st.position, self.config.priority, self.member)
        better = 0
        for name, rec in self._members.items():
            if name == self.member or not rec.eligible:
                continue
            theirs = (rec.position or 0, rec.priority, name)
            # More of the history first, then higher priority, then the smaller name.
            if (theirs[0], theirs[1]) > (mine[0], mine[1]) or (theirs[:2] == mine[:2] and name < mine[2]):
                better += 1
        return better

    def _maybe_campaign(self, st: NodeState) -> None:
        ok, why = self._eligible(st)
        now = time.monotonic()
        if ok and st.role == "standby" and now - self._started < self.ttl:
            return  # just started: let the primary's own sidecar, perhaps slower to start, claim it first
        if not ok:
            self._vacant_since = None
            return
        if self._vacant_since is None:
            self._vacant_since = now
            rank = self._rank(st)
            self._wait_until = now + rank * self.config.grace
            self.note("no leader: will campaign", rank=rank, reason=why)
        if now < self._wait_until:
            return
        try:
            leadership = self.election.campaign(timeout=self.interval)
        except CampaignTimeout:
            return
        self._vacant_since = None
        self._on_elected(leadership, st)

    def _on_elected(self, leadership: Leadership, st: NodeState) -> None:
        self.note("elected", token=leadership.token, role=st.role)
        self.leadership = leadership
        leadership.on_lost(lambda _l: self._wake.set())
        try:
            self.policy.promote(self, leadership, st)
        except TenureError as e:
            log.error("could not take over as primary: %s; resigning", e)
            leadership.resign()
            self._demote("promotion failed")
            return
        self._lead(leadership, self.policy.status())

    # -- reporting ------------------------------------------------------------

    def lag(self) -> int | None:
        """How far this standby is behind the newest primary position it has seen (None if not a standby)."""
        st = self.status
        if st is None or st.role != "standby":
            return None
        return max(0, self._primary_position - st.position)

    def snapshot(self) -> dict[str, Any]:
        """The sidecar's view, for /status."""
        st = self.status
        leadership = self.leadership
        with self._lock:
            events = list(self.events[-10:])
        return {
            "service": self.service, "member": self.member, "kind": self.policy.kind,
            **self.policy.snapshot(),
            "leader": None if self.leader is None else {"member": self.leader.member, "token": self.leader.token},
            "leading": leadership is not None and leadership.is_valid(),
            "token": leadership.token if leadership is not None else None,
            "lease_remaining": leadership.remaining() if leadership is not None else 0.0,
            "eligible": self._eligible(st)[1] if st is not None else None,
            "events": events,
        }


def main(config: SidecarConfig) -> int:
    """``tenure sidecar --config FILE``: run until SIGTERM or SIGINT."""
    from .http import serve

    sidecar = Sidecar(config)
    server = serve(sidecar, config.http_address) if config.http_address else None
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sidecar.stop())
    try:
        sidecar.run()
    finally:
        if server is not None:
            server.shutdown()
    return 0
