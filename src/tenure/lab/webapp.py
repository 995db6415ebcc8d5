"""A small web app on the router, served in-process, and HTTP clients that keep a light load on it.

The app (WSGI, behind :class:`~tenure.web.ReadOnlyMiddleware`) answers
``GET /`` with a count read from a replica and ``POST /`` by inserting a row
on the primary, saying which member and term took it. :class:`HttpLoad`
sends both and counts what a user would have seen: reads served, writes
served, writes held (answered, but slower than usual because they waited for
a new primary), writes refused (503) and other failures.
"""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..web import ReadOnlyMiddleware, Router

HELD_AFTER = 0.1  # s: a write slower than this waited for a new primary


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base class's name
        pass


def make_app(router: Router, service: str) -> Any:
    """The WSGI app: GET reads through the router's replicas, POST writes to the primary."""
    provider = router.postgres(service)
    ids = itertools.count(int(time.time() * 1000) * 1000)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["REQUEST_METHOD"] == "POST":
            with provider.write() as conn:
                p = provider.view.primary
                conn.execute("INSERT INTO items VALUES (%s, 'web', %s)", (next(ids), time.time()))
            body = {"member": p.member if p else None, "token": p.token if p else None}
        else:
            with provider.read() as conn:
                row = conn.execute("SELECT count(*) FROM items").fetchone()
            body = {"rows": row[0] if row else 0}
        data = json.dumps(body).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    return ReadOnlyMiddleware(app, router, service, retry_after=2), provider


class WebApp:
    """The app on 127.0.0.1 (a free port), in a thread."""

    def __init__(self, endpoints: list[str], service: str) -> None:
        self.router = Router(endpoints)
        app, self.provider = make_app(self.router, service)
        self.server = make_server("127.0.0.1", 0, app, server_class=_Server, handler_class=_Quiet)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True, name="demo-webapp")
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.provider.close()
        self.router.close()


@dataclass
class Seen:
    """What the users of the web app saw."""

    reads: int = 0
    writes: int = 0
    held: int = 0
    refused: int = 0
    failed: int = 0
    longest_write: float = 0.0
    by_token: dict[int, tuple[float, str]] = field(default_factory=dict)  # token -> (first write time, member)
    last_token: int | None = None

    def copy(self) -> "Seen":
        return Seen(self.reads, self.writes, self.held, self.refused, self.failed, self.longest_write,
                    dict(self.by_token), self.last_token)


class HttpLoad:
    """``writers`` + ``readers`` clients, each one request every ``interval`` s, until :meth:`stop`."""

    def __init__(self, port: int, *, writers: int = 2, readers: int = 2, interval: float = 0.05) -> None:
        self.port = port
        self.interval = interval
        self.seen = Seen()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=("POST",), daemon=True) for _ in range(writers)]
        self._threads += [threading.Thread(target=self._run, args=("GET",), daemon=True) for _ in range(readers)]
        for t in self._threads:
            t.start()

    def _run(self, method: str) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            status, body = 0, b""
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request(method, "/", body=b"" if method == "POST" else None)
                r = conn.getresponse()
                status, body = r.status, r.read()
                conn.close()
            except OSError:
                status = 0
            took = time.monotonic() - t0
            with self._lock:
                s = self.seen
                if status == 200 and method == "GET":
                    s.reads += 1
                elif status == 200:
                    s.writes += 1
                    s.longest_write = max(s.longest_write, took)
                    if took > HELD_AFTER:
                        s.held += 1
                    try:
                        info = json.loads(body)
                    except ValueError:
                        info = {}
                    token = info.get("token")
                    if isinstance(token, int):
                        s.last_token = token
                        s.by_token.setdefault(token, (time.monotonic(), str(info.get("member"))))
                elif status == 503 and method == "POST":
                    s.refused += 1
                else:
                    s.failed += 1
            self._stop.wait(self.interval)

    def snapshot(self) -> Seen:
        with self._lock:
            return self.seen.copy()

    def stop(self) -> Seen:
        self._stop.set()
        for t in self._threads:
            t.join(15)
        return self.snapshot()
