"""The memcached registrar: keeps a member record in etcd while its local memcached passes real checks.

:class:`MemcacheRegistrar` checks its local memcached every ``interval``
seconds with a real ``version``, ``set`` and ``get``
(:func:`tenure.services.memcache.check_memcached`) and keeps a lease-bound
member record -- ``{"member", "address": "host:port", "host", "port", "role":
"cache", "healthy": true, "version", "since"}`` -- only while those succeed.
On a failed check it withdraws the record at once (revokes its lease); if the
registrar itself dies, etcd drops the record within ``ttl``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, EtcdError, ServiceError
from ..members import MemberPublisher
from ..records import check_name
from ..services.memcache import check_address, check_memcached

if TYPE_CHECKING:
    from ..etcd import Client

log = logging.getLogger("tenure.memcache")


class MemcacheRegistrar:
    """Keeps ``member``'s record in etcd while the memcached at ``host:port`` passes its checks.

    ``advertise`` is the ``host:port`` clients should use (default: the
    checked address). Call :meth:`check` every ``interval`` s (``run`` does),
    which must be at most ttl/3 so the lease is renewed in time.
    """

    def __init__(self, client: "Client", service: str, member: str, host: str, port: int, *, ttl: int = 2,
                 interval: float | None = None, timeout: float = 0.5, advertise: str | None = None) -> None:
        self.service = check_name("service", service)
        self.member = check_name("member", member)
        self.host, self.port = check_address(host, port)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise ConfigError(f"ttl must be whole seconds >= 1, got {ttl!r}")
        self.interval = ttl / 3 if interval is None else float(interval)
        if not 0 < self.interval <= ttl / 3:
            raise ConfigError(f"interval must be > 0 and at most ttl/3 = {ttl / 3:.2f} s, got {interval!r}")
        if advertise is not None:
            h, _, p = advertise.rpartition(":")
            check_address(h, int(p) if p.isdigit() else p)
        self.address = advertise or f"{self.host}:{self.port}"
        self.timeout = timeout
        self.publisher = MemberPublisher(client, service, member, ttl=ttl)
        self.healthy = False
        self._since: float | None = None

    def check(self) -> bool:
        """Check the server once and publish or withdraw the record; True if healthy and published."""
        try:
            version = check_memcached(self.host, self.port, timeout=self.timeout, key=f"tenure:health:{self.member}")
        except ServiceError as e:
            if self.healthy or self._since is None:
                log.warning("%s/%s: %s: withdrawing the member record", self.service, self.member, e)
            self.healthy, self._since = False, 0.0
            self.publisher.close()  # revoke now: clients drop it at once rather than after the ttl
            return False
        if not self.healthy:
            self._since = time.time()
            log.info("%s/%s: memcached %s healthy (version %s): publishing", self.service, self.member,
                     self.address, version)
        host, _, port = self.address.rpartition(":")
        ok = self.publisher.publish({"member": self.member, "address": self.address, "host": host,
                                     "port": int(port), "role": "cache", "healthy": True, "version": version,
                                     "since": self._since})
        self.healthy = True
        return ok

    def run(self, stop: threading.Event) -> None:
        """Check every ``interval`` s until ``stop`` is set, then withdraw the record."""
        try:
            while True:
                started = time.monotonic()
                try:
                    self.check()
                except EtcdError as e:  # MemberPublisher logs its own; anything else from etcd: go on
                    log.warning("%s/%s: %s", self.service, self.member, e)
                if stop.wait(max(0.0, self.interval - (time.monotonic() - started))):
                    return
        finally:
            self.close()

    def close(self) -> None:
        """Withdraw the record."""
        self.publisher.close()
        self.healthy = False


def run_registrar(client: "Client", service: str, member: str, host: str, port: int, ttl: int,
                  stop_event: threading.Event, **settings: Any) -> None:
    """Run a :class:`MemcacheRegistrar` until ``stop_event`` is set (blocks)."""
    MemcacheRegistrar(client, service, member, host, port, ttl=ttl, **settings).run(stop_event)
