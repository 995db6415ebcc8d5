"""A generic HTTP service with one active instance (e.g. infobase), from a web worker.

:class:`HttpServiceView` (from :meth:`tenure.web.Router.http`) gives the URL
of the active instance, as its sidecar published it with its term's token, and
follows failovers live; None while no instance is active (fail safe: send no
request rather than guess).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .router import ServiceView


class HttpServiceView:
    """The active instance of one HTTP service, as the router sees it."""

    def __init__(self, view: "ServiceView") -> None:
        self.view = view

    @property
    def url(self) -> str | None:
        """The active instance's URL, or None while there is none."""
        p = self.view.primary
        return p.dsn if p is not None else None

    @property
    def token(self) -> int | None:
        """The fencing token of the active instance's term; pass it on writes the service fences."""
        p = self.view.primary
        return p.token if p is not None else None

    def wait_for_url(self, timeout: float) -> str:
        """Block until an instance is active and return its URL (as :meth:`ServiceView.wait_for_primary`)."""
        return self.view.wait_for_primary(timeout).dsn
