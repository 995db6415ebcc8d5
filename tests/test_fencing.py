"""The PostgreSQL fence against a real server, and the metrics of a term."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from prometheus_client import REGISTRY

import tenure
from tenure.errors import ConfigError, Fenced
from tenure.fencing import install_pg_fence, pg_fence

from support import LocalPostgres, wait_for


def test_pg_fence_orders_terms(postgres: LocalPostgres) -> None:
    with psycopg.connect(postgres.dsn, autocommit=True) as a, psycopg.connect(postgres.dsn, autocommit=True) as b:
        install_pg_fence(a)
        install_pg_fence(a)  # idempotent
        with a.transaction():
            pg_fence(a, "orders", 10)
        with a.transaction():
            pg_fence(a, "orders", 10)  # the same term may write again
        with pytest.raises(Fenced, match="refused token 9: it has already seen token 10") as info:
            with b.transaction():
                pg_fence(b, "orders", 9)
        assert (info.value.token, info.value.current) == (9, 10)
        with b.transaction():
            pg_fence(b, "other", 1)  # resources are independent


def test_pg_fence_holds_back_an_older_writer_until_the_newer_commits(postgres: LocalPostgres) -> None:
    with psycopg.connect(postgres.dsn, autocommit=True) as new, psycopg.connect(postgres.dsn, autocommit=True) as old:
        install_pg_fence(new)
        new.execute("CREATE TABLE IF NOT EXISTS fenced_rows (token bigint)")
        with new.transaction():
            pg_fence(new, "race", 1)
        result: list[BaseException | None] = []

        def old_writer() -> None:
            try:
                with old.transaction():
                    pg_fence(old, "race", 1)
                    old.execute("INSERT INTO fenced_rows VALUES (1)")
                result.append(None)
            except Fenced as e:
                result.append(e)

        with new.transaction():
            pg_fence(new, "race", 2)
            t = threading.Thread(target=old_writer)
            t.start()
            time.sleep(0.3)  # give the old writer time to block on the fence row (it must not finish)
            assert t.is_alive() and not result
            new.execute("INSERT INTO fenced_rows VALUES (2)")
        t.join(10)
        assert isinstance(result[0], Fenced)
        assert new.execute("SELECT token FROM fenced_rows").fetchall() == [(2,)]


def test_pg_fence_needs_a_transaction(postgres: LocalPostgres) -> None:
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        install_pg_fence(conn)
        with pytest.raises(ConfigError, match="inside the transaction"):
            pg_fence(conn, "x", 1)
        assert conn.execute("SELECT count(*) FROM tenure.fence WHERE resource = 'x'").fetchone() == (0,)


def test_term_metrics(client: tenure.Client, service: str) -> None:
    labels = {"service": service, "member": "m1"}
    election = tenure.Election(client, service, member="m1")
    leadership = election.campaign(timeout=5)
    assert REGISTRY.get_sample_value("tenure_is_leader", labels) == 1
    assert REGISTRY.get_sample_value("tenure_fencing_token", labels) == leadership.token
    assert 0 < REGISTRY.get_sample_value("tenure_lease_remaining_seconds", labels) <= 2
    leadership.resign()
    assert REGISTRY.get_sample_value("tenure_is_leader", labels) == 0
    assert REGISTRY.get_sample_value("tenure_fencing_token", labels) == 0
    election.close()


def test_fenced_put_that_may_have_been_applied_is_indeterminate_not_fenced(service: str) -> None:
    import threading

    from tenure.errors import IndeterminateWrite
    from tenure.fencing import etcd_put
    from tenure.lab.etcd import LocalEtcd

    cluster = LocalEtcd(size=3, proxied=True).start()
    try:
        other = tenure.connect(cluster.endpoints[1:])
        writer = tenure.connect(cluster.endpoints[:2], timeout=1.5)
        leadership = tenure.Election(other, service, member="a", ttl=2).campaign(10)
        writer.get("warm-up")  # the writer's connection to member 0 is open
        cluster.cut_clients(0, "down")  # requests arrive and are applied; answers are held
        result: list[BaseException | int] = []

        def write() -> None:
            try:
                result.append(etcd_put(writer, service, leadership.token, "data", "v1"))
            except BaseException as e:
                result.append(e)

        t = threading.Thread(target=write)
        t.start()
        wait_for(lambda: other.get("data") is not None, 1.2, "the first attempt applied")
        leadership.resign()  # the term ends before the retry
        t.join(10)
        assert len(result) == 1 and isinstance(result[0], IndeterminateWrite), result
        other.close()
        writer.close()
    finally:
        cluster.stop()
