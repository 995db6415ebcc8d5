"""web.py on tenure: database objects that follow the primary, and 503s instead of 500s.

Two pieces, one per migration phase:

* :func:`unavailable_processor` (phase 1, no other change): a web.py
  processor that turns a request failed by the database being unreachable,
  read-only or switching servers -- psycopg2 or psycopg 3 ``OperationalError``,
  SQLSTATE 25006, web.py's ``InterfaceError: connection already closed``
  (whose real cause is in ``__context__``), :class:`tenure.errors.ReadOnly` --
  into ``503 Service Unavailable`` with ``Retry-After``, and retries a GET or
  HEAD that lost its connection, on a new one. Every other error stays a 500.
* :func:`database` (phase 2): a drop-in for ``web.database(dbn="postgres",
  **params)`` whose connections are made, at each connect (web.py connects
  once per request and thread), to the server the router says: the current
  primary (``role="primary"``) or a healthy replica within a lag bound
  (``role="reader"``). A database object built once per process, as Open
  Library builds its own, follows a failover on the next request.

``role="primary"``: writes go to the published primary; while there is none
(or it cannot be reached) a request that only reads -- GET, HEAD, OPTIONS, or
one the :class:`~tenure.web.wsgi.ReadOnlyMiddleware` allowlist marks
(``environ["tenure.safe"]``) -- is served from a standby in a read-only
session, so reads never become errors; any other request gets
:class:`~tenure.errors.ReadOnly` (a 503 through the processor).

``role="reader"``: reads go to a streaming standby no further behind the
primary than ``max_lag_bytes`` (from the WAL positions the sidecars publish),
else the primary, else any healthy standby (with no primary at all, reads go
on from the standbys). Every reader session is read-only. A read (a reader's
query, or a query of a request that only reads) that loses its connection
outside an explicit transaction is run once more on the next server.

web.py's own driver list has only psycopg2; ``driver="psycopg"`` uses
psycopg 3 instead.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import web

from ..config import build_section
from ..errors import ConfigError, PrimaryUnavailable, ReadOnly
from ..records import check_name
from .dberrors import UNAVAILABLE, chain, classify, classify_one, is_connection_error
from .health import HealthMiddleware
from .router import Router, ServiceView, load_settings
from .state import Endpoint
from .wsgi import DEFAULT_BODY, SAFE_METHODS, ReadOnlyMiddleware, parse_allow

log = logging.getLogger("tenure.web")

_monotonic = time.monotonic

DEFAULT_MAX_LAG = 16 * 1024 * 1024  # bytes, as the sidecar's max_lag_bytes
DRIVERS = ("psycopg2", "psycopg")
ROLES = ("primary", "reader")


# -- phase 1: errors to 503 -------------------------------------------------------------------

def unavailable_processor(*, retry_after: int = 5, body: str | bytes = DEFAULT_BODY,
                          content_type: str = "text/html; charset=utf-8", retries: int = 3,
                          retry_delay: float = 0.05) -> Callable[[Callable[[], Any]], Any]:
    """A web.py processor: database unavailable or read-only -> 503 + Retry-After; GETs retried.

    ``app.add_processor(unavailable_processor())``. A GET, HEAD or OPTIONS
    that failed because its connection was lost or refused is run again
    (at most ``retries`` times, after ``retry_delay`` s, doubled each time:
    0.35 s in all by default) on a new connection:
    the web.py database objects named in the traceback drop this thread's
    connection first. A handler that wrote before its connection was lost
    would write again: GET handlers that write should be idempotent.
    """
    if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
        raise ConfigError(f"retry_after must be whole seconds >= 0, got {retry_after!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0 or retry_delay < 0:
        raise ConfigError(f"retries must be an int >= 0 and retry_delay >= 0, got {retries!r}, {retry_delay!r}")
    data = body.decode() if isinstance(body, bytes) else body
    headers = {"Content-Type": content_type, "Retry-After": str(retry_after), "Cache-Control": "no-store"}

    def processor(handler: Callable[[], Any]) -> Any:
        method = str(web.ctx.get("method") or "GET").upper()
        attempts = 1 + (retries if method in SAFE_METHODS else 0)
        status, saved = web.ctx.get("status"), list(web.ctx.get("headers") or [])
        for attempt in range(attempts):
            try:
                return handler()
            except Exception as e:
                kind = _kind(e)
                if kind is None:
                    raise
                web.ctx.status, web.ctx.headers = status, list(saved)  # what the failed attempt set goes
                if kind == UNAVAILABLE and attempt + 1 < attempts:
                    reset_connections(e)
                    log.info("%s %s: database unavailable (%s): retrying", method, web.ctx.get("path"),
                             _cause(e))
                    if retry_delay:
                        time.sleep(retry_delay * 2 ** attempt)
                    continue
                log.info("%s %s: 503: %s", method, web.ctx.get("path"), _cause(e))
                raise web.HTTPError("503 Service Unavailable", headers, data) from None
        raise AssertionError("unreachable")

    return processor


def _kind(e: BaseException) -> str | None:
    """What a failed handler's exception means; only a 500 (web.py's wrapper of an error) or a raw error counts."""
    if isinstance(e, web.HTTPError):
        status = str(e.args[0]) if e.args else ""
        if not status.startswith("500"):
            return None  # a redirect or a 404 raised while handling a database error is the app's answer
    return classify(e)


def _cause(e: BaseException) -> str:
    for x in chain(e):
        if classify_one(x) is not None:
            return f"{type(x).__name__}: {str(x).strip().splitlines()[0] if str(x).strip() else ''}"
    return type(e).__name__


def reset_connections(exc: BaseException) -> int:
    """Drop this thread's connection of every web.py database whose method appears in the traceback of ``exc``.

    Returns how many were dropped. web.py keeps one connection per thread in
    each database object's context until the request ends; a connection that
    failed must not serve the retry.
    """
    dbs: dict[int, web.db.DB] = {}
    for e in chain(exc):
        for frame, _ in traceback.walk_tb(e.__traceback__):
            obj = frame.f_locals.get("self")
            if isinstance(obj, web.db.DB):
                dbs[id(obj)] = obj
    for db in dbs.values():
        drop_connection(db)
    return len(dbs)


def drop_connection(db: "web.db.DB") -> None:
    """Close and forget this thread's connection of ``db``; the next query connects afresh."""
    ctx = db._ctx  # web.py's per-thread context of the database (a ThreadedDict): this thread's slot only
    conn = ctx.get("db")
    if conn is not None:
        try:
            conn.close()
        except Exception:  # already gone
            pass
    ctx.clear()


# -- phase 2: database objects that follow the primary ------------------------------------------

def database(router: Router | ServiceView, service: str | None = None, *, role: str = "primary",
             driver: str = "psycopg2", max_lag_bytes: int = DEFAULT_MAX_LAG, cooldown: float = 1.0,
             read_fallback: bool = True, first_wait: float = 1.0, **params: Any) -> "RoutedDB":
    """A web.py database for ``service`` whose connections go where the router says; see the module doc.

    ``params`` are ``web.database`` keywords (``dbn="postgres"``, ``db`` or
    ``database``, ``user``, ``pw`` or ``password``, any libpq keyword); a
    ``host`` or ``port`` among them is ignored (the server comes from etcd),
    so an existing ``db_parameters`` mapping can be passed as it is.
    ``cooldown``: seconds a server that refused a connection is tried last.
    ``read_fallback``: for ``role="primary"``, serve requests that only read
    from a standby while there is no reachable primary.
    """
    view = router.service(service) if isinstance(router, Router) else router
    if not isinstance(view, ServiceView):
        raise ConfigError(f"database() needs a tenure.web.Router and a service name, got {type(router).__name__}")
    return RoutedDB(view, role=role, driver=driver, max_lag_bytes=max_lag_bytes, cooldown=cooldown,
                    read_fallback=read_fallback, first_wait=first_wait, **params)


class RoutedDB(web.db.PostgresDB):
    """``web.db.PostgresDB`` whose every connection is made to the server :func:`database` describes."""

    def __init__(self, view: ServiceView, *, role: str, driver: str, max_lag_bytes: int, cooldown: float,
                 read_fallback: bool, first_wait: float, **params: Any) -> None:
        if role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if driver not in DRIVERS:
            raise ConfigError(f"driver must be one of {', '.join(DRIVERS)}, got {driver!r}")
        if isinstance(max_lag_bytes, bool) or not isinstance(max_lag_bytes, int) or max_lag_bytes < 0:
            raise ConfigError(f"max_lag_bytes must be an int >= 0, got {max_lag_bytes!r}")
        if cooldown < 0 or first_wait < 0:
            raise ConfigError(f"cooldown and first_wait must be >= 0, got {cooldown!r}, {first_wait!r}")
        dbn = params.pop("dbn", "postgres")
        if dbn != "postgres":
            raise ConfigError(f"tenure routes PostgreSQL only, got dbn={dbn!r}")
        for k in ("host", "port", "hostaddr"):
            params.pop(k, None)  # the server comes from etcd
        if "db" in params:
            params["dbname"] = params.pop("db")
        if "database" in params:
            params["dbname"] = params.pop("database")
        if "pw" in params:
            params["password"] = params.pop("pw")
        params.setdefault("connect_timeout", 2)
        params["client_encoding"] = "UTF8"
        params["pooling"] = False  # a pool would pin the server it first connected to
        try:
            super().__init__(driver=driver, **params)
        except ImportError as e:
            raise ConfigError(f"driver {driver!r} is not installed: {e}") from None
        self.view = view
        self.role = role
        self.driver = driver
        self.max_lag_bytes = max_lag_bytes
        self.cooldown = float(cooldown)
        self.read_fallback = read_fallback
        self.first_wait = float(first_wait)
        self._down: dict[str, float] = {}  # dsn -> monotonic time until which it is tried last
        self._targets: dict[str, dict[str, Any]] = {}  # dsn -> its host/port keywords
        self._last_readable: list[Endpoint] = []  # the last non-empty read_candidates(), for a lapse

    def __repr__(self) -> str:
        return f"<RoutedDB {self.view.name} role={self.role} driver={self.driver}>"

    # -- where to connect ------------------------------------------------------------------------

    def _connect(self, keywords: Mapping[str, Any]) -> Any:
        if self.view.peek().exists is None:
            self.view.ready(self.first_wait)  # first use in this process: its view is milliseconds away
        if self.role == "reader":
            return self._connect_reading(keywords, exclude=None)
        p = self.view.primary
        error: Exception | None = None
        if p is not None and self._down.get(p.dsn, 0.0) <= _monotonic():
            try:
                return self._connect_to(p, keywords, read_only=False)
            except Exception as e:
                if not is_connection_error(e):
                    raise
                self._mark_down(p.dsn)
                error = e
        if self.read_fallback and _request_only_reads():
            return self._connect_reading(keywords, exclude=p.dsn if p is not None else None)
        if p is None:
            raise ReadOnly(f"{self.view.name} is read-only: {self.view.reason}")
        raise PrimaryUnavailable(f"{self.view.name}: could not reach primary {p.member} (token {p.token})"
                                 + (f": {_first_line(error)}" if error else f" less than {self.cooldown:g} s ago"))

    def _connect_reading(self, keywords: Mapping[str, Any], exclude: str | None) -> Any:
        candidates = [e for e in self.read_candidates() if e.dsn != exclude]
        if not candidates:
            raise ReadOnly(f"{self.view.name}: no server to read from ({self.view.reason or 'no healthy member'})")
        errors = []
        for e in candidates:
            try:
                return self._connect_to(e, keywords, read_only=True)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise
                self._mark_down(e.dsn)
                errors.append(f"{e.member}: {_first_line(exc)}")
        raise PrimaryUnavailable(f"{self.view.name}: could not reach any server to read from: {'; '.join(errors)}")

    def read_candidates(self) -> list[Endpoint]:
        """Where a read would go now, in order: replicas within the lag bound (shuffled), the primary,
        other healthy members, replicas beyond the bound; servers that refused lately last. With
        nothing readable in the view, the servers last seen readable."""
        state = self.view.peek()
        self.view.readable  # noqa: B018 -- starts the view in a new process
        readable, n = list(state.readable), len(state.replicas)
        replicas, rest = readable[:n], readable[n:]
        primary_pos = _position(state.members, state.primary.member if state.primary else None, "wal_current")
        near, far = [], []
        for r in replicas:
            lag = None
            if primary_pos is not None:
                pos = _position(state.members, r.member, "wal_replayed")
                lag = primary_pos - pos if pos is not None else None
            (far if lag is not None and lag > self.max_lag_bytes else near).append(r)
        random.shuffle(near)  # spread reads over the replicas
        ordered = near + rest + far
        if ordered:
            self._last_readable = ordered
        else:
            # Nothing readable in the view: a member's record can lapse while its sidecar is busy
            # promoting. Reads are read-only sessions, so the servers last seen readable are safe to try.
            ordered = list(self._last_readable)
        now = _monotonic()
        ordered.sort(key=lambda e: self._down.get(e.dsn, 0.0) > now)  # stable
        return ordered

    def _connect_to(self, endpoint: Endpoint, keywords: Mapping[str, Any], *, read_only: bool) -> Any:
        kw = {**keywords, **self._target(endpoint.dsn)}
        if read_only:
            opt = "-c default_transaction_read_only=on"
            kw["options"] = f"{kw['options']} {opt}" if kw.get("options") else opt
        conn = self.db_module.connect(**kw)  # libpq keywords: the same for psycopg2 and psycopg 3
        self._ctx["tenure_endpoint"] = endpoint
        self._ctx["tenure_read_session"] = read_only
        return conn

    def _target(self, dsn: str) -> dict[str, Any]:
        t = self._targets.get(dsn)
        if t is None:
            parts = _parse_dsn(dsn, self.driver)
            t = {k: parts[k] for k in ("host", "hostaddr", "port") if parts.get(k)}
            if not t.get("host") and not t.get("hostaddr"):
                raise ConfigError(f"{self.view.name}: published DSN names no host")
            self._targets = {**self._targets, dsn: t}
        return t

    def _mark_down(self, dsn: str) -> None:
        if self.cooldown > 0:
            self._down[dsn] = _monotonic() + self.cooldown

    def endpoint(self) -> Endpoint | None:
        """The server this thread's current connection goes to (None before the first query of a request)."""
        return self._ctx.get("tenure_endpoint") if self._ctx.get("db") is not None else None

    # -- reads survive a lost replica ------------------------------------------------------------

    def query(self, sql_query: Any, vars: Any = None, processed: bool = False, _test: bool = False) -> Any:
        if _test:
            return super().query(sql_query, vars, processed, _test)
        in_transaction = bool(self._ctx.get("transactions"))
        try:
            return super().query(sql_query, vars, processed, _test)
        except Exception as e:
            ctx = self._ctx
            # Once more only for a read -- a read session, or a request that only reads on the primary's
            # object (it then falls back to a standby) -- that connected and then lost its server, outside
            # a transaction (a connect that failed has already tried every candidate).
            reading = ctx.get("tenure_read_session") or (self.read_fallback and _request_only_reads())
            if in_transaction or ctx.get("db") is None or not reading or classify(e) != UNAVAILABLE:
                raise
            endpoint = self._ctx.get("tenure_endpoint")
            if endpoint is not None:
                self._mark_down(endpoint.dsn)
            log.info("%s: read lost its connection to %s (%s): once more elsewhere", self.view.name,
                     endpoint.member if endpoint else "?", _first_line(e))
            drop_connection(self)
            return super().query(sql_query, vars, processed, _test)


def _request_only_reads() -> bool:
    env = web.ctx.get("env") or {}
    flagged = env.get("tenure.safe")
    if flagged is not None:
        return bool(flagged)
    method = web.ctx.get("method")
    return method is not None and str(method).upper() in SAFE_METHODS


def _position(members: Mapping[str, Mapping[str, Any]], member: str | None, field: str) -> int | None:
    if member is None or member not in members:
        return None
    rec = members[member]
    value = rec.get(field)
    if not isinstance(value, int) or isinstance(value, bool):
        value = rec.get("position")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _parse_dsn(dsn: str, driver: str) -> dict[str, Any]:
    try:
        if driver == "psycopg2":
            from psycopg2.extensions import parse_dsn

            return dict(parse_dsn(dsn))
        from psycopg.conninfo import conninfo_to_dict

        return dict(conninfo_to_dict(dsn))
    except Exception:
        raise ConfigError("a published DSN is not a valid libpq connection string") from None


def _first_line(e: BaseException | None) -> str:
    text = str(e).strip() if e is not None else ""
    return text.splitlines()[0] if text else type(e).__name__


def read_only() -> bool:
    """In a web.py handler or template: whether the site is read-only now (the middleware's banner flag)."""
    env = web.ctx.get("env") or {}
    return bool(env.get("tenure.read_only", False))


# -- configuration: the `web` table of the router's settings ----------------------------------

@dataclass(frozen=True)
class DatabaseSettings:
    """One entry of ``web.databases``: how :func:`database` builds that object."""

    service: str
    role: str = "primary"
    driver: str = "psycopg2"
    max_lag_bytes: int = DEFAULT_MAX_LAG
    cooldown: float = 1.0


@dataclass(frozen=True)
class WebSettings:
    """The ``web`` table: the service whose state drives read-only mode, its 503, the allowlist, databases."""

    service: str = "db"
    retry_after: int = 5
    allow: list[str] = field(default_factory=list)
    health_path: str = "/health"
    hold: float = 1.0  # seconds a write waits for a new primary while there is none (holds a sync worker)
    databases: dict[str, DatabaseSettings] = field(default_factory=dict)


def web_settings(source: str | Mapping[str, Any], section: str | None = None) -> WebSettings:
    """The ``web`` table of a router config (file or mapping, as :meth:`Router.from_config` reads it)."""
    data = load_settings(source)
    if section is not None:
        if not isinstance(data.get(section), Mapping):
            raise ConfigError(f"config has no {section!r} table")
        data = data[section]
    raw = dict(data.get("web") or {})
    dbs_raw = raw.pop("databases", {}) or {}
    settings = build_section(WebSettings, "web", raw)
    check_name("service", settings.service)
    if isinstance(settings.retry_after, bool) or settings.retry_after < 0:
        raise ConfigError(f"[web] retry_after must be whole seconds >= 0, got {settings.retry_after!r}")
    parse_allow(settings.allow)
    if not settings.health_path.startswith("/"):
        raise ConfigError(f"[web] health_path must start with /, got {settings.health_path!r}")
    if not isinstance(dbs_raw, Mapping):
        raise ConfigError("[web] databases must be a table of name -> settings")
    dbs = {}
    for name, entry in dbs_raw.items():
        entry = {"service": settings.service, **(entry or {})} if isinstance(entry, Mapping) or entry is None else entry
        d = build_section(DatabaseSettings, f"web.databases.{name}", entry)
        check_name("service", d.service)
        if d.role not in ROLES:
            raise ConfigError(f"[web.databases.{name}] role must be one of {', '.join(ROLES)}, got {d.role!r}")
        if d.driver not in DRIVERS:
            raise ConfigError(f"[web.databases.{name}] driver must be one of {', '.join(DRIVERS)}, got {d.driver!r}")
        if d.max_lag_bytes < 0 or d.cooldown < 0:
            raise ConfigError(f"[web.databases.{name}] max_lag_bytes and cooldown must be >= 0")
        dbs[str(name)] = d
    return replace(settings, databases=dbs)


def databases(router: Router, settings: WebSettings, **params: Any) -> dict[str, RoutedDB]:
    """Every database of ``settings.databases``, by name, with the ``web.database`` keywords ``params``."""
    return {name: database(router, d.service, role=d.role, driver=d.driver, max_lag_bytes=d.max_lag_bytes,
                           cooldown=d.cooldown, **params)
            for name, d in settings.databases.items()}


def wsgi(app: "web.application", router: Router, settings: WebSettings | None = None) -> Callable[..., Any]:
    """The WSGI callable of a web.py application on tenure: 503s instead of 500s, read-only mode, ``/health``.

    Adds :func:`unavailable_processor` to ``app`` and wraps its ``wsgifunc()``
    in :class:`~tenure.web.wsgi.ReadOnlyMiddleware` (``settings.allow``) and
    :class:`~tenure.web.health.HealthMiddleware`.
    """
    s = settings or WebSettings()
    app.add_processor(unavailable_processor(retry_after=s.retry_after))
    inner = ReadOnlyMiddleware(app.wsgifunc(), router, s.service, retry_after=s.retry_after, allow=s.allow,
                               hold=s.hold)
    return HealthMiddleware(inner, router, [s.service], path=s.health_path)
