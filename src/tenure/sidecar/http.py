"""The sidecar's HTTP endpoints, for haproxy health checks and Prometheus.

Patroni's paths, so existing haproxy configurations keep working:

``/primary`` (also ``/master``, ``/leader``, ``/read-write``)
    200 only if this member leads, its lease is valid and the server is a
    writable primary; 503 otherwise.
``/replica``
    200 for a healthy standby that is streaming; ``?lag=BYTES`` also requires
    it to be at most that far behind the last primary position it saw.
``/read-only``
    200 if the server can serve reads (primary or standby).
``/health``
    200 if the server is running.
``/status``
    the sidecar's view as JSON (always 200).
``/metrics``
    Prometheus metrics.

GET (and HEAD) only: nothing changes state over HTTP.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from ..election import Leadership
    from .policy import NodeState


class Observable(Protocol):
    """What the endpoints read of a sidecar (:class:`tenure.sidecar.loop.Sidecar` is one)."""

    status: "NodeState | None"
    leadership: "Leadership | None"

    def lag(self) -> int | None: ...

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
        ok = healthy and st is not None and st.role == "standby" and st.streaming
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


def serve(sidecar: Observable, address: tuple[str, int]) -> ThreadingHTTPServer:
    """Serve the endpoints on a daemon thread; ``.shutdown()`` stops it."""
    server = ThreadingHTTPServer(address, handler_for(sidecar))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="tenure-http", daemon=True).start()
    return server
