"""memcached in load-sharing mode, from a web worker: a ring whose nodes follow etcd.

:class:`RingClient` (from :meth:`tenure.web.Router.memcache`) is a pymemcache
``HashClient`` with rendezvous hashing whose nodes are the live member records
that the registrars publish. A member that leaves moves only its own keys; a
member that returns is added back at once. A dead or unreachable server is a
miss, never an exception (``ignore_exc=True``, short timeouts).

Keys that move back to a returning (empty) member miss there, and the copies
left on the node that served them meanwhile are stale: use expiry times, and
never keep anything election-related in memcached.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Mapping

from pymemcache.client.base import PooledClient
from pymemcache.client.hash import HashClient
from pymemcache.client.rendezvous import RendezvousHash
from pymemcache.exceptions import MemcacheError, MemcacheUnexpectedCloseError

from ..errors import ConfigError

if TYPE_CHECKING:
    from .router import ServiceView

log = logging.getLogger("tenure.memcache")


class RingClient(HashClient):
    """A pymemcache ``HashClient`` (rendezvous hashing) whose nodes follow a service's member records.

    Thread-safe: node changes replace the ring (hasher and clients) whole,
    under a lock, and each lookup reads one consistent ring. Node clients are
    pooled (``use_pooling=True``) so several threads can share the client.
    Defaults suit a web request: 0.2 s timeouts, TCP_NODELAY, ``ignore_exc=True``
    (a dead node is a miss), a failing node leaves this client's ring at its
    first error (``retry_attempts=0``; a connection closed under it counts as
    an error, which plain HashClient does not) and is tried again after
    ``dead_timeout`` s only while etcd still lists it. Its registrar
    withdraws the record at its next failed check (every ttl/3), or etcd
    drops it within ttl if the registrar died too; then it is gone for good
    until it registers again.
    """

    # Set by HashClient.__init__ (pymemcache is untyped).
    hasher: RendezvousHash
    clients: dict[str, Any]
    _failed_clients: dict[Any, Any]
    _dead_clients: dict[Any, float]

    def __init__(self, view: "ServiceView", **settings: Any) -> None:
        defaults: dict[str, Any] = {"connect_timeout": 0.2, "timeout": 0.2, "ignore_exc": True,
                                    "retry_attempts": 0, "retry_timeout": 0.2, "dead_timeout": 2.0,
                                    "use_pooling": True, "no_delay": True}
        unknown = set(settings) & {"servers", "hasher"}
        if unknown:
            raise ConfigError(f"RingClient takes its servers from etcd; do not pass {sorted(unknown)}")
        self._ring_lock = threading.RLock()
        self._members: dict[str, tuple[tuple[str, int], int]] = {}  # member -> ((host, port), record revision)
        super().__init__([], **{**defaults, **settings})
        self._ring: tuple[RendezvousHash, dict[str, Any]] = (self.hasher, self.clients)
        self.view = view
        self._unsubscribe = view.on_change(self._changed)
        if view.peek().exists is not None:  # already has its snapshot: take it now (else: on the first one)
            self.sync(view)

    # -- following etcd -----------------------------------------------------------

    def _changed(self, view: "ServiceView") -> None:
        self.sync(view)

    def sync(self, view: "ServiceView") -> None:
        """Make the ring the view's live, healthy members (called on every change of the view)."""
        wanted: dict[str, tuple[tuple[str, int], int]] = {}
        state = view.peek()  # not the property: syncing must not start a watch (e.g. in a pre-fork master)
        revisions = state.member_revisions
        for name, rec in state.members.items():
            addr = _record_address(rec)
            if addr is not None and rec.get("healthy", True):
                wanted[name] = (addr, revisions.get(name, 0))
        with self._ring_lock:
            if wanted == self._members:
                return
            old = self._members
            self._members = wanted
            keep = {addr for addr, _ in wanted.values()}
            for name, (addr, rev) in wanted.items():
                if old.get(name) != (addr, rev):
                    # New, moved or re-registered (its server restarted): a fresh client, no dead mark.
                    self._forget(addr)
                    self._add(addr)
                    log.info("%s: %s (%s:%d) joins the ring", view.name, name, *addr)
            for name, (addr, _) in old.items():
                if addr not in keep:
                    self._forget(addr)
                    log.info("%s: %s (%s:%d) leaves the ring", view.name, name, *addr)
            self._publish()

    @property
    def nodes(self) -> list[str]:
        """The ``host:port`` of each node keys are hashed over now."""
        self.view.exists  # noqa: B018 -- a read: starts the view's watch in a new process
        return list(self._ring[0].nodes)

    # -- ring changes (HashClient's own failure handling comes through here too) ----------

    def _add(self, server: tuple[str, int]) -> None:
        cls = PooledClient if self.use_pooling else self.client_class
        client = cls(server, **self.default_kwargs)
        if self.use_pooling:
            client.client_class = self.client_class
        key = self._make_client_key(server)
        self.clients = {**self.clients, key: client}
        self._nodes_add(key)

    def _forget(self, server: tuple[str, int]) -> None:
        key = self._make_client_key(server)
        client = self.clients.get(key)
        self.clients = {k: c for k, c in self.clients.items() if k != key}
        self._failed_clients.pop(server, None)
        self._dead_clients.pop(server, None)
        self.hasher = RendezvousHash(nodes=[n for n in self.hasher.nodes if n != key])
        if client is not None:
            try:
                client.close()
            except Exception:  # a dead server: nothing to close cleanly
                pass

    def _nodes_add(self, key: str) -> None:
        if key not in self.hasher.nodes:
            self.hasher = RendezvousHash(nodes=sorted([*self.hasher.nodes, key]))

    def _publish(self) -> None:
        self._ring = (self.hasher, self.clients)

    def add_server(self, server: Any, port: Any = None) -> None:
        """HashClient's hook (used when a dead node's ``dead_timeout`` is over): back only if etcd lists it."""
        if port is not None:
            server = (server, port)
        with self._ring_lock:
            if not hasattr(self, "_ring"):  # HashClient.__init__ with no servers never gets here; be safe
                return
            if tuple(server) not in {addr for addr, _ in self._members.values()}:
                self._dead_clients.pop(server, None)
                return
            key = self._make_client_key(server)
            if key not in self.clients:
                self._add(tuple(server))
            else:
                self._nodes_add(key)
            self._publish()

    def remove_server(self, server: Any, port: Any = None) -> None:
        """HashClient's hook when a node fails: out of the ring for ``dead_timeout`` s (its keys move)."""
        if port is not None:
            server = (server, port)
        with self._ring_lock:
            key = self._make_client_key(server)
            self._failed_clients.pop(server, None)
            self._dead_clients[server] = time.time()
            self.hasher = RendezvousHash(nodes=[n for n in self.hasher.nodes if n != key])
            self._publish()
            log.info("%s: %s failed: out of the ring for %g s", self.view.name, key, self.dead_timeout)

    def _safely_run_func(self, client: Any, func: Any, default_val: Any, *args: Any, **kwargs: Any) -> Any:
        def run(*a: Any, **kw: Any) -> Any:
            try:
                return func(*a, **kw)
            except MemcacheUnexpectedCloseError as e:
                # A server killed under an open connection shows as a closed socket, which HashClient
                # would not count as a failure (only OSError): count it, so the key moves now.
                raise ConnectionResetError(f"{client.server}: {e or 'connection closed'}") from e

        return super()._safely_run_func(client, run, default_val, *args, **kwargs)

    def _set_many(self, client: Any, values: Any, *args: Any, **kwargs: Any) -> Any:
        succeeded, failed, err = super()._set_many(client, values, *args, **kwargs)
        if isinstance(err, MemcacheUnexpectedCloseError):
            err = ConnectionResetError(f"{client.server}: {err or 'connection closed'}")
        return succeeded, failed, err

    def _retry_dead(self) -> None:
        with self._ring_lock:
            super()._retry_dead()

    def _get_client(self, key: Any) -> Any:
        from pymemcache.client.base import check_key_helper

        check_key_helper(key, self.allow_unicode_keys, self.key_prefix)
        self.view.exists  # noqa: B018 -- starts the view's watch in a new process
        if self._dead_clients:
            self._retry_dead()
        hasher, clients = self._ring
        server = hasher.get_node(key)
        if server is None:
            if self.ignore_exc:
                return None
            raise MemcacheError(f"no live member in memcache service {self.view.name!r}")
        return clients[server]

    def after_fork(self) -> None:
        """In a child: the node clients hold the parent's sockets; fresh clients for the same nodes."""
        self._ring_lock = threading.RLock()
        self._failed_clients, self._dead_clients = {}, {}
        old, self.clients = self.clients, {}
        self.hasher = RendezvousHash()
        for key in old:
            host, _, port = key.rpartition(":")
            self._add((host, int(port)))
        self._publish()

    def close(self) -> None:
        """Stop following etcd and close every node connection."""
        self._unsubscribe()
        super().close()


def _record_address(rec: Mapping[str, Any]) -> tuple[str, int] | None:
    addr = rec.get("address")
    if isinstance(addr, str) and ":" in addr:
        host, _, port = addr.rpartition(":")
        if port.isdigit():
            return host.strip("[]"), int(port)
    return None
