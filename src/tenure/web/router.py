"""The web tier's view of its services: where the primary is, which replicas serve reads, and when to be read-only.

A :class:`Router` keeps, per process, one etcd watch for each service it is
asked about (on ``svc/<service>/``) and answers lookups from memory:
``router.service("db").primary`` is a dict lookup and an attribute read, with
no etcd round trip. What the keys mean is in :mod:`tenure.web.state`.

Fail safe: a view is read-only -- ``primary`` is None -- when there is no
valid primary, before the process has read the service for the first time,
and when the process has not heard from etcd for longer than ``stale_after``
seconds. The watch asks etcd for progress every second, so a healthy process
hears from etcd at least that often; the default bound
(:data:`DEFAULT_STALE_AFTER`, 4 s = twice the default 2 s lease ttl) is longer
than the time the watch takes to move off a frozen or cut-off etcd member (3 s
without an answer, then a reconnect), so losing one etcd member never turns
the site read-only, and short enough that a cut-off worker stops sending
writes about when a successor primary could be taking over. Writes sent
meanwhile to a deposed primary are refused by its own write guard: the bound
is about serving clean 503s, not about data safety.

Pre-fork servers (gunicorn, uwsgi): nothing talks to etcd until a view is read
in a process, and a process that finds itself forked (``os.register_at_fork``,
or a pid that changed) drops what it inherited -- connections, watches,
pools -- without closing them (that would close the parent's) and starts its
own on first use. A router may be built in the master at import time. The
fork generation and the set of live routers are the only process-wide state:
a fork is a process-wide event.
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
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from .. import records
from ..config import parse_etcd_section
from ..errors import ConfigError, TenureError, UnknownService, WaitTimeout
from ..etcd import Client, Event, KeyValue, Watch, check_client_settings
from ..records import check_name
from .state import EMPTY, Endpoint, ServiceState, parse_state, relevant

if TYPE_CHECKING:
    from .http import HttpServiceView
    from .memcache import Client as MemcacheClient
    from .postgres import PostgresProvider
    from .solr import SolrView

log = logging.getLogger("tenure.web")

DEFAULT_STALE_AFTER = 4.0  # seconds without word from etcd before a view turns read-only; see the module doc
CLOCK_EVERY = 0.1  # seconds between checks of each watch's last answer (and read-only transitions)

_monotonic = time.monotonic

# Bumped in a child process after fork; a view started under another value
# belongs to the parent and restarts itself on first use.
_FORK_GEN = 0
_ROUTERS: "weakref.WeakSet[Router]" = weakref.WeakSet()




class ServiceView:
    """One service as this process sees it. Reads are memory reads; the watch thread replaces the state.

    Obtain with :meth:`Router.service`; the same object is returned every
    time, in every process (after a fork it starts its own watch on first use).
    """

    __slots__ = ("name", "_router", "_state", "_heard", "_gen", "_stale_after", "_watch", "_kvs", "_cond",
                 "_ready", "_callbacks", "_deliver_lock", "_delivered", "_warned_missing", "_rings", "__weakref__")

    def __init__(self, router: "Router", name: str) -> None:
        self.name = name
        self._router = router
        self._stale_after = router.stale_after
        self._callbacks: list[Callable[[ServiceView], None]] = []
        self._reset()

    def _reset(self) -> None:
        """Forget everything learnt (new process, or closed router); callbacks stay."""
        self._state = EMPTY
        self._heard = -math.inf  # monotonic time of the last answer from etcd
        self._gen = -1  # the fork generation this view's watch runs in; -1: not started
        self._watch: Watch | None = None
        self._kvs: dict[str, KeyValue] = {}
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._deliver_lock = threading.RLock()
        self._delivered: tuple[Any, ...] | None = None
        self._warned_missing = False
        self._rings: tuple[KeyValue, ...] = ()

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

    def valid_primary(self) -> Endpoint | None:
        """:attr:`primary` without starting anything (for callbacks and the router's own threads)."""
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

    @property
    def ring_records(self) -> tuple[KeyValue, ...]:
        """The service's memcached ring records (``ring/<epoch>`` keys) as last received, oldest first."""
        return self._rings

    def peek(self) -> ServiceState:
        """The state as last received, without starting a watch (safe in a pre-fork master and in callbacks)."""
        return self._state

    @property
    def generation(self) -> int:
        """The fork generation this view's watch runs in (-1 before it starts); changes in a forked child."""
        return self._gen

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
                    raise self.unknown_error()
                raise WaitTimeout(f"no primary for {self.name!r} within {timeout:g} s: {self.reason}")
            with self._cond:
                self._cond.wait(min(left, CLOCK_EVERY))

    def unknown_error(self) -> UnknownService:
        """The error to raise when this service turned out to have no keys in etcd at all."""
        return UnknownService(
            f"service {self.name!r} has no keys in etcd under {self._router.namespace}/{records.service_prefix(self.name)}: "
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
        return relevant(self.name, key) or records.ring_epoch_of(self.name, key) is not None

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
        state = parse_state(self.name, self._kvs, revision, exists)
        self._rings = tuple(kv for k, kv in sorted(self._kvs.items()) if records.ring_epoch_of(self.name, k))
        self._state = state
        if state.exists is False and not self._warned_missing:
            self._warned_missing = True
            log.warning("service %r has no keys in etcd under %s: unknown service name?", self.name,
                        records.service_prefix(self.name))
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
        if self._delivered is not None and (self.valid_primary() is None) != self._delivered[-1]:
            with self._cond:
                self._cond.notify_all()
            self._deliver()

    def _signature(self) -> tuple[Any, ...]:
        s = self._state
        members = tuple(sorted(
            (name, s.member_revisions.get(name, 0), rec.get("dsn"), rec.get("address"), rec.get("role"),
             rec.get("healthy"), rec.get("streaming"))
            for name, rec in s.members.items()))
        rings = tuple(kv.mod_revision for kv in self._rings)
        return (s.primary, s.replicas, members, rings, self.valid_primary() is None)

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


class Router:
    """Per-process views of services, from one etcd watch per service; see the module doc.

    ``client_or_endpoints`` is a :class:`tenure.Client`, or etcd endpoints
    (``"http://host:port"``, a list or a comma-separated string) from which
    the router makes its own client, in each process that uses it, with
    ``namespace``, ``timeout``, ``retry_for`` and the TLS and auth settings
    of :func:`tenure.connect`. ``stale_after`` is the
    fail-safe bound in seconds; it must exceed the watch's progress interval.
    """

    def __init__(self, client_or_endpoints: Client | str | Sequence[str], *,
                 stale_after: float = DEFAULT_STALE_AFTER, namespace: str = "/tenure",
                 timeout: float = 1.0, retry_for: float = 5.0, ca_cert: str | None = None,
                 cert: str | None = None, key: str | None = None, user: str | None = None,
                 password: str | None = None) -> None:
        tls = {"ca_cert": ca_cert, "cert": cert, "key": key, "user": user, "password": password}
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
            self._endpoints = [e.url for e in check_client_settings(
                client_or_endpoints, namespace=namespace, timeout=timeout, retry_for=retry_for, **tls)]
            self.namespace = "/" + namespace.strip("/")
            self._client_args = {"namespace": namespace, "timeout": timeout, "retry_for": retry_for, **tls}
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
        self._rings: dict[str, MemcacheClient] = {}
        self._inherited: list[Any] = []  # a parent's objects, kept (not closed) so that GC does not close them
        self._closed = False
        _ROUTERS.add(self)

    @classmethod
    def from_config(cls, source: str | Mapping[str, Any], section: str | None = None) -> "Router":
        """A router from a TOML or YAML file (path) or a mapping, e.g. a section of ``openlibrary.yml``.

        The settings: an ``etcd`` table (the sidecar's: endpoints, namespace,
        timeout, TLS files, user and password), an optional ``router`` table
        (``stale_after``) and an optional ``web`` table, left to
        :func:`tenure.web.webpy.web_settings`. ``section`` names the table of
        the file or mapping that holds them (``"tenure"``). A ``.yml`` or
        ``.yaml`` path is read with PyYAML, anything else as TOML.
        """
        data = load_settings(source)
        if section is not None:
            if not isinstance(data.get(section), Mapping):
                raise ConfigError(f"router config has no {section!r} table")
            data = data[section]
        unknown = sorted(set(data) - {"etcd", "router", "web"})
        if unknown:
            raise ConfigError(f"unknown section(s) in router config: {', '.join(map(str, unknown))} "
                              "(known: etcd, router, web)")
        if "etcd" not in data:
            raise ConfigError("router config needs an [etcd] table with endpoints")
        etcd = parse_etcd_section(data["etcd"])
        router = data.get("router") or {}
        if not isinstance(router, Mapping) or set(router) - {"stale_after"}:
            raise ConfigError(f"[router] takes only stale_after, got {dict(router) if isinstance(router, Mapping) else router!r}")
        return cls(etcd.endpoints, namespace=etcd.namespace, timeout=etcd.timeout,
                   stale_after=router.get("stale_after", DEFAULT_STALE_AFTER), ca_cert=etcd.ca_cert,
                   cert=etcd.cert, key=etcd.key, user=etcd.user, password=etcd.password)

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
                    from .postgres import PostgresProvider

                    provider = PostgresProvider(self.service(service), **settings)
                    self._providers[service] = provider
        return provider

    def memcache(self, service: str, **settings: Any) -> "MemcacheClient":
        """A python-memcached compatible client over the ring of ``service`` (one per router; see docs/memcache.md)."""
        ring = self._rings.get(service)
        if ring is None:
            from .memcache import Client as MemcacheClient

            with self._lock:
                ring = self._rings.get(service)
                if ring is None:
                    ring = MemcacheClient(self.service(service), **settings)
                    self._rings[service] = ring
        return ring

    def solr(self, service: str, **settings: Any) -> "SolrView":
        """The Solr leader (updates) and caught-up read cores of ``service`` (see :mod:`tenure.web.solr`)."""
        from .solr import SolrView

        return SolrView(self.service(service), **settings)

    def http(self, service: str) -> "HttpServiceView":
        """The active instance of a generic HTTP service (see :mod:`tenure.web.http`)."""
        from .http import HttpServiceView

        return HttpServiceView(self.service(service))

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
            view._watch = client.watch(records.service_prefix(view.name), prefix=True,
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
                # In a child of the process that was given a client: the same settings, its own channels.
                self._client = (self._given.clone() if self._given is not None
                                else Client(self._endpoints, **self._client_args))
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
            provider.after_fork(self._inherited)
        for ring in self._rings.values():
            ring.after_fork()

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


def load_settings(source: str | Mapping[str, Any]) -> Mapping[str, Any]:
    """A config file (TOML, or YAML by its extension) or a mapping, as a mapping; ConfigError otherwise."""
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, str):
        raise ConfigError(f"from_config needs a path or a mapping, got {type(source).__name__}")
    yaml_file = source.endswith((".yml", ".yaml"))
    try:
        with open(source, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read router config {source}: {e.strerror}") from None
    if yaml_file:
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"reading {source} needs PyYAML (pip install pyyaml), "
                              "or pass the already-loaded section as a mapping") from None
        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"router config {source} is not valid YAML: {e}") from None
    else:
        import tomllib

        try:
            data = tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"router config {source} is not valid TOML: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"router config {source} must hold a table at the top")
    return data


def _after_fork_in_child() -> None:
    global _FORK_GEN
    _FORK_GEN += 1
    for router in list(_ROUTERS):
        try:
            router._forked()
        except Exception:  # never break the child's fork
            log.exception("router: resetting after fork failed")


os.register_at_fork(after_in_child=_after_fork_in_child)
