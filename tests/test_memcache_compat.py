"""tenure's memcache Client against the real python-memcached 1.62, on real servers: same placement, same values."""

from __future__ import annotations

import memcache  # python-memcached
import pytest

import tenure
from tenure.lab.etcd import LocalEtcd
from tenure.web import Router

from support import wait_for
from test_memcache import TTL, Pool, direct_get, live, whole

N = 10_000


@pytest.fixture
def pool(etcd: LocalEtcd, service: str) -> Pool:
    p = Pool(etcd, service)
    yield p
    p.close()


def holders(pool: Pool, keys: list[str]) -> dict[str, str]:
    """Where each key actually is: asked of each server directly."""
    out: dict[str, str] = {}
    for s in pool.servers:
        if not s.alive:
            continue
        one = memcache.Client([s.address])
        for i in range(0, len(keys), 500):
            for k in one.get_multi(keys[i:i + 500]):
                assert k not in out, f"{k} on two servers"
                out[k] = s.address
        one.disconnect_all()
    return out


def test_same_server_as_python_memcached_for_10000_keys_and_the_cache_stays_warm(
        pool: Pool, etcd: LocalEtcd, client: tenure.Client, service: str) -> None:
    router = Router(etcd.endpoints)
    try:
        mc = router.memcache(service)
        wait_for(lambda: whole(mc, pool), 15, "all three members in the ring")
        keys = [f"/works/OL{i}W" for i in range(N)]
        pm = memcache.Client(pool.addresses)  # python-memcached over the same ordered list
        for i in range(0, N, 1000):
            assert pm.set_multi({k: f"doc {k}" for k in keys[i:i + 1000]}) == []
        where = holders(pool, keys)
        assert len(where) == N
        differ = [k for k in keys if mc.server_for(k) != where[k]]
        assert not differ, f"{len(differ)} of {N} keys on another server than python-memcached's: {differ[:5]}"
        # Switching clients: every entry python-memcached wrote is a hit for tenure's client.
        got: dict[str, str] = {}
        for i in range(0, N, 1000):
            got.update(mc.get_multi(keys[i:i + 1000]))
        assert len(got) == N and all(got[k] == f"doc {k}" for k in keys)

        # One server gone: python-memcached (its socket finds it dead) and tenure (etcd says so) rehash alike.
        pool.servers[2].kill()
        wait_for(lambda: pool.servers[2].address not in live(mc), TTL + 2, "the dead member out of the ring")
        pm2 = memcache.Client(pool.addresses, socket_timeout=0.5)
        sub = keys[:3000]
        for i in range(0, len(sub), 1000):
            pm2.set_multi({k: "again" for k in sub[i:i + 1000]})
        where2 = holders(pool, sub)
        assert len(where2) == len(sub)
        differ2 = [k for k in sub if mc.server_for(k) != where2[k]]
        assert not differ2, f"{len(differ2)} of {len(sub)} keys placed differently with one server down"
        moved = sum(1 for k in sub if where2[k] != where[k])
        print(f"memcached hashing compatibility: {N}/{N} keys on the same server as python-memcached 1.62 "
              f"(3 servers, modulo); all {N} written by python-memcached read back by tenure; with one server "
              f"down {len(sub)}/{len(sub)} the same ({moved} moved, all from the dead server)")
    finally:
        router.close()


def test_values_written_by_either_client_are_read_by_the_other(pool: Pool, etcd: LocalEtcd, service: str) -> None:
    router = Router(etcd.endpoints)
    try:
        mc = router.memcache(service)
        wait_for(lambda: whole(mc, pool), 15, "all three members in the ring")
        pm = memcache.Client(pool.addresses)
        values = {"str": "Título", "int": 12345, "dict": {"key": "/books/OL1M", "n": [1, 2]}, "bytes": b"\x00\xff",
                  "float": 2.5, "none": None, "big": "z" * 20000}
        for name, v in values.items():
            assert pm.set(f"pm:{name}", v, min_compress_len=1000 if name == "big" else 0)
            assert mc.set(f"mc:{name}", v, min_compress_len=1000 if name == "big" else 0)
        for name, v in values.items():
            assert mc.get(f"pm:{name}") == v, name
            assert pm.get(f"mc:{name}") == v, name
        assert pm.get_multi([f"mc:{n}" for n in values]) == {f"mc:{n}": v for n, v in values.items()}
        assert mc.incr("pm:int") == 12346 and pm.incr("mc:int") == 12346 and mc.get("mc:int") == 12346
        # A tuple key (hash value, key) is placed by its hash by both.
        assert pm.set((4242, "user:7"), "u") and mc.get((4242, "user:7")) == "u"
        # tenure tags what it writes with the ring epoch (upper flag bits); the value bytes are python-memcached's.
        owner = next(s for s in pool.servers if s.address == mc.server_for("mc:str"))
        assert direct_get(owner, "mc:str") == "Título".encode()
    finally:
        router.close()
