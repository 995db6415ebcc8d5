"""memcached pools with real servers: registrars, the ring in etcd, the client's semantics and its failure behaviour."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
from pymemcache.client.base import Client as PlainClient

import tenure
from tenure import records
from tenure.errors import ConfigError
from tenure.lab.etcd import LocalEtcd
from tenure.lab.memcached import LocalMemcached
from tenure.records import RingMember, RingRecord
from tenure.services.memcache import check_memcached
from tenure.sidecar.config import RegistrarConfig, parse_config
from tenure.sidecar.memcache import MemcacheRegistrar
from tenure.web import Router
from tenure.web.memcache import Client

from support import wait_for

TTL = 2
KV = namedtuple("KV", "key value mod_revision")


class Pool:
    """Three real memcached servers, each with a registrar thread (its own etcd client), slots 0, 1, 2."""

    def __init__(self, etcd: LocalEtcd, service: str, n: int = 3, hashing: str = "modulo") -> None:
        self.etcd, self.service, self.hashing = etcd, service, hashing
        self.servers = [LocalMemcached().start() for _ in range(n)]
        self.registrars: list[MemcacheRegistrar | None] = [None] * n
        self.stops: list[threading.Event] = [threading.Event() for _ in range(n)]
        self.threads: list[threading.Thread | None] = [None] * n
        for i in range(n):
            self.start_registrar(i)

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]

    def start_registrar(self, i: int) -> MemcacheRegistrar:
        s = self.servers[i]
        reg = MemcacheRegistrar(tenure.connect(self.etcd.endpoints), self.service, f"m{i}", s.host, s.port, ttl=TTL,
                                slot=i, hashing=self.hashing)
        self.stops[i] = threading.Event()
        t = threading.Thread(target=reg.run, args=(self.stops[i],), daemon=True)
        t.start()
        self.registrars[i], self.threads[i] = reg, t
        return reg

    def stop_registrar(self, i: int) -> None:
        self.stops[i].set()
        t = self.threads[i]
        if t is not None:
            t.join(10)
        reg = self.registrars[i]
        if reg is not None:
            reg.client.close()

    def live(self, client: tenure.Client) -> list[str]:
        kvs, _ = client.get_prefix(records.ring_prefix(self.service))
        return [s.address for s in RingRecord.decode(kvs[-1].value).live] if kvs else []

    def close(self) -> None:
        for i in range(len(self.servers)):
            self.stop_registrar(i)
        for s in self.servers:
            s.kill()


@pytest.fixture
def pool(etcd: LocalEtcd, service: str) -> Iterator[Pool]:
    p = Pool(etcd, service)
    yield p
    p.close()


def direct_get(server: LocalMemcached, key: str) -> bytes | None:
    c = PlainClient((server.host, server.port), connect_timeout=0.5, timeout=0.5)
    try:
        return c.get(key)
    finally:
        c.close()


def live(mc: Client) -> list[str]:
    return mc.servers if mc.ring() is not None else []


def whole(mc: Client, pool: Pool) -> bool:
    return live(mc) == pool.addresses


def test_an_absent_member_is_flushed_before_it_rejoins_and_no_copy_from_its_absence_is_served(
        pool: Pool, etcd: LocalEtcd, client: tenure.Client, service: str) -> None:
    router = Router(etcd.endpoints)
    try:
        mc = router.memcache(service)
        wait_for(lambda: whole(mc, pool), 15, "all three members in the ring")
        epoch0 = mc.ring().epoch  # type: ignore[union-attr]
        away = pool.servers[1]
        keys = [f"k{i}" for i in range(200)]
        for k in keys:
            assert mc.set(k, "v1")
        moved = [k for k in keys if mc.server_for(k) == away.address]
        assert moved and all(direct_get(away, k) is not None for k in moved)

        # m1 leaves while its memcached lives (its registrar stops): its keys go to the others.
        pool.stop_registrar(1)
        wait_for(lambda: away.address not in live(mc), TTL + 2, "m1 out of the ring")
        fallback = {k: mc.server_for(k) for k in moved}
        for k in moved:
            assert mc.get(k) is None, "a moved key misses on its new server (no copy there yet)"
            assert mc.set(k, "v2")
        assert all(mc.get(k) == "v2" for k in moved)

        # It comes back: flushed first, so what it held (v1) is gone; its keys are its own again.
        reg = pool.start_registrar(1)
        wait_for(lambda: whole(mc, pool), 10, "m1 back in the ring")
        assert reg.flushes == 1
        assert all(direct_get(away, k) is None for k in moved), "flushed before it rejoined"
        # Past the settle window, writes no longer clear the fallbacks: the v2 copies stay there.
        wait_for(lambda: not mc.ring().previous_owners(None, moved[0].encode(), time.monotonic()),  # type: ignore
                 10, "the change to settle")
        for k in moved:
            assert mc.get(k) is None  # never v1, never the v2 left on the fallback
            assert mc.set(k, "v3")

        # It leaves again: the v2 copies written during its first absence are still on the fallbacks,
        # and must never be served (they are older than v3).
        pool.stop_registrar(1)
        wait_for(lambda: away.address not in live(mc), TTL + 2, "m1 out again")
        assert {k: mc.server_for(k) for k in moved} == fallback
        by_address = {s.address: s for s in pool.servers}
        still_there = [k for k in moved if direct_get(by_address[fallback[k]], k) is not None]
        served = [k for k in moved if mc.get(k) is not None]
        assert still_there, "the test needs old copies on the fallbacks"
        assert not served, f"copies from an earlier absence were served: {served[:5]}"
        h = mc.ring()
        assert h is not None and h.epoch >= epoch0 + 3
        print(f"memcached rejoin: {len(moved)} keys moved; {len(still_there)} old copies still on the "
              f"fallback servers after the second absence, none served; ring epoch {epoch0} -> {h.epoch}")
    finally:
        router.close()


def test_a_dead_member_s_keys_miss_until_etcd_says_otherwise_and_no_other_key_moves(
        pool: Pool, etcd: LocalEtcd, service: str) -> None:
    router = Router(etcd.endpoints)
    try:
        mc = router.memcache(service, socket_timeout=0.2)
        wait_for(lambda: whole(mc, pool), 15, "all three members in the ring")
        keys = [f"k{i}" for i in range(300)]
        assert mc.set_multi({k: f"v-{k}" for k in keys}) == []
        owner = {k: mc.server_for(k) for k in keys}
        dead = pool.servers[0]
        dead.kill()
        t = time.monotonic()
        got = mc.get_multi(keys)  # never raises; the dead server's keys miss, the others hit
        took = time.monotonic() - t
        assert all(got.get(k) == f"v-{k}" for k in keys if owner[k] != dead.address)
        assert not [k for k in keys if owner[k] == dead.address and k in got]
        assert took < 1.0
        wait_for(lambda: dead.address not in live(mc), TTL + 2, "withdrawn by its registrar")
        assert all(mc.server_for(k) == owner[k] for k in keys if owner[k] != dead.address), "only its keys moved"
        dead.start()
        wait_for(lambda: whole(mc, pool), 10, "back after an empty restart")
        assert all(mc.server_for(k) == owner[k] for k in keys)
        got = mc.get_multi(keys)
        assert all(got.get(k) == f"v-{k}" for k in keys if owner[k] != dead.address)
        print(f"memcached kill -9: get_multi of {len(keys)} keys right after the kill took {took * 1000:.0f} ms")
    finally:
        router.close()


def test_a_killed_registrar_s_record_expires_and_the_ring_follows(etcd: LocalEtcd, client: tenure.Client,
                                                                 service: str, tmp_path: Path) -> None:
    with LocalMemcached() as server:
        cfg = tmp_path / "m.toml"
        cfg.write_text(f'service = "{service}"\nmember = "m0"\nttl = {TTL}\n[etcd]\nendpoints = '
                       f'{list(etcd.endpoints)!r}\n[memcache]\nport = {server.port}\n'.replace("'", '"'))
        proc = subprocess.Popen([sys.executable, "-m", "tenure", "sidecar", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            def live() -> list[str]:
                kvs, _ = client.get_prefix(records.ring_prefix(service))
                return [s.member for s in RingRecord.decode(kvs[-1].value).live] if kvs else []

            wait_for(lambda: live() == ["m0"], 30, "tenure sidecar --config to register memcached")
            t = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            wait_for(lambda: client.get(records.member_key(service, "m0")) is None, TTL + 2, "the record to expire")
            expired = time.monotonic() - t
            assert expired >= 0.5, "it went by expiry"
            # No registrar is left to write the next ring: the ring keeps m0, whose keys then miss. A second
            # registrar would record the change at its next round.
            assert live() == ["m0"]
            print(f"registrar kill -9: record expired after {expired:.2f} s")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_registrar_config_health_and_bad_input(client: tenure.Client, service: str, tmp_path: Path) -> None:
    base = {"service": "cache", "member": "m1", "etcd": {"endpoints": ["http://127.0.0.1:2379"]}}
    cfg = parse_config({**base, "memcache": {"port": 11311, "slot": 2, "hashing": "rendezvous"}})
    assert isinstance(cfg, RegistrarConfig) and cfg.memcache.slot == 2 and cfg.memcache.port == 11311
    for bad, match in (({"port": 0}, "port"), ({"port": "x"}, "port"), ({"hashing": "ketama"}, "hashing"),
                       ({"slot": -1}, "slot"), ({"fresh_within": 5}, "fresh_within"), ({"interval": 1}, "interval"),
                       ({"advertise": "nohost"}, "advertise"), ({"colour": 1}, "unknown key")):
        with pytest.raises(ConfigError, match=match):
            parse_config({**base, "memcache": bad})
    with pytest.raises(ConfigError, match="either"):
        parse_config({**base, "memcache": {}, "postgres": {"data_dir": "/x"}})
    bad_file = tmp_path / "bad.toml"
    bad_file.write_text('service = "c"\nmember = "m"\n[etcd]\nendpoints = ["http://127.0.0.1:1"]\n'
                        '[memcache]\nhashing = "ketama"\n')
    out = subprocess.run([sys.executable, "-m", "tenure", "sidecar", "--config", str(bad_file)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "hashing" in out.stderr

    # Health: published only while version/set/get work; withdrawn at the first failure; flushed on rejoin.
    with LocalMemcached() as server:
        assert check_memcached(server.host, server.port).startswith("1.")
        reg = MemcacheRegistrar(client, service, "m1", server.host, server.port, ttl=2)
        assert reg.check() and reg.flushes == 1
        rec = client.get(records.member_key(service, "m1"))
        assert rec is not None and rec.json()["address"] == server.address
        assert reg.check() and reg.flushes == 1, "same lease: no flush"
        server.kill()
        assert not reg.check()
        assert client.get(records.member_key(service, "m1")) is None, "withdrawn on the first failed check"
        server.start()
        assert reg.check() and reg.flushes == 2
        stop = threading.Event()
        stop.set()
        reg.run(stop)
        assert client.get(records.member_key(service, "m1")) is None


# -- the client's semantics, against real servers, with a ring given directly -----------------------------


class FakeView:
    """A view with given ring records (no etcd): for the client's semantics and its connection handling."""

    name = "cache"

    def __init__(self, *rings: RingRecord) -> None:
        self.stale_for = 0.0
        self.set_rings(*rings)

    def set_rings(self, *rings: RingRecord) -> None:
        self.ring_records = tuple(KV(records.ring_key("cache", r.epoch), r.encode(), r.epoch) for r in rings)

    def peek(self) -> Any:
        return SimpleNamespace(exists=True)

    def ready(self, timeout: float) -> bool:
        return True


@pytest.fixture
def servers() -> Iterator[list[LocalMemcached]]:
    ss = [LocalMemcached().start() for _ in range(2)]
    yield ss
    for s in ss:
        s.kill()


def members(ss: list[LocalMemcached]) -> list[RingMember]:
    return [RingMember(f"m{i}", s.address, i, True) for i, s in enumerate(ss)]


def test_python_memcached_semantics(servers: list[LocalMemcached]) -> None:
    m = members(servers)
    mc = Client(FakeView(RingRecord(1, "modulo", tuple(m), 1)))  # type: ignore[arg-type]
    assert mc.get("nope") is None and mc.get("nope", "dflt") == "dflt"
    assert mc.set("s", "text") is True and mc.get("s") == "text"
    assert mc.add("s", "other") is False and mc.get("s") == "text"
    assert mc.add("a", 1) is True and mc.incr("a") == 2 and mc.incr("a", 5) == 7 and mc.decr("a", 10) == 0
    assert mc.incr("missing") is None
    assert mc.replace("missing", 1) is False and mc.replace("s", "new") is True and mc.get("s") == "new"
    assert mc.delete("s") == 1 and mc.delete("s") == 0 and mc.get("s") is None
    assert mc.set((7, "hashed"), [1, 2]) and mc.get((7, "hashed")) == [1, 2]
    assert mc.set_multi({"x": 1, "y": "two", 3: {"z": 3}}, key_prefix="p:") == []
    assert mc.get_multi(["x", "y", 3, "none"], key_prefix="p:") == {"x": 1, "y": "two", 3: {"z": 3}}
    assert mc.delete_multi(["x", "y"], key_prefix="p:") == 1
    assert mc.get_multi(["x", "y", 3], key_prefix="p:") == {3: {"z": 3}}
    assert mc.set("n", "v", noreply=True) is True and mc.get("n") == "v"
    assert mc.set("big", "x" * 2_000_000) is False, "over the value limit: not stored, as python-memcached"
    assert mc.set("exp", "soon", time=1) and mc.get("exp") == "soon"
    with pytest.raises(Client.MemcachedKeyCharacterError):
        mc.get("has space")
    mc.flush_all()
    assert mc.get((7, "hashed")) is None


def test_a_view_that_is_not_fresh_is_not_used(servers: list[LocalMemcached]) -> None:
    view = FakeView(RingRecord(1, "modulo", tuple(members(servers)), 1))
    mc = Client(view)  # type: ignore[arg-type]
    assert mc.set("k", "v") and mc.get("k") == "v"
    view.stale_for = 2.5  # beyond the ring's fresh_within (2 s)
    assert mc.get("k") is None and mc.set("k", "w") is False and mc.get_multi(["k"]) == {}
    view.stale_for = 0.1
    assert mc.get("k") == "v"


def test_a_write_to_a_frozen_server_never_overtakes_a_newer_one(servers: list[LocalMemcached]) -> None:
    s = servers[0]
    mc = Client(FakeView(RingRecord(1, "modulo", (RingMember("m0", s.address, 0, True),), 1)),  # type: ignore[arg-type]
                socket_timeout=0.2, dead_retry=0.3)
    assert mc.set("k", "v1")
    s.freeze()
    try:
        assert mc.set("k", "v2") is False, "no answer: not acknowledged (it may still run later)"
        assert mc.get("k") is None, "skipped for dead_retry: a miss at once"
    finally:
        s.thaw()
    # v2 runs when the server resumes (a read on another connection may still see v1 a moment before).
    wait_for(lambda: mc.get("k") == "v2", 5, "the late v2 to run once the server answers again")
    assert mc.set("k", "v3") and mc.get("k") == "v3"


def test_a_moved_key_is_also_cleared_on_its_previous_owner_while_the_change_settles(
        servers: list[LocalMemcached]) -> None:
    a, b = members(servers)
    r1 = RingRecord(1, "modulo", (a, b), 1, 2.0, 30.0)  # a long settle: the test is not timing-sensitive
    view = FakeView(r1)
    mc = Client(view)  # type: ignore[arg-type]
    key = next(f"k{i}" for i in range(1000) if mc.server_for(f"k{i}") == b.address)
    assert mc.set(key, "v1") and direct_get(servers[1], key) is not None
    r2 = RingRecord(2, "modulo", (a, RingMember(b.member, b.address, 1, False)), 1, 2.0, 30.0)
    view.set_rings(r1, r2)
    assert mc.server_for(key) == a.address
    assert mc.set(key, "v2")
    assert direct_get(servers[1], key) is None, "deleted on the previous owner, for clients still on epoch 1"
    servers[1].freeze()
    try:
        assert mc.set(key, "v3") is False, "the previous owner could not be cleared: not acknowledged"
    finally:
        servers[1].thaw()


def test_the_ring_history_is_trimmed(client: tenure.Client, service: str) -> None:
    a = RingMember("m0", "127.0.0.1:1", 0, True)
    last = records.RING_HISTORY + 5
    for e in range(1, last + 1):
        client.put(records.ring_key(service, e), RingRecord(e, "modulo", (a,), 1).encode())
    with LocalMemcached() as server:
        reg = MemcacheRegistrar(client, service, "m1", server.host, server.port, ttl=2)
        assert reg.check()
        kvs, _ = client.get_prefix(records.ring_prefix(service))
        epochs = [records.ring_epoch_of(service, kv.key) for kv in kvs]
        assert epochs[0] == last - records.RING_HISTORY + 1 and epochs[-1] == last + 1, "trimmed, then m1 added"
        newest = RingRecord.decode(kvs[-1].value)
        assert [(s.member, s.live) for s in newest.servers] == [("m0", False), ("m1", True)]
        reg.close()


def test_a_restarted_server_is_used_again_at_once(servers: list[LocalMemcached]) -> None:
    s = servers[0]
    mc = Client(FakeView(RingRecord(1, "modulo", (RingMember("m0", s.address, 0, True),), 1)),  # type: ignore[arg-type]
                dead_retry=30)
    assert mc.set("k", "v1") and mc.get("k") == "v1"
    s.restart()  # empty; this thread's connection to the old process is dead
    assert mc.get("k") is None, "a miss on the empty server, found through a new connection at once"
    assert mc.set("k", "v2") and mc.get("k") == "v2"
