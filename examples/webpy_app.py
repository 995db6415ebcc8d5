"""A web.py application whose database follows the PostgreSQL primary through tenure.

Run it under gunicorn (pre-fork, several workers), pointing at etcd::

    TENURE_ETCD=http://10.0.0.1:2379,http://10.0.0.2:2379 TENURE_DB_SERVICE=db \\
        gunicorn -w 4 -b 127.0.0.1:8080 --chdir examples 'webpy_app:wsgi()'

What it shows:

* the database parameters (``web.database`` keywords) come from the primary
  record tenure publishes, not from a config file: one ``web.db`` object per
  term, made on first use after a change; each thread closes its connection
  to the deposed primary before it uses the new one (``PrimaryDB``);
* reads go to a streaming replica when there is one (``ReplicaDB``);
* ``tenure.web.ReadOnlyMiddleware`` answers writes with 503 + Retry-After
  while there is no valid primary, and every page can show a banner from
  ``web.ctx.env["tenure.read_only"]``; a write that finds the primary gone
  mid-request (``tenure.errors.ReadOnly``) gets the same 503 page from the
  ``@writes`` decorator below (web.py turns any exception escaping a handler
  into a 500 before a processor or a WSGI middleware could see it).

web.py's own PostgreSQL driver list has only psycopg2; tenure already depends
on psycopg 3, so ``PsycopgDB`` below is web.py's PostgresDB with psycopg 3's
``connect``. With psycopg2 installed, ``web.database(dbn="postgres", **params)``
works the same way.

The table is the one tenure's test clusters create:
``items(id bigint primary key, writer text, at float8)``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import threading
import time
from typing import Any, Callable

import psycopg
import web
from psycopg.conninfo import conninfo_to_dict

from tenure.errors import ReadOnly
from tenure.web import Endpoint, Router, ServiceView
from tenure.web.wsgi import DEFAULT_BODY, ReadOnlyMiddleware

log = logging.getLogger("webpy_app")

web.config.debug = False  # no reloader, no query printing

RETRY_AFTER = 5


class PsycopgDB(web.db.PostgresDB):
    """web.py's PostgreSQL database on psycopg 3 (its own driver list knows only psycopg2)."""

    def __init__(self, **params: Any) -> None:
        super().__init__(driver="psycopg", pooling=False, **params)

    def _connect(self, keywords: dict[str, Any]) -> psycopg.Connection[Any]:
        return psycopg.connect(**keywords)


def db_params(endpoint: Endpoint) -> dict[str, Any]:
    """``web.database`` keywords from a DSN published by the sidecar."""
    params: dict[str, Any] = dict(conninfo_to_dict(endpoint.dsn))
    params.setdefault("connect_timeout", 2)
    return params


def _close_thread_connection(db: web.db.DB) -> None:
    """Close this thread's connection of ``db``, if it has one (web.py keeps one per thread)."""
    ctx = db._ctx  # a threadeddict: this thread's slot only
    conn = ctx.get("db")
    if conn is not None:
        try:
            conn.close()
        except Exception:  # the server may be gone already
            pass
        del ctx["db"]


class _Follower:
    """One web.py database object per endpoint, and per thread the one it last used."""

    def __init__(self, view: ServiceView) -> None:
        self.view = view
        self._lock = threading.Lock()
        self._dbs: dict[tuple[str, int | None], web.db.DB] = {}
        self._local = threading.local()
        view.on_change(self._changed)

    def _changed(self, view: ServiceView) -> None:
        """Forget database objects of endpoints that are gone (threads close their own connections)."""
        live: set[tuple[str, int | None]] = {(r.dsn, None) for r in view.readable}
        p = view.last_primary
        if p is not None:
            live |= {(p.dsn, p.token), (p.dsn, None)}
        with self._lock:
            for key in [k for k in self._dbs if k not in live]:
                log.info("%s: dropping the database object for %s", view.name, key)
                del self._dbs[key]

    def reset_thread(self, avoid: bool = False) -> None:
        """Close this thread's connection; with ``avoid``, prefer another server next time."""
        db = getattr(self._local, "db", None)
        if db is not None:
            _close_thread_connection(db)
            if avoid:
                self._local.avoid = db
        self._local.db = None

    def _use(self, endpoint: Endpoint, key: tuple[str, int | None]) -> web.db.DB:
        with self._lock:
            db = self._dbs.get(key)
            if db is None:
                db = self._dbs[key] = PsycopgDB(**db_params(endpoint))
        previous = getattr(self._local, "db", None)
        if previous is not None and previous is not db:
            _close_thread_connection(previous)  # the connection to the old server is not reused
        self._local.db, self._local.endpoint = db, endpoint
        return db

    def endpoint(self) -> Endpoint | None:
        """The server this thread's database object points at."""
        return getattr(self._local, "endpoint", None)


class PrimaryDB(_Follower):
    """``PrimaryDB(view).get()``: the web.py database of the current primary; ReadOnly while there is none."""

    def get(self) -> web.db.DB:
        p = self.view.primary
        if p is None:
            raise ReadOnly(f"{self.view.name} is read-only: {self.view.reason}")
        return self._use(p, (p.dsn, p.token))  # keyed by term: a new term is a new connection


class ReplicaDB(_Follower):
    """``ReplicaDB(view).get()``: a web.py database for reads (a streaming replica, else the primary, else a standby)."""

    def get(self) -> web.db.DB:
        replicas = list(self.view.replicas)
        random.shuffle(replicas)  # spread threads over replicas; then the primary, then any healthy standby
        candidates = replicas + list(self.view.readable[len(replicas):])
        if not candidates:
            raise ReadOnly(f"{self.view.name}: nothing to read from: {self.view.reason}")
        avoid = getattr(self._local, "avoid", None)
        self._local.avoid = None
        if avoid is not None and len(candidates) > 1:  # the last read failed there: go elsewhere this time
            candidates = [c for c in candidates if self._dbs.get((c.dsn, None)) is not avoid] or candidates
        current = getattr(self._local, "db", None)
        for c in candidates:  # stay on this thread's server while it is still a candidate
            if current is not None and self._dbs.get((c.dsn, None)) is current:
                return current
        return self._use(candidates[0], (candidates[0].dsn, None))


def _unavailable(e: Exception) -> web.HTTPError:
    return web.HTTPError("503 Service Unavailable",
                         {"Content-Type": "text/html; charset=utf-8", "Retry-After": str(RETRY_AFTER)},
                         DEFAULT_BODY)


def writes(method: Callable[..., Any]) -> Callable[..., Any]:
    """For handlers that write: ReadOnly, or a connection lost on the way to the primary, is the 503 page.

    (web.py turns any exception escaping a handler into a 500 before a
    processor or a WSGI middleware could see it, so this has to be here.)
    """

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except ReadOnly as e:
            log.info("%s %s: 503: %s", web.ctx.method, web.ctx.path, e)
            raise _unavailable(e) from None
        except psycopg.OperationalError as e:
            primary_db.reset_thread()  # reconnect next time rather than reuse a broken connection
            log.info("%s %s: 503: %s", web.ctx.method, web.ctx.path, e)
            raise _unavailable(e) from None

    return wrapper


def reads(method: Callable[..., Any]) -> Callable[..., Any]:
    """For handlers that read: on a lost connection, try once more (possibly on another server)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except psycopg.OperationalError as e:
            log.info("%s %s: read failed (%s): retrying", web.ctx.method, web.ctx.path, e)
            replica_db.reset_thread(avoid=True)
            return method(*args, **kwargs)

    return wrapper


# -- the application ------------------------------------------------------------------------

urls = ("/", "Index", "/items", "Items")

router = Router(os.environ.get("TENURE_ETCD", "http://127.0.0.1:2379"))  # no etcd traffic until a worker reads it
SERVICE = os.environ.get("TENURE_DB_SERVICE", "db")
view = router.service(SERVICE)
primary_db = PrimaryDB(view)
replica_db = ReplicaDB(view)


class Index:
    @reads
    def GET(self) -> str:
        banner = "read-only" if web.ctx.env.get("tenure.read_only") else "read-write"
        row = replica_db.get().query("SELECT count(*) AS n FROM items")[0]
        web.header("Content-Type", "application/json")
        return json.dumps({"mode": banner, "items": row.n, "pid": os.getpid()})


class Items:
    @writes
    def POST(self) -> str:
        i = web.input(id=None)
        db = primary_db.get()
        db.insert("items", id=int(i.id), writer=f"webpy-{os.getpid()}", at=time.time(), seqname=False)
        p = primary_db.endpoint()  # where this write went
        web.header("Content-Type", "application/json")
        return json.dumps({"ok": True, "member": p.member if p else None, "token": p.token if p else None})


app = web.application(urls, globals(), autoreload=False)


def wsgi() -> Any:
    """The WSGI callable (gunicorn: ``'webpy_app:wsgi()'``)."""
    return ReadOnlyMiddleware(app.wsgifunc(), router, SERVICE, retry_after=RETRY_AFTER)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    # web.py's development server: `python webpy_app.py 8080`
    app.run(lambda wsgi_app: ReadOnlyMiddleware(wsgi_app, router, SERVICE, retry_after=RETRY_AFTER))
