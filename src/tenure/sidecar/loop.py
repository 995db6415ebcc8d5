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

SIGTERM makes a leader refuse writes, stop its server, wait (bounded) until a
standby has published the server's final position, and only then resign (the
next standby is elected at once); a follower just withdraws.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any

from .. import connect, maintenance, records
from ..election import Election, LeaderInfo, Leadership
from ..errors import CampaignTimeout, ConfigError, EtcdError, MalformedRecord, TenureError
from ..etcd import Client
from ..members import MemberPublisher, read_members
from ..records import MemberRecord, PrimaryRecord, Term
from .config import SidecarConfig
from .decide import Action, Observed, clears_fence, decide, may_campaign, newest_fence
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
            user=e.user, password=e.password, check=False, retry_for=max(0.5, config.ttl / 4))
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
        self._not_eligible_why: str | None = None  # the last reason noted for not campaigning
        self._unhealthy_since: float | None = None  # monotonic time the leader's probes began failing
        self._wait_until = 0.0
        self._published_primary: int | None = None
        # The newest fenced term start as last read: (term or None, why it could not be read, monotonic time).
        self._fence: tuple[Term | None, str | None, float] = (None, "not read yet", 0.0)
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []  # recent decisions, for /status
        self.paused = False  # maintenance mode, as last read
        self._restarted = 0.0  # wall-clock request time of the last restart request acted on

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
            self._hand_over(leadership)
        self.publisher.close()
        self.election.close()

    def _hand_over(self, leadership: Leadership) -> None:
        """A clean stop as leader: nothing acknowledged may be lost.

        Writes are refused, the server stops (its final position is then fixed), and the
        leadership is released only once a standby has published that position, or after a
        bounded wait (then the standbys' own lag checks decide who may take over).
        """
        self.note("shutdown: refusing writes, stopping the server")
        self.policy.refuse_writes()
        with contextlib.suppress(TenureError):
            self.policy.stop()
        final = self.policy.final_position()
        holder = self._wait_for_successor(final, time.monotonic() + max(2.0, float(self.ttl))) if final else None
        if final and holder is None:
            log.error("%s/%s: no standby reached the final position %s before the hand-over; releasing the "
                      "leadership anyway: only a standby within its lag bound may take over", self.service,
                      self.member, final)
        self.note("shutdown: resigning", final_position=final, caught_up=holder)
        leadership.resign()

    def _wait_for_successor(self, final: int, deadline: float) -> str | None:
        """The first member (other than this one) whose published position reaches ``final``, or None at ``deadline``."""
        while True:
            try:
                for name, rec in sorted(read_members(self.client, self.service).items()):
                    if name != self.member and rec.role != "down" and (rec.position or 0) >= final:
                        return name
            except EtcdError as e:
                log.info("%s/%s: reading member records: %s", self.service, self.member, e)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

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

        leadership = self.leadership
        action = decide(Observed(
            holds_term=leadership is not None, term_valid=leadership is not None and leadership.is_valid(),
            leader_seen=self._leader_seen.is_set(), leader=leader.member if leader is not None else None,
            member=self.member, role=st.role,
            running=st.role != "down" or self.policy.is_running()))
        # Acting on the end of a term comes before anything that talks to etcd.
        if action is Action.STEP_DOWN:
            assert leadership is not None
            self._demote(f"leadership ended: {leadership.reason or 'deadline passed'}")
            self.publisher.publish(self.record(self.status))
            return
        self.publisher.publish(self.record(st))
        if action is Action.LEAD:
            assert leadership is not None
            if self._switchover_due(leadership):
                return self._switch_over(leadership)
            return self._lead(leadership, st)
        if action is Action.WAIT:
            return
        self._learn_from_primary()
        if action is Action.FOLLOW:
            self._vacant_since = None
            if self._restart_requested():
                return self._restart()
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
            # One failed probe is not a failure: resign on a definite fact (the server's process is
            # gone) or once the probes have failed for the whole window.
            now = time.monotonic()
            if self._unhealthy_since is None:
                self._unhealthy_since = now
                self.note("local server not answering while leading", error=st.error)
            gone = not self.policy.is_running()
            if gone or now - self._unhealthy_since >= self.config.unhealthy_window:
                why = "local server is not running" if gone else \
                    f"local server failed its probes for {now - self._unhealthy_since:.1f} s"
                self.note("resigning", why=why)
                leadership.resign()
                self._demote(why)
            return
        self._unhealthy_since = None
        self.policy.lead(self, leadership, st)
        if self._published_primary != leadership.token:
            leadership.put(records.primary_key(self.service),
                           PrimaryRecord(self.member, self.address, leadership.token).encode(), ephemeral=True)
            self._published_primary = leadership.token
            self.note("published primary", token=leadership.token)

    def _demote(self, why: str) -> None:
        self.note("demoting", why=why)
        self.policy.demote()
        self._unhealthy_since = None
        self.leadership = None
        self._published_primary = None

    # -- following ------------------------------------------------------------

    def _learn_from_primary(self) -> None:
        """Remember how far the primary got (and what else the policy wants of it), while it lives."""
        self._fence = self._read_fence()
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
        if st.role not in ("primary", "standby"):
            return False, f"role {st.role}"
        fence, error, read_at = self._fence
        if error is None and time.monotonic() - read_at > 2 * cfg.ttl:
            error = "not read recently"
        ok, why = clears_fence(st.timeline, st.position, fence, error)
        if not ok:
            return ok, why
        if st.role == "primary":
            return True, "current primary"
        ok, why = self.policy.eligible(st, self._primary_position)
        if not ok:
            return ok, why
        if time.monotonic() - self._last_streaming > 2 * cfg.ttl + 1:
            return False, "not streaming from the last primary recently"
        return True, why

    def _read_fence(self) -> tuple[Term | None, str | None, float]:
        """The newest fenced term start from the history; any error is kept as the reason not to lead."""
        now = time.monotonic()
        try:
            kvs, _ = self.client.get_prefix(records.history_prefix(self.service))
            return newest_fence([Term.decode(kv.value) for kv in kvs]), None, now
        except (EtcdError, MalformedRecord) as e:
            return None, str(e), now

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
        target = self._operator_allows_campaign()
        if target is False:
            self._vacant_since = None
            return
        ok, why = self._eligible(st)
        now = time.monotonic()
        if ok and st.role == "standby" and now - self._started < self.ttl and target != self.member:
            return  # just started: let the primary's own sidecar, perhaps slower to start, claim it first
        if not ok:
            if why != self._not_eligible_why:
                self.note("no leader: not eligible", reason=why)
            self._not_eligible_why = why
            self._vacant_since = None
            return
        self._not_eligible_why = None
        if self._vacant_since is None:
            self._vacant_since = now
            rank = 0 if target == self.member else self._rank(st)
            self._wait_until = now + rank * self.config.grace
            self.note("no leader: will campaign", rank=rank, reason=why)
        if now < self._wait_until:
            return
        self._fence = self._read_fence()  # fresh, right before the campaign: fail closed
        ok, why = self._eligible(st)
        if not ok:
            self.note("not campaigning", reason=why)
            self._vacant_since = None
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
        leadership.on_lost(self._on_term_lost)
        # The term's start, fenced by the leader key, before the server takes a write: a node may
        # lead later only if it holds at least this much (see _eligible).
        start = Term(leadership.token, self.member, time.time(), timeline=self.policy.term_timeline(st),
                     start_position=st.position)
        try:
            leadership.put(records.history_key(self.service, leadership.token), start.encode())
        except TenureError as e:
            log.error("could not record the term's start (%s); resigning without taking over", e)
            leadership.resign()
            self.leadership = None
            return
        try:
            self.policy.promote(self, leadership, st)
        except TenureError as e:
            log.error("could not take over as primary: %s; resigning", e)
            leadership.resign()
            self._demote("promotion failed")
            return
        self._lead(leadership, self.policy.status())
        self._switchover_finished(leadership)

    # -- operator requests: maintenance mode, switchover, restart ----------------

    def _operator_allows_campaign(self) -> str | bool | None:
        """False if a pause or another member's switchover forbids campaigning; else the switchover target (or None)."""
        try:
            pause = maintenance.paused(self.client, self.service)
            request = maintenance.switchover(self.client, self.service)
        except EtcdError:
            return False  # cannot tell: fail closed
        self.paused = pause is not None
        target = request.target if request is not None and request.in_force(time.time()) else None
        ok, why = may_campaign(self.member, paused=self.paused, switchover_target=target)
        if not ok:
            if not self.events or self.events[-1].get("reason") != why:
                self.note("not campaigning", reason=why)
            return False
        return target

    def _switchover_due(self, leadership: Leadership) -> bool:
        try:
            self.paused = maintenance.paused(self.client, self.service) is not None
            request = maintenance.switchover(self.client, self.service)
        except EtcdError:
            return False
        if request is None:
            return False
        now = time.time()
        if request.token != leadership.token or not request.in_force(now) or request.target == self.member:
            if not request.in_force(now) or request.token < leadership.token:
                with contextlib.suppress(EtcdError):
                    maintenance.clear_switchover(self.client, self.service)  # stale: not this term's
            return False
        return request.due(now)

    def _switch_over(self, leadership: Leadership) -> None:
        """Hand the term over to the requested target with no lost write, or leave everything as it was.

        The primary key goes first (the web tier holds new writes from then
        on), then the policy stops writes and waits for the target to hold
        every one (:meth:`ServicePolicy.hand_over`); only then is the term
        released, and the target, the only member allowed to campaign while
        the request stands, takes it. The old server is demoted and rejoins
        as a standby of the target.
        """
        request = maintenance.switchover(self.client, self.service)
        if request is None:
            return
        target = self.members().get(request.target)
        problem = maintenance.refusal(target)
        if problem:
            self.note("switchover refused", target=request.target, reason=problem)
            maintenance.clear_switchover(self.client, self.service)
            return
        self.note("switchover: handing over", target=request.target, token=leadership.token)
        self.client.delete(records.primary_key(self.service),
                           guard=(records.leader_key(self.service), leadership.token))
        self._published_primary = None
        deadline = time.monotonic() + max(0.0, request.deadline - time.time())
        handed = False
        try:
            handed = self.policy.hand_over(self, leadership, request.target, deadline)
        finally:
            if not handed:
                self.note("switchover timed out: still primary", target=request.target)
                with contextlib.suppress(EtcdError):
                    maintenance.clear_switchover(self.client, self.service)
        if not handed:
            return
        leadership.resign()
        self.note("switchover: term released", target=request.target)
        self._demote("switchover")  # rejoins as a standby of the target from the next tick
        # Wait for the target to take the term, so that this stopped server is not started as it was meanwhile.
        while time.monotonic() < deadline and not self._stop.is_set():
            leader = self.leader
            if leader is not None and leader.member == request.target:
                break
            self._wake.wait(0.02)
            self._wake.clear()

    def _switchover_finished(self, leadership: Leadership) -> None:
        with contextlib.suppress(EtcdError):
            request = maintenance.switchover(self.client, self.service)
            if request is not None and request.target == self.member:
                maintenance.clear_switchover(self.client, self.service)
                self.note("switchover: took over", token=leadership.token)

    def _restart_requested(self) -> bool:
        try:
            request = maintenance.restart_request(self.client, self.service, self.member)
        except EtcdError:
            return False
        return request is not None and request.requested > self._restarted and request.deadline > time.time()

    def _restart(self) -> None:
        request = maintenance.restart_request(self.client, self.service, self.member)
        if request is None:
            return
        self._restarted = request.requested
        self.note("restarting the local server on request")
        try:
            self.policy.stop()
            self.policy.start()
        finally:
            with contextlib.suppress(EtcdError):
                maintenance.clear_restart(self.client, self.service, self.member)

    def _on_term_lost(self, leadership: Leadership) -> None:
        """At the local deadline (on the keepalive thread, no etcd call): refuse writes now, demote next tick."""
        if leadership.reason != "resigned":
            self.policy.refuse_writes()
        self._wake.set()

    # -- reporting ------------------------------------------------------------

    def lag(self) -> int | None:
        """How far this standby is behind the newest primary position it has seen (None if not a standby)."""
        st = self.status
        if st is None or st.role != "standby":
            return None
        return max(0, self._primary_position - st.position)

    def streamed_within(self, seconds: float) -> bool:
        """Whether this member was streaming from the leader at most ``seconds`` ago."""
        return self._last_streaming > 0 and time.monotonic() - self._last_streaming <= seconds

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
            "paused": self.paused,
            "events": events,
        }


def preflight(sidecar: Sidecar, etcd_wait: float = 30.0) -> None:
    """Startup checks; each failure is one TenureError naming what is wrong (the CLI prints it and exits non-zero).

    etcd must answer within ``etcd_wait`` seconds and grant the configured ttl (not more);
    then the policy checks its own server (see :meth:`~tenure.sidecar.policy.ServicePolicy.preflight`).
    """
    deadline = time.monotonic() + etcd_wait
    while True:
        try:
            lease = sidecar.client.grant(sidecar.ttl)
            break
        except EtcdError as e:
            if time.monotonic() >= deadline:
                raise EtcdError(f"etcd did not answer for {etcd_wait:.0f} s at start: {e}") from None
            time.sleep(0.5)
    with contextlib.suppress(EtcdError):
        sidecar.client.revoke(lease.id, retry_for=1.0)
    if lease.ttl > sidecar.ttl:
        raise ConfigError(f"ttl {sidecar.ttl} s is below what etcd grants ({lease.ttl} s, 1.5 x its election "
                          f"timeout): set ttl = {lease.ttl} or more")
    sidecar.policy.preflight()


def main(config: SidecarConfig) -> int:
    """``tenure sidecar --config FILE``: run until SIGTERM or SIGINT."""
    from .http import serve

    sidecar = Sidecar(config)
    preflight(sidecar, config.etcd_wait)
    try:
        server = serve(sidecar, config.http_address) if config.http_address else None
    except OSError as e:
        raise ConfigError(f"cannot listen on {config.listen}: {e.strerror or e}") from None
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sidecar.stop())
    try:
        sidecar.run()
    finally:
        if server is not None:
            server.shutdown()
    return 0
