"""The per-host agent (``tenure agent``): one process watches etcd for the host's web workers and publishes it.

A gunicorn sync worker with its own :class:`~tenure.web.router.Router` pays
for gRPC, protobuf and a watch of its own. The agent keeps one router for
the whole host and publishes every followed service's view (primary,
replicas, members, memcached ring records) in a memory-mapped file (layout in
:mod:`tenure.web.agent_view`); workers read it with
:class:`~tenure.web.agent_view.AgentRouter`, which imports neither gRPC nor
protobuf. A change is written as soon as the router reports it; every
``beat_every`` seconds (0.1) the agent also stamps each service's slot with
the time its watch last heard from etcd and its own time, so a worker turns
read-only when the agent dies or freezes (``heartbeat_bound``, 1.5 s), as
a router does when etcd goes quiet (``stale_after``).

The agent also exports the routing view once per host on ``/metrics``
(Prometheus) and answers ``/health`` (200 while every followed service is
fresh, else 503, with a JSON body).

Configuration (TOML)::

    [etcd]                # the sidecar's table
    endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"]

    [agent]
    services = ["db", "cache"]
    path = "/run/tenure/agent.view"     # on tmpfs; readable by the workers
    listen = "127.0.0.1:9321"           # /metrics and /health; "" for none
    stale_after = 4.0                   # as Router(stale_after=...)
    heartbeat_bound = 1.5               # workers go read-only when the agent is silent this long
    beat_every = 0.1
    capacity = 1048576                  # bytes per payload buffer (it grows if needed)
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Mapping, Sequence

from prometheus_client import Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..config import EtcdConfig, build_section, parse_etcd_section
from ..errors import ConfigError
from ..records import check_name
from .agent_view import (DEFAULT_HEARTBEAT_BOUND, DEFAULT_PATH, HEADER, LIVE, MAGIC, PAYLOAD, PAYLOAD_AT,
                         SLOT_FIELDS, SUPERSEDED, VERSION, buffers_at, slot_array)
from .router import DEFAULT_STALE_AFTER, Router, ServiceView

log = logging.getLogger("tenure.agent")

READ_ONLY = Gauge("tenure_agent_read_only", "1 while the service has no valid primary in the agent's view", ["service"])
PRIMARY_TOKEN = Gauge("tenure_agent_primary_token", "Fencing token of the primary in the agent's view (0: none)",
                      ["service"])
ETCD_STALE = Gauge("tenure_agent_etcd_stale_seconds", "Seconds since the agent's watch last heard from etcd",
                   ["service"])
RING_EPOCH = Gauge("tenure_agent_ring_epoch", "Newest memcached ring epoch in the agent's view (0: none)", ["service"])
MEMBERS = Gauge("tenure_agent_members", "Live member records in the agent's view", ["service"])
PUBLISHED = Counter("tenure_agent_publications_total", "Views written to the shared file")


@dataclass(frozen=True)
class AgentConfig:
    """The ``[agent]`` table (with the shared ``[etcd]`` one)."""

    services: list[str]
    path: str = DEFAULT_PATH
    listen: str = "127.0.0.1:9321"
    stale_after: float = DEFAULT_STALE_AFTER
    heartbeat_bound: float = DEFAULT_HEARTBEAT_BOUND
    beat_every: float = 0.1
    capacity: int = 1 << 20
    etcd: EtcdConfig | None = field(default=None)


def parse_agent_config(data: Mapping[str, Any]) -> AgentConfig:
    """Validate an agent configuration already read from TOML; ConfigError naming what is wrong."""
    unknown = sorted(set(data) - {"etcd", "agent"})
    if unknown:
        raise ConfigError(f"unknown section(s) in agent config: {', '.join(unknown)} (known: etcd, agent)")
    for s in ("etcd", "agent"):
        if s not in data:
            raise ConfigError(f"missing section [{s}]")
    etcd = parse_etcd_section(data["etcd"])
    raw = data["agent"]
    if isinstance(raw, Mapping) and "etcd" in raw:
        raise ConfigError("unknown key in [agent]: etcd")
    cfg = build_section(AgentConfig, "agent", raw)
    if not cfg.services:
        raise ConfigError("[agent] services must name at least one service")
    for s in cfg.services:
        check_name("service", s)
    if len(set(cfg.services)) != len(cfg.services):
        raise ConfigError("[agent] services lists a service twice")
    if cfg.listen:
        host, sep, port = cfg.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"[agent] listen must be 'host:port', got {cfg.listen!r}")
    if not 0 < cfg.beat_every <= 1:
        raise ConfigError(f"[agent] beat_every must be > 0 and at most 1 s, got {cfg.beat_every}")
    if not cfg.beat_every < cfg.heartbeat_bound <= cfg.stale_after:
        raise ConfigError(f"[agent] heartbeat_bound must exceed beat_every and be at most stale_after, "
                          f"got {cfg.heartbeat_bound}")
    if cfg.capacity < 4096:
        raise ConfigError(f"[agent] capacity must be at least 4096 bytes, got {cfg.capacity}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(cfg.path))):
        raise ConfigError(f"[agent] path {cfg.path!r}: its directory does not exist")
    if not 1.0 < cfg.stale_after < 3600:
        raise ConfigError(f"[agent] stale_after must be seconds above the watch's 1 s progress interval, "
                          f"got {cfg.stale_after}")
    return AgentConfig(list(cfg.services), cfg.path, cfg.listen, float(cfg.stale_after),
                       float(cfg.heartbeat_bound), float(cfg.beat_every), int(cfg.capacity), etcd)


def encode_payload(gen: int, views: Sequence[ServiceView], stale_after: float, heartbeat_bound: float) -> bytes:
    """The JSON payload describing ``views`` (read back by :func:`tenure.web.agent_view.decode_payload`)."""
    def ep(e: Any) -> list[Any] | None:
        return None if e is None else [e.member, e.dsn, e.token, e.zone]

    services = {}
    for slot, v in enumerate(views):
        s = v.peek()
        services[v.name] = {
            "slot": slot, "exists": s.exists, "revision": s.revision, "primary": ep(s.primary),
            "replicas": [ep(e) for e in s.replicas], "readable": [ep(e) for e in s.readable],
            "members": {m: dict(rec) for m, rec in s.members.items()}, "member_revisions": dict(s.member_revisions),
            "rings": [[kv.key, kv.mod_revision, kv.value.decode()] for kv in v.ring_records],
        }
    return json.dumps({"gen": gen, "stale_after": stale_after, "heartbeat_bound": heartbeat_bound,
                       "services": services},
                      separators=(",", ":")).encode()


class Agent:
    """Publishes ``services`` as ``router`` sees them to the file at ``path``; :meth:`run` until stopped."""

    def __init__(self, router: Router, services: Sequence[str], path: str, *, beat_every: float = 0.1,
                 heartbeat_bound: float = DEFAULT_HEARTBEAT_BOUND, capacity: int = 1 << 20) -> None:
        self.router = router
        self.views = [router.service(s) for s in services]
        self.path = path
        self.beat_every = beat_every
        self.heartbeat_bound = heartbeat_bound
        self.capacity = capacity
        self.gen = 0
        self.mm: mmap.mmap | None = None
        self.slots: Any = None
        self._dirty = threading.Event()
        self._signature: tuple[Any, ...] | None = None
        self._lock = threading.Lock()
        for v in self.views:
            v.on_change(lambda _v: self._dirty.set())

    def start(self, timeout: float = 10.0) -> "Agent":
        """Create the file and publish the first views (waiting up to ``timeout`` s for them)."""
        self.router.ready(timeout, [v.name for v in self.views])
        self._create(self.capacity)
        self.publish()
        return self

    def _create(self, capacity: int) -> None:
        slots = len(self.views)
        size = buffers_at(slots) + 2 * capacity
        tmp = f"{self.path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        HEADER.pack_into(mm, 0, MAGIC, VERSION, LIVE, slots, capacity)
        PAYLOAD.pack_into(mm, PAYLOAD_AT, 0, 0, 0, 0)
        array = slot_array(mm, slots)
        for i in range(slots * SLOT_FIELDS):
            array[i] = -math.inf  # gen -inf matches nothing: readers wait for the first payload
        os.replace(tmp, self.path)  # readers only ever see a complete file
        old, old_array = self.mm, self.slots
        self.mm, self.slots, self.capacity = mm, array, capacity
        if old is not None:  # readers of the old file move to the new one at their next look
            HEADER.pack_into(old, 0, MAGIC, VERSION, SUPERSEDED, slots, 0)
            for i in range(slots * SLOT_FIELDS):
                old_array[i] = -math.inf
        log.info("agent view at %s: %d services, %d bytes per payload", self.path, slots, capacity)

    def publish(self) -> None:
        """Write the current views (a new generation) and stamp the slots."""
        with self._lock:
            gen = self.gen + 1
            data = encode_payload(gen, self.views, self.router.stale_after, self.heartbeat_bound)
            if len(data) > self.capacity:
                self._create(max(len(data) * 2, self.capacity * 2))
            mm = self.mm
            assert mm is not None
            seq, active, length, crc = PAYLOAD.unpack_from(mm, PAYLOAD_AT)
            target = 1 - active if length else active
            PAYLOAD.pack_into(mm, PAYLOAD_AT, seq + 1, active, length, crc)  # odd: a write is under way
            start = buffers_at(len(self.views)) + target * self.capacity
            mm[start:start + len(data)] = data
            PAYLOAD.pack_into(mm, PAYLOAD_AT, seq + 2, target, len(data), zlib.crc32(data))
            self.gen = gen
            self._signature = self._current_signature()
            self.beat()
            PUBLISHED.inc()

    def beat(self) -> None:
        """Stamp each service's slot: when its watch last heard from etcd, now, the deadline, the generation."""
        a = self.slots
        if a is None:
            return
        now = time.monotonic()
        gen = float(self.gen)
        stale_after = self.router.stale_after
        for i, v in enumerate(self.views):
            at = i * SLOT_FIELDS
            heard = now - v.stale_for
            a[at + 2] = heard
            a[at + 3] = now
            a[at + 1] = min(heard + stale_after, now + self.heartbeat_bound)
            a[at] = gen

    def _current_signature(self) -> tuple[Any, ...]:
        return tuple((v.peek().revision, v.ring_records) for v in self.views)

    def run(self, stop: threading.Event) -> None:
        """Publish on every change, beat every ``beat_every`` s, until ``stop`` is set."""
        while not stop.is_set():
            changed = self._dirty.wait(self.beat_every)
            self._dirty.clear()
            try:
                if changed or self._current_signature() != self._signature:
                    self.publish()
                else:
                    self.beat()
                self._export()
            except Exception:  # never stop beating over one bad round; the workers would go read-only
                log.exception("agent: publishing failed")

    def _export(self) -> None:
        for v in self.views:
            p = v.valid_primary()
            READ_ONLY.labels(v.name).set(0 if p is not None else 1)
            PRIMARY_TOKEN.labels(v.name).set((p.token or 0) if p is not None else 0)
            stale = v.stale_for
            ETCD_STALE.labels(v.name).set(stale if stale != math.inf else -1)
            rings = v.ring_records
            RING_EPOCH.labels(v.name).set(int(rings[-1].key.rsplit("/", 1)[1]) if rings else 0)
            MEMBERS.labels(v.name).set(len(v.peek().members))

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether every followed service is fresh, with a per-service summary."""
        out = {}
        ok = True
        for v in self.views:
            stale = v.stale_for
            p = v.valid_primary()
            fresh = stale <= self.router.stale_after
            ok = ok and fresh
            out[v.name] = {"fresh": fresh, "stale_for": None if stale == math.inf else round(stale, 3),
                           "primary": None if p is None else {"member": p.member, "token": p.token},
                           "members": len(v.peek().members)}
        return ok, out

    def close(self) -> None:
        self.slots = self.mm = None  # unmapped once nothing refers to it


def serve(agent: Agent, address: tuple[str, int]) -> ThreadingHTTPServer:
    """``/metrics`` and ``/health`` on ``address``, in a daemon thread."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 -- http.server's name
            if self.path == "/metrics":
                body, status, ctype = generate_latest(), 200, CONTENT_TYPE_LATEST
            elif self.path == "/health":
                ok, detail = agent.health()
                body, status, ctype = json.dumps(detail).encode(), 200 if ok else 503, "application/json"
            else:
                body, status, ctype = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("http: " + format, *args)

    server = ThreadingHTTPServer(address, Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="tenure-agent-http", daemon=True).start()
    return server


def main(config: AgentConfig) -> int:
    """``tenure agent --config FILE``: run until SIGTERM or SIGINT."""
    e = config.etcd
    assert e is not None
    router = Router(e.endpoints, namespace=e.namespace, timeout=e.timeout, stale_after=config.stale_after,
                    ca_cert=e.ca_cert, cert=e.cert, key=e.key, user=e.user, password=e.password)
    agent = Agent(router, config.services, config.path, beat_every=config.beat_every,
                  heartbeat_bound=config.heartbeat_bound, capacity=config.capacity)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = None
    try:
        agent.start()
        if config.listen:
            host, _, port = config.listen.rpartition(":")
            server = serve(agent, (host or "0.0.0.0", int(port)))
        log.info("agent: publishing %s to %s", ", ".join(config.services), config.path)
        agent.run(stop)
    finally:
        if server is not None:
            server.shutdown()
        agent.close()
        router.close()
    return 0
