"""The PostgreSQL policy: how the sidecar loop promotes, guards, demotes and re-points one server.

* promoted: ``pg_promote`` (or, for a primary restarted read-only after a
  demotion, writes allowed again), then the in-database write guard installed
  and renewed with the new term's token, so the server refuses writes on its
  own once the term's deadline passes, even if the sidecar freezes;
* leading: the guard kept current; in synchronous mode exactly one named
  synchronous standby, published only once it holds every acknowledged commit;
* demoted: the guard expired at once, the server stopped;
* following: the server made a standby of the current primary (pg_rewind and
  restart if it is a stale primary or streams from the wrong place).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Mapping

from psycopg.conninfo import conninfo_to_dict

from ..errors import TenureError
from ..services import pg_guard
from ..services.postgres import NodeStatus, PostgresNode, parse_lsn
from .config import PostgresConfig
from .policy import Host, NodeState

if TYPE_CHECKING:
    from ..election import Leadership
    from ..records import MemberRecord, PrimaryRecord

log = logging.getLogger("tenure.sidecar")


def dsn_target(dsn: str) -> tuple[str, int]:
    """``(host, port)`` of a libpq connection string."""
    parts = conninfo_to_dict(dsn)
    return str(parts.get("host", "127.0.0.1")), int(parts.get("port", 5432))


def wal_position(st: NodeStatus) -> int:
    """How much WAL a node has: a primary's current position, or the most a standby received or replayed.

    (Right after a standby restarts, its receive position starts at a segment boundary behind replay.)
    """
    return max(st.wal_current or 0, st.wal_received or 0, st.wal_replayed or 0)


class PostgresPolicy:
    """One PostgreSQL server, driven by the sidecar loop."""

    kind = "postgres"

    def __init__(self, member: str, pg: PostgresConfig, *, ttl: int, node: PostgresNode | None = None) -> None:
        self.pg = pg
        self.ttl = ttl
        self.node = node or PostgresNode(
            member, pg.data_dir, pg.port, host=pg.host, user=pg.user, dbname=pg.dbname,
            bin_dir=pg.bin_dir, socket_dir=pg.socket_dir,
            **({"run_as": pg.run_as} if pg.run_as is not None else {}),
        )
        self.member = member
        self.address = pg.advertise_dsn or self.node.dsn
        self.last_status: NodeStatus | None = None
        self.sync_names: list[str] = []  # synchronous standbys as last published by the primary
        self._sync_configured: list[str] | None = None
        self._sync_switch_lsn = 0  # primary WAL position when the synchronous standby last changed
        self._guard_renewed = 0.0
        self._next_rejoin = 0.0
        self._last_streaming = 0.0

    # -- observing ------------------------------------------------------------

    def status(self) -> NodeState:
        st = self.node.status()
        self.last_status = st
        details = {"wal_current": st.wal_current, "wal_received": st.wal_received,
                   "wal_replayed": st.wal_replayed}
        return NodeState(role=st.role, healthy=st.healthy, writable=st.role == "primary" and not st.read_only,
                         streaming=st.streaming, upstream=st.upstream, position=wal_position(st),
                         timeline=st.timeline, error=st.error, details=details)

    def is_running(self) -> bool:
        return self.node.is_running()

    def start(self) -> None:
        self.node.start()

    def upstream_of(self, leader_address: str) -> str | None:
        host, port = dsn_target(leader_address)
        return f"{host}:{port}"

    def eligible(self, st: NodeState, primary_position: int) -> tuple[bool, str]:
        lag = primary_position - st.position
        if lag > self.pg.max_lag_bytes:
            return False, f"lag {lag} bytes > max_lag_bytes {self.pg.max_lag_bytes}"
        if self.pg.synchronous and self.member not in self.sync_names:
            return False, "synchronous mode: not a synchronous standby"
        return True, "caught-up standby"

    def record_fields(self, st: NodeState, leading: bool) -> dict[str, Any]:
        fields = dict(st.details)
        if leading:
            fields["sync"] = self.sync_names
        return fields

    def learn(self, records: Mapping[str, "MemberRecord"]) -> None:
        for rec in records.values():
            if rec.leader:
                sync = rec.get("sync")
                if isinstance(sync, list):
                    self.sync_names = [s for s in sync if isinstance(s, str)]

    # -- leading --------------------------------------------------------------

    def promote(self, host: Host, leadership: "Leadership", st: NodeState) -> None:
        if st.role == "standby":
            self.node.promote()
            host.note("promoted", token=leadership.token)
        else:
            self.node.allow_writes()  # a primary restarted after a demotion comes back read-only
        if self.pg.guard_tables or self.pg.guard_schema:
            with self.node.connect() as conn:
                pg_guard.install_guard(conn, tables=self.pg.guard_tables or None, schema=self.pg.guard_schema)
        self._renew_guard(leadership)

    def lead(self, host: Host, leadership: "Leadership", st: NodeState) -> None:
        if time.monotonic() - self._guard_renewed >= self.ttl / 8:
            self._renew_guard(leadership)
        if self.pg.synchronous:
            self._manage_sync(host)

    def _renew_guard(self, leadership: "Leadership") -> None:
        try:
            with self.node.connect() as conn:
                remaining = leadership.remaining()  # measured last: see renew_guard
                if remaining <= 0:
                    return
                pg_guard.renew_guard(conn, leadership.token, remaining)
            self._guard_renewed = time.monotonic()
        except Exception as e:  # the guard expires on its own; keep trying
            log.warning("could not renew the write guard: %s", e)

    def refuse_writes(self) -> None:
        try:
            with self.node.connect() as conn:
                pg_guard.expire_guard(conn)
        except Exception as e:
            log.info("could not expire the write guard (the server may be down): %s", e)

    def _manage_sync(self, host: Host) -> None:
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
            others = sorted(m for m in host.members() if m != self.member)
            wanted = [m for m in streaming if m in others][:1] or (current if current else others[:1])
            if wanted != current:
                self.sync_names = []
                if not host.publish_now():
                    return  # the withdrawal must be in etcd before the switch; try again next tick
                self._sync_switch_lsn = self.node.status().wal_current or 0
                self.node.set_synchronous_standbys(wanted, 1)
                self._sync_configured = wanted
                host.note("synchronous standby", names=wanted, from_lsn=self._sync_switch_lsn)
        self.sync_names = [r.application_name for r in replicas
                           if r.sync_state == "sync" and r.application_name in (self._sync_configured or [])
                           and (r.replay_lsn or 0) >= self._sync_switch_lsn]

    def demote(self) -> None:
        self.refuse_writes()
        try:
            self.node.demote()
        except TenureError as e:
            log.error("demote failed: %s", e)

    def stop(self) -> None:
        self.node.stop("fast")

    # -- following ------------------------------------------------------------

    def follow(self, host: Host, st: NodeState, primary: "PrimaryRecord") -> None:
        upstream = self.upstream_of(primary.dsn)
        if st.role == "standby" and st.upstream == upstream:
            if st.streaming:
                self._last_streaming = time.monotonic()
                return
            if time.monotonic() - self._last_streaming < self.ttl:
                return  # (re)connecting to it
        if time.monotonic() < self._next_rejoin:
            return
        host.note("rejoining", primary=primary.dsn, role=st.role)
        try:
            self.node.rejoin(primary.dsn)
        except TenureError:
            self._next_rejoin = time.monotonic() + self.ttl  # e.g. the primary is not up yet
            raise

    # -- planned handover -------------------------------------------------------

    def hand_over(self, host: Host, leadership: "Leadership", target: str, deadline: float) -> bool:
        """Let open transactions finish, refuse writes, wait for ``target`` to replay every commit.

        Open transactions get until a quarter of the time left (at most
        1 s) to finish: the web tier stops starting new ones once the primary key
        is gone. If ``target`` has not replayed up to the primary's last WAL
        position by ``deadline``, writes are allowed again and False returned.
        """
        drain_until = min(deadline, time.monotonic() + min(1.0, max(0.0, deadline - time.monotonic()) / 4))
        try:
            with self.node.connect() as conn:
                streaming = conn.execute("SELECT count(*) FROM pg_stat_replication WHERE application_name = %s"
                                         " AND state = 'streaming'", (target,)).fetchone()
                if not streaming or not streaming[0]:
                    host.note("switchover refused: target not streaming from this primary", target=target)
                    return False  # nothing was changed yet: writes go on
                while time.monotonic() < drain_until and _open_transactions(conn) > 0:
                    time.sleep(0.005)
                pg_guard.expire_guard(conn)
                conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
                conn.execute("SELECT pg_reload_conf()")
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                             " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                             " AND state IN ('active', 'idle in transaction', 'idle in transaction (aborted)')")
                row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
                assert row is not None
                final = parse_lsn(row[0])
                while True:
                    caught = conn.execute(
                        "SELECT count(*) FROM pg_stat_replication WHERE application_name = %s"
                        " AND state = 'streaming' AND replay_lsn >= %s::pg_lsn", (target, row[0])).fetchone()
                    if caught and caught[0]:
                        break
                    if time.monotonic() >= deadline:
                        host.note("switchover: target did not catch up", target=target, position=final)
                        self._resume_after_hand_over(leadership)
                        return False
                    time.sleep(0.002)
            host.note("switchover: target caught up", target=target, position=final)
            return True
        except Exception as e:
            log.error("switchover to %s failed: %s; writable again", target, e)
            self._resume_after_hand_over(leadership)
            return False

    def _resume_after_hand_over(self, leadership: "Leadership") -> None:
        if not self.node.is_running():
            self.node.start()
        self.node.allow_writes()
        self._renew_guard(leadership)

    def snapshot(self) -> dict[str, Any]:
        st = self.last_status
        return {"postgres": asdict(st) if st is not None else None, "synchronous_standbys": self.sync_names}


def _open_transactions(conn: Any) -> int:
    """Client backends other than this one inside a transaction (reads included: they may be about to write)."""
    row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                       " AND pid <> pg_backend_pid() AND xact_start IS NOT NULL").fetchone()
    return int(row[0]) if row else 0
