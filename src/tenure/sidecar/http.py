"""The sidecar's HTTP endpoints, for haproxy health checks and Prometheus.

Patroni's paths, so existing haproxy configurations keep working:

``/primary`` (also ``/master``, ``/leader``, ``/read-write``)
    200 only if this member leads, its lease is valid and the server is a
    writable primary; 503 otherwise.
``/replica``
    200 for a healthy standby that is streaming, or streamed within
    ``?staleness=SECONDS`` (default 5: a walreceiver reconnecting through a
    failover); ``?lag=BYTES`` also requires it to be at most that far behind
    the last primary position it saw.
``/read-only``
    200 if the server can serve reads (primary or standby).
``/health``
    200 if the server is running.
``/status``
    the sidecar's view as JSON (always 200).
``/metrics``
    Prometheus metrics.

GET (and HEAD) only: nothing changes state over HTTP.

The endpoint cannot be used to starve the sidecar: a connection must send its
request within :data:`REQUEST_TIMEOUT`, at most :data:`MAX_CONNECTIONS` are
served at once, and when that many are open the oldest one that has not sent
a request is closed to make room, so a fresh health check is always answered.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

MAX_CONNECTIONS = 64  # served at once; each holds a thread and a descriptor
REQUEST_TIMEOUT = 2.0  # seconds a connection may take to send its request (and between keep-alive requests)

if TYPE_CHECKING:
    from ..election import Leadership
    from .policy import NodeState


class Observable(Protocol):
    """What the endpoints read of a sidecar (:class:`tenure.sidecar.loop.Sidecar` is one)."""

    status: "NodeState | None"
    leadership: "Leadership | None"

    def lag(self) -> int | None: ...

    def streamed_within(self, seconds: float) -> bool: ...

    def snapshot(self) -> dict[str, Any]: ...


def _checks(sidecar: Observable, path: str, query: dict[str, list[str]]) -> tuple[int, Any] | None:
    st = sidecar.status
    healthy = st is not None and st.healthy
    if path in ("/primary", "/master", "/leader", "/read-write"):
        leadership = sidecar.leadership
        ok = (healthy and leadership is not None and leadership.is_valid() and st is not None
              and st.role == "primary" and st.writable)
        return (200 if ok else 503), {"role": st.role if st else "down", "leader": bool(ok)}
    if path == "/replica":
        # A standby whose walreceiver is reconnecting (e.g. while the primary fails over) keeps
        # serving reads for ``staleness`` seconds (default 5) after it last streamed.
        try:
            staleness = float(query.get("staleness", ["5"])[0])
        except ValueError:
            return 400, {"error": "staleness must be a number of seconds"}
        ok = (healthy and st is not None and st.role == "standby"
              and (st.streaming or sidecar.streamed_within(staleness)))
        lag = None
        if ok and st is not None and "lag" in query:
            try:
                limit = int(query["lag"][0])
            except ValueError:
                return 400, {"error": "lag must be an integer number of bytes"}
            lag = sidecar.lag()
            ok = lag is not None and lag <= limit
        return (200 if ok else 503), {"role": st.role if st else "down", "streaming": bool(st and st.streaming),
                                      "lag": lag}
    if path == "/read-only":
        ok = healthy and st is not None and st.role in ("primary", "standby")
        return (200 if ok else 503), {"role": st.role if st else "down"}
    if path == "/health":
        return (200 if healthy else 503), {"healthy": healthy}
    if path == "/status":
        return 200, sidecar.snapshot()
    return None


def handler_for(sidecar: Observable) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "tenure-sidecar"
        timeout = REQUEST_TIMEOUT  # an idle connection is closed, not kept for ever

        def handle_one_request(self) -> None:
            server = self.server
            if isinstance(server, CappedHTTPServer):
                server.mark(self.connection, busy=False)
            super().handle_one_request()

        def parse_request(self) -> bool:
            server = self.server
            if isinstance(server, CappedHTTPServer):
                server.mark(self.connection, busy=True)
            return super().parse_request()

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlsplit(self.path)
            if url.path == "/metrics":
                return self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            result = _checks(sidecar, url.path.rstrip("/") or "/", parse_qs(url.query))
            if result is None:
                return self._send(404, b'{"error": "not found"}\n', "application/json")
            code, body = result
            self._send(code, (json.dumps(body, default=str) + "\n").encode(), "application/json")

        do_HEAD = do_GET

        def _refuse(self) -> None:
            self.send_response(405)
            self.send_header("Allow", "GET, HEAD")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

        def log_message(self, format: str, *args: Any) -> None:  # haproxy polls often: stay quiet
            pass

    return Handler


class CappedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that serves at most :data:`MAX_CONNECTIONS` connections at once."""

    request_queue_size = 128
    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._conns: dict[socket.socket, tuple[float, bool]] = {}  # open connection -> (opened, busy)
        self._conns_lock = threading.Lock()

    def mark(self, conn: socket.socket, *, busy: bool) -> None:
        with self._conns_lock:
            if conn in self._conns:
                self._conns[conn] = (self._conns[conn][0], busy)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self._conns_lock:
            if len(self._conns) >= MAX_CONNECTIONS:
                idle = sorted((t, id(c), c) for c, (t, busy) in self._conns.items() if not busy)
                if not idle:
                    return False  # every slot is answering a request: refuse this one
                victim = idle[0][2]
                del self._conns[victim]
                try:
                    victim.shutdown(socket.SHUT_RDWR)  # its thread sees end of input and exits
                except OSError:
                    pass
            self._conns[request] = (time.monotonic(), False)
        return True

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.pop(request, None)
        super().shutdown_request(request)


def serve(sidecar: Observable, address: tuple[str, int]) -> ThreadingHTTPServer:
    """Serve the endpoints on a daemon thread; ``.shutdown()`` stops it."""
    server = CappedHTTPServer(address, handler_for(sidecar))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="tenure-http", daemon=True).start()
    return server
