"""The memcached registrar: publishes its server while healthy, flushes it before it rejoins, keeps the ring.

:class:`MemcacheRegistrar` runs beside one memcached (``tenure sidecar
--config`` with a ``[memcache]`` section, or :func:`run_registrar`). Every
``interval`` (at most ttl/3) it:

1. checks its server with a real ``version``, ``set`` and ``get``
   (:func:`tenure.services.memcache.check_memcached`); on a failure it
   revokes its lease, so its member record goes at once;
2. while healthy, keeps a lease-bound member record ``{"member", "address",
   "host", "port", "slot", "role": "cache", "healthy": true, "version",
   "since"}``. Before it publishes on a *new* lease -- at start, after a
   failed check, or after its lease ran out (a frozen host, a lost
   connection to etcd) -- it flushes its server: a member that was away may
   hold copies older than ones written elsewhere meanwhile. While the same
   lease lives, the record never left, so no flush is needed;
3. keeps the ring (:func:`next_ring`): if the live member records differ from
   the newest ``ring/<epoch>`` record, it creates ``ring/<epoch + 1>``
   (create-if-absent, so concurrent registrars agree on one), and deletes
   records older than :data:`tenure.records.RING_HISTORY` epochs.

Clients place keys by the ring records alone (see docs/memcache.md).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Mapping

from .. import records
from ..errors import ConfigError, EtcdError, MalformedRecord, ServiceError
from ..records import RING_HASHINGS, MemberRecord, RingMember, RingRecord, check_name
from ..services.memcache import check_address, check_memcached, flush_memcached

if TYPE_CHECKING:
    from ..etcd import Client
    from .config import RegistrarConfig

log = logging.getLogger("tenure.memcache")


def next_ring(latest: RingRecord | None, live: Mapping[str, tuple[str, int | None]], *, hashing: str,
              fresh_within: float, settle: float, now: float) -> RingRecord | None:
    """The ring that should follow ``latest`` given the live members (name -> (address, wanted slot)), or None.

    Servers keep their slots; absent ones stay listed (``live`` False) so
    that modulo hashing keeps its list. A new member takes the slot it asks
    for if that slot is free or held by an absent member (which it
    replaces), else the lowest free slot. The hashing and the two bounds
    of the first ring stay those of every later one.
    """
    servers = {s.member: s for s in (latest.servers if latest else ())}
    for name, s in list(servers.items()):
        if name in live:
            servers[name] = replace(s, address=live[name][0], live=True)
        else:
            servers[name] = replace(s, live=False)
    for name in sorted(set(live) - set(servers)):
        address, wanted = live[name]
        holder = next((s for s in servers.values() if s.slot == wanted), None) if wanted is not None else None
        if wanted is not None and holder is not None and holder.live:
            log.warning("memcache ring: %s asks for slot %d, held by live member %s: giving it another slot",
                        name, wanted, holder.member)
            wanted = None
        if wanted is not None and holder is not None:
            del servers[holder.member]  # a replacement takes the absent member's place in the list
        if wanted is None:
            used = {s.slot for s in servers.values()}
            wanted = next(i for i in range(len(used) + 1) if i not in used)
        servers[name] = RingMember(name, address, wanted, True)
    ordered = tuple(sorted(servers.values(), key=lambda s: s.slot))
    if (latest is not None and ordered == latest.servers) or not ordered:
        return None
    if latest is not None:
        hashing, fresh_within, settle = latest.hashing, latest.fresh_within, latest.settle
    epoch = latest.epoch + 1 if latest else 1
    # Untagged entries (python-memcached's, over the full list) count as written at the newest epoch of a
    # pool that has only grown so far; the first absence freezes that epoch.
    growing = latest is None or latest.legacy_epoch == latest.epoch
    legacy = epoch if growing and all(s.live for s in ordered) else (latest.legacy_epoch if latest else None)
    return RingRecord(epoch, hashing, ordered, legacy, fresh_within, settle, now)


class MemcacheRegistrar:
    """Keeps ``member``'s record in etcd while the memcached at ``host:port`` passes its checks; keeps the ring.

    ``advertise`` is the ``host:port`` clients should use (default: the
    checked address); ``slot`` the member's place in the pool's ordered list
    (default: the lowest free one when it first joins); ``hashing``,
    ``fresh_within`` and ``settle`` are used only if the pool has no ring
    yet. Call :meth:`check` every ``interval`` s (``run`` does), at most
    ttl/3.
    """

    def __init__(self, client: "Client", service: str, member: str, host: str, port: int, *, ttl: int = 2,
                 interval: float | None = None, timeout: float = 0.5, advertise: str | None = None,
                 slot: int | None = None, hashing: str = "modulo", fresh_within: float = 2.0,
                 settle: float = 3.0) -> None:
        self.client = client
        self.service = check_name("service", service)
        self.member = check_name("member", member)
        self.host, self.port = check_address(host, port)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise ConfigError(f"ttl must be whole seconds >= 1, got {ttl!r}")
        self.ttl = ttl
        self.interval = ttl / 3 if interval is None else float(interval)
        if not 0 < self.interval <= ttl / 3:
            raise ConfigError(f"interval must be > 0 and at most ttl/3 = {ttl / 3:.2f} s, got {interval!r}")
        if advertise is not None:
            h, _, p = advertise.rpartition(":")
            check_address(h, int(p) if p.isdigit() else p)
        if slot is not None and (isinstance(slot, bool) or not isinstance(slot, int) or slot < 0):
            raise ConfigError(f"slot must be an int >= 0, got {slot!r}")
        if hashing not in RING_HASHINGS:
            raise ConfigError(f"hashing must be one of {', '.join(RING_HASHINGS)}, got {hashing!r}")
        if not 0 < fresh_within < settle:
            raise ConfigError(f"fresh_within must be > 0 and below settle (got {fresh_within!r}, {settle!r})")
        if fresh_within <= 1.0:
            raise ConfigError(f"fresh_within must exceed the watch's 1 s progress interval, got {fresh_within!r}")
        self.address = advertise or f"{self.host}:{self.port}"
        self.timeout = timeout
        self.slot = slot
        self.hashing, self.fresh_within, self.settle = hashing, float(fresh_within), float(settle)
        self.key = records.member_key(self.service, self.member)
        self.healthy = False
        self.flushes = 0  # how many times this registrar emptied its server before (re)joining
        self._lease: int | None = None
        self._renewed = 0.0
        self._written: dict[str, Any] | None = None
        self._since = 0.0
        self._failing = False
        self._warned_hashing = False

    # -- one round -----------------------------------------------------------------------------

    def check(self) -> bool:
        """Check the server once, publish or withdraw the record, keep the ring; True if published."""
        try:
            version = check_memcached(self.host, self.port, timeout=self.timeout, key=f"tenure:health:{self.member}")
        except ServiceError as e:
            if not self._failing:
                log.warning("%s/%s: %s: withdrawing the member record", self.service, self.member, e)
            self.healthy, self._failing = False, True
            self._withdraw()
            self._keep_ring()
            return False
        self._failing = False
        published = self._publish(version)
        self.healthy = published
        self._keep_ring()
        return published

    def _publish(self, version: str) -> bool:
        now = time.monotonic()
        try:
            if self._lease is not None and now - self._renewed >= self.interval:
                if self.client.keepalive(self._lease, retry_for=0) > 0:
                    self._renewed = now
                else:
                    log.warning("%s/%s: lease ran out (frozen, or cut off from etcd): rejoining, flushed",
                                self.service, self.member)
                    self._lease, self._written = None, None
            if self._lease is None:
                flush_memcached(self.host, self.port, timeout=self.timeout)  # before anyone can see it again
                self.flushes += 1
                self._lease = self.client.grant(self.ttl).id
                self._renewed = now
                self._written = None
                self._since = time.time()
                log.info("%s/%s: memcached %s healthy (version %s), flushed: publishing", self.service,
                         self.member, self.address, version)
            host, _, port = self.address.rpartition(":")
            body = {"member": self.member, "address": self.address, "host": host, "port": int(port),
                    "slot": self.slot, "role": "cache", "healthy": True, "version": version,
                    "since": self._since}
            if body != self._written:
                self.client.put(self.key, json.dumps(body, sort_keys=True), lease=self._lease)
                self._written = body
            return True
        except ServiceError as e:
            log.warning("%s/%s: %s: not publishing", self.service, self.member, e)
            return False
        except EtcdError as e:
            # Not known whether the lease lives: the next answer from etcd tells (a lost lease means a rejoin).
            log.warning("%s/%s: %s", self.service, self.member, e)
            return False

    def _withdraw(self) -> None:
        lease, self._lease, self._written = self._lease, None, None
        if lease is not None:
            try:
                self.client.revoke(lease, retry_for=1.0)
            except EtcdError as e:  # it expires within ttl anyway; it is never renewed again
                log.warning("%s/%s: could not withdraw the member record: %s", self.service, self.member, e)

    def _keep_ring(self) -> None:
        try:
            self.keep_ring()
        except EtcdError as e:
            log.warning("%s: ring not updated: %s", self.service, e)

    def keep_ring(self) -> RingRecord | None:
        """Write the next ring record if the live members changed; return it (None: unchanged, or another wrote it)."""
        kvs, _ = self.client.get_prefix(records.service_prefix(self.service))  # one consistent read
        live: dict[str, tuple[str, int | None]] = {}
        rings: dict[int, RingRecord] = {}
        for kv in kvs:
            name = records.member_of(self.service, kv.key)
            epoch = records.ring_epoch_of(self.service, kv.key)
            try:
                if name is not None:
                    rec = MemberRecord.decode(kv.value)
                    slot = rec.get("slot")
                    if rec.role == "cache" and rec.healthy and rec.address:
                        live[name] = (rec.address, slot if isinstance(slot, int) and slot >= 0 else None)
                elif epoch is not None:
                    rings[epoch] = RingRecord.decode(kv.value)
            except MalformedRecord as e:
                log.warning("%s: ignoring %s: %s", self.service, kv.key, e)
        latest = rings[max(rings)] if rings else None
        if latest is not None and latest.hashing != self.hashing and not self._warned_hashing:
            self._warned_hashing = True
            log.warning("%s: the ring uses %s hashing; this registrar's %s setting is ignored", self.service,
                        latest.hashing, self.hashing)
        new = next_ring(latest, live, hashing=self.hashing, fresh_within=self.fresh_within, settle=self.settle,
                        now=time.time())
        if latest is not None:
            for epoch in sorted(rings):
                if epoch <= latest.epoch - records.RING_HISTORY:
                    self.client.delete(records.ring_key(self.service, epoch))
        if new is None:
            return None
        created, _ = self.client.create(records.ring_key(self.service, new.epoch), new.encode())
        if created:
            log.info("%s: ring epoch %d: live %s", self.service, new.epoch,
                     ", ".join(f"{s.member}={s.address}" for s in new.live) or "none")
            return new
        return None

    def run(self, stop: threading.Event) -> None:
        """Check every ``interval`` s until ``stop`` is set, then withdraw the record."""
        try:
            while True:
                started = time.monotonic()
                try:
                    self.check()
                except EtcdError as e:
                    log.warning("%s/%s: %s", self.service, self.member, e)
                if stop.wait(max(0.0, self.interval - (time.monotonic() - started))):
                    return
        finally:
            self.close()

    def close(self) -> None:
        """Withdraw the record (the ring follows at the next round of any other registrar)."""
        self._withdraw()
        self.healthy = False


def run_registrar(client: "Client", service: str, member: str, host: str, port: int, ttl: int,
                  stop_event: threading.Event, **settings: Any) -> None:
    """Run a :class:`MemcacheRegistrar` until ``stop_event`` is set (blocks)."""
    MemcacheRegistrar(client, service, member, host, port, ttl=ttl, **settings).run(stop_event)


def main(config: "RegistrarConfig") -> int:
    """``tenure sidecar --config FILE`` with a ``[memcache]`` section: run the registrar until SIGTERM or SIGINT."""
    from ..config import connect_etcd

    m = config.memcache
    client = connect_etcd(config.etcd, check=False)
    registrar = MemcacheRegistrar(client, config.service, config.member, m.host, m.port, ttl=config.ttl,
                                  interval=m.interval, timeout=m.timeout, advertise=m.advertise, slot=m.slot,
                                  hashing=m.hashing, fresh_within=m.fresh_within, settle=m.settle)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("%s/%s: memcache registrar started (memcached %s, ttl %d s)", config.service, config.member,
             registrar.address, config.ttl)
    try:
        registrar.run(stop)
    finally:
        client.close()
    return 0
