"""Three real memcached servers, each with a registrar process; the router's ring follows them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator

import pytest
from pymemcache.client.base import Client as PlainClient

import tenure
from tenure.errors import ConfigError
from tenure.lab.etcd import LocalEtcd
from tenure.lab.memcached import LocalMemcached
from tenure.web import Router
from tenure.services.memcache import check_memcached
from tenure.sidecar.memcache import MemcacheRegistrar

from support import wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
REGISTRAR = os.path.join(os.path.dirname(HERE), "examples", "memcache_registrar.py")
TTL = 2


class Registrar:
    """examples/memcache_registrar.py for one memcached, in its own process."""

    def __init__(self, etcd: LocalEtcd, service: str, member: str, server: LocalMemcached) -> None:
        self.member = member
        self.proc = subprocess.Popen(
            [sys.executable, REGISTRAR, "--etcd", ",".join(etcd.endpoints), "--service", service,
             "--member", member, "--port", str(server.port), "--ttl", str(TTL), "-v"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self, sig: int = signal.SIGTERM) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        return self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""


@pytest.fixture
def pool(etcd: LocalEtcd, service: str) -> Iterator[tuple[list[LocalMemcached], list[Registrar]]]:
    servers = [LocalMemcached().start() for _ in range(3)]
    registrars = [Registrar(etcd, service, f"m{i}", s) for i, s in enumerate(servers)]
    yield servers, registrars
    for r in registrars:
        r.stop()
    for s in servers:
        s.kill()


def direct_get(server: LocalMemcached, key: str) -> bytes | None:
    c = PlainClient((server.host, server.port), connect_timeout=0.5, timeout=0.5)
    try:
        return c.get(key)
    finally:
        c.close()


def test_a_dead_member_leaves_the_ring_only_its_keys_move_and_it_rejoins(
        pool: tuple[list[LocalMemcached], list[Registrar]], etcd: LocalEtcd, service: str) -> None:
    servers, _ = pool
    router = Router(etcd.endpoints)
    try:
        ring = router.memcache(service)
        assert router.memcache(service) is ring
        addresses = sorted(s.address for s in servers)
        wait_for(lambda: sorted(ring.nodes) == addresses, 10, "all three members in the ring")

        keys = [f"key{i}" for i in range(300)]
        owner = {k: ring._ring[0].get_node(k) for k in keys}
        assert len(set(owner.values())) == 3
        for k in keys:
            ring.set(k, f"v-{k}")
        dead = servers[0]
        dead_keys = [k for k in keys if owner[k] == dead.address]
        live_keys = [k for k in keys if owner[k] != dead.address]
        assert all(direct_get(dead, k) == f"v-{k}".encode() for k in dead_keys), "keys stored on their owner"

        def read_through(k: str) -> tuple[bool, float]:
            """A cache-aside read as a web page does it: a miss is refilled. Returns (hit, seconds)."""
            t = time.monotonic()
            value = ring.get(k)
            if value is None:
                ring.set(k, f"v-{k}")
            return value is not None, time.monotonic() - t

        # SIGKILL one server: reads never raise, its keys miss and are refilled elsewhere; the rest stay.
        t_kill = time.monotonic()
        dead.kill()
        results = {k: read_through(k) for k in keys}
        slowest = max(t for _, t in results.values())
        assert slowest < 0.5, "a dead server costs at most one short timeout"
        assert not [k for k in dead_keys if results[k][0]], "keys of the dead member missed"
        assert all(results[k][0] for k in live_keys), "keys of the live members were all still hits"
        assert dead.address not in ring.nodes, "out of the ring at its first failure"
        wait_for(lambda: len(router.service(service).members) == 2, TTL + 1, "its record withdrawn")
        left_after = time.monotonic() - t_kill
        # Past the client's dead_timeout it is not tried again: etcd no longer lists it.
        dead_timeout = ring.dead_timeout
        wait_for(lambda: time.monotonic() > t_kill + dead_timeout + 0.2, dead_timeout + 1, "dead_timeout to pass")
        for k in live_keys[:10]:
            ring.get(k)  # each operation is the client's chance to retry its dead nodes
        assert dead.address not in ring.nodes
        assert {ring._ring[0].get_node(k) for k in live_keys} == {owner[k] for k in live_keys}
        assert all(ring._ring[0].get_node(k) == owner[k] for k in live_keys), "only the dead member's keys moved"
        refilled = [k for k in dead_keys if ring.get(k) == f"v-{k}".encode()]
        assert refilled == dead_keys, "the dead member's keys were refilled on the others"
        assert all(ring._ring[0].get_node(k) != dead.address for k in dead_keys)

        # Restart it (empty, same port): its registrar republishes and it rejoins; its keys map back to it.
        t_back = time.monotonic()
        dead.start()
        wait_for(lambda: sorted(ring.nodes) == addresses, 10, "the restarted member back in the ring")
        rejoined_after = time.monotonic() - t_back
        assert all(ring._ring[0].get_node(k) == owner[k] for k in keys), "every key maps to its first owner again"
        results = {k: read_through(k) for k in keys}
        assert not [k for k in dead_keys if results[k][0]], "its keys miss on the empty server (then refill)"
        assert all(results[k][0] for k in live_keys), "other keys never moved"
        assert all(direct_get(dead, k) == f"v-{k}".encode() for k in dead_keys), "refilled on the rejoined server"
        print(f"memcached kill -9: slowest read-through after the kill {slowest * 1000:.1f} ms; "
              f"record withdrawn (out of the ring for good) after {left_after:.2f} s (ttl {TTL} s); back {rejoined_after:.2f} s after restart; "
              f"{len(dead_keys)}/{len(keys)} keys moved")
    finally:
        router.close()


def test_a_dead_registrar_record_expires_within_ttl(pool: tuple[list[LocalMemcached], list[Registrar]],
                                                     etcd: LocalEtcd, service: str) -> None:
    servers, registrars = pool
    router = Router(etcd.endpoints)
    try:
        ring = router.memcache(service)
        wait_for(lambda: len(ring.nodes) == 3, 10, "three members")
        t = time.monotonic()
        registrars[1].stop(signal.SIGKILL)  # the registrar dies, its memcached lives: the record expires
        wait_for(lambda: servers[1].address not in ring.nodes, TTL + 1.5, "the member out of the ring")
        gone_after = time.monotonic() - t
        assert gone_after >= 0.5, "it went by expiry, not at once"
        registrars[2].stop(signal.SIGTERM)  # a clean stop withdraws at once
        t = time.monotonic()
        wait_for(lambda: servers[2].address not in ring.nodes, 1.0, "the member withdrawn on SIGTERM")
        print(f"registrar kill -9: record expired after {gone_after:.2f} s; SIGTERM: withdrawn after "
              f"{time.monotonic() - t:.2f} s")
        # Every member gone: reads are misses, not errors.
        registrars[0].stop(signal.SIGTERM)
        wait_for(lambda: not ring.nodes, 2, "an empty ring")
        assert ring.get("anything") is None and ring.set("anything", "x") in (True, False, None)
    finally:
        router.close()


def test_registrar_bad_input_and_health_check(etcd: LocalEtcd, client: tenure.Client, service: str) -> None:
    with pytest.raises(ConfigError, match="port"):
        MemcacheRegistrar(client, service, "m1", "127.0.0.1", 0)
    with pytest.raises(ConfigError, match="port"):
        MemcacheRegistrar(client, service, "m1", "127.0.0.1", "11211")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="host"):
        MemcacheRegistrar(client, service, "m1", "", 11211)
    with pytest.raises(ConfigError, match="member name"):
        MemcacheRegistrar(client, service, "bad member", "127.0.0.1", 11211)
    with pytest.raises(ConfigError, match="interval"):
        MemcacheRegistrar(client, service, "m1", "127.0.0.1", 11211, ttl=3, interval=2)
    router = Router(etcd.endpoints)
    try:
        with pytest.raises(ConfigError, match="servers from etcd"):
            router.memcache(service, servers=[("127.0.0.1", 1)])
    finally:
        router.close()
    out = subprocess.run([sys.executable, REGISTRAR, "--etcd", "nonsense", "--service", service, "--member", "m1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "malformed etcd endpoint" in out.stderr

    # Health: a registrar publishes only a server that answers version/set/get, and withdraws it on failure.
    with LocalMemcached() as server:
        assert check_memcached(server.host, server.port).startswith("1.")
        reg = MemcacheRegistrar(client, service, "m1", server.host, server.port, ttl=2)
        assert reg.check()
        rec = client.get(f"svc/{service}/members/m1")
        assert rec is not None and rec.json()["address"] == server.address and rec.json()["healthy"] is True
        server.kill()
        assert not reg.check()
        assert client.get(f"svc/{service}/members/m1") is None, "withdrawn on the first failed check"
        server.start()
        assert reg.check() and client.get(f"svc/{service}/members/m1") is not None
        stop = threading.Event()
        stop.set()
        reg.run(stop)  # one more check, then withdraw
        assert client.get(f"svc/{service}/members/m1") is None
