"""The web tier's view of its services: where the primary is, which replicas serve reads, and when to be read-only.

A :class:`Router` keeps, per process, one etcd watch for each service it is
asked about (on ``svc/<service>/``; history and candidate keys are skipped)
and answers lookups from memory: ``router.service("db").primary`` is a dict lookup and an attribute
read, with no etcd round trip. What it reads is what the sidecars publish:

* ``svc/S/primary`` = ``{"member", "dsn", "token"}``, written once the new
  primary is writable and bound to the leader's lease; it is believed only
  while ``svc/S/leader`` exists with that token as its create revision (so a
  resigned term stops counting the moment its leader key goes, even before
  the lease is revoked);
* ``svc/S/members/<m>``: replicas are the members with role ``standby``,
  ``healthy`` and ``streaming``.

Fail safe (DESIGN.md invariant 5): a view is read-only -- ``primary`` is None
-- when there is no valid primary, before the process has read the service
for the first time, and when the process has not heard from etcd for longer
than ``stale_after`` seconds. The watch asks etcd for progress every second,
so a healthy process hears from etcd at least that often; the default bound
(:data:`DEFAULT_STALE_AFTER`, 4 s = twice the default 2 s lease ttl) is longer
than the time the watch takes to move off a frozen etcd member (3 s without an
answer, then a reconnect), so losing one etcd member never turns the site
read-only, and short enough that a cut-off worker stops sending writes about
when a successor primary could be taking over. Writes sent meanwhile to a
deposed primary are refused by its own guard (invariant 4): the bound is about
serving clean 503s, not about data safety.

Pre-fork servers (gunicorn, uwsgi): nothing talks to etcd until a view is read
in a process, and a process that finds itself forked (``os.register_at_fork``,
or a pid that changed) drops what it inherited -- connections, watches,
pools -- without closing them (that would close the parent's) and starts its
own on first use. A router may be built in the master at import time.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from .errors import ConfigError, PrimaryUnavailable, ReadOnly, TenureError, UnknownService, WaitTimeout  # noqa: F401 (re-exported)
from .etcd import Client, Event, KeyValue, Watch, parse_endpoints
from .keys import check_name, service_key

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

    from .services.memcache import RingClient

log = logging.getLogger("tenure.router")

DEFAULT_STALE_AFTER = 4.0  # seconds without word from etcd before a view turns read-only; see the module doc
CLOCK_EVERY = 0.1  # seconds between checks of each watch's last answer (and read-only transitions)

_monotonic = time.monotonic

# Bumped in a child process after fork; a view started under another value
# belongs to the parent and restarts itself on first use.
_FORK_GEN = 0
_ROUTERS: "weakref.WeakSet[Router]" = weakref.WeakSet()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One member a client can connect to: ``dsn`` is its DSN or address; ``token`` the term, for a primary."""

    member: str
    dsn: str
    token: int | None = None  # the fencing token of the primary's term; None for a replica
    zone: str = ""


@dataclass(frozen=True, slots=True)
class _State:
    """What one snapshot of ``svc/<service>/`` says; replaced whole, never changed in place."""

    primary: Endpoint | None = None  # as published, whatever the staleness
    replicas: tuple[Endpoint, ...] = ()
    readable: tuple[Endpoint, ...] = ()  # where reads may go, best first
    members: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    member_revisions: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # create revisions
    exists: bool | None = None  # None before the first snapshot
    revision: int = 0


_EMPTY = _State()


class ServiceView:
    """One service as this process sees it. Reads are memory reads; the watch thread replaces the state.

    Obtain with :meth:`Router.service`; the same object is returned every
    time, in every process (after a fork it starts its own watch on first use).
    """

    __slots__ = ("name", "_base", "_router", "_state", "_heard", "_gen", "_stale_after", "_watch", "_kvs", "_cond",
                 "_ready", "_callbacks", "_deliver_lock", "_delivered", "_warned_missing", "__weakref__")

    def __init__(self, router: "Router", name: str) -> None:
        self.name = name
        self._base = service_key(name, "")
        self._router = router
        self._stale_after = router.stale_after
        self._callbacks: list[Callable[[ServiceView], None]] = []
        self._reset()

    def _reset(self) -> None:
        """Forget everything learnt (new process, or closed router); callbacks stay."""
        self._state = _EMPTY
        self._heard = -math.inf  # monotonic time of the last answer from etcd
        self._gen = -1  # the fork generation this view's watch runs in; -1: not started
        self._watch: Watch | None = None
        self._kvs: dict[str, KeyValue] = {}
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._deliver_lock = threading.RLock()
        self._delivered: tuple[Any, ...] | None = None
        self._warned_missing = False

    # -- the hot path: plain reads -----------------------------------------

    @property
    def primary(self) -> Endpoint | None:
        """The current primary, or None while the service is read-only (see :attr:`read_only`)."""
        if self._gen != _FORK_GEN:
            self._start()
        p = self._state.primary
        if p is not None and _monotonic() - self._heard <= self._stale_after:
            return p
        if p is not None:
            self._router._check_pid()  # a fork the hooks did not see leaves a view that never hears again
        return None

    def _valid_primary(self) -> Endpoint | None:
        """:attr:`primary` without starting anything (for the router's own threads)."""
        p = self._state.primary
        return p if p is not None and _monotonic() - self._heard <= self._stale_after else None

    @property
    def read_only(self) -> bool:
        """True when writes must not be attempted: no valid primary, no view yet, or etcd not heard from lately."""
        return self.primary is None

    @property
    def replicas(self) -> tuple[Endpoint, ...]:
        """Standbys that are healthy and streaming, as last seen (kept while etcd is out of sight: reads go on)."""
        if self._gen != _FORK_GEN:
            self._start()
        return self._state.replicas

    @property
    def readable(self) -> tuple[Endpoint, ...]:
        """Servers reads may use, best first: streaming replicas, the primary, then other healthy members."""
        if self._gen != _FORK_GEN:
            self._start()
        return self._state.readable

    @property
    def last_primary(self) -> Endpoint | None:
        """The primary of the current term as published, even while etcd is out of sight (None once it is gone)."""
        if self._gen != _FORK_GEN:
            self._start()
        return self._state.primary

    @property
    def members(self) -> Mapping[str, Mapping[str, Any]]:
        """Every live member record (JSON as published), by member name."""
        if self._gen != _FORK_GEN:
            self._start()
        return self._state.members

    @property
    def exists(self) -> bool | None:
        """Whether etcd has any key for this service; None before the first snapshot."""
        if self._gen != _FORK_GEN:
            self._start()
        return self._state.exists

    @property
    def stale_for(self) -> float:
        """Seconds since this process last heard from etcd about this service (inf before the first answer)."""
        if self._gen != _FORK_GEN:
            self._start()
        return _monotonic() - self._heard

    @property
    def reason(self) -> str | None:
        """Why the view is read-only (None if it is not)."""
        if self.primary is not None:
            return None
        s = self._state
        if s.exists is None:
            return f"no view of {self.name!r} yet (waiting for the first answer from etcd)"
        if s.exists is False:
            return f"service {self.name!r} has no keys in etcd"
        if s.primary is None:
            return f"{self.name!r} has no primary (failover in progress?)"
        return f"etcd not heard from for {self.stale_for:.1f} s (bound {self._stale_after:g} s)"

    # -- waiting and callbacks -------------------------------------------------

    def ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for this process's first snapshot of the service; True once it has one."""
        if self._gen != _FORK_GEN:
            self._start()
        self._router._check_pid()
        return self._ready.wait(timeout)

    def wait_for_primary(self, timeout: float) -> Endpoint:
        """Block until there is a valid primary and return it.

        After ``timeout`` s raises :class:`UnknownService` if etcd still has no
        key at all for the service (a wrong name, or nothing registered yet),
        else :class:`WaitTimeout`.
        """
        if self._gen != _FORK_GEN:
            self._start()
        self._router._check_pid()
        deadline = _monotonic() + timeout
        while True:
            p = self.primary
            if p is not None:
                return p
            left = deadline - _monotonic()
            if left <= 0:
                if self._state.exists is False:
                    raise self._unknown()
                raise WaitTimeout(f"no primary for {self.name!r} within {timeout:g} s: {self.reason}")
            with self._cond:
                self._cond.wait(min(left, CLOCK_EVERY))

    def _unknown(self) -> UnknownService:
        return UnknownService(
            f"service {self.name!r} has no keys in etcd under {self._router.namespace}/{service_key(self.name)}/: "
            "is the name (or the namespace) right, and is its sidecar or registrar running?")

    def on_change(self, callback: Callable[["ServiceView"], None]) -> Callable[[], None]:
        """Call ``callback(view)`` whenever the primary, the replicas, the member set or :attr:`read_only` change.

        Returns a function that unsubscribes. Callbacks run on the router's
        threads, one at a time: keep them short. A callback subscribed before
        this process's first snapshot is called with it; one subscribed later
        is not called for the state at the time: read the view when
        subscribing. Subscribing does not start the view's watch; reading does.
        """
        if not callable(callback):
            raise ConfigError(f"on_change needs a callable, got {callback!r}")
        with self._deliver_lock:
            self._callbacks.append(callback)
        # Subscribing is not a read: it starts nothing (a pre-fork master may subscribe).

        def unsubscribe() -> None:
            with self._deliver_lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    # -- the watch thread's side -------------------------------------------------

    def _start(self) -> None:
        self._router._start_view(self)

    def _relevant(self, key: str) -> bool:
        # Of everything under svc/<service>/, only these make the view; history and candidates do not.
        base = self._base
        return key == base + "leader" or key == base + "primary" or key.startswith(base + "members/")

    def _on_snapshot(self, kvs: list[KeyValue], revision: int) -> None:
        self._heard = _monotonic()
        self._kvs = {kv.key: kv for kv in kvs if self._relevant(kv.key)}
        self._update(revision, bool(kvs))

    def _on_events(self, events: list[Event]) -> None:
        self._heard = _monotonic()
        changed = False
        for ev in events:
            if not self._relevant(ev.kv.key):
                continue
            changed = True
            if ev.type == "put":
                self._kvs[ev.kv.key] = ev.kv
            else:
                self._kvs.pop(ev.kv.key, None)
        exists = bool(self._state.exists) or any(ev.type == "put" for ev in events)
        if changed or exists != self._state.exists:
            self._update(events[-1].kv.mod_revision if events else self._state.revision, exists)

    def _update(self, revision: int, exists: bool) -> None:
        prev = self._state
        state = _parse(self.name, self._kvs, revision, exists)
        self._state = state
        if state.exists is False and not self._warned_missing:
            self._warned_missing = True
            log.warning("service %r has no keys in etcd under svc/%s/: unknown service name?", self.name, self.name)
        if state.primary != prev.primary:
            p = state.primary
            log.info("%s: primary %s", self.name,
                     f"{p.member} (token {p.token})" if p is not None else "none: read-only")
        if not self._ready.is_set():
            log.debug("%s: first view in process %d (revision %d)", self.name, os.getpid(), revision)
            self._ready.set()
        with self._cond:
            self._cond.notify_all()
        self._deliver()

    def _sample(self) -> None:
        """From the clock thread: note the watch's last answer; report read-only transitions."""
        w = self._watch
        if w is not None:
            # Read the time first: while the stream is up (connected) every value written to
            # last_contact is an answer's; the watch also writes it when it *starts* a stream.
            lc = w.last_contact
            if w.connected.is_set() and lc > self._heard:
                self._heard = lc
        if self._delivered is not None and (self._valid_primary() is None) != self._delivered[-1]:
            with self._cond:
                self._cond.notify_all()
            self._deliver()

    def _signature(self) -> tuple[Any, ...]:
        s = self._state
        members = tuple(sorted(
            (name, s.member_revisions.get(name, 0), rec.get("dsn"), rec.get("address"), rec.get("role"),
             rec.get("healthy"), rec.get("streaming"))
            for name, rec in s.members.items()))
        return (s.primary, s.replicas, members, self._valid_primary() is None)

    def _deliver(self) -> None:
        # Under the lock, callbacks included: they run one at a time and see changes in order.
        with self._deliver_lock:
            sig = self._signature()
            if sig == self._delivered:
                return
            self._delivered = sig
            for cb in list(self._callbacks):
                try:
                    cb(self)
                except Exception:
                    log.exception("%s: on_change callback %r failed", self.name, cb)

    def __repr__(self) -> str:
        p = self._state.primary
        return (f"<ServiceView {self.name} primary={p.member if p else None} token={p.token if p else None} "
                f"replicas={[r.member for r in self._state.replicas]} read_only={self.read_only}>")


def _parse(service: str, kvs: Mapping[str, KeyValue], revision: int, exists: bool) -> _State:
    base = service_key(service, "")
    leader = kvs.get(base + "leader")
    primary = None
    kv = kvs.get(base + "primary")
    if kv is not None:
        rec = _json(kv)
        token = rec.get("token") if isinstance(rec, dict) else None
        if (isinstance(token, int) and not isinstance(token, bool) and token > 0
                and isinstance(rec.get("dsn"), str) and isinstance(rec.get("member"), str)):
            # Believed only while its term is the current one.
            if leader is not None and leader.create_revision == token:
                lrec = _json(leader)
                zone = ((lrec.get("value") or {}).get("zone") or "") if isinstance(lrec, dict) else ""
                primary = Endpoint(rec["member"], rec["dsn"], token, str(zone))
        else:
            log.warning("ignoring a malformed primary record for %s: %r", service, kv.value[:200])
    members: dict[str, Mapping[str, Any]] = {}
    revisions: dict[str, int] = {}
    prefix = base + "members/"
    for key, kv in kvs.items():
        if key.startswith(prefix):
            rec = _json(kv)
            if isinstance(rec, dict):
                name = key[len(prefix):]
                members[name] = MappingProxyType(rec)
                revisions[name] = kv.create_revision
    replicas = tuple(
        Endpoint(name, rec["dsn"], None, str(rec.get("zone") or ""))
        for name, rec in sorted(members.items())
        if rec.get("role") == "standby" and rec.get("healthy") and rec.get("streaming")
        and isinstance(rec.get("dsn"), str) and (primary is None or name != primary.member))
    # Reads: streaming replicas, then the primary, then any other healthy server (a standby that
    # stopped streaming because its primary died still serves slightly stale reads).
    readable = list(replicas)
    if primary is not None:
        readable.append(Endpoint(primary.member, primary.dsn, None, primary.zone))
    seen = {e.member for e in readable}
    for name, rec in sorted(members.items()):
        if (name not in seen and rec.get("healthy") and rec.get("role") in ("standby", "primary")
                and isinstance(rec.get("dsn"), str)):
            readable.append(Endpoint(name, rec["dsn"], None, str(rec.get("zone") or "")))
    return _State(primary, replicas, tuple(readable), MappingProxyType(members), MappingProxyType(revisions),
                  exists, revision)


def _json(kv: KeyValue) -> Any:
    try:
        return kv.json()
    except ValueError:
        return None


class Router:
    """Per-process views of services, from one etcd watch per service; see the module doc.

    ``client_or_endpoints`` is a :class:`tenure.Client`, or etcd endpoints
    (``"http://host:port"``, a list or a comma-separated string) from which
    the router makes its own client, in each process that uses it, with
    ``namespace``, ``timeout`` and ``retry_for``. ``stale_after`` is the
    fail-safe bound in seconds; it must exceed the watch's progress interval.
    """

    def __init__(self, client_or_endpoints: Client | str | Sequence[str], *,
                 stale_after: float = DEFAULT_STALE_AFTER, namespace: str = "/tenure",
                 timeout: float = 1.0, retry_for: float = 5.0) -> None:
        if isinstance(stale_after, bool) or not isinstance(stale_after, (int, float)) \
                or not Watch.PROGRESS_EVERY < stale_after < 3600:
            raise ConfigError(
                f"stale_after must be a number of seconds above the watch's progress interval "
                f"({Watch.PROGRESS_EVERY:g} s; the default is {DEFAULT_STALE_AFTER:g} s), got {stale_after!r}")
        self.stale_after = float(stale_after)
        self._given: Client | None = None
        self._given_pid = os.getpid()  # a given client belongs to this process; a child makes its own
        if isinstance(client_or_endpoints, Client):
            self._given = client_or_endpoints
            self._endpoints = [e.url for e in client_or_endpoints.endpoints]
            self.namespace = client_or_endpoints.namespace
            self._client_args: dict[str, Any] = {"namespace": self.namespace,
                                                 "timeout": client_or_endpoints.timeout,
                                                 "retry_for": client_or_endpoints.retry_for}
        elif isinstance(client_or_endpoints, (str, list, tuple)):
            # Checked here, as Client would, but without making one: nothing of gRPC in a pre-fork master.
            self._endpoints = [e.url for e in parse_endpoints(client_or_endpoints)]  # ConfigError if malformed
            if not isinstance(namespace, str) or not namespace.strip("/"):
                raise ConfigError(f"namespace must be a non-empty path such as '/tenure', got {namespace!r}")
            if not timeout > 0 or not retry_for >= 0:
                raise ConfigError(f"timeout must be > 0 and retry_for >= 0 (got {timeout}, {retry_for})")
            self.namespace = "/" + namespace.strip("/")
            self._client_args = {"namespace": namespace, "timeout": timeout, "retry_for": retry_for}
        else:
            raise ConfigError("Router needs a tenure.Client or etcd endpoints such as 'http://127.0.0.1:2379', "
                              f"got {type(client_or_endpoints).__name__}")
        self._pid = os.getpid()
        self._lock = threading.RLock()
        self._client: Client | None = None
        self._views: dict[str, ServiceView] = {}
        self._clock: threading.Thread | None = None
        self._clock_stop = threading.Event()
        self._providers: dict[str, PostgresProvider] = {}
        self._rings: dict[str, RingClient] = {}
        self._inherited: list[Any] = []  # a parent's objects, kept (not closed) so that GC does not close them
        self._closed = False
        _ROUTERS.add(self)

    @classmethod
    def from_config(cls, source: str | Mapping[str, Any]) -> "Router":
        """A router from a TOML file (path) or a dict with an ``[etcd]`` table and an optional ``[router]`` table.

        ``[etcd]`` takes ``endpoints``, ``namespace``, ``timeout`` (as the
        sidecar's config; TLS and auth need a :class:`tenure.Client` passed
        to the constructor); ``[router]`` takes ``stale_after``.
        """
        import tomllib

        if isinstance(source, str):
            try:
                with open(source, "rb") as f:
                    data: Mapping[str, Any] = tomllib.load(f)
            except OSError as e:
                raise ConfigError(f"cannot read router config {source}: {e.strerror}") from None
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"router config {source} is not valid TOML: {e}") from None
        elif isinstance(source, Mapping):
            data = source
        else:
            raise ConfigError(f"from_config needs a path or a mapping, got {type(source).__name__}")
        from .config import EtcdConfig, _build

        unknown = sorted(set(data) - {"etcd", "router"})
        if unknown:
            raise ConfigError(f"unknown section(s) in router config: {', '.join(unknown)} (known: etcd, router)")
        if "etcd" not in data:
            raise ConfigError("router config needs an [etcd] table with endpoints")
        etcd = _build(EtcdConfig, "etcd", data["etcd"])
        if etcd.ca_cert or etcd.cert or etcd.user:
            raise ConfigError("for TLS or auth, build a tenure.Client and pass it to Router()")
        router = data.get("router", {})
        if not isinstance(router, Mapping) or set(router) - {"stale_after"}:
            raise ConfigError(f"[router] takes only stale_after, got {dict(router) if isinstance(router, Mapping) else router!r}")
        return cls(etcd.endpoints, namespace=etcd.namespace, timeout=etcd.timeout,
                   stale_after=router.get("stale_after", DEFAULT_STALE_AFTER))

    # -- lookups --------------------------------------------------------------------

    def service(self, name: str) -> ServiceView:
        """The view of service ``name`` (the same object on every call). Raises ConfigError for an invalid name."""
        try:
            return self._views[name]
        except (KeyError, TypeError):
            return self._open(name)

    def _open(self, name: str) -> ServiceView:
        check_name("service", name)
        with self._lock:
            if self._closed:
                raise TenureError("router is closed")
            view = self._views.get(name)
            if view is None:
                view = ServiceView(self, name)
                # Replace the dict rather than change it under readers' feet.
                self._views = {**self._views, name: view}
            return view

    def ready(self, timeout: float, services: Sequence[str] | None = None) -> bool:
        """Wait up to ``timeout`` s until every view (or the named ones) has its first snapshot."""
        deadline = _monotonic() + timeout
        views = [self.service(n) for n in services] if services is not None else list(self._views.values())
        return all(v.ready(max(0.0, deadline - _monotonic())) for v in views)

    def postgres(self, service: str, **settings: Any) -> "PostgresProvider":
        """The PostgreSQL connection provider for ``service`` (one per router; ``settings`` apply on first call)."""
        provider = self._providers.get(service)
        if provider is None:
            with self._lock:
                provider = self._providers.get(service)
                if provider is None:
                    provider = PostgresProvider(self.service(service), **settings)
                    self._providers[service] = provider
        return provider

    def memcache(self, service: str, **settings: Any) -> "RingClient":
        """A pymemcache ``HashClient`` over the live members of ``service``, kept in sync with etcd."""
        ring = self._rings.get(service)
        if ring is None:
            from .services.memcache import RingClient

            with self._lock:
                ring = self._rings.get(service)
                if ring is None:
                    ring = RingClient(self.service(service), **settings)
                    self._rings[service] = ring
        return ring

    # -- lifecycle --------------------------------------------------------------------

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:
            _after_fork_in_child()

    def _start_view(self, view: ServiceView) -> None:
        """Start ``view``'s watch in this process (first use here)."""
        self._check_pid()
        with self._lock:
            if view._gen == _FORK_GEN:
                return
            if self._closed:
                raise TenureError("router is closed")
            client = self._ensure_client()
            view._gen = _FORK_GEN
            view._watch = client.watch(service_key(view.name, ""), prefix=True,
                                       on_snapshot=view._on_snapshot, on_events=view._on_events)
            if self._clock is None or not self._clock.is_alive():
                self._clock_stop = threading.Event()
                self._clock = threading.Thread(target=self._run_clock, args=(self._clock_stop,),
                                               name="tenure-router-clock", daemon=True)
                self._clock.start()
            log.debug("%s: watching in process %d", view.name, self._pid)

    def _ensure_client(self) -> Client:
        if self._client is None:
            if self._given is not None and os.getpid() == self._given_pid:
                self._client = self._given
            else:
                self._client = Client(self._endpoints, **self._client_args)
                if self._given is not None:
                    # Carry over TLS credentials and auth; see the report: etcd.Client could offer clone().
                    self._client._creds = self._given._creds
                    self._client._user, self._client._password = self._given._user, self._given._password
        return self._client

    def _run_clock(self, stop: threading.Event) -> None:
        gen = _FORK_GEN
        while not stop.wait(CLOCK_EVERY) and gen == _FORK_GEN:
            for view in list(self._views.values()):
                if view._gen == gen:
                    try:
                        view._sample()
                    except Exception:
                        log.exception("router clock: %s", view.name)

    def _forked(self) -> None:
        """In a child process: forget the parent's threads, connections and state, closing nothing."""
        self._pid = os.getpid()
        self._lock = threading.RLock()
        if self._client is not None:
            self._inherited.append(self._client)
        self._client = None
        self._clock = None
        for view in self._views.values():
            if view._watch is not None:
                self._inherited.append(view._watch)
            view._reset()
        for provider in self._providers.values():
            provider._forked(self._inherited)
        for ring in self._rings.values():
            ring._forked()

    def close(self) -> None:
        """Stop the watches and the clock, close pools, rings and the router's own client (not a given one)."""
        with self._lock:
            self._closed = True
            self._clock_stop.set()
            for view in self._views.values():
                if view._watch is not None:
                    view._watch.cancel()
                view._reset()
            for provider in self._providers.values():
                provider.close()
            for ring in self._rings.values():
                ring.close()
            if self._client is not None and self._client is not self._given:
                self._client.close()
            self._client = None

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _after_fork_in_child() -> None:
    global _FORK_GEN
    _FORK_GEN += 1
    for router in list(_ROUTERS):
        try:
            router._forked()
        except Exception:  # never break the child's fork
            log.exception("router: resetting after fork failed")


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- PostgreSQL -----------------------------------------------------------------------


class PostgresProvider:
    """Connections to a service's PostgreSQL primary (writes) and replicas (reads), following failover.

    ``with provider.write() as conn:`` runs on the current primary through a
    ``psycopg_pool.ConnectionPool`` of that term; it raises
    :class:`~tenure.errors.ReadOnly` while the view is read-only, and
    :class:`PrimaryUnavailable` (a ReadOnly) when the primary cannot be reached
    or refuses the write as deposed. When the primary's token changes the old
    pool is closed: its idle connections at once, connections in use when
    they are returned. ``with provider.read() as conn:`` uses a healthy
    streaming replica if there is one, else the primary, else any healthy
    standby, moving to the next when one cannot be reached (after at most
    0.5 s while others remain).

    ``timeout`` bounds the wait for a connection (s); a server that could not
    be reached is skipped for ``cooldown`` s, so requests during a failover
    fail fast rather than each wait. ``kwargs`` go to ``psycopg.connect``;
    ``pool`` to ``ConnectionPool``.
    """

    def __init__(self, view: ServiceView, *, timeout: float = 2.0, cooldown: float = 1.0, min_size: int = 1,
                 max_size: int = 4, kwargs: Mapping[str, Any] | None = None, pool: Mapping[str, Any] | None = None,
                 prewarm: bool = True) -> None:
        try:
            from psycopg_pool import ConnectionPool  # noqa: F401
        except ImportError:
            raise ConfigError("router.postgres() needs psycopg_pool: pip install 'tenure[postgres]'") from None
        if timeout <= 0 or cooldown < 0 or not 0 <= min_size <= max_size or max_size < 1:
            raise ConfigError(f"bad pool settings: timeout={timeout}, cooldown={cooldown}, "
                              f"min_size={min_size}, max_size={max_size}")
        self.view = view
        self.timeout = float(timeout)
        self.cooldown = float(cooldown)
        self._sizes = (min_size, max_size)
        self._kwargs = {"connect_timeout": max(2, math.ceil(timeout)), **(kwargs or {})}
        self._pool_args = dict(pool or {})
        self._prewarm = prewarm
        self._lock = threading.Lock()
        self._write: tuple[int, str, ConnectionPool] | None = None  # (token, dsn, pool)
        self._read: dict[str, ConnectionPool] = {}
        self._down: dict[str, float] = {}  # dsn -> monotonic time until which it is skipped
        self._closed = False
        view.on_change(self._changed)

    # -- writes ---------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator["psycopg.Connection[Any]"]:
        """A connection to the current primary, committed on success, rolled back on error."""
        import psycopg
        from psycopg_pool import PoolClosed, PoolTimeout

        p = self.view.primary
        if p is None and self.view._state.exists is None:
            self.view.ready(self.timeout)  # first use in this process: its view is milliseconds away
            p = self.view.primary
        if p is None:
            if self.view.exists is False:
                raise self.view._unknown()
            raise ReadOnly(f"{self.view.name} is read-only: {self.view.reason}")
        assert p.token is not None
        if self._down.get(p.dsn, 0.0) > _monotonic():
            raise PrimaryUnavailable(f"{self.view.name}: primary {p.member} (token {p.token}) was unreachable "
                                     f"less than {self.cooldown:g} s ago")
        pool = self._write_pool(p.token, p.dsn)
        try:
            with pool.connection(timeout=self.timeout) as conn:
                yield conn
        except PoolTimeout as e:
            self._mark_down(p.dsn)
            raise PrimaryUnavailable(f"{self.view.name}: no connection to primary {p.member} "
                                     f"(token {p.token}) within {self.timeout:g} s") from e
        except PoolClosed as e:  # the term ended while this write waited for a connection
            raise PrimaryUnavailable(f"{self.view.name}: the term of {p.member} (token {p.token}) ended "
                                     "while waiting for a connection") from e
        except psycopg.errors.ReadOnlySqlTransaction as e:
            # The deposed primary's guard (or a demoted server) refused: nothing was written.
            raise PrimaryUnavailable(f"{self.view.name}: {p.member} (token {p.token}) refused the write "
                                     f"as read-only: {e}") from e
        except psycopg.OperationalError as e:
            if _broken(e):
                self._mark_down(p.dsn)
                raise PrimaryUnavailable(f"{self.view.name}: lost the connection to primary {p.member} "
                                         f"(token {p.token}): {e}") from e
            raise

    def _write_pool(self, token: int, dsn: str) -> "ConnectionPool":
        cur = self._write
        if cur is not None and cur[0] == token and cur[1] == dsn:
            return cur[2]
        with self._lock:
            cur = self._write
            if cur is not None and cur[0] == token and cur[1] == dsn:
                return cur[2]
            if self._closed:
                raise TenureError("provider is closed")
            old, self._write = cur, (token, dsn, self._new_pool(dsn, f"{self.view.name}-primary-{token}"))
        if old is not None:
            self._close_later(old[2])
        return self._write[2]

    # -- reads ----------------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator["psycopg.Connection[Any]"]:
        """A connection to a replica (or the primary, or any healthy standby), for reads."""
        from psycopg_pool import PoolClosed, PoolTimeout

        candidates = self._read_candidates()
        if not candidates and self.view._state.exists is None:
            self.view.ready(self.timeout)  # first use in this process: its view is milliseconds away
            candidates = self._read_candidates()
        if not candidates:
            raise ReadOnly(f"{self.view.name}: no server to read from ({self.view.reason or 'no members'})")
        now = _monotonic()
        candidates.sort(key=lambda dsn: self._down.get(dsn, 0.0) > now)  # stable: skipped ones last
        errors = []
        for i, dsn in enumerate(candidates):
            pool = self._read_pool(dsn)
            # A server that is up hands out a connection in milliseconds: while others remain to be
            # tried, do not give one the whole timeout.
            wait = self.timeout if i == len(candidates) - 1 else min(self.timeout, 0.5)
            try:
                conn = pool.getconn(timeout=wait)
            except PoolTimeout:
                self._mark_down(dsn)
                errors.append(dsn)
                continue
            except PoolClosed:  # the server left the view while this read waited: try the next
                errors.append(dsn)
                continue
            try:
                with conn:  # commit or roll back; a pooled connection is not closed
                    yield conn
            finally:
                pool.putconn(conn)
            return
        raise PrimaryUnavailable(f"{self.view.name}: could not reach any server to read from: {errors}")

    def _read_candidates(self) -> list[str]:
        self.view.readable  # noqa: B018 -- starts the view in a new process
        state = self.view._state  # one state: replicas and readable agree
        readable, n = state.readable, len(state.replicas)
        replicas = [e.dsn for e in readable[:n]]
        random.shuffle(replicas)  # spread reads over the replicas; the rest keep their order
        return list(dict.fromkeys(replicas + [e.dsn for e in readable[n:]]))

    def _read_pool(self, dsn: str) -> "ConnectionPool":
        pool = self._read.get(dsn)
        if pool is None:
            with self._lock:
                pool = self._read.get(dsn)
                if pool is None:
                    if self._closed:
                        raise TenureError("provider is closed")
                    pool = self._new_pool(dsn, f"{self.view.name}-read")
                    self._read = {**self._read, dsn: pool}
        return pool

    # -- pools ----------------------------------------------------------------------

    def _new_pool(self, dsn: str, name: str) -> "ConnectionPool":
        from psycopg_pool import ConnectionPool

        args = {"min_size": self._sizes[0], "max_size": self._sizes[1], "name": name,
                "check": ConnectionPool.check_connection, "reconnect_timeout": 3600.0, **self._pool_args}
        return ConnectionPool(dsn, kwargs=dict(self._kwargs), open=True, **args)

    def _mark_down(self, dsn: str) -> None:
        if self.cooldown > 0:
            self._down[dsn] = _monotonic() + self.cooldown

    def _close_later(self, pool: "ConnectionPool") -> None:
        # close() waits for the pool's workers: not on the watch thread, nor in a request.
        threading.Thread(target=_close_pool, args=(pool,), name="tenure-pool-close", daemon=True).start()

    def _changed(self, view: ServiceView) -> None:
        p = view.last_primary
        cur = self._write
        if cur is not None and (p is None or p.token != cur[0] or p.dsn != cur[1]):
            with self._lock:
                if self._write is cur:
                    self._write = None
            log.info("%s: primary changed from token %d: closing its pool", view.name, cur[0])
            self._close_later(cur[2])
        if (p is not None and p.token is not None and self._prewarm and cur is not None and p.token != cur[0]
                and view._valid_primary() is not None):
            # A process that writes will write again: have connections ready on the new primary.
            try:
                self._write_pool(p.token, p.dsn)
            except TenureError:
                pass
        live = {r.dsn for r in view.replicas} | {rec.get("dsn") for rec in view.members.values()}
        if p is not None:
            live.add(p.dsn)
        with self._lock:
            gone = [pl for dsn, pl in self._read.items() if dsn not in live]
            if gone:
                self._read = {dsn: pl for dsn, pl in self._read.items() if dsn in live}
        for pool in gone:
            self._close_later(pool)

    def _forked(self, keep: list[Any]) -> None:
        """In a child: the parent's pools hold the parent's sockets; keep them unclosed and start afresh."""
        self._lock = threading.Lock()
        if self._write is not None:
            keep.append(self._write[2])
        keep.extend(self._read.values())
        self._write, self._read, self._down = None, {}, {}

    def close(self) -> None:
        """Close every pool."""
        with self._lock:
            self._closed = True
            pools = ([self._write[2]] if self._write is not None else []) + list(self._read.values())
            self._write, self._read = None, {}
        for pool in pools:
            _close_pool(pool)


def _close_pool(pool: "ConnectionPool") -> None:
    try:
        pool.close(timeout=1.0)
    except Exception:
        log.exception("closing pool %s", pool.name)


def _broken(e: Exception) -> bool:
    """True if the error left its connection unusable (server gone), as opposed to a query error."""
    return getattr(e, "sqlstate", None) is None or str(getattr(e, "sqlstate", "")).startswith(("08", "57P"))

