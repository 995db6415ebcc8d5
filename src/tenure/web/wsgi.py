"""WSGI middleware that turns writes away while a service is read-only.

``ReadOnlyMiddleware(app, router, service="db", allow=["POST /account/login"])``:
every request gets ``environ["tenure.read_only"]`` (a bool, for a banner),
``environ["tenure.safe"]`` (True for a request that only reads: GET, HEAD,
OPTIONS, or one the allowlist names) and ``environ["tenure.view"]`` (the
:class:`~tenure.web.router.ServiceView`). While the service is read-only,
requests that are not safe wait up to ``hold`` seconds for a new
primary (a switchover or failover in progress) and then get
``503 Service Unavailable`` with ``Retry-After`` and a configurable body without reaching the application;
safe ones always pass through. An error raised by the application because
the database is read-only or out of reach -- :class:`~tenure.errors.ReadOnly`
(for instance from ``router.postgres(...).write()`` when the primary turned
out to be gone), SQLSTATE 25006 or a lost connection from psycopg 3 or
psycopg2 (see :mod:`tenure.web.dberrors`) -- gets the same 503, as long as
the response has not started.

web.py turns every exception escaping a handler into its own 500 before a
WSGI middleware could see it: add :func:`tenure.web.webpy.unavailable_processor`
to the web.py application as well.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..errors import ConfigError
from . import hold as holding
from .dberrors import classify
from .router import Router

log = logging.getLogger("tenure.web")

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

DEFAULT_BODY = (
    "<!doctype html><title>Read-only for a moment</title>"
    "<h1>Read-only for a moment</h1>"
    "<p>The site cannot save changes right now while its database switches servers. "
    "Please try again in a few seconds.</p>\n"
)

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class ReadOnlyMiddleware:
    """Refuse unsafe methods with 503 while ``service`` is read-only; tag every request.

    ``retry_after`` (whole seconds) goes in the Retry-After header: about how
    long a failover takes (lease ttl + promotion). ``body`` (str or bytes) and
    ``content_type`` make the 503 page. ``first_wait``: a new worker process
    waits up to this long, once, for its first view of the service before
    answering, so that the first requests after a fork are not refused only
    because the view is a few milliseconds old. ``hold``: how long a write
    waits for a new primary while the service has none (0: refuse at once).


    ``allow``: requests that pass while read-only, because they only read
    (a login checks a password): ``"METHOD /path-regex"`` strings or
    ``(method, regex)`` pairs; the regex must match the whole ``PATH_INFO``,
    the method may be ``*``. See :func:`parse_allow`.
    """

    def __init__(self, app: WSGIApp, router: Router, service: str = "db", *, retry_after: int = 5,
                 body: str | bytes = DEFAULT_BODY, content_type: str = "text/html; charset=utf-8",
                 first_wait: float = 1.0, hold: float = holding.DEFAULT_HOLD,
                 allow: Sequence[str | tuple[str, str]] = ()) -> None:
        if not callable(app):
            raise ConfigError(f"ReadOnlyMiddleware needs a WSGI callable, got {app!r}")
        if not isinstance(router, Router):
            raise ConfigError(f"ReadOnlyMiddleware needs a tenure.web.Router, got {type(router).__name__}")
        if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
            raise ConfigError(f"retry_after must be whole seconds >= 0, got {retry_after!r}")
        if not isinstance(body, (str, bytes)):
            raise ConfigError(f"body must be str or bytes, got {type(body).__name__}")
        self.app = app
        self.router = router
        self.view = router.service(service)  # ConfigError for a malformed name; no etcd traffic yet
        self.retry_after = retry_after
        self.body = body.encode() if isinstance(body, str) else body
        self.headers = [("Content-Type", content_type), ("Content-Length", str(len(self.body))),
                        ("Retry-After", str(retry_after)), ("Cache-Control", "no-store")]
        self.first_wait = first_wait
        self.hold = holding.check_hold(hold)  # how long a new write waits for a primary during a change
        self.allow = parse_allow(allow)
        self._waited_gen = -2  # the view's fork generation when this process last waited (-1: view not started)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        view = self.view
        if self._waited_gen != view.generation:
            self._first_request()
        read_only = view.read_only
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        safe = method in SAFE_METHODS or self._allowed(method, str(environ.get("PATH_INFO", "")))
        environ["tenure.read_only"] = read_only
        environ["tenure.safe"] = safe
        environ["tenure.view"] = view
        if read_only and not safe:
            if holding.wait_for_primary(view, self.hold) is None:
                return self._refuse(start_response, None)
            environ["tenure.read_only"] = False
        try:
            return self.app(environ, start_response)
        except Exception as e:
            if classify(e) is None:
                raise
            log.info("%s %s refused: %s: %s", method, environ.get("PATH_INFO"), type(e).__name__, e)
            return self._refuse(start_response, sys.exc_info())

    def _allowed(self, method: str, path: str) -> bool:
        return any((m == "*" or m == method) and rx.fullmatch(path) for m, rx in self.allow)

    def _first_request(self) -> None:
        if self.first_wait > 0 and not self.view.ready(self.first_wait):
            log.warning("no view of %s after %.1f s: answering read-only", self.view.name, self.first_wait)
        self._waited_gen = self.view.generation

    def _refuse(self, start_response: StartResponse, exc_info: Any) -> Iterable[bytes]:
        start_response("503 Service Unavailable", list(self.headers), exc_info)
        return [self.body]


def parse_allow(allow: Sequence[str | tuple[str, str]]) -> list[tuple[str, "re.Pattern[str]"]]:
    """``["POST /account/login", ("POST", "/account/(login|logout)")]`` -> [(method, compiled regex)].

    ConfigError for anything else (a bad regex, a missing method or path).
    """
    if isinstance(allow, (str, bytes)) or not isinstance(allow, Sequence):
        raise ConfigError(f"allow must be a list of 'METHOD /path-regex' entries, got {allow!r}")
    out = []
    for item in allow:
        if isinstance(item, str):
            method, _, path = item.strip().partition(" ")
            path = path.strip()
        elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item):
            method, path = item
        else:
            raise ConfigError(f"allow entries are 'METHOD /path-regex' strings or (method, regex) pairs, got {item!r}")
        method = method.strip().upper()
        if not method or not (method == "*" or method.isalpha()) or not path.startswith("/"):
            raise ConfigError(f"allow entry {item!r}: needs a method (or *) and a path regex starting with /")
        try:
            out.append((method, re.compile(path)))
        except re.error as e:
            raise ConfigError(f"allow entry {item!r}: bad regex: {e}") from None
    return out


def is_read_only(environ: Mapping[str, Any]) -> bool:
    """``environ["tenure.read_only"]``, False outside the middleware."""
    return bool(environ.get("tenure.read_only", False))
