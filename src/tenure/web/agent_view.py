"""What a web worker reads from the per-host agent (``tenure agent``): the routing view, without gRPC.

:class:`AgentRouter` has the :class:`~tenure.web.router.Router` interface a
web application uses -- ``service(name)`` returning a view with ``primary``,
``read_only``, ``replicas``, ``readable``, ``members``, ``on_change`` ...,
``postgres(service)``, ``memcache(service)`` -- but keeps no etcd
connection, no watch and no thread: one agent per host keeps the watches
and publishes what they see in a file that each worker maps read-only. This
module imports neither gRPC nor protobuf.

The file (:data:`MAGIC`, little-endian)::

    0    header   magic[8] version:u32 state:u32 slots:u32 capacity:u32
    64   payload  seq:u64 active:u32 length:u32 crc:u32          (a seqlock)
    128  slots    per service: gen:f64 deadline:f64 heard:f64 beat:f64
    ...  buffers  two payload buffers of ``capacity`` bytes (JSON)

The agent rewrites every slot each ``beat`` (0.1 s): ``heard`` is when its
watch of that service last heard from etcd, ``beat`` when it wrote,
``deadline`` = min(heard + stale_after, beat + heartbeat_bound), ``gen``
the payload generation. Times are ``time.monotonic()`` values, the same
clock in every process of the host. Each field is an aligned 8-byte double,
read and written whole (a memoryview cast to doubles copies the 8 bytes at
once), so no read is torn. A worker's lookup reads ``gen`` and
``deadline`` and the clock; it re-reads the payload (under the seqlock,
checked by its CRC) only when ``gen`` changed. So a view is read-only once
the agent's beat is older than ``heartbeat_bound`` (the agent died or
froze) or its etcd answer older than ``stale_after``, as a router's is; a
memcached client then neither reads nor writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import time
import zlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..errors import ConfigError, UnknownService, WaitTimeout
from ..records import check_name
from .state import EMPTY, Endpoint, ServiceState

if TYPE_CHECKING:
    import mmap

    from .memcache import Client as MemcacheClient
    from .postgres import PostgresProvider

log = logging.getLogger("tenure.web")

MAGIC = b"TENUREAG"
VERSION = 1
LIVE, SUPERSEDED = 1, 2
HEADER = struct.Struct("<8sIIII")
PAYLOAD_AT = 64
PAYLOAD = struct.Struct("<QIII")
SLOTS_AT = 128
SLOT_FIELDS = 4  # gen, deadline, heard, beat: doubles
DEFAULT_PATH = "/run/tenure/agent.view"
DEFAULT_HEARTBEAT_BOUND = 1.5  # seconds; the agent beats every 0.1 s
_REOPEN_EVERY = 0.25  # seconds between attempts to (re)open a missing or superseded file

_monotonic = time.monotonic


def buffers_at(slots: int) -> int:
    return SLOTS_AT + slots * SLOT_FIELDS * 8


def slot_array(buffer: Any, slots: int) -> memoryview:
    """The slots of a mapped file as doubles (``[4 * i]`` gen, ``+1`` deadline, ``+2`` heard, ``+3`` beat)."""
    return memoryview(buffer)[SLOTS_AT:SLOTS_AT + slots * SLOT_FIELDS * 8].cast("d")


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A ring record as the agent saw it in etcd (what :class:`tenure.web.memcache.Client` reads)."""

    key: str
    value: bytes
    mod_revision: int


def _endpoint(d: Sequence[Any] | None) -> Endpoint | None:
    return None if d is None else Endpoint(d[0], d[1], d[2], d[3])


@dataclass(frozen=True)
class _Snapshot:
    gen: int
    index: Mapping[str, int]
    states: Mapping[str, ServiceState]
    rings: Mapping[str, tuple[RawRecord, ...]]
    stale_after: float
    heartbeat_bound: float


_EMPTY_SNAPSHOT = _Snapshot(-1, {}, {}, {}, math.inf, DEFAULT_HEARTBEAT_BOUND)


def decode_payload(data: bytes) -> _Snapshot:
    """The snapshot a payload describes (the inverse of :func:`tenure.web.agent.encode_payload`)."""
    d = json.loads(data)
    states, rings, index = {}, {}, {}
    for name, s in d["services"].items():
        index[name] = s["slot"]
        members = {m: MappingProxyType(rec) for m, rec in s["members"].items()}
        states[name] = ServiceState(_endpoint(s["primary"]), tuple(_endpoint(e) for e in s["replicas"]),  # type: ignore
                                    tuple(_endpoint(e) for e in s["readable"]),  # type: ignore[misc]
                                    MappingProxyType(members), MappingProxyType(s["member_revisions"]),
                                    s["exists"], s["revision"])
        rings[name] = tuple(RawRecord(k, v.encode(), r) for k, r, v in s["rings"])
    return _Snapshot(d["gen"], index, states, rings, float(d["stale_after"]), float(d["heartbeat_bound"]))


class AgentView:
    """One service as the host's agent sees it; the interface of :class:`~tenure.web.router.ServiceView`.

    Obtain with :meth:`AgentRouter.service`. Callbacks given to
    :meth:`on_change` run in the thread whose lookup noticed the change (there
    are no threads here).
    """

    __slots__ = ("name", "_router", "_callbacks", "_delivered", "_state", "_rings", "_slots", "_at", "_gen",
                 "_plain", "__weakref__")

    def __init__(self, router: "AgentRouter", name: str) -> None:
        self.name = name
        self._router = router
        self._callbacks: list[Callable[[AgentView], None]] = []
        self._delivered: tuple[Any, ...] | None = None
        self._state: ServiceState = EMPTY
        self._rings: tuple[RawRecord, ...] = ()
        self._slots: Any = None  # the file's slot array while this service is published in it
        self._at = 0  # index of this service's gen in it
        self._gen = -2.0
        self._plain = router._bounds is None  # no bounds of the worker's own: the agent's deadline says it all

    # -- the hot path ------------------------------------------------------------------------------

    @property
    def primary(self) -> Endpoint | None:
        """The current primary, or None while read-only (no primary, agent silent, or etcd not heard lately)."""
        a = self._slots
        if a is not None and a[self._at] == self._gen and _monotonic() <= a[self._at + 1] and self._plain:
            return self._state.primary
        self._refresh()
        return self._state.primary if self._fresh() else None

    def _times(self) -> tuple[float, float, float]:
        """(deadline, heard, beat) of this service's slot, or -inf for each while it has none."""
        a = self._slots
        if a is None:
            return -math.inf, -math.inf, -math.inf
        at = self._at
        return a[at + 1], a[at + 2], a[at + 3]

    def _fresh(self) -> bool:
        deadline, heard, beat = self._times()
        now = _monotonic()
        if now > deadline:
            return False
        bounds = self._router._bounds
        return bounds is None or (now - beat <= bounds[0] and now - heard <= bounds[1])

    def valid_primary(self) -> Endpoint | None:
        return self.primary

    @property
    def read_only(self) -> bool:
        return self.primary is None

    @property
    def replicas(self) -> tuple[Endpoint, ...]:
        self._refresh()
        return self._state.replicas

    @property
    def readable(self) -> tuple[Endpoint, ...]:
        self._refresh()
        return self._state.readable

    @property
    def last_primary(self) -> Endpoint | None:
        self._refresh()
        return self._state.primary

    @property
    def members(self) -> Mapping[str, Mapping[str, Any]]:
        self._refresh()
        return self._state.members

    @property
    def exists(self) -> bool | None:
        self._refresh()
        return self._state.exists

    @property
    def ring_records(self) -> tuple[RawRecord, ...]:
        self._refresh()
        return self._rings

    @property
    def stale_for(self) -> float:
        """Seconds since the agent last heard from etcd about this service (inf if the agent itself is silent)."""
        self._refresh()
        _, heard, beat = self._times()
        now = _monotonic()
        return math.inf if now - beat > self._router.heartbeat_bound else now - heard

    @property
    def reason(self) -> str | None:
        if self.primary is not None:
            return None
        r = self._router
        if r._mm is None:
            return f"no agent view at {r.path} (is tenure agent running?)"
        if self._slots is None:
            return f"the agent does not follow service {self.name!r} (add it to its services)"
        _, h, b = self._times()
        now = _monotonic()
        bound, stale_after = r.heartbeat_bound, r.stale_after
        if now - b > bound:
            return f"the agent has not written for {now - b:.1f} s (bound {bound:g} s)"
        if now - h > stale_after:
            return f"the agent has not heard from etcd for {now - h:.1f} s (bound {stale_after:g} s)"
        s = self._state
        if s.exists is None:
            return f"no view of {self.name!r} yet"
        if s.exists is False:
            return f"service {self.name!r} has no keys in etcd"
        return f"{self.name!r} has no primary (failover in progress?)"

    def peek(self) -> ServiceState:
        self._refresh()
        return self._state

    @property
    def generation(self) -> int:
        """Changes in a forked child (as :attr:`ServiceView.generation` does)."""
        return os.getpid()

    # -- waiting and callbacks ---------------------------------------------------------------------------

    def ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until the agent has published a view of this service."""
        deadline = _monotonic() + timeout
        while True:
            self._refresh()
            if self._state.exists is not None and self._fresh():
                return True
            if _monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def wait_for_primary(self, timeout: float) -> Endpoint:
        deadline = _monotonic() + timeout
        while True:
            p = self.primary
            if p is not None:
                return p
            if _monotonic() >= deadline:
                if self._state.exists is False:
                    raise self.unknown_error()
                raise WaitTimeout(f"no primary for {self.name!r} within {timeout:g} s: {self.reason}")
            time.sleep(0.005)

    def unknown_error(self) -> UnknownService:
        return UnknownService(f"service {self.name!r} has no keys in etcd: is the name right, and is its sidecar or "
                              "registrar running?")

    def on_change(self, callback: Callable[["AgentView"], None]) -> Callable[[], None]:
        """Call ``callback(view)`` when the primary, replicas, members, ring or read-only state change.

        Noticed at the next lookup of this view in this process, and called in
        that thread.
        """
        if not callable(callback):
            raise ConfigError(f"on_change needs a callable, got {callback!r}")
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    # -- the slow path -----------------------------------------------------------------------------------

    def _refresh(self) -> None:
        r = self._router
        snap = r._snapshot()
        slots = r._slots if self.name in snap.index else None
        if snap.gen != self._gen or self._slots is not slots:
            self._gen = float(snap.gen)
            self._state = snap.states.get(self.name, EMPTY if snap.gen < 0 else ServiceState(exists=None))
            self._rings = snap.rings.get(self.name, ())
            i = snap.index.get(self.name)
            self._slots = slots
            self._at = 0 if i is None else i * SLOT_FIELDS
        if self._callbacks:
            s = self._state
            sig = (s.primary, s.replicas, tuple(sorted(s.member_revisions.items())),
                   tuple(r.mod_revision for r in self._rings), self._fresh())
            if sig != self._delivered:
                self._delivered = sig
                for cb in list(self._callbacks):
                    try:
                        cb(self)
                    except Exception:
                        log.exception("%s: on_change callback %r failed", self.name, cb)

    def __repr__(self) -> str:
        p = self._state.primary
        return f"<AgentView {self.name} primary={p.member if p else None} read_only={self.read_only}>"


class AgentRouter:
    """Views of services as published by the host's agent at ``path``; see the module doc.

    By default the agent's own bounds apply (its ``heartbeat_bound``: how old
    its last write may be, and its ``stale_after``: how long ago it may have
    heard from etcd, before a view turns read-only). A worker may give
    tighter ones of its own (``heartbeat_bound``, ``stale_after``), at the
    cost of a slower lookup.
    """

    def __init__(self, path: str = DEFAULT_PATH, *, heartbeat_bound: float | None = None,
                 stale_after: float | None = None) -> None:
        for name, v in (("heartbeat_bound", heartbeat_bound), ("stale_after", stale_after)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise ConfigError(f"{name} must be a number of seconds > 0, got {v!r}")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"the agent view path must be a file path, got {path!r}")
        self.path = path
        self._bounds: tuple[float, float] | None = None
        if heartbeat_bound is not None or stale_after is not None:
            self._bounds = (math.inf if heartbeat_bound is None else float(heartbeat_bound),
                            math.inf if stale_after is None else float(stale_after))
        self.namespace = ""
        self._mm: "mmap.mmap | None" = None
        self._slots: Any = None
        self._inode: tuple[int, int] | None = None
        self._snap = _EMPTY_SNAPSHOT
        self._seq = -1
        self._geometry = (0, 0)
        self._checked = -math.inf
        self._views: dict[str, AgentView] = {}
        self._providers: dict[str, Any] = {}
        self._caches: dict[str, Any] = {}

    @property
    def stale_after(self) -> float:
        """How long ago the agent may have heard from etcd before a view turns read-only (seconds)."""
        agent = self._snap.stale_after
        return agent if self._bounds is None else min(agent, self._bounds[1])

    @property
    def heartbeat_bound(self) -> float:
        """How old the agent's last write may be before every view turns read-only (seconds)."""
        agent = self._snap.heartbeat_bound
        return agent if self._bounds is None else min(agent, self._bounds[0])

    def service(self, name: str) -> AgentView:
        """The view of service ``name`` (the same object on every call)."""
        try:
            return self._views[name]
        except (KeyError, TypeError):
            check_name("service", name)
            view = self._views[name] = AgentView(self, name)
            return view

    def ready(self, timeout: float, services: Sequence[str] | None = None) -> bool:
        deadline = _monotonic() + timeout
        views = [self.service(n) for n in services] if services is not None else list(self._views.values())
        return all(v.ready(max(0.0, deadline - _monotonic())) for v in views)

    def postgres(self, service: str, **settings: Any) -> "PostgresProvider":
        """The PostgreSQL provider for ``service``, as :meth:`Router.postgres` (psycopg pools follow the primary)."""
        provider = self._providers.get(service)
        if provider is None:
            from .postgres import PostgresProvider

            provider = self._providers[service] = PostgresProvider(self.service(service), **settings)  # type: ignore
        return provider

    def memcache(self, service: str, **settings: Any) -> "MemcacheClient":
        """The python-memcached compatible client for ``service`` (see :mod:`tenure.web.memcache`)."""
        cache = self._caches.get(service)
        if cache is None:
            from .memcache import Client as MemcacheClient

            cache = self._caches[service] = MemcacheClient(self.service(service), **settings)
        return cache

    def close(self) -> None:
        for p in self._providers.values():
            p.close()
        for c in self._caches.values():
            c.close()
        self._slots = None
        for v in self._views.values():
            v._slots = None
        self._mm = None  # unmapped once no slot array refers to it any more

    # -- reading the file ------------------------------------------------------------------------------

    def _snapshot(self) -> _Snapshot:
        mm = self._mm
        now = _monotonic()
        if now - self._checked >= _REOPEN_EVERY:
            # Now and then: is there a newer file (a restarted agent renamed its own into place)?
            self._checked = now
            if mm is None or self._superseded(mm) or self._moved():
                self._open()
                mm = self._mm
        if mm is None:
            return self._snap
        seq, active, length, crc = PAYLOAD.unpack_from(mm, PAYLOAD_AT)
        if self._snap.gen >= 0 and seq == self._seq:
            return self._snap
        slots, capacity = self._geometry
        for _ in range(1000):
            seq, active, length, crc = PAYLOAD.unpack_from(mm, PAYLOAD_AT)
            if seq % 2 == 0 and 0 < length <= capacity:
                start = buffers_at(slots) + active * capacity
                data = mm[start:start + length]
                if PAYLOAD.unpack_from(mm, PAYLOAD_AT)[0] == seq and zlib.crc32(data) == crc:
                    try:
                        snap = decode_payload(data)
                    except (ValueError, KeyError, TypeError, IndexError) as e:
                        log.warning("unreadable agent view at %s: %s", self.path, e)
                        return self._snap
                    self._seq = seq
                    self._snap = snap
                    return snap
            time.sleep(0)
        return self._snap

    def _moved(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) != self._inode

    def _superseded(self, mm: "mmap.mmap") -> bool:
        return HEADER.unpack_from(mm, 0)[2] != LIVE

    def _open(self) -> None:
        import mmap

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            if self._mm is None:
                log.debug("no agent view at %s: %s", self.path, e.strerror)
            return
        try:
            st = os.fstat(fd)
            if self._mm is not None and (st.st_dev, st.st_ino) == self._inode:
                return  # the same file, still superseded: the new one is not in place yet
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            log.warning("cannot map the agent view at %s: %s", self.path, e)
            return
        finally:
            os.close(fd)
        magic, version, state, slots, capacity = HEADER.unpack_from(mm, 0)
        if magic != MAGIC or version != VERSION or len(mm) < buffers_at(slots) + 2 * capacity:
            log.warning("%s is not a tenure agent view (version %d)", self.path, version)
            mm.close()
            return
        # The old map (if any) goes when no view's slot array refers to it any more.
        self._mm, self._inode, self._geometry = mm, (st.st_dev, st.st_ino), (slots, capacity)
        self._slots = slot_array(mm, slots) if slots else None
        self._seq = -1
        self._snap = _EMPTY_SNAPSHOT
        log.debug("mapped the agent view %s (%d services)", self.path, slots)

