"""The self-fencing primary (tenure.services.pg_guard) against a real PostgreSQL.

Each test gets its own database on the session's server, so the guard's
objects (which are per database) never leak from one test into another.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tenure.errors import ConfigError, ServiceError
from tenure.services.pg_guard import expire_guard, guard_status, install_guard, remove_guard, renew_guard

from support import LocalPostgres, wait_for

Connect = Callable[..., psycopg.Connection[Any]]


@pytest.fixture
def dsn(postgres: LocalPostgres) -> Iterator[str]:
    """A fresh database on the session's server."""
    name = f"guard_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres.dsn, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield make_conninfo(postgres.dsn, dbname=name)
    with psycopg.connect(postgres.dsn, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def connect(dsn: str) -> Iterator[Connect]:
    """Open connections to the test's database (autocommit unless told); all closed at the end."""
    opened: list[psycopg.Connection[Any]] = []

    def _connect(autocommit: bool = True) -> psycopg.Connection[Any]:
        c = psycopg.connect(dsn, autocommit=autocommit, connect_timeout=10)
        opened.append(c)
        return c

    yield _connect
    for c in opened:
        c.close()


@pytest.fixture
def admin(connect: Connect) -> psycopg.Connection[Any]:
    """The sidecar's connection, with a table ``t`` to guard."""
    c = connect()
    c.execute("CREATE TABLE t (id serial PRIMARY KEY, v text)")
    return c


def refused(conn: psycopg.Connection[Any], statement: str) -> psycopg.Error:
    """Run ``statement``; it must fail with SQLSTATE 25006. Returns the error."""
    with pytest.raises(psycopg.Error) as info:
        conn.execute(statement)
    assert info.value.sqlstate == "25006", f"{statement}: {info.value.sqlstate} {info.value}"
    return info.value


def accepts(conn: psycopg.Connection[Any], statement: str = "INSERT INTO t (v) VALUES ('x')") -> bool:
    """True if the write went through, False if the guard refused it (other errors propagate)."""
    try:
        conn.execute(statement)
        return True
    except psycopg.errors.ReadOnlySqlTransaction:
        if not conn.autocommit:
            conn.rollback()
        return False


def triggers(conn: psycopg.Connection[Any], table: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname LIKE 'tenure%%' ORDER BY 1",
        (table,))]


# --- the lease ----------------------------------------------------------------------------------


def test_writes_are_refused_before_the_first_renewal_and_reads_work(admin: Any, connect: Connect) -> None:
    install_guard(admin, tables=["t"])
    app = connect()
    err = refused(app, "INSERT INTO t (v) VALUES ('a')")
    assert "holds no primary lease" in str(err) and "it is not the primary" in str(err)
    refused(app, "UPDATE t SET v = 'b'")
    refused(app, "DELETE FROM t")
    assert app.execute("SELECT count(*) FROM t").fetchone() == (0,)
    st = guard_status(admin)
    assert st["installed"] and st["token"] is None and st["valid_until"] is None and st["seconds_left"] == 0.0


def test_writes_are_accepted_after_a_renewal(admin: Any, connect: Connect) -> None:
    install_guard(admin, tables=["t"])
    assert renew_guard(admin, 7, 30.0) is True
    app = connect()
    app.execute("INSERT INTO t (v) VALUES ('a')")
    app.execute("UPDATE t SET v = 'b'")
    st = guard_status(admin)
    assert st["token"] == 7
    assert 28.0 < st["seconds_left"] <= 30.0
    assert st["enforced_until"] == st["valid_until"]


def test_writes_are_refused_once_the_lease_runs_out(admin: Any, connect: Connect) -> None:
    install_guard(admin, tables=["t"])
    app = connect()
    t0 = time.monotonic()
    assert renew_guard(admin, 7, 0.5)
    assert accepts(app)
    wait_for(lambda: not accepts(app), timeout=5, what="the lease to run out")
    # valid_until is never later than the caller's deadline (t0 + 0.5)
    assert time.monotonic() - t0 < 0.5 + 1.0
    err = refused(app, "INSERT INTO t (v) VALUES ('late')")
    assert "primary lease expired at" in str(err) and "(token 7)" in str(err)
    assert err.diag.message_detail and "public.t" in err.diag.message_detail
    # reads keep working on a fenced server
    assert app.execute("SELECT count(*) FROM t WHERE v = 'late'").fetchone() == (0,)
    assert guard_status(admin)["seconds_left"] == 0.0


def test_a_renewal_with_an_older_token_is_refused(admin: Any) -> None:
    install_guard(admin, tables=["t"])
    assert renew_guard(admin, 10, 30.0)
    assert renew_guard(admin, 9, 60.0) is False  # an older term cannot take the lease back
    st = guard_status(admin)
    assert st["token"] == 10 and st["seconds_left"] <= 30.0
    assert renew_guard(admin, 10, 20.0)  # the same term may renew, shorter too
    assert guard_status(admin)["seconds_left"] <= 20.0
    assert renew_guard(admin, 11, 30.0)
    assert guard_status(admin)["token"] == 11


def test_expire_guard_stops_writes_at_once_even_in_open_transactions(admin: Any, connect: Connect) -> None:
    install_guard(admin, tables=["t"])
    assert renew_guard(admin, 5, 60.0)
    app = connect(autocommit=False)
    app.execute("INSERT INTO t (v) VALUES ('before')")
    assert expire_guard(admin) == 0
    err = refused(app, "INSERT INTO t (v) VALUES ('after')")  # same transaction, no waiting
    assert "expired at -infinity (token 5)" in str(err)
    app.rollback()
    refused(connect(), "INSERT INTO t (v) VALUES ('after')")
    st = guard_status(admin)
    assert st["token"] == 5 and st["seconds_left"] == 0.0 and st["valid_until"].year == 1


def test_expire_guard_with_drain_ends_transactions_that_wrote_under_the_old_lease(admin: Any, connect: Connect) -> None:
    install_guard(admin, tables=["t"])
    assert renew_guard(admin, 5, 60.0)
    app = connect(autocommit=False)
    app.execute("INSERT INTO t (v) VALUES ('in flight')")
    bystander = connect(autocommit=False)
    bystander.execute("SELECT count(*) FROM t")  # reads only: not a writer, left alone
    assert expire_guard(admin, drain=0.2) == 1
    with pytest.raises(psycopg.OperationalError):
        app.commit()
    assert admin.execute("SELECT count(*) FROM t").fetchone() == (0,)
    bystander.commit()


def test_install_twice_is_fine(admin: Any, connect: Connect) -> None:
    install_guard(admin, tables=["t"])
    install_guard(admin, tables=["public.t"])
    assert triggers(admin, "t") == ["tenure_guard"]
    assert renew_guard(admin, 3, 30.0)
    assert accepts(connect())
    assert guard_status(admin)["tables"] == ["t"]


def test_remove_restores_writes_and_is_idempotent(admin: Any, connect: Connect) -> None:
    install_guard(admin, tables=["t"])
    app = connect()
    assert not accepts(app)
    remove_guard(admin, tables=["t"])
    assert accepts(app)
    remove_guard(admin, tables=["t"])
    assert triggers(admin, "t") == []
    remove_guard(admin, drop_all=True)
    remove_guard(admin, drop_all=True)
    assert admin.execute("SELECT to_regnamespace('tenure')").fetchone() == (None,)
    assert guard_status(admin)["installed"] is False


def test_drop_all_keeps_the_fence_table(admin: Any) -> None:
    from tenure.fencing import install_pg_fence

    install_pg_fence(admin)
    install_guard(admin, tables=["t"])
    remove_guard(admin, drop_all=True)
    assert triggers(admin, "t") == []
    assert admin.execute("SELECT to_regclass('tenure.fence') IS NOT NULL, to_regclass('tenure.lease')").fetchone() \
        == (True, None)


def test_truncate_is_guarded(admin: Any, connect: Connect) -> None:
    install_guard(admin, tables=["t"])
    assert renew_guard(admin, 2, 30.0)
    app = connect()
    app.execute("INSERT INTO t (v) VALUES ('keep')")
    expire_guard(admin)
    refused(app, "TRUNCATE t")
    assert app.execute("SELECT count(*) FROM t").fetchone() == (1,)


def test_a_manual_update_of_the_lease_row_takes_effect(admin: Any, connect: Connect) -> None:
    install_guard(admin, tables=["t"])
    assert renew_guard(admin, 2, 30.0)
    app = connect()
    assert accepts(app)
    admin.execute("UPDATE tenure.lease SET valid_until = clock_timestamp() - interval '1 second'")
    refused(app, "INSERT INTO t (v) VALUES ('x')")


def test_a_repeatable_read_transaction_sees_later_renewals(admin: Any, connect: Connect) -> None:
    # The check does not read the lease through the transaction's snapshot, so
    # a long transaction keeps writing while the lease is renewed under it.
    install_guard(admin, tables=["t"])
    t0 = time.monotonic()
    assert renew_guard(admin, 4, 1.0)
    app = connect(autocommit=False)
    app.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    app.execute("INSERT INTO t (v) VALUES ('first')")
    assert renew_guard(admin, 4, 30.0)
    wait_for(lambda: time.monotonic() > t0 + 1.2, timeout=5, what="the first lease to pass")
    app.execute("INSERT INTO t (v) VALUES ('second')")
    app.commit()
    assert admin.execute("SELECT count(*) FROM t").fetchone() == (2,)


# --- what is guarded ----------------------------------------------------------------------------


def test_schema_install_covers_its_tables_now_and_later(admin: Any, connect: Connect) -> None:
    admin.execute("CREATE SCHEMA app; CREATE TABLE app.a (v text); CREATE TABLE other (v text);"
                  "CREATE TABLE moved (v text)")
    install_guard(admin, schema="app")
    admin.execute("CREATE TABLE app.b (v text)")
    admin.execute("CREATE TABLE app.c AS SELECT 'x'::text AS v")
    admin.execute("ALTER TABLE moved SET SCHEMA app")
    app = connect()
    for table in ("app.a", "app.b", "app.c", "app.moved"):
        refused(app, f"INSERT INTO {table} (v) VALUES ('x')")
    assert accepts(app, "INSERT INTO other (v) VALUES ('x')")  # not in the schema
    assert accepts(app, "INSERT INTO t (v) VALUES ('x')")
    st = guard_status(admin)
    assert st["schemas"] == ["app"] and st["covers_new_tables"]
    assert set(st["tables"]) == {"app.a", "app.b", "app.c", "app.moved"}
    assert renew_guard(admin, 1, 30.0)
    for table in ("app.a", "app.b", "app.c", "app.moved"):
        assert accepts(app, f"INSERT INTO {table} (v) VALUES ('x')")
    with pytest.raises(ConfigError, match="through schema app"):
        remove_guard(admin, tables=["app.a"])
    remove_guard(admin, schema="app")
    admin.execute("CREATE TABLE app.d (v text)")
    assert triggers(admin, "app.a") == [] and triggers(admin, "app.d") == []


def test_partitions_are_guarded_including_later_ones(admin: Any, connect: Connect) -> None:
    admin.execute("CREATE TABLE parted (k int, v text) PARTITION BY RANGE (k);"
                  "CREATE TABLE p1 PARTITION OF parted FOR VALUES FROM (0) TO (10)")
    install_guard(admin, tables=["parted"])
    admin.execute("CREATE TABLE p2 PARTITION OF parted FOR VALUES FROM (10) TO (20)")
    admin.execute("CREATE TABLE p3 (k int, v text)")
    admin.execute("ALTER TABLE parted ATTACH PARTITION p3 FOR VALUES FROM (20) TO (30)")
    app = connect()
    refused(app, "INSERT INTO parted VALUES (1, 'x')")
    for part, k in (("p1", 1), ("p2", 11), ("p3", 21)):  # a write straight to a partition is checked too
        refused(app, f"INSERT INTO {part} VALUES ({k}, 'x')")
    assert renew_guard(admin, 1, 30.0)
    assert accepts(app, "INSERT INTO p3 VALUES (21, 'x')")
    remove_guard(admin, tables=["parted"])
    assert all(triggers(admin, p) == [] for p in ("parted", "p1", "p2", "p3"))


def test_a_table_that_does_not_exist_is_a_config_error_and_changes_nothing(admin: Any, connect: Connect) -> None:
    with pytest.raises(ConfigError, match="'no_such_table' does not exist"):
        install_guard(admin, tables=["t", "no_such_table"])
    assert admin.execute("SELECT to_regclass('tenure.lease')").fetchone() == (None,)
    assert triggers(admin, "t") == []
    assert accepts(connect())
    # nothing changes on a database that is already guarded either
    admin.execute("CREATE TABLE u (v text)")
    install_guard(admin, tables=["t"])
    with pytest.raises(ConfigError, match="'no_such_table' does not exist"):
        install_guard(admin, tables=["u", "no_such_table"], at_commit=True)
    assert triggers(admin, "u") == [] and triggers(admin, "t") == ["tenure_guard"]
    with pytest.raises(ConfigError, match="'no_such_table' does not exist"):
        remove_guard(admin, tables=["t", "no_such_table"])
    assert triggers(admin, "t") == ["tenure_guard"]


def test_bad_input_is_a_config_error(admin: Any) -> None:
    admin.execute("CREATE VIEW tv AS SELECT * FROM t")
    for kwargs, match in [
        ({}, "nothing to guard"),
        ({"tables": "t"}, "list of table names"),
        ({"tables": [""]}, "non-empty string"),
        ({"tables": ["a.b.c.d"]}, "not a valid table name"),
        ({"tables": ["tv"]}, "not a table"),
        ({"tables": ["pg_catalog.pg_class"]}, "cannot be guarded"),
        ({"schema": "no_such_schema"}, "does not exist"),
        ({"schema": "pg_catalog"}, "cannot be guarded"),
        ({"tables": ["t"], "at_commit": 1}, "bool"),
    ]:
        with pytest.raises(ConfigError, match=match):
            install_guard(admin, **kwargs)
    assert admin.execute("SELECT to_regclass('tenure.lease')").fetchone() == (None,)
    with pytest.raises(ConfigError, match="drop_all"):
        remove_guard(admin, tables=["t"], drop_all=True)
    with pytest.raises(ConfigError):
        remove_guard(admin)
    install_guard(admin, tables=["t"])
    for token in (0, -1, True, 1.5, "3", 2**63):
        with pytest.raises(ConfigError, match="token"):
            renew_guard(admin, token, 10.0)  # type: ignore[arg-type]
    for remaining in (float("nan"), float("inf"), "1", None, 1e12):
        with pytest.raises(ConfigError, match="remaining"):
            renew_guard(admin, 1, remaining)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="drain"):
        expire_guard(admin, drain=-1)
    with admin.transaction():
        with pytest.raises(ConfigError, match="outside a transaction"):
            renew_guard(admin, 1, 10.0)
        with pytest.raises(ConfigError, match="outside a transaction"):
            expire_guard(admin)
    assert guard_status(admin)["token"] is None


def test_renew_and_expire_without_the_guard_are_service_errors(admin: Any) -> None:
    assert guard_status(admin)["installed"] is False
    with pytest.raises(ServiceError, match="tenure.lease"):
        renew_guard(admin, 1, 10.0)
    with pytest.raises(ServiceError):
        expire_guard(admin)


# --- the window between a write and its commit --------------------------------------------------


@pytest.mark.parametrize("at_commit", [False, True])
def test_a_transaction_that_wrote_before_expiry_and_commits_after(admin: Any, connect: Connect,
                                                                  at_commit: bool) -> None:
    install_guard(admin, tables=["t"], at_commit=at_commit)
    assert renew_guard(admin, 8, 0.5)
    app = connect(autocommit=False)
    app.execute("INSERT INTO t (v) VALUES ('wrote in time')")
    probe = connect()
    wait_for(lambda: not accepts(probe), timeout=5, what="the lease to run out")
    if at_commit:
        # checked again at COMMIT: the write is rolled back
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match=r"expired at .* \(token 8\)"):
            app.commit()
        assert admin.execute("SELECT count(*) FROM t WHERE v = 'wrote in time'").fetchone() == (0,)
    else:
        # the documented window: statements are checked when they start
        app.commit()
        assert admin.execute("SELECT count(*) FROM t WHERE v = 'wrote in time'").fetchone() == (1,)


# --- synchronous standbys and a frozen sidecar --------------------------------------------------


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def test_a_renewal_does_not_wait_for_a_synchronous_standby(postgres: LocalPostgres, admin: Any,
                                                           connect: Connect) -> None:
    install_guard(admin, tables=["t"])
    assert renew_guard(admin, 1, 30.0)
    server = psycopg.connect(postgres.dsn, autocommit=True)

    def setting() -> str:
        with psycopg.connect(postgres.dsn, autocommit=True) as c:
            return c.execute("SHOW synchronous_standby_names").fetchone()[0]

    blocked = connect()
    try:
        server.execute("ALTER SYSTEM SET synchronous_standby_names = 'tenure_no_such_standby'")
        server.execute("SELECT pg_reload_conf()")
        wait_for(lambda: setting() == "tenure_no_such_standby", timeout=10, what="the reload")
        # Control: an ordinary commit now waits for a standby that never comes.
        th, _ = _in_thread(lambda: blocked.execute("INSERT INTO t (v) VALUES ('waits')"))
        th.join(0.5)
        assert th.is_alive(), "a plain commit did not wait for the synchronous standby"
        th, out = _in_thread(lambda: renew_guard(admin, 1, 30.0))
        th.join(5.0)
        if th.is_alive():
            admin.cancel()
            th.join(5.0)
            pytest.fail("renew_guard waited for the synchronous standby")
        assert out.get("value") is True, out
        th, out = _in_thread(lambda: expire_guard(admin))
        th.join(5.0)
        if th.is_alive():
            admin.cancel()
            th.join(5.0)
            pytest.fail("expire_guard waited for the synchronous standby")
        assert "error" not in out, out
    finally:
        server.execute("ALTER SYSTEM RESET synchronous_standby_names")
        server.execute("SELECT pg_reload_conf()")
        wait_for(lambda: setting() == "", timeout=10, what="the reload")
        blocked.cancel()  # release the control's wait, if it is still waiting
        server.close()


_SIDECAR = """
import sys, time, psycopg
from tenure.services.pg_guard import renew_guard
conn = psycopg.connect(sys.argv[1], autocommit=True)
first = True
while True:
    renew_guard(conn, 42, 0.6)
    if first:
        print("renewing", flush=True)
        first = False
    time.sleep(0.1)
"""


def test_a_frozen_sidecar_leaves_a_fenced_primary(admin: Any, dsn: str, connect: Connect) -> None:
    install_guard(admin, tables=["t"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"),
         os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _SIDECAR, dsn], stdout=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "renewing"
        app = connect()
        wait_for(lambda: accepts(app), timeout=5, what="writes while the sidecar renews")
        os.kill(proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_for(lambda: not accepts(app), timeout=5, what="the primary to fence itself")
        # its last renewal granted at most 0.6 s
        assert time.monotonic() - stopped < 0.6 + 1.0
        err = refused(app, "INSERT INTO t (v) VALUES ('after')")
        assert "(token 42)" in str(err)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
