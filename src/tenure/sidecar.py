"""The loop that runs beside one PostgreSQL server and keeps it in its place.

Each tick (ttl/8, at most 250 ms) the sidecar reads the local server's state,
publishes its member record and then does one thing:

* leading: keep the in-database guard's lease row current (so the server
  refuses writes on its own once the term's deadline passes, even if this
  process freezes); manage synchronous standbys; once the term is gone,
  expire the guard at once and stop the server (demote);
* following: make the server a standby of the current primary (pg_rewind and
  restart if it is a stale primary or streams from the wrong place);
* no leader: campaign if this member may (healthy, was streaming recently,
  within ``max_lag_bytes`` of the last primary position it saw, not
  ``nofailover``; in synchronous mode only a synchronous standby), after
  waiting ``grace`` seconds per better-placed candidate so that the most
  caught-up standby wins;
* elected: promote, start the guard with the new token, publish the
  primary's DSN under ``svc/<service>/primary`` with the token, bound to the
  term's lease.

SIGTERM makes a leader refuse writes, resign (the next standby is elected at
once) and stop its server; a follower just withdraws.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from dataclasses import asdict
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from . import connect
from .config import SidecarConfig
from .election import Election, LeaderInfo, Leadership
from .errors import CampaignTimeout, EtcdError, TenureError
from .etcd import Client
from .keys import service_key
from .members import MemberPublisher, read_members
from .services import pg_guard
from .services.postgres import NodeStatus, PostgresNode

log = logging.getLogger("tenure.sidecar")


def primary_key(service: str) -> str:
    return service_key(service, "primary")


def _dsn_target(dsn: str) -> tuple[str, int]:
    parts = conninfo_to_dict(dsn)
    return str(parts.get("host", "127.0.0.1")), int(parts.get("port", 5432))


def _upstream_of(leader: LeaderInfo) -> str | None:
    """``host:port`` of the leader's advertised DSN, as a standby's walreceiver reports its sender."""
    dsn = (leader.value or {}).get("dsn")
    if not dsn:
        return None
    host, port = _dsn_target(dsn)
    return f"{host}:{port}"


def _position(st: NodeStatus | dict[str, Any]) -> int:
    """How much WAL a node has: a primary's current position, or the most a standby received or replayed.

    (Right after a standby restarts, its receive position starts at a segment boundary behind replay.)
    """
    get = st.get if isinstance(st, dict) else lambda k: getattr(st, k)
    return max(get("wal_current") or 0, get("wal_received") or 0, get("wal_replayed") or 0)


class Sidecar:
    """One PostgreSQL node's sidecar; :meth:`run` blocks until :meth:`stop`."""

    def __init__(self, config: SidecarConfig, *, client: Client | None = None,
                 node: PostgresNode | None = None) -> None:
        self.config = config
        pg = config.postgres
        self.node = node or PostgresNode(
            config.member, pg.data_dir, pg.port, host=pg.host, user=pg.user, dbname=pg.dbname,
            bin_dir=pg.bin_dir, socket_dir=pg.socket_dir,
            **({"run_as": pg.run_as} if pg.run_as is not None else {}),
        )
        self.dsn = pg.advertise_dsn or self.node.dsn
        e = config.etcd
        self.client = client or connect(
            e.endpoints, namespace=e.namespace, timeout=e.timeout, ca_cert=e.ca_cert, cert=e.cert, key=e.key,
            user=e.user, password=e.password, check=False)
        self.election = Election(self.client, config.service, member=config.member, ttl=config.ttl,
                                 value={"dsn": self.dsn, "zone": config.zone})
        self.publisher = MemberPublisher(self.client, config.service, config.member, ttl=max(2, config.ttl))
        self.interval = min(0.25, config.ttl / 8)
        self.leadership: Leadership | None = None
        self.status: NodeStatus | None = None
        self.leader: LeaderInfo | None = None
        self._leader_seen = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        # Monotonic time this node was last seen streaming from the leader of the day: only such a
        # standby may be promoted (a standby of a stale node can look caught up on another timeline).
        self._last_streaming = 0.0
        self._started = time.monotonic()
        self._primary_wal = 0  # the newest primary WAL position seen in the primary's record
        self._sync_names: list[str] = []  # synchronous standbys as last published by the primary
        self._members: dict[str, dict[str, Any]] = {}  # other members' records, as last read
        self._sync_configured: list[str] | None = None
        self._sync_switch_lsn = 0  # primary WAL position when the synchronous standby last changed
        self._vacant_since: float | None = None
        self._wait_until = 0.0
        self._next_rejoin = 0.0
        self._guard_renewed = 0.0
        self._published_primary: int | None = None
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []  # recent decisions, for /status

    # -- lifecycle ------------------------------------------------------------

    def run(self) -> None:
        """Run until :meth:`stop`; on the way out, step down cleanly."""
        self.election.on_change(self._on_leader)
        log.info("%s/%s: sidecar started (ttl %d s, tick %.2f s)", self.config.service, self.config.member,
                 self.config.ttl, self.interval)
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
            self._note("shutdown: refusing writes and resigning")
            self._expire_guard()
            leadership.resign()
            with contextlib.suppress(TenureError):
                self.node.stop("fast")
        self.publisher.close()
        self.election.close()

    def _on_leader(self, info: LeaderInfo | None) -> None:
        self.leader = info
        self._leader_seen.set()
        self._wake.set()

    def _note(self, what: str, **fields: Any) -> None:
        log.info("%s/%s: %s %s", self.config.service, self.config.member, what,
                 " ".join(f"{k}={v}" for k, v in fields.items()))
        with self._lock:
            self.events.append({"t": time.time(), "what": what, **fields})
            del self.events[:-50]

    # -- one tick -------------------------------------------------------------

    def tick(self) -> None:
        st = self.node.status()
        self.status = st
        now = time.monotonic()
        leader = self.leader
        if (st.streaming and leader is not None and leader.member != self.config.member
                and st.upstream == _upstream_of(leader)):
            self._last_streaming = now
        self.publisher.publish(self.record(st))

        leadership = self.leadership
        if leadership is not None:
            if leadership.is_valid():
                return self._lead(leadership, st)
            self._demote(f"leadership ended: {leadership.reason or 'deadline passed'}")
            return
        if not self._leader_seen.is_set():
            return  # no view of the election yet: do nothing rather than guess
        self._learn_from_primary()
        leader = self.leader
        if leader is not None and leader.member != self.config.member:
            self._vacant_since = None
            return self._follow(st)
        if leader is None:
            if st.role == "down" and not self.node.is_running():
                # Nobody leads and this server is stopped (e.g. demoted when etcd lost quorum):
                # start it as it was, read-only and guarded, so it can be judged and campaign.
                self._note("starting the local server: no leader anywhere")
                self.node.start()
                return
            return self._maybe_campaign(st)

    def record(self, st: NodeStatus) -> dict[str, Any]:
        """This member's record as published in etcd."""
        leadership = self.leadership
        rec = {
            "member": self.config.member, "dsn": self.dsn, "zone": self.config.zone,
            "priority": self.config.priority, "nofailover": self.config.nofailover,
            "role": st.role, "healthy": st.healthy, "streaming": st.streaming, "timeline": st.timeline,
            "wal_current": st.wal_current, "wal_received": st.wal_received, "wal_replayed": st.wal_replayed,
            "leader": leadership is not None and leadership.is_valid(),
        }
        # A leader needs no verdict (and judging a primary reads the history from etcd).
        rec["eligible"] = rec["leader"] or self._eligible(st)[0]
        if rec["leader"]:
            rec["sync"] = self._sync_names
        return rec

    # -- leading --------------------------------------------------------------

    def _lead(self, leadership: Leadership, st: NodeStatus) -> None:
        if not st.healthy:
            self._note("local server unhealthy while leading: resigning")
            leadership.resign()
            self._demote("local server unhealthy")
            return
        now = time.monotonic()
        if now - self._guard_renewed >= self.config.ttl / 8:
            self._renew_guard(leadership)
        if self.config.postgres.synchronous:
            self._manage_sync(st)
        if self._published_primary != leadership.token:
            leadership.put(primary_key(self.config.service), json.dumps(
                {"member": self.config.member, "dsn": self.dsn, "token": leadership.token}), ephemeral=True)
            self._published_primary = leadership.token
            self._note("published primary", token=leadership.token)

    def _renew_guard(self, leadership: Leadership) -> None:
        try:
            with self.node.connect() as conn:
                remaining = leadership.remaining()  # measured last: see renew_guard
                if remaining <= 0:
                    return
                pg_guard.renew_guard(conn, leadership.token, remaining)
            self._guard_renewed = time.monotonic()
        except Exception as e:  # the guard expires on its own; keep trying
            log.warning("could not renew the write guard: %s", e)

    def _expire_guard(self) -> None:
        try:
            with self.node.connect() as conn:
                pg_guard.expire_guard(conn)
        except Exception as e:
            log.info("could not expire the write guard (the server may be down): %s", e)

    def _manage_sync(self, st: NodeStatus) -> None:
        """Keep exactly one named synchronous standby, and publish it only once it holds every acknowledged commit.

        Invariant: every standby in the published list (``sync`` in this member's record, the
        only standbys allowed to be promoted) has every commit the primary acknowledged. So:
        the list is withdrawn (published empty) *before* ``synchronous_standby_names`` changes,
        and the new standby is listed only once it has replayed past the WAL position of the
        switch (commits acknowledged by the old one). The name changes only when the old
        standby stops streaming; meanwhile commits wait (strict mode).
        """
        replicas = self.node.replicas()
        streaming = sorted(r.application_name for r in replicas if r.state == "streaming")
        current = self._sync_configured or []
        if not current or current[0] not in streaming:
            others = sorted(m for m in read_members(self.client, self.config.service) if m != self.config.member)
            wanted = [m for m in streaming if m in others][:1] or (current if current else others[:1])
            if wanted != current:
                self._sync_names = []
                if not self.publisher.publish(self.record(st)):
                    return  # the withdrawal must be in etcd before the switch; try again next tick
                self._sync_switch_lsn = self.node.status().wal_current or 0
                self.node.set_synchronous_standbys(wanted, 1)
                self._sync_configured = wanted
                self._note("synchronous standby", names=wanted, from_lsn=self._sync_switch_lsn)
        self._sync_names = [r.application_name for r in replicas
                            if r.sync_state == "sync" and r.application_name in (self._sync_configured or [])
                            and (r.replay_lsn or 0) >= self._sync_switch_lsn]

    def _demote(self, why: str) -> None:
        self._note("demoting", why=why)
        self._expire_guard()
        try:
            self.node.demote()
        except TenureError as e:
            log.error("demote failed: %s", e)
        self.leadership = None
        self._published_primary = None

    # -- following ------------------------------------------------------------

    def _learn_from_primary(self) -> None:
        """Remember how far the primary got and who its synchronous standbys are, while it lives."""
        try:
            members = read_members(self.client, self.config.service)
        except EtcdError:
            return
        self._members = members
        for rec in members.values():
            if rec.get("leader"):
                self._primary_wal = max(self._primary_wal, rec.get("wal_current") or 0)
                if "sync" in rec:
                    self._sync_names = list(rec["sync"])

    def _primary_dsn(self) -> str | None:
        kv = self.client.get(primary_key(self.config.service))
        return kv.json().get("dsn") if kv is not None else None

    def _follow(self, st: NodeStatus) -> None:
        primary = self._primary_dsn()
        if primary is None:
            return  # elected but not yet promoted and published
        host, port = _dsn_target(primary)
        if st.role == "standby" and st.upstream == f"{host}:{port}":
            if st.streaming or time.monotonic() - self._last_streaming < self.config.ttl:
                return  # streaming from the primary, or (re)connecting to it
        if time.monotonic() < self._next_rejoin:
            return
        self._note("rejoining", primary=primary, role=st.role)
        try:
            self.node.rejoin(primary)
        except TenureError:
            self._next_rejoin = time.monotonic() + self.config.ttl  # e.g. the primary is not up yet
            raise

    # -- campaigning ----------------------------------------------------------

    def _eligible(self, st: NodeStatus) -> tuple[bool, str]:
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
        lag = self._primary_wal - _position(st)
        if lag > cfg.postgres.max_lag_bytes:
            return False, f"lag {lag} bytes > max_lag_bytes {cfg.postgres.max_lag_bytes}"
        if time.monotonic() - self._last_streaming > 2 * cfg.ttl + 1:
            return False, "not streaming from the last primary recently"
        if cfg.postgres.synchronous and cfg.member not in self._sync_names:
            return False, "synchronous mode: not a synchronous standby"
        return True, "caught-up standby"

    def _last_term_member(self) -> str | None:
        try:
            terms = self.election.history(1)
        except EtcdError:
            return None
        return terms[-1].member if terms else None

    def _rank(self, st: NodeStatus) -> int:
        """How many eligible members are better placed than this one."""
        mine = (_position(st), self.config.priority, self.config.member)
        better = 0
        for name, rec in self._members.items():
            if name == self.config.member or not rec.get("eligible"):
                continue
            theirs = (_position(rec), rec.get("priority", 0), name)
            # More WAL first, then higher priority, then the smaller name.
            if (theirs[0], theirs[1]) > (mine[0], mine[1]) or (theirs[:2] == mine[:2] and name < mine[2]):
                better += 1
        return better

    def _maybe_campaign(self, st: NodeStatus) -> None:
        ok, why = self._eligible(st)
        now = time.monotonic()
        if ok and st.role == "standby" and now - self._started < self.config.ttl:
            return  # just started: let the primary's own sidecar, perhaps slower to start, claim it first
        if not ok:
            self._vacant_since = None
            return
        if self._vacant_since is None:
            self._vacant_since = now
            rank = self._rank(st)
            self._wait_until = now + rank * self.config.grace
            self._note("no leader: will campaign", rank=rank, reason=why)
        if now < self._wait_until:
            return
        try:
            leadership = self.election.campaign(timeout=self.interval)
        except CampaignTimeout:
            return
        self._vacant_since = None
        self._on_elected(leadership, st)

    def _on_elected(self, leadership: Leadership, st: NodeStatus) -> None:
        self._note("elected", token=leadership.token, role=st.role)
        self.leadership = leadership
        leadership.on_lost(lambda _l: self._wake.set())
        try:
            if st.role == "standby":
                self.node.promote()
                self._note("promoted", token=leadership.token)
            else:
                self.node.allow_writes()  # a primary restarted after a demotion comes back read-only
            pg = self.config.postgres
            if pg.guard_tables or pg.guard_schema:
                with self.node.connect() as conn:
                    pg_guard.install_guard(conn, tables=pg.guard_tables or None, schema=pg.guard_schema)
            self._renew_guard(leadership)
        except TenureError as e:
            log.error("could not take over as primary: %s; resigning", e)
            leadership.resign()
            self._demote("promotion failed")
            return
        self._lead(leadership, self.node.status())

    # -- reporting ------------------------------------------------------------

    def lag(self) -> int | None:
        """Bytes this standby is behind the newest primary position it has seen (None if not a standby)."""
        st = self.status
        if st is None or st.role != "standby":
            return None
        return max(0, self._primary_wal - _position(st))

    def snapshot(self) -> dict[str, Any]:
        """The sidecar's view, for /status."""
        st = self.status
        leadership = self.leadership
        with self._lock:
            events = list(self.events[-10:])
        return {
            "service": self.config.service, "member": self.config.member,
            "postgres": asdict(st) if st is not None else None,
            "leader": None if self.leader is None else {"member": self.leader.member, "token": self.leader.token},
            "leading": leadership is not None and leadership.is_valid(),
            "token": leadership.token if leadership is not None else None,
            "lease_remaining": leadership.remaining() if leadership is not None else 0.0,
            "eligible": self._eligible(st)[1] if st is not None else None,
            "synchronous_standbys": self._sync_names,
            "events": events,
        }


def main(config: SidecarConfig) -> int:
    """``tenure sidecar --config FILE``: run until SIGTERM or SIGINT."""
    from .sidecar_http import serve

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
