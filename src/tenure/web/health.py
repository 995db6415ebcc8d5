"""``/health`` for web workers: what this worker's routing depends on, for haproxy and for people.

:func:`health_report` says, per service, whether the worker knows a primary,
whether its view of etcd is fresh, and which replicas and readable servers it
would use. :class:`HealthMiddleware` answers ``GET /health`` with it as JSON:

* 200 while the worker can serve: each service has had its first snapshot
  and has somewhere to read from. Read-only (no primary, or etcd out of
  sight) is still 200 -- the worker serves reads and clean 503s for writes,
  and taking every web host out of haproxy during a failover would turn a
  read-only site into a site that is down;
* 503 when it cannot serve reads: no view yet, or no readable server;
* ``/health?require=primary``: 503 also while read-only (for monitoring).
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Iterable, Sequence
from urllib.parse import parse_qs

from ..errors import ConfigError
from .router import Router

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def health_report(router: Router, services: Sequence[str], *, require_primary: bool = False,
                  first_wait: float = 0.0) -> tuple[bool, dict[str, Any]]:
    """``(healthy, report)`` for ``services``; ``first_wait`` s for a view's first snapshot (a new worker)."""
    report: dict[str, Any] = {}
    ok = True
    for name in services:
        view = router.service(name)
        if first_wait > 0 and view.peek().exists is None:
            view.ready(first_wait)
        p = view.primary
        stale = view.stale_for
        state = view.peek()
        serves = state.exists is not None and bool(view.readable)
        fine = serves and (p is not None or not require_primary)
        ok = ok and fine
        report[name] = {
            "ok": fine,
            "primary": None if p is None else {"member": p.member, "token": p.token},
            "read_only": p is None,
            "reason": view.reason,
            "etcd_fresh": stale <= router.stale_after,
            "stale_for": None if math.isinf(stale) else round(stale, 3),
            "replicas": [r.member for r in view.replicas],
            "readable": [r.member for r in view.readable],
        }
    return ok, report


class HealthMiddleware:
    """Answer ``GET``/``HEAD`` on ``path`` with :func:`health_report` as JSON; pass everything else to ``app``."""

    def __init__(self, app: WSGIApp, router: Router, services: Sequence[str] = ("db",), *,
                 path: str = "/health", first_wait: float = 0.5) -> None:
        if not callable(app):
            raise ConfigError(f"HealthMiddleware needs a WSGI callable, got {app!r}")
        if not isinstance(router, Router):
            raise ConfigError(f"HealthMiddleware needs a tenure.web.Router, got {type(router).__name__}")
        if isinstance(services, str) or not services:
            raise ConfigError(f"services must be a non-empty list of names, got {services!r}")
        for name in services:
            router.service(name)  # ConfigError for a malformed name
        if not path.startswith("/"):
            raise ConfigError(f"path must start with /, got {path!r}")
        self.app, self.router, self.services, self.path = app, router, list(services), path
        self.first_wait = first_wait

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != self.path or environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return self.app(environ, start_response)
        query = parse_qs(str(environ.get("QUERY_STRING", "")))
        require = "primary" in query.get("require", [])
        ok, report = health_report(self.router, self.services, require_primary=require,
                                   first_wait=self.first_wait)
        body = (json.dumps({"ok": ok, "services": report}, sort_keys=True) + "\n").encode()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                        ("Cache-Control", "no-store")])
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]
