"""What runs inside web workers: where the primary is, where reads go, and when to be read-only.

* :class:`Router` (:mod:`tenure.web.router`) -- per-process views of services,
  one etcd watch each, fail-safe to read-only;
* :class:`PostgresProvider` (:mod:`tenure.web.postgres`, from
  ``router.postgres(service)``) -- psycopg pools that follow the primary;
* :class:`RingClient` (:mod:`tenure.web.memcache`, from
  ``router.memcache(service)``) -- a memcached ring over the live members;
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

from .router import DEFAULT_STALE_AFTER, Router, ServiceView
from .state import Endpoint, ServiceState
from .wsgi import ReadOnlyMiddleware, is_read_only

__all__ = ["Router", "ServiceView", "Endpoint", "ServiceState", "ReadOnlyMiddleware", "is_read_only",
           "DEFAULT_STALE_AFTER"]
