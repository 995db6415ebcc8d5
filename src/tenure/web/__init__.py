"""What runs inside web workers: where the primary is, where reads go, and when to be read-only.

* :class:`Router` (:mod:`tenure.web.router`) -- per-process views of services,
  one etcd watch each, fail-safe to read-only;
* :class:`PostgresProvider` (:mod:`tenure.web.postgres`, from
  ``router.postgres(service)``) -- psycopg pools that follow the primary;
* :class:`~tenure.web.memcache.Client` (from ``router.memcache(service)``)
  -- python-memcached's client API over a memcached pool's ring in etcd;
* :class:`~tenure.web.agent_view.AgentRouter` -- the same views, read from
  the per-host agent (``tenure agent``) without gRPC;
* :class:`ReadOnlyMiddleware` (:mod:`tenure.web.wsgi`) -- 503 for writes while
  a service is read-only, with an allowlist of requests that only read;
* :mod:`tenure.web.webpy` -- web.py: a 503 processor, ``web.database``
  objects that follow the primary or read from replicas;
* :mod:`tenure.web.dberrors` -- what a psycopg 3 or psycopg2 error means
  (read-only, unavailable, neither); :mod:`tenure.web.health` -- ``/health``;
  :mod:`tenure.web.pg2` -- psycopg2 pool and fence helpers.

The web tier reads what sidecars and registrars publish; it never writes to
etcd.
"""

from typing import TYPE_CHECKING, Any

from .state import Endpoint, ServiceState

if TYPE_CHECKING:
    from .router import DEFAULT_STALE_AFTER, Router, ServiceView
    from .wsgi import ReadOnlyMiddleware, is_read_only

__all__ = ["Router", "ServiceView", "Endpoint", "ServiceState", "ReadOnlyMiddleware", "is_read_only",
           "DEFAULT_STALE_AFTER"]


def __getattr__(name: str) -> Any:
    # The router (and with it gRPC) loads on first use: a worker reading the agent's view never needs it.
    if name in ("Router", "ServiceView", "DEFAULT_STALE_AFTER"):
        from . import router

        return getattr(router, name)
    if name in ("ReadOnlyMiddleware", "is_read_only"):
        from . import wsgi

        return getattr(wsgi, name)
    raise AttributeError(f"module 'tenure.web' has no attribute {name!r}")
