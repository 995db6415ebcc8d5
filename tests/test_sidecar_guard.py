"""The write guard follows the lease, not the sidecar's loop: a sidecar in this process, real PostgreSQL and etcd."""

from __future__ import annotations

import threading
import time
from typing import Iterator

import psycopg
import pytest

from tenure.lab.etcd import LocalEtcd
from tenure.lab.postgres import LocalPostgresCluster
from tenure.sidecar.config import parse_config
from tenure.sidecar.loop import Sidecar
from tenure.sidecar.policy import NodeState
from tenure.sidecar.postgres import PostgresPolicy

from pgfailover import Writer
from support import PG_BIN, wait_for


def renewed_token(dsn: str) -> int | None:
    from tenure.services import pg_guard

    with psycopg.connect(dsn, autocommit=True) as conn:
        st = pg_guard.guard_status(conn)
    return st.get("token") if st.get("renewed_at") is not None else None


class StallingPolicy(PostgresPolicy):
    """The PostgreSQL policy whose status probe hangs while ``stall`` is set (a slow moment of the loop)."""

    stall = threading.Event()

    def status(self) -> NodeState:
        while self.stall.is_set():
            time.sleep(0.01)
        return super().status()


@pytest.fixture
def single() -> Iterator[LocalPostgresCluster]:
    c = LocalPostgresCluster(size=1, bin_dir=PG_BIN).start()
    yield c
    c.stop()


def test_guard_is_renewed_while_the_loop_stalls(etcd: LocalEtcd, service: str, single: LocalPostgresCluster) -> None:
    node = single.nodes[0]
    with psycopg.connect(node.dsn, autocommit=True) as conn:
        conn.execute("CREATE DATABASE app")
    app = node.dsn_for("app")
    with psycopg.connect(app, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, writer text, at float8)")
    cfg = parse_config({"service": service, "member": node.name, "ttl": 2, "listen": "",
                        "etcd": {"endpoints": etcd.endpoints},
                        "postgres": {"data_dir": node.data_dir, "port": node.port, "bin_dir": PG_BIN,
                                     "socket_dir": node.socket_dir, "guard_schema": "public",
                                     "advertise_dsn": app}})
    policy = StallingPolicy(cfg.member, cfg.postgres, ttl=cfg.ttl, node=node)
    sidecar = Sidecar(cfg, policy=policy)
    thread = threading.Thread(target=sidecar.run, daemon=True)
    thread.start()
    writer = None
    try:
        wait_for(lambda: sidecar.leadership is not None and sidecar.leadership.is_valid(), 20, "leading")
        writer = Writer(app, "stall", 1)
        wait_for(lambda: renewed_token(app) == sidecar.leadership.token, 10, "the guard armed for the term")
        n = len(writer.accepted)
        wait_for(lambda: len(writer.accepted) > n + 10, 10, "writes accepted")
        StallingPolicy.stall.set()
        t0 = time.monotonic()
        time.sleep(3 * cfg.ttl)  # the loop is stuck in its probe for three ttls
        StallingPolicy.stall.clear()
        refused = [t for t, _ in writer.refused if t > t0]
        assert not refused, f"a healthy primary refused writes while its loop stalled: {writer.errors[-3:]}, {[round(t - t0, 2) for t in refused[:3]]}"
        assert sidecar.leadership is not None and sidecar.leadership.is_valid()
    finally:
        StallingPolicy.stall.clear()
        if writer is not None:
            writer.stop()
        sidecar.stop()
        thread.join(30)


def test_a_renewal_with_a_passed_deadline_never_rearms_the_guard(single: LocalPostgresCluster) -> None:
    from tenure.services import pg_guard

    node = single.nodes[0]
    with psycopg.connect(node.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        pg_guard.install_guard(conn, tables=["t"])
        assert pg_guard.renew_guard(conn, 5, deadline=time.monotonic() + 5)
        conn.execute("INSERT INTO t VALUES (1)")
        deadline = time.monotonic() + 0.2
        time.sleep(0.4)  # the caller froze between taking its deadline and renewing
        pg_guard.renew_guard(conn, 5, deadline=deadline)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO t VALUES (2)")
