"""tenure.web.webpy, dberrors, the read-only allowlist, /health and psycopg2 support, with real web.py,
psycopg2, psycopg 3, PostgreSQL and etcd (the routing records are published by the test itself)."""

from __future__ import annotations

import io
import json
import threading
from typing import Any, Callable
from wsgiref.util import setup_testing_defaults

import psycopg
import psycopg2
import pytest
import web

import tenure
from tenure import records
from tenure.errors import ConfigError, Fenced, PrimaryUnavailable, ReadOnly, UnknownService
from tenure.lab.etcd import free_ports
from tenure.records import MemberRecord
from tenure.web import Router
from tenure.web import dberrors, pg2, webpy
from tenure.web.webpy import WebSettings

from support import LocalPostgres, wait_for
from test_router import publish_primary

web.config.debug = False


def _closed_port() -> int:
    return free_ports(1)[0]


def _error(call: Callable[[], Any]) -> BaseException:
    try:
        call()
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("no error")


def test_errors_from_both_drivers_and_from_webpy_are_classified(postgres: LocalPostgres) -> None:
    ro = "-c default_transaction_read_only=on"
    for connect in (lambda **kw: psycopg2.connect(postgres.dsn, **kw), lambda **kw: psycopg.connect(postgres.dsn, **kw)):
        with connect(options=ro) as conn:
            e = _error(lambda: conn.cursor().execute("CREATE TABLE nope (x int)"))
            assert dberrors.sqlstate(e) == "25006" and dberrors.classify(e) == dberrors.READ_ONLY
            assert dberrors.is_read_only_error(e)
        with connect() as conn:
            e = _error(lambda: conn.cursor().execute("SELEC 1"))
            assert dberrors.classify(e) is None  # a query error is the application's
    for e in (_error(lambda: psycopg2.connect(host="127.0.0.1", port=_closed_port(), connect_timeout=2)),
              _error(lambda: psycopg.connect(host="127.0.0.1", port=_closed_port(), connect_timeout=2))):
        assert dberrors.classify(e) == dberrors.UNAVAILABLE and dberrors.is_connection_error(e)
    assert dberrors.classify(PrimaryUnavailable("gone")) == dberrors.UNAVAILABLE
    assert dberrors.classify(ReadOnly("no primary")) == dberrors.READ_ONLY
    assert dberrors.classify(ValueError("x")) is None

    # web.py's own rollback on a connection the server closed: InterfaceError, the cause in __context__.
    db = web.database(dbn="postgres", host="127.0.0.1", port=postgres.port, user="postgres", db="postgres")
    pid = db.query("SELECT pg_backend_pid() AS pid")[0].pid
    with psycopg.connect(postgres.dsn, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", (pid,))
    wait_for(lambda: _gone(postgres, pid), 5, "the backend to go")
    e = _error(lambda: db.query("SELECT 1"))
    assert type(e).__name__ == "InterfaceError" and "already closed" in str(e)
    assert dberrors.classify_one(e) == dberrors.UNAVAILABLE
    assert any(type(x).__name__ == "OperationalError" for x in dberrors.chain(e)[1:])


def _gone(postgres: LocalPostgres, pid: int) -> bool:
    with psycopg.connect(postgres.dsn) as c:
        return c.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0] == 0


def test_processor_answers_503_with_retry_after_and_retries_reads(postgres: LocalPostgres) -> None:
    good = web.database(dbn="postgres", host="127.0.0.1", port=postgres.port, user="postgres", db="postgres")
    ro = web.database(dbn="postgres", host="127.0.0.1", port=postgres.port, user="postgres", db="postgres",
                      options="-c default_transaction_read_only=on")
    down = web.database(dbn="postgres", host="127.0.0.1", port=_closed_port(), user="postgres", connect_timeout=2)
    attempts: list[str] = []

    class Ro:
        def POST(self) -> str:
            web.header("X-Before", "1")
            ro.query("CREATE TABLE nope (x int)")
            return "written"

    class Down:
        def GET(self) -> str:
            return str(down.query("SELECT 1"))

    class Flaky:  # the first attempt's connection is cut by the server (57P01), as a standby restart does
        def GET(self) -> str:
            attempts.append(web.ctx.method)
            if len(attempts) == 1:
                good.query("SELECT pg_terminate_backend(pg_backend_pid())")
            return "read " + str(good.query("SELECT 1 AS one")[0].one)

        POST = GET

    class Bug:
        def GET(self) -> str:
            return str(1 // 0)

    app = web.application(("/ro", "Ro", "/down", "Down", "/flaky", "Flaky", "/bug", "Bug"), locals(), autoreload=False)
    app.add_processor(webpy.unavailable_processor(retry_after=7, retry_delay=0.01))

    r = app.request("/ro", method="POST")
    assert r.status.startswith("503") and r.headers["Retry-After"] == "7" and "Read-only" in r.data.decode()
    assert "X-Before" not in r.headers and r.headers["Content-Type"].startswith("text/html")
    r = app.request("/down")
    assert r.status.startswith("503") and r.headers["Retry-After"] == "7"
    r = app.request("/flaky")
    assert r.status.startswith("200") and r.data == b"read 1" and attempts == ["GET", "GET"]
    attempts.clear()
    r = app.request("/flaky", method="POST")  # a write is never replayed
    assert r.status.startswith("503") and attempts == ["POST"]
    assert app.request("/bug").status.startswith("500")  # other errors stay errors
    with pytest.raises(ConfigError):
        webpy.unavailable_processor(retry_after=-1)


def _call(app: Callable[..., Any], method: str, path: str, query: str = "") -> tuple[str, dict[str, str], bytes]:
    environ: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
                               "wsgi.input": io.BytesIO(b"")}
    setup_testing_defaults(environ)
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        got["status"], got["headers"] = status, dict(headers)

    body = b"".join(app(environ, start_response))
    return got["status"], got["headers"], body


def _member(client: tenure.Client, service: str, name: str, dsn: str, *, role: str = "standby",
            streaming: bool = True, replayed: int = 1000, leader: bool = False) -> None:
    rec = MemberRecord(member=name, role=role, healthy=True, dsn=dsn, streaming=streaming, leader=leader,
                       position=replayed, extra={"wal_replayed": replayed, "wal_current": replayed})
    client.put(records.member_key(service, name), rec.encode())


def test_routed_databases_follow_the_view_read_only_mode_and_health(client: tenure.Client, service: str,
                                                                     postgres: LocalPostgres) -> None:
    port = postgres.port
    primary_dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    router = Router(client)
    try:
        params = {"dbn": "postgres", "host": "ignored.invalid", "port": 1, "db": "postgres", "user": "postgres"}
        db = webpy.database(router, service, **params)
        reader = webpy.database(router, service, role="reader", max_lag_bytes=100, **params)
        psy3 = webpy.database(router, service, role="reader", driver="psycopg", max_lag_bytes=100, **params)
        for bad in ({"role": "writer"}, {"driver": "mysql"}, {"max_lag_bytes": -1}, {"dbn": "mysql"}):
            with pytest.raises(ConfigError):
                webpy.database(router, service, **{**params, **bad})

        class Read:
            def GET(self) -> str:
                n = reader.query("SELECT 1 AS one")[0].one
                return json.dumps({"n": n, "member": reader.endpoint().member, "banner": webpy.read_only()})

        class Read3:
            def GET(self) -> str:
                return json.dumps({"n": psy3.query("SELECT 1 AS one")[0].one, "member": psy3.endpoint().member})

        class Primary:  # reads through the primary's object, as most Open Library pages do
            def GET(self) -> str:
                db.query("SELECT 1")
                return json.dumps({"member": db.endpoint().member})

            def POST(self) -> str:
                db.query("CREATE TABLE IF NOT EXISTS webpy_t (x int)")
                return json.dumps({"member": db.endpoint().member})

        class Login(Primary):
            POST = Primary.GET

        class WritingGet(Primary):
            GET = Primary.POST

        app = web.application(("/read", "Read", "/read3", "Read3", "/primary", "Primary", "/account/login", "Login",
                               "/writing-get", "WritingGet"), locals(), autoreload=False)
        wsgi = webpy.wsgi(app, router, WebSettings(service=service, retry_after=3, allow=["POST /account/login"]))

        # No keys yet: read-only; nothing to read from either -> 503, never 500.
        status, headers, _ = _call(wsgi, "POST", "/primary")
        assert status.startswith("503") and headers["Retry-After"] == "3"
        status, _, body = _call(wsgi, "GET", "/health")
        assert status.startswith("503") and json.loads(body)["services"][service]["read_only"] is True

        term = publish_primary(client, service, "p", primary_dsn)
        _member(client, service, "p", primary_dsn, role="primary", streaming=False, replayed=1000, leader=True)
        _member(client, service, "near", f"{primary_dsn} application_name=near", replayed=990)
        _member(client, service, "far", f"{primary_dsn} application_name=far", replayed=10)
        router.service(service).wait_for_primary(10)
        wait_for(lambda: len(router.service(service).replicas) == 2, 10, "both replicas in the view")

        assert json.loads(_call(wsgi, "POST", "/primary")[2])["member"] == "p"
        seen = {json.loads(_call(wsgi, "GET", "/read")[2])["member"] for _ in range(6)}
        assert seen == {"near"}, "reads go to the replica within the lag bound"
        assert json.loads(_call(wsgi, "GET", "/read3")[2])["member"] == "near"  # psycopg 3 as well
        status, _, body = _call(wsgi, "GET", "/health")
        rep = json.loads(body)["services"][service]
        assert status.startswith("200") and rep["primary"]["member"] == "p" and rep["etcd_fresh"]
        assert sorted(rep["replicas"]) == ["far", "near"]

        # The replica within the bound dies: reads fall back to the primary, then the far one.
        _member(client, service, "near", f"host=127.0.0.1 port={_closed_port()} user=postgres", replayed=990)
        wait_for(lambda: f"port={port}" not in str(router.service(service).peek().members["near"].get("dsn")),
                 10, "the new near record")
        assert json.loads(_call(wsgi, "GET", "/read")[2])["member"] == "p"

        # The term ends: read-only. Writes get the 503 page; reads and the allowlisted login go on
        # from a standby; a GET that writes gets the 503 page, never a 500.
        term.resign()
        wait_for(lambda: router.service(service).read_only, 10, "read-only")
        status, headers, _ = _call(wsgi, "POST", "/primary")
        assert status.startswith("503") and headers["Retry-After"] == "3"
        status, _, body = _call(wsgi, "GET", "/read")
        assert status.startswith("200") and json.loads(body)["banner"] is True
        for method, path in (("GET", "/primary"), ("POST", "/account/login")):
            status, _, body = _call(wsgi, method, path)
            assert status.startswith("200") and json.loads(body)["member"] in ("p", "far"), (method, path, body)
        assert _call(wsgi, "GET", "/writing-get")[0].startswith("503")
        assert _call(wsgi, "POST", "/account/logout")[0].startswith("503")  # not on the allowlist
        status, _, body = _call(wsgi, "GET", "/health")
        assert status.startswith("200") and json.loads(body)["services"][service]["primary"] is None
        assert _call(wsgi, "GET", "/health", "require=primary")[0].startswith("503")
    finally:
        router.close()


def test_psycopg2_provider_pool_and_fence(client: tenure.Client, service: str, postgres: LocalPostgres) -> None:
    dsn = f"host=127.0.0.1 port={postgres.port} user=postgres dbname=postgres"
    router = Router(client)
    try:
        pg = router.postgres(service, driver="psycopg2", timeout=1.0, cooldown=0.2)
        with pytest.raises(UnknownService):  # no keys at all for the service yet
            with pg.write():
                pass
        term = publish_primary(client, service, "p", dsn)
        router.service(service).wait_for_primary(10)
        with pg.write() as conn:
            assert isinstance(conn, psycopg2.extensions.connection)
            with conn.cursor() as cur:
                cur.execute("CREATE TABLE IF NOT EXISTS pg2_items (id int PRIMARY KEY)")
                cur.execute("INSERT INTO pg2_items VALUES (1) ON CONFLICT DO NOTHING")
        with pg.read() as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg2_items")
            assert cur.fetchone()[0] == 1
        with pytest.raises(PrimaryUnavailable, match="read-only"):  # SQLSTATE 25006 from psycopg2
            with pg.write() as conn, conn.cursor() as cur:
                cur.execute("SET TRANSACTION READ ONLY")
                cur.execute("INSERT INTO pg2_items VALUES (2)")
        with pytest.raises(ConfigError):
            router.postgres(service + "x", driver="psycopg4")
        term.resign()
    finally:
        router.close()

    # The pool on its own: bounded, a dead server refuses at once, closing refuses takers.
    pool = pg2.Pool(dsn, min_size=1, max_size=1, name="t")
    a = pool.getconn(1.0)
    with pytest.raises(pg2.PoolTimeout):
        pool.getconn(0.1)
    threading.Timer(0.1, pool.putconn, (a,)).start()
    pool.putconn(pool.getconn(2.0))
    pool.close()
    with pytest.raises(pg2.PoolClosed):
        pool.getconn(0.1)
    with pytest.raises(pg2.PoolTimeout, match="could not connect"):
        pg2.Pool(f"host=127.0.0.1 port={_closed_port()} connect_timeout=2", min_size=0).getconn(1.0)

    # The fence helpers on psycopg2 connections.
    a, b = psycopg2.connect(dsn), psycopg2.connect(dsn)
    try:
        pg2.install_pg_fence(a)
        pg2.pg_fence(a, f"res-{service}", 10)
        a.commit()
        with pytest.raises(Fenced):
            pg2.pg_fence(b, f"res-{service}", 9)
        b.rollback()
    finally:
        a.close()
        b.close()
