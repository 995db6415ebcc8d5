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
import threading
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Mapping

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..errors import ConfigError, TenureError
from ..services import pg_guard
from ..services.postgres import NodeStatus, PostgresNode, parse_lsn, public_dsn
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
            bin_dir=pg.bin_dir, socket_dir=pg.socket_dir, passfile=pg.passfile,
            **({"run_as": pg.run_as} if pg.run_as is not None else {}),
        )
        self.member = member
        # Published in etcd and shown everywhere: never a secret (credentials come from the passfile).
        self.address = public_dsn(pg.advertise_dsn or self.node.dsn)
        self.last_status: NodeStatus | None = None
        self.sync_names: list[str] = []  # synchronous standbys as last published by the primary
        self._sync_configured: list[str] | None = None
        self._sync_switch_lsn = 0  # primary WAL position when the synchronous standby last changed
        # The write guard follows the lease: each confirmed renewal hands its absolute deadline to a
        # renewer thread of its own (the keepalive must not wait on the database).
        self._guard_lock = threading.Lock()
        self._guard_token: int | None = None  # the term whose guard is armed; None once writes are refused
        self._guard_deadline = 0.0
        self._guard_wake = threading.Event()
        self._guard_conns: dict[str, Any] = {}  # the renewer's own connection per guarded database
        self._guard_thread: threading.Thread | None = None
        self._next_rejoin = 0.0
        self._pointed_at: str | None = None  # the primary this standby was last pointed at
        self._repointed_at = 0.0
        # How long a standby that is not streaming is left to reconnect by itself (PostgreSQL's
        # walreceiver retries every wal_retrieve_retry_interval, 5 s by default).
        self.rejoin_grace = max(2.0 * ttl, 6.0)
        self._last_streaming = 0.0

    # -- starting ---------------------------------------------------------------

    def preflight(self) -> None:
        """What failover needs of this server, checked when it answers (a stopped one is checked by its start).

        * ``advertise_dsn`` reaches this very server (its ``cluster_name`` is this member);
        * pg_rewind can work: ``wal_log_hints`` or data checksums;
        * standbys can stream: ``wal_level`` replica or logical, WAL senders, a pg_hba
          ``replication`` rule;
        * WAL archiving, when on, runs on the primary only (``archive_mode = on``, not ``always``).
        """
        if not self.node.status().healthy:
            return
        problems = []
        try:
            with psycopg.connect(self.node.with_credentials(self.address), connect_timeout=3) as conn:
                name = conn.execute("SELECT current_setting('cluster_name')").fetchone()
        except psycopg.Error as e:
            raise ConfigError(f"[postgres] advertise_dsn does not reach this server: "
                              f"{str(e).strip().splitlines()[0]}") from None
        if not name or name[0] != self.member:
            raise ConfigError(f"[postgres] advertise_dsn reaches another server ({name[0] if name else None!r}), "
                              f"not {self.member}")
        with self.node.connect() as conn:
            row = conn.execute(
                "SELECT current_setting('wal_log_hints'), current_setting('data_checksums'),"
                " current_setting('wal_level'), current_setting('max_wal_senders')::int,"
                " current_setting('archive_mode'),"
                " (SELECT count(*) FROM pg_hba_file_rules WHERE 'replication' = ANY(database))").fetchone()
        assert row is not None
        hints, checksums, level, senders, archive, hba = row
        if hints != "on" and checksums != "on":
            problems.append("pg_rewind needs wal_log_hints = on (or data checksums)")
        if level not in ("replica", "logical") or senders < 1:
            problems.append(f"streaming needs wal_level = replica and max_wal_senders > 0 "
                            f"(have {level}, {senders})")
        if hba == 0:
            problems.append("pg_hba.conf has no replication rule: standbys could not stream")
        if archive == "always":
            problems.append("archive_mode = always archives on standbys too: use on (archive from the primary only)")
        if problems:
            raise ConfigError(f"{self.member}: " + "; ".join(problems))

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

    def term_timeline(self, st: NodeState) -> int | None:
        if st.timeline is None:
            return None
        # pg_promote starts the next timeline (at least; it skips ids already in the WAL archive).
        return st.timeline + 1 if st.role == "standby" else st.timeline

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
        self._begin_term(host)
        if st.role == "standby":
            self.node.promote()
            host.note("promoted", token=leadership.token)
        else:
            self.node.allow_writes()  # a primary restarted after a demotion comes back read-only
        for db in self._guard_dbs():
            with self.node.connect(dbname=db) as conn:
                pg_guard.install_guard(conn, tables=self.pg.guard_tables or None, schema=self.pg.guard_schema)
        self._arm_guard(leadership)

    def _begin_term(self, host: Host) -> None:
        """Derive the term's state afresh from the server and etcd; nothing is kept from an earlier term.

        In synchronous mode the server names a synchronous standby *before* it can accept a
        write (``synchronous_standby_names`` can be set on a standby): a rejoin strips the
        setting, and a primary without it would acknowledge commits no standby holds. The
        published list starts empty; :meth:`_manage_sync` lists a standby only once it has
        replayed past the start of the term.
        """
        self.sync_names = []
        self._sync_switch_lsn = wal_position(self.node.status())
        self._sync_configured = None
        if not self.pg.synchronous:
            return
        configured = [n for n in self.node.configured_synchronous_standbys() if n != self.member]
        if not configured:
            others = sorted(m for m in host.members() if m != self.member)
            # No other member known: any standby may acknowledge until one is chosen by name.
            configured = others[:1] or ["*"]
            self.node.set_synchronous_standbys(configured, 1)
            host.note("synchronous standby", names=configured, from_lsn=self._sync_switch_lsn)
        self._sync_configured = configured

    def lead(self, host: Host, leadership: "Leadership", st: NodeState) -> None:
        if self.pg.synchronous:
            self._manage_sync(host)

    def _arm_guard(self, leadership: "Leadership") -> None:
        """Renew the guard now, and from then on at each confirmed lease renewal, with its absolute deadline."""
        token = leadership.token
        with self._guard_lock:
            self._guard_token, self._guard_deadline = token, leadership.deadline
        leadership.on_renewed(lambda deadline: self._on_renewed(token, deadline))
        if self._guard_thread is None:
            self._guard_thread = threading.Thread(target=self._guard_renewer, name="tenure-pg-guard", daemon=True)
            self._guard_thread.start()
        self._renew_guard()

    def _on_renewed(self, token: int, deadline: float) -> None:
        # No lock: the keepalive thread never waits for a renewal in progress. A deadline set
        # just after refuse_writes is harmless: the renewer checks the token under the lock.
        if self._guard_token == token:
            self._guard_deadline = deadline
            self._guard_wake.set()

    def _guard_renewer(self) -> None:
        while True:
            # Woken by each renewal; otherwise retry now and then after a failure.
            self._guard_wake.wait(self.ttl / 4)
            self._guard_wake.clear()
            self._renew_guard()

    def _guard_dbs(self) -> list[str]:
        return list(self.pg.guard_databases) or [self.pg.app_database]

    def _renew_guard(self) -> None:
        with self._guard_lock:
            token, deadline = self._guard_token, self._guard_deadline
            if token is None or deadline <= time.monotonic():
                return
            for db in self._guard_dbs():
                try:
                    conn = self._guard_conns.get(db)
                    if conn is None or conn.closed:
                        conn = self._guard_conns[db] = self.node.open(dbname=db)
                    pg_guard.renew_guard(conn, token, deadline=deadline)
                except Exception as e:  # the guard expires on its own; the next renewal tries again
                    log.warning("could not renew the write guard in database %s: %s", db, e)
                    self._close_guard_conn(db)

    def _close_guard_conn(self, db: str) -> None:
        conn = self._guard_conns.pop(db, None)
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def refuse_writes(self) -> None:
        with self._guard_lock:  # no renewal can land after the expiry
            self._guard_token = None
            for db in self._guard_dbs():
                try:
                    with self.node.connect(dbname=db) as conn:
                        pg_guard.expire_guard(conn)
                except Exception as e:
                    log.info("could not expire the write guard in database %s (the server may be down): %s", db, e)
                self._close_guard_conn(db)

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
        self.sync_names = []
        self._sync_configured = None
        self.refuse_writes()
        try:
            self.node.demote()
        except TenureError as e:
            log.error("demote failed: %s", e)

    def stop(self) -> None:
        # Read-only and every client ended first, then a fast stop: its shutdown checkpoint is the last WAL.
        self.node.demote()

    def final_position(self) -> int | None:
        try:
            return self.node.checkpoint_location()
        except TenureError as e:
            log.error("cannot read the final checkpoint location: %s", e)
            return None

    # -- following ------------------------------------------------------------

    def follow(self, host: Host, st: NodeState, primary: "PrimaryRecord") -> None:
        upstream = self.upstream_of(primary.dsn)
        now = time.monotonic()
        if st.role == "standby":
            if st.upstream == upstream and st.streaming:
                self._last_streaming = now
                self._pointed_at = primary.dsn
                return
            if self._pointed_at != primary.dsn:
                # A new primary: a standby on the same timeline history follows it after a
                # reload of primary_conninfo, without a restart (it keeps serving reads).
                host.note("re-pointing by reload", primary=primary.dsn)
                self.node.repoint(self.node.with_credentials(primary.dsn))
                self._pointed_at, self._repointed_at = primary.dsn, now
                return
            # Reconnecting (the walreceiver retries every wal_retrieve_retry_interval, upstream
            # unknown meanwhile): left alone for a grace before it is rewound and restarted.
            if now - max(self._last_streaming, self._repointed_at) < self.rejoin_grace:
                return
        if now < self._next_rejoin:
            return
        host.note("rejoining", primary=primary.dsn, role=st.role)
        try:
            self.node.rejoin(self.node.with_credentials(primary.dsn))
            self._pointed_at = primary.dsn
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
                self.refuse_writes()  # every guarded database, and no renewal re-arms it meanwhile
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
        if leadership.is_valid():
            with self._guard_lock:  # the renewal hook registered at promotion applies again to this token
                self._guard_token, self._guard_deadline = leadership.token, leadership.deadline
            self._renew_guard()

    def snapshot(self) -> dict[str, Any]:
        st = self.last_status
        return {"postgres": asdict(st) if st is not None else None, "synchronous_standbys": self.sync_names}


def _open_transactions(conn: Any) -> int:
    """Client backends other than this one inside a transaction (reads included: they may be about to write)."""
    row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                       " AND pid <> pg_backend_pid() AND xact_start IS NOT NULL").fetchone()
    return int(row[0]) if row else 0
