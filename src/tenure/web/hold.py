"""Holding a new write for a moment while a service changes primary, instead of refusing it.

During a switchover or failover the service has no primary for a fraction
of a second. A write that has not started yet can safely wait for the next
primary; one that already started (its outcome unknown) is never retried
here. :func:`wait_for_primary` is that wait, bounded; the write path
(:meth:`tenure.web.postgres.PostgresProvider.write`) and the WSGI middleware
call it before giving up with read-only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .router import ServiceView
    from .state import Endpoint

DEFAULT_HOLD = 2.0  # seconds: a planned handover takes well under one
_POLL = 0.005


def check_hold(hold: object) -> float:
    """``hold`` as seconds, if it is a number in [0, 60]; else ConfigError."""
    if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not 0 <= hold <= 60:
        raise ConfigError(f"hold must be seconds between 0 and 60, got {hold!r}")
    return float(hold)


def wait_for_primary(view: "ServiceView", hold: float) -> "Endpoint | None":
    """The service's primary, waiting up to ``hold`` s for one; None if none came.

    Waits only while a change of primary is plausible: the service exists and
    etcd is in sight with no primary published. With etcd out of sight it
    returns at once: then the service is read-only, not between primaries.
    """
    deadline = time.monotonic() + hold
    while True:
        p = view.primary
        if p is not None:
            return p
        if view.exists is not True:
            return None
        if p is None and view.last_primary is not None:
            return None  # a primary is published but etcd has not been heard from lately: read-only
        if time.monotonic() >= deadline:
            return None
        time.sleep(_POLL)
