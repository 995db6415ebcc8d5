"""Real gunicorn workers behind the router and the middleware, under load, while the PostgreSQL primary is killed.

Two applications run side by side on the same failover cluster: a plain WSGI
app writing through ``router.postgres`` (``make_app`` below, loaded by
gunicorn as ``test_wsgi:make_app()``) and ``examples/webpy_app.py``.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs

import pytest

from tenure.lab.cluster import FailoverCluster
from tenure.lab.etcd import LocalEtcd, free_ports

from support import wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples")
REQUEST_TIMEOUT = 5.0
WORKERS = 3


# -- the application under test (runs in the gunicorn workers) ----------------------------------

def make_app() -> Callable[..., Iterable[bytes]]:
    """A WSGI app: GET reads from a replica, POST inserts into ``items`` on the primary."""
    import logging

    from psycopg.conninfo import conninfo_to_dict

    from tenure.errors import ReadOnly
    from tenure.web import Router
    from tenure.web.wsgi import ReadOnlyMiddleware

    log = logging.getLogger("test_wsgi.app")
    logging.basicConfig(level=logging.WARNING, format="%(process)d %(relativeCreated)d %(name)s %(message)s")
    logging.getLogger("tenure.web").setLevel(logging.DEBUG)

    service = os.environ["TENURE_DB_SERVICE"]
    router = Router(os.environ["TENURE_ETCD"].split(","))  # built in the master; watches start in each worker
    provider = router.postgres(service, timeout=1.0, cooldown=0.5)
    view = router.service(service)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return handle(environ, start_response)
        except ReadOnly as e:
            log.warning("%.3f %s refused: %s", time.monotonic(), environ["REQUEST_METHOD"], e)
            raise
        except Exception:
            log.exception("request failed")
            raise

    def handle(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body: dict[str, Any]
        if environ["REQUEST_METHOD"] == "POST":
            row_id = int(parse_qs(environ.get("QUERY_STRING", ""))["id"][0])
            with provider.write() as conn:
                conn.execute("INSERT INTO items VALUES (%s, %s, %s)", (row_id, f"web-{os.getpid()}", time.time()))
                port = str(conn.info.port)
            # Which server took the write, by its port: the test checks no write landed on the dead one.
            member = next((m for m, rec in view.members.items()
                           if conninfo_to_dict(rec.get("dsn") or "").get("port") == port), None)
            body = {"ok": True, "member": member, "port": port}
        else:
            with provider.read() as conn:
                conn.execute("SELECT 1").fetchone()
            body = {"read_only": environ["tenure.read_only"], "pid": os.getpid()}
        data = json.dumps(body).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    return ReadOnlyMiddleware(app, router, service, retry_after=1)


# -- harness ------------------------------------------------------------------------------------

class Gunicorn:
    def __init__(self, app: str, chdir: str, env: dict[str, str], log_path: str) -> None:
        self.port = free_ports(1)[0]
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-w", str(WORKERS), "-b", f"127.0.0.1:{self.port}",
                 "--chdir", chdir, "--timeout", "30", "--graceful-timeout", "3", "--log-level", "warning", app],
                env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-8000:]


@dataclass
class Result:
    app: str
    method: str
    start: float
    end: float
    status: int  # 0: no answer (exception)
    body: bytes
    retry_after: str | None = None
    error: str | None = None


def request(port: int, method: str, path: str) -> tuple[int, bytes, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Retry-After")
    finally:
        conn.close()


class Load:
    """Threads doing GET and POST in a loop against each app, recording every answer (bounded by ``stop``)."""

    def __init__(self, apps: dict[str, int], *, getters: int = 1, posters: int = 2, paths: dict[str, str]) -> None:
        self.results: list[Result] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.ids = itertools.count(1_000_000)
        self.threads = []
        for name, port in apps.items():
            for method, n in (("GET", getters), ("POST", posters)):
                for _ in range(n):
                    t = threading.Thread(target=self.run, args=(name, port, method, paths[name]), daemon=True)
                    self.threads.append(t)
        for t in self.threads:
            t.start()

    def run(self, app: str, port: int, method: str, path: str) -> None:
        while not self.stop.is_set():
            p = f"{path}?id={next(self.ids)}" if method == "POST" else "/"
            start = time.monotonic()
            try:
                status, body, retry = request(port, method, p)
                r = Result(app, method, start, time.monotonic(), status, body, retry)
            except Exception as e:  # noqa: BLE001 -- a timeout or a reset is a result to report
                r = Result(app, method, start, time.monotonic(), 0, b"", None, repr(e))
            with self.lock:
                self.results.append(r)
            self.stop.wait(0.01)

    def finish(self) -> list[Result]:
        self.stop.set()
        for t in self.threads:
            t.join(REQUEST_TIMEOUT + 5)
        with self.lock:
            return list(self.results)

    def snapshot(self) -> list[Result]:
        with self.lock:
            return list(self.results)


def test_gunicorn_workers_go_read_only_during_failover_and_write_to_the_new_primary(
        cluster: FailoverCluster, etcd: LocalEtcd, tmp_path: Any) -> None:
    first = cluster.wait_primary(30)
    env = {"TENURE_ETCD": ",".join(etcd.endpoints), "TENURE_DB_SERVICE": cluster.service,
           "PYTHONPATH": os.pathsep.join([os.path.join(os.path.dirname(HERE), "src"), HERE])}
    servers = {
        "plain": Gunicorn("test_wsgi:make_app()", HERE, env, str(tmp_path / "plain.log")),
        "webpy": Gunicorn("webpy_app:wsgi()", EXAMPLES, env, str(tmp_path / "webpy.log")),
    }
    paths = {"plain": "/", "webpy": "/items"}
    load: Load | None = None
    try:
        for name, g in servers.items():
            wait_for(lambda: _ok(g.port, "GET", "/"), 30, f"{name}: GET 200")
            wait_for(lambda: _ok(g.port, "POST", f"{paths[name]}?id={next(_warm_ids)}"), 30, f"{name}: POST 200")
        load = running = Load({n: g.port for n, g in servers.items()}, paths=paths)
        wait_for(lambda: sum(r.status == 200 and r.method == "POST" for r in running.snapshot()) > 20, 10,
                 "writes flowing before the kill")

        t_kill = time.monotonic()
        cluster.sidecar(first["member"]).kill_with_postgres()
        new = cluster.wait_primary(30, not_member=first["member"])

        def written_on_new(app: str) -> bool:
            return any(r.app == app and r.method == "POST" and r.status == 200 and r.start > t_kill
                       and json.loads(r.body).get("member") == new["member"] for r in running.snapshot())

        for name in servers:
            wait_for(lambda: written_on_new(name), 30, f"{name}: a write accepted by the new primary")
        t_new = time.monotonic()
        wait_for(lambda: time.monotonic() > t_new + 1.0, 2, "one more second of load")
        results = load.finish()
        load = None
    finally:
        if load is not None:
            load.finish()
        for name, g in servers.items():
            g.stop()
            if sys.exc_info()[0] is not None:
                print(f"----- gunicorn {name}\n{g.log()}")

    try:
        for name in servers:
            _check(name, results, t_kill, first, new)
    except AssertionError:
        for name, g in servers.items():
            print(f"----- gunicorn {name}\n{g.log()}")
        raise


def _check(name: str, results: list[Result], t_kill: float, first: dict[str, Any], new: dict[str, Any]) -> None:
    """The load generator's view of one app through the failover; prints the read-only window."""
    rs = [r for r in results if r.app == name]
    gets = [r for r in rs if r.method == "GET"]
    posts = [r for r in rs if r.method == "POST"]
    failed_gets = [r for r in gets if r.status != 200]
    assert not failed_gets, f"{name}: GETs failed: {failed_gets[:5]}"
    slow = [r for r in rs if r.end - r.start >= REQUEST_TIMEOUT]
    assert not slow and not [r for r in rs if r.status == 0], f"{name}: requests hung or got no answer: {slow[:5]}"
    other = [r for r in posts if r.status not in (200, 503)]
    assert not other, f"{name}: POSTs answered neither 200 nor 503: {other[:5]}"
    refused = [r for r in posts if r.status == 503]
    assert refused, f"{name}: no POST was refused with 503 during the failover"
    assert all(r.retry_after for r in refused), f"{name}: a 503 without Retry-After"
    early = [(round(r.start - t_kill, 3), round(r.end - r.start, 3)) for r in refused if r.start <= t_kill - 0.05]
    assert not early, f"{name}: 503s before the kill (start - t_kill, duration): {early[:10]}"
    ok_after = [r for r in posts if r.status == 200 and r.start > t_kill]
    assert ok_after and all(json.loads(r.body)["member"] == new["member"] for r in ok_after
                            if r.start > max(x.end for x in refused)), f"{name}: writes after the gap went elsewhere"
    stale_ok = [r for r in posts if r.status == 200 and r.end > t_kill + 0.5
                and json.loads(r.body).get("member") == first["member"]]
    assert not stale_ok, f"{name}: writes accepted by the killed primary after the kill: {stale_ok[:3]}"
    first_503 = min(r.start for r in refused)
    last_503 = max(r.end for r in refused)
    first_new = min(r.end for r in ok_after if json.loads(r.body)["member"] == new["member"])
    print(f"{name}: {len(gets)} GETs (all 200, max {max(r.end - r.start for r in gets):.3f} s), "
          f"{len(posts)} POSTs ({len(refused)} x 503); kill -> first 503 {first_503 - t_kill:.2f} s, "
          f"read-only window seen by the load generator {first_new - first_503:.2f} s "
          f"(kill -> first write on {new['member']} {first_new - t_kill:.2f} s, last 503 at "
          f"{last_503 - t_kill:.2f} s); max POST latency {max(r.end - r.start for r in posts):.3f} s")


_warm_ids = itertools.count(1)


def test_middleware_in_process(client: Any, service: str, etcd: LocalEtcd) -> None:
    """The middleware's contract, called directly: flag, 503 + Retry-After + body, ReadOnly from the app, bad input."""
    from tenure.errors import ConfigError, ReadOnly
    from tenure.web import Router
    from tenure.web.wsgi import ReadOnlyMiddleware, is_read_only

    from test_router import publish_primary

    calls: list[dict[str, Any]] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        calls.append(environ)
        if environ.get("PATH_INFO") == "/raise":
            raise ReadOnly("primary gone mid-request")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    def call(mw: ReadOnlyMiddleware, method: str, path: str = "/") -> tuple[str, dict[str, str], bytes]:
        got: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            got["status"], got["headers"] = status, dict(headers)

        body = b"".join(mw({"REQUEST_METHOD": method, "PATH_INFO": path}, start_response))
        return got["status"], got["headers"], body

    router = Router(client)
    try:
        with pytest.raises(ConfigError, match="retry_after"):
            ReadOnlyMiddleware(app, router, service, retry_after=-1)
        with pytest.raises(ConfigError, match="Router"):
            ReadOnlyMiddleware(app, object(), service)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="service name"):
            ReadOnlyMiddleware(app, router, "no such/name")
        mw = ReadOnlyMiddleware(app, router, service, retry_after=7, body="back soon", content_type="text/plain")
        # No primary yet: writes refused without reaching the app, reads pass with the flag set.
        for method in ("POST", "PUT", "PATCH", "DELETE", "post"):
            status, headers, body = call(mw, method)
            assert status.startswith("503") and headers["Retry-After"] == "7" and body == b"back soon"
        assert not calls
        assert call(mw, "GET")[0] == "200 OK" and calls[-1]["tenure.read_only"] is True and is_read_only(calls[-1])
        assert call(mw, "HEAD")[0] == "200 OK"
        term = publish_primary(client, service, "a", "host=a")
        router.service(service).wait_for_primary(10)
        assert call(mw, "POST")[0] == "200 OK" and calls[-1]["tenure.read_only"] is False
        status, headers, body = call(mw, "POST", "/raise")  # the app found the primary gone: same 503
        assert status.startswith("503") and body == b"back soon"
        term.resign()
        wait_for(lambda: call(mw, "POST")[0].startswith("503"), 5, "writes refused once the term ended")
    finally:
        router.close()


def _ok(port: int, method: str, path: str) -> bool:
    try:
        return request(port, method, path)[0] == 200
    except OSError:
        return False
