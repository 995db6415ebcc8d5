"""WSGI middleware that turns writes away while a service is read-only.

``ReadOnlyMiddleware(app, router, service="db")``: every request gets
``environ["tenure.read_only"]`` (a bool, for a banner) and
``environ["tenure.view"]`` (the :class:`~tenure.web.router.ServiceView`); while the
service is read-only, unsafe methods (POST, PUT, PATCH, DELETE) wait up to
``hold`` seconds for a new primary (a switchover or failover in progress) and
then get ``503 Service Unavailable`` with ``Retry-After`` and a configurable
body without reaching the application. Reads always pass through. A
:class:`~tenure.errors.ReadOnly` raised by the application (for instance by
``router.postgres(...).write()`` when the primary turned out to be gone) gets
the same 503, as long as the response has not started.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Iterable, Mapping

from ..errors import ConfigError, ReadOnly
from . import hold as holding
from .router import Router

log = logging.getLogger("tenure.web")

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

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
    """

    def __init__(self, app: WSGIApp, router: Router, service: str = "db", *, retry_after: int = 5,
                 body: str | bytes = DEFAULT_BODY, content_type: str = "text/html; charset=utf-8",
                 first_wait: float = 1.0, hold: float = holding.DEFAULT_HOLD) -> None:
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
        self._waited_gen = -2  # the view's fork generation when this process last waited (-1: view not started)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        view = self.view
        if self._waited_gen != view.generation:
            self._first_request()
        read_only = view.read_only
        environ["tenure.read_only"] = read_only
        environ["tenure.view"] = view
        if read_only and environ.get("REQUEST_METHOD", "GET").upper() in UNSAFE_METHODS:
            if holding.wait_for_primary(view, self.hold) is None:
                return self._refuse(start_response, None)
            environ["tenure.read_only"] = False
        try:
            return self.app(environ, start_response)
        except ReadOnly as e:
            log.info("%s %s refused: %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), e)
            return self._refuse(start_response, sys.exc_info())

    def _first_request(self) -> None:
        if self.first_wait > 0 and not self.view.ready(self.first_wait):
            log.warning("no view of %s after %.1f s: answering read-only", self.view.name, self.first_wait)
        self._waited_gen = self.view.generation

    def _refuse(self, start_response: StartResponse, exc_info: Any) -> Iterable[bytes]:
        start_response("503 Service Unavailable", list(self.headers), exc_info)
        return [self.body]


def is_read_only(environ: Mapping[str, Any]) -> bool:
    """``environ["tenure.read_only"]``, False outside the middleware."""
    return bool(environ.get("tenure.read_only", False))
