"""PostgresNode against real PostgreSQL 15 servers on loopback: status, lag, promote, demote, rejoin, sync standbys.

Read-only checks share one module cluster (tests that change it put it back);
tests that fail over get a fresh 3-node cluster each.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterator

import psycopg
import pytest

from tenure.errors import ConfigError, ServiceError
from tenure.lab.etcd import free_ports
from tenure.lab.postgres import LocalPostgresCluster
from tenure.services.postgres import NodeStatus, PostgresNode, format_lsn, parse_lsn

from support import PG_BIN, wait_for

if not os.path.exists(f"{PG_BIN}/initdb"):
    pytest.fail(f"PostgreSQL 15 binaries not found in {PG_BIN} (apt-get install postgresql-15)", pytrace=False)


def _cluster() -> Iterator[LocalPostgresCluster]:
    c = LocalPostgresCluster(size=3, bin_dir=PG_BIN).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalPostgresCluster]:
    """n1 primary, n2 and n3 streaming from it; tests that change it restore it."""
    yield from _cluster()


@pytest.fixture
def fresh() -> Iterator[LocalPostgresCluster]:
    """A cluster of its own, for a test that fails over."""
    yield from _cluster()


def sql(node: PostgresNode, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(node.dsn, autocommit=True) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []


def streaming_from(node: PostgresNode, primary: PostgresNode) -> NodeStatus | None:
    st = node.status()
    ok = st.role == "standby" and st.streaming and st.upstream == f"127.0.0.1:{primary.port}"
    return st if ok else None


def auto_conf(node: PostgresNode) -> str:
    with open(os.path.join(node.data_dir, "postgresql.auto.conf")) as f:
        return f.read()


# -- status and lag -------------------------------------------------------------


def test_status_of_primary_and_standbys(cluster: LocalPostgresCluster) -> None:
    n1, n2, n3 = cluster.nodes
    p = n1.status()
    assert (p.healthy, p.role, p.timeline, p.read_only) == (True, "primary", 1, False)
    assert (p.streaming, p.upstream) == (False, None)
    assert isinstance(p.wal_current, int) and p.wal_current > 0
    assert p.wal_received is None and p.wal_replayed is None
    for s in (n2, n3):
        st = wait_for(lambda: streaming_from(s, n1), 10, f"{s.name} streaming")
        assert (st.healthy, st.timeline, st.read_only, st.wal_current) == (True, 1, False, None)
        assert isinstance(st.wal_replayed, int) and isinstance(st.wal_received, int)
    assert [(r.application_name, r.state, r.sync_state) for r in n1.replicas()] == [
        ("n2", "streaming", "async"), ("n3", "streaming", "async")]
    assert cluster.primary is n1


def test_lag_bytes_after_writes(cluster: LocalPostgresCluster) -> None:
    n1, n2, n3 = cluster.nodes
    sql(n1, "CREATE TABLE IF NOT EXISTS lag_t (x text)")
    sql(n1, "INSERT INTO lag_t SELECT repeat('x', 100) FROM generate_series(1, 5000)")
    pos = n1.status().wal_current
    assert pos is not None
    for s in (n2, n3):
        wait_for(lambda: s.lag_bytes(pos) == 0, 10, f"{s.name} to receive up to {format_lsn(pos)}")
    assert n1.lag_bytes(pos) is None  # a primary has no lag

    # n3 restarted against an upstream that does not exist: it stays up, receives
    # nothing, and falls behind by exactly what the primary writes next.
    dead = f"host=127.0.0.1 port={free_ports(1)[0]} user=postgres dbname=postgres"
    try:
        n3.stop("fast")
        assert n3.lag_bytes(pos) is None  # down
        n3.start(standby_of=dead)
        sql(n1, "INSERT INTO lag_t SELECT repeat('y', 100) FROM generate_series(1, 5000)")
        pos2 = n1.status().wal_current
        assert pos2 is not None
        st = n3.status()
        assert st.role == "standby" and not st.streaming and st.upstream is None
        assert st.wal_replayed is not None and st.wal_replayed <= pos
        lag = n3.lag_bytes(pos2)
        assert lag is not None and lag >= pos2 - pos > 500_000
    finally:
        n3.stop("fast")
        n3.start(standby_of=n1.dsn)
    wait_for(lambda: n3.lag_bytes(pos2) == 0, 10, "n3 to catch up")
    assert sql(n3, "SELECT count(*) FROM lag_t WHERE x LIKE 'y%'") == [(5000,)]


def test_synchronous_standbys(cluster: LocalPostgresCluster) -> None:
    n1 = cluster.nodes[0]
    wait_for(lambda: len(n1.replicas()) == 2, 10, "both standbys connected")
    try:
        n1.set_synchronous_standbys(["n2"])
        assert sql(n1, "SHOW synchronous_standby_names") == [("FIRST 1 (n2)",)]
        wait_for(lambda: n1.synchronous_standbys() == ["n2"], 5, "n2 sync")
        assert {r.application_name: r.sync_state for r in n1.replicas()} == {"n2": "sync", "n3": "async"}
        sql(n1, "CREATE TABLE IF NOT EXISTS sync_t (i int); INSERT INTO sync_t VALUES (1)")  # commits: n2 acks

        n1.set_synchronous_standbys(["n2", "n3"], num=2)
        wait_for(lambda: n1.synchronous_standbys() == ["n2", "n3"], 5, "n2 and n3 sync")
    finally:
        n1.set_synchronous_standbys([])
    assert sql(n1, "SHOW synchronous_standby_names") == [("",)]
    wait_for(lambda: n1.synchronous_standbys() == [], 5, "no sync standbys")

    for names, num in ((["n2"], 2), (["n2"], 0), (["n2", "n2"], 1), (["n2; DROP"], 1), ("n2", 1), (["n2"], True)):
        with pytest.raises(ConfigError):
            n1.set_synchronous_standbys(names, num)  # type: ignore[arg-type]
    assert sql(n1, "SHOW synchronous_standby_names") == [("",)]


# -- failover --------------------------------------------------------------------


def test_promote_a_standby_leaves_the_others_stale(fresh: LocalPostgresCluster) -> None:
    n1, n2, n3 = fresh.nodes
    n2.promote()
    st = n2.status()
    assert (st.role, st.timeline, st.read_only) == ("primary", 2, False)
    sql(n2, "CREATE TABLE promoted (i int)")  # accepts writes at once
    # Promotion ends the checkpoint too, so the control file already has the new timeline.
    assert sql(n2, "SELECT timeline_id FROM pg_control_checkpoint()") == [(2,)]

    # Nothing else moved: n1 still thinks it is primary on timeline 1, n3 still follows it.
    assert (n1.status().role, n1.status().timeline) == ("primary", 1)
    st3 = streaming_from(n3, n1)
    assert st3 is not None and st3.timeline == 1
    assert n2.replicas() == []

    for node in (n1, n2):
        with pytest.raises(ServiceError, match="not a standby") as err:
            node.promote()
        assert err.value.detail == "it is not a standby (role primary)"


def test_demote_fails_an_open_transaction_and_stops_the_server(fresh: LocalPostgresCluster) -> None:
    n1, n2, _ = fresh.nodes
    sql(n1, "CREATE TABLE t (v text)")
    with psycopg.connect(n1.dsn) as conn:  # not autocommit: a transaction stays open
        conn.execute("INSERT INTO t VALUES ('before')")
        n1.demote()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("INSERT INTO t VALUES ('after')")
            conn.commit()
    st = n1.status()
    assert (st.role, st.healthy) == ("down", False) and st.error
    assert not n1.is_running()
    assert "default_transaction_read_only = 'on'" in auto_conf(n1)  # stays read-only if restarted as is
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(n1.dsn, connect_timeout=2)
    n1.demote()  # already down: nothing to do
    n2.promote()
    assert sql(n2, "SELECT count(*) FROM t") == [(0,)]  # the open transaction never committed


def test_rejoin_discards_the_diverged_write_and_streams_from_the_new_primary(fresh: LocalPostgresCluster) -> None:
    n1, n2, n3 = fresh.nodes
    sql(n1, "CREATE TABLE t (v text)")
    wait_for(lambda: sql(n2, "SELECT to_regclass('t') IS NOT NULL") == [(True,)], 10, "t on n2")
    n2.promote()
    sql(n1, "INSERT INTO t VALUES ('diverged')")  # the old primary went on writing
    n1.demote()

    n1.rejoin(n2.dsn)
    st = streaming_from(n1, n2)
    assert st is not None and st.timeline == 2 and not st.read_only
    conf = auto_conf(n1)
    # demote's setting is gone, the new primary's own settings did not come along, n1's name did.
    assert "default_transaction_read_only" not in conf
    assert "application_name=n1" in conf and f"port={n2.port}" in conf
    assert conf.count("primary_conninfo") == 1

    sql(n2, "INSERT INTO t VALUES ('new')")
    wait_for(lambda: sql(n1, "SELECT v FROM t") == [("new",)], 10, "the new row on n1 (and no diverged row)")

    # n3 was a standby of n1 on timeline 1: it follows n2 too.
    n3.rejoin(n2.dsn)
    assert streaming_from(n3, n2) is not None
    wait_for(lambda: sql(n3, "SELECT v FROM t") == [("new",)], 10, "the new row on n3")
    assert [r.application_name for r in n2.replicas()] == ["n1", "n3"]


def test_rejoin_after_a_crash_and_a_promotion_without_checkpoint(fresh: LocalPostgresCluster) -> None:
    """The notes' trap: pg_rewind right after pg_promote() would find "no rewind required"."""
    n1, n2, _ = fresh.nodes
    sql(n1, "CREATE TABLE t (v text)")
    wait_for(lambda: sql(n2, "SELECT to_regclass('t') IS NOT NULL") == [(True,)], 10, "t on n2")
    n1.stop("immediate")  # the primary dies...
    sql(n2, "SELECT pg_promote(true, 10)")  # ...and someone else promotes n2, with no CHECKPOINT after
    sql(n2, "INSERT INTO t VALUES ('new')")
    n1.rejoin(n2.dsn)  # from an unclean shutdown: pg_rewind recovers it first
    assert streaming_from(n1, n2) is not None
    wait_for(lambda: sql(n1, "SELECT v FROM t") == [("new",)], 10, "the new row on n1")
    sql(n2, "INSERT INTO t VALUES ('newer')")
    wait_for(lambda: len(sql(n1, "SELECT v FROM t")) == 2, 10, "a later row on n1")


# -- bad input and unreachable servers -----------------------------------------


def test_a_data_dir_that_is_not_a_cluster_is_refused_and_nothing_is_created() -> None:
    base = tempfile.mkdtemp(prefix="tenure-pg-bad-")
    try:
        missing = os.path.join(base, "missing")
        empty = os.path.join(base, "empty")
        os.mkdir(empty)
        for d in (missing, empty):
            node = PostgresNode("nx", d, free_ports(1)[0], bin_dir=PG_BIN)
            ops = (node.start, node.stop, node.is_running, node.demote, lambda: node.rejoin("host=127.0.0.1 port=1"))
            for op in ops:
                with pytest.raises(ConfigError, match="does not exist|not a PostgreSQL cluster"):
                    op()
        assert sorted(os.listdir(base)) == ["empty"] and os.listdir(empty) == []
    finally:
        shutil.rmtree(base)

    with pytest.raises(ConfigError, match="no pg_ctl"):
        PostgresNode("nx", "/nonexistent", 5432, bin_dir="/usr/bin")
    for bad in ({"name": "n-1"}, {"name": ""}, {"port": 0}, {"port": "5432"}, {"host": ""}, {"connect_timeout": 0}):
        with pytest.raises(ConfigError):
            PostgresNode(**{"name": "nx", "data_dir": "/nonexistent", "port": 5432, "bin_dir": PG_BIN, **bad})
    assert parse_lsn("1/2A") == (1 << 32) + 0x2A and format_lsn(parse_lsn("16/B374D848")) == "16/B374D848"
    with pytest.raises(ConfigError):
        parse_lsn("nonsense")


def test_a_wrong_port_is_down_and_promote_says_why(cluster: LocalPostgresCluster) -> None:
    port = free_ports(1)[0]
    node = PostgresNode("nx", "/nonexistent", port, bin_dir=PG_BIN)
    st = node.status()
    assert (st.healthy, st.role, st.timeline) == (False, "down", None)
    assert st.error and str(port) in st.error
    assert node.lag_bytes(0) is None
    with pytest.raises(ServiceError) as err:
        node.promote()
    msg = str(err.value)
    assert f"nx (127.0.0.1:{port}): cannot promote: the server does not answer" in msg
    assert err.value.detail and "refused" in err.value.detail.lower() and err.value.detail in msg
    with pytest.raises(ServiceError, match="pg_stat_replication"):
        node.replicas()
    with pytest.raises(ServiceError, match="cannot connect"):
        with node.connect():
            pass


def test_connect_bounds_statements_and_reports_server_errors(cluster: LocalPostgresCluster) -> None:
    n1 = cluster.nodes[0]
    with n1.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(ServiceError, match="canceling statement due to statement timeout"):
        with n1.connect(statement_timeout=0.1) as conn:
            conn.execute("SELECT pg_sleep(5)")
    with pytest.raises(ServiceError) as err:
        with n1.connect() as conn:
            conn.execute("SELECT * FROM no_such_table")
    assert err.value.detail and 'relation "no_such_table" does not exist' in err.value.detail


def test_rejoin_refuses_a_source_that_is_not_a_primary(cluster: LocalPostgresCluster) -> None:
    _, n2, n3 = cluster.nodes
    with pytest.raises(ServiceError, match="not a primary"):
        n2.rejoin(n3.dsn)
    with pytest.raises(ConfigError, match="itself"):
        n2.rejoin(n2.dsn)
    assert n2.is_running() and n2.status().role == "standby"  # untouched
