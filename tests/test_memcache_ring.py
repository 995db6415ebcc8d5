"""The memcached ring as pure functions: placement, which copies may be served, the next ring, the codec."""

from __future__ import annotations

import pickle
import random

import memcache  # python-memcached, the real package
import pytest

from tenure import records
from tenure.errors import (ConfigError, MalformedRecord, MemcacheKeyCharacterError, MemcacheKeyError,
                           MemcacheKeyLengthError, MemcacheKeyNoneError, MemcacheKeyTypeError)
from tenure.records import RingMember, RingRecord
from tenure.sidecar.memcache import MemcacheRegistrar, next_ring
from tenure.web.memcache import Client
from tenure.web.memcache_codec import Codec, tag_of
from tenure.web.memcache_ring import CLOCK_SKEW, Placement, RingHistory, cmemcache_hash, learn

A, B, C = (RingMember(m, f"10.0.0.{i}:11211", i, True) for i, m in enumerate("abc"))


def ring(epoch: int, *servers: RingMember, hashing: str = "modulo", legacy: int | None = 1) -> RingRecord:
    return RingRecord(epoch, hashing, tuple(servers), legacy)


def absent(m: RingMember) -> RingMember:
    return RingMember(m.member, m.address, m.slot, False)


def keys(n: int = 2000) -> list[bytes]:
    return [f"key{i}".encode() for i in range(n)]


def test_the_hash_is_python_memcached_s() -> None:
    rnd = random.Random(1)
    for _ in range(2000):
        k = bytes(rnd.randrange(33, 127) for _ in range(rnd.randrange(1, 40)))
        assert cmemcache_hash(k) == memcache.cmemcache_hash(k)


def test_modulo_placement_is_python_memcached_s_formula_and_skips_absent_servers_by_its_rehash() -> None:
    p = Placement.of(ring(1, A, B, C))
    servers = [A, B, C]
    for k in keys():
        assert p.owner(None, k) == servers[memcache.cmemcache_hash(k) % 3]
    assert p.owner(7, b"anything") == servers[7 % 3], "a (hash, key) tuple places by its hash, as python-memcached"
    q = Placement.of(ring(2, A, absent(B), C))
    moved = [k for k in keys() if q.owner(None, k) != p.owner(None, k)]
    assert moved and all(p.owner(None, k) == B for k in moved), "only the absent server's keys move"
    assert all(q.owner(None, k) in (A, C) for k in keys())
    assert Placement.of(ring(3, absent(A), absent(B), absent(C))).owner(None, b"k") is None


def test_rendezvous_moves_only_the_keys_of_the_server_that_left() -> None:
    p = Placement.of(ring(1, A, B, C, hashing="rendezvous"))
    owners = {k: p.owner(None, k) for k in keys()}
    assert {o.member for o in owners.values() if o} == {"a", "b", "c"}
    q = Placement.of(ring(2, A, absent(B), C, hashing="rendezvous"))
    for k, o in owners.items():
        if o != B:
            assert q.owner(None, k) == o
        else:
            assert q.owner(None, k) in (A, C)


def find_key(pred: object, hist: RingHistory) -> bytes:
    for k in keys(5000):
        if pred(k):  # type: ignore[operator]
            return k
    raise AssertionError("no such key")


def test_a_copy_is_served_only_if_its_server_owned_the_key_at_every_epoch_since_it_was_written() -> None:
    # e1 all live, e2 c away, e3 c back, e4 c away again.
    rings = [ring(1, A, B, C), ring(2, A, B, absent(C)), ring(3, A, B, C), ring(4, A, B, absent(C))]
    h4 = RingHistory(rings, {})
    h3 = RingHistory(rings[:3], {})
    h2 = RingHistory(rings[:2], {})
    p1, p2 = Placement.of(rings[0]), Placement.of(rings[1])
    moved = find_key(lambda k: p1.owner(None, k) == C and p2.owner(None, k) == B, h4)
    stays = find_key(lambda k: p1.owner(None, k) == A, h4)
    # Written on the fallback while c was away: good while c is away ...
    assert h2.valid(None, moved, B, 2)
    # ... and never again after c came back and left again (the copy can be many versions old by then).
    assert not h4.valid(None, moved, B, 2)
    # c returning with what it held before it left: refused (and it was flushed anyway).
    assert not h3.valid(None, moved, C, 1)
    assert not h3.valid(None, moved, C, 0), "an untagged copy from before the absence too"
    assert h3.valid(None, moved, C, 3)
    # Keys that never moved stay warm through all of it, tagged or not.
    assert h4.valid(None, stays, A, 1) and h4.valid(None, stays, A, 0) and h4.valid(None, stays, A, 3)
    # A tag from an epoch this client does not know yet, or older than its history: refused.
    assert not h2.valid(None, stays, A, 3)
    trimmed = RingHistory(rings[2:], {})
    assert trimmed.first == 3 and not trimmed.valid(None, stays, A, 1)
    assert RingHistory(rings[:2], {}).valid(None, stays, A, 0), "legacy epoch 1 is known here"
    no_legacy = RingHistory([ring(1, A, B, C, legacy=None)], {})
    assert not no_legacy.valid(None, stays, A, 0)


def test_a_history_with_a_gap_uses_only_the_contiguous_newest_run() -> None:
    h = RingHistory([ring(1, A, B, C), ring(3, A, B, absent(C)), ring(4, A, B, C)], {})
    assert (h.first, h.epoch) == (3, 4)


def test_previous_owners_are_cleared_only_while_slower_clients_may_use_their_epoch() -> None:
    rings = [ring(1, A, B, C), ring(2, A, B, absent(C))]
    h = RingHistory(rings, {1: 100.0, 2: 200.0})
    p1 = Placement.of(rings[0])
    moved = find_key(lambda k: p1.owner(None, k) == C, h)
    stays = find_key(lambda k: p1.owner(None, k) == A, h)
    settle = rings[1].settle
    assert h.previous_owners(None, moved, 200.0 + settle - 0.1) == [C]
    assert h.previous_owners(None, stays, 200.0 + 0.1) == []
    assert h.previous_owners(None, moved, 200.0 + settle + 0.1) == []


def test_a_new_process_dates_old_rings_back_by_their_age() -> None:
    old = RingRecord(1, "modulo", (A, B, C), 1, since=1000.0)
    new = RingRecord(2, "modulo", (A, B, absent(C)), 1, since=1995.0)
    learned = learn({}, [old, new], now=50.0, wall=2000.0)
    assert learned[2] == 50.0, "a change of 5 s ago counts as just learnt (clocks may differ by 30 s)"
    assert learned[1] == 50.0 - (1000.0 - CLOCK_SKEW)
    assert learn({2: 7.0}, [new], now=60.0, wall=2010.0) == {2: 7.0}, "what was learnt stays"


def test_next_ring_grows_marks_absence_replaces_and_freezes_the_legacy_epoch() -> None:
    r1 = next_ring(None, {"a": ("h:1", 0)}, hashing="modulo", fresh_within=2, settle=3, now=0)
    assert r1 is not None and r1.epoch == 1 and r1.legacy_epoch == 1
    r2 = next_ring(r1, {"a": ("h:1", 0), "b": ("h:2", 1), "c": ("h:3", 2)}, hashing="rendezvous", fresh_within=5,
                   settle=9, now=0)
    assert r2 is not None and [s.member for s in r2.servers] == ["a", "b", "c"] and r2.legacy_epoch == 2
    assert (r2.hashing, r2.fresh_within, r2.settle) == ("modulo", 2, 3), "the first ring's settings stay"
    assert next_ring(r2, {"a": ("h:1", 0), "b": ("h:2", 1), "c": ("h:3", 2)}, hashing="modulo", fresh_within=2,
                     settle=3, now=1) is None, "nothing changed: no new epoch"
    r3 = next_ring(r2, {"a": ("h:1", 0), "c": ("h:3", 2)}, hashing="modulo", fresh_within=2, settle=3, now=0)
    assert r3 is not None and [s.live for s in r3.servers] == [True, False, True] and r3.legacy_epoch == 2
    r4 = next_ring(r3, {"a": ("h:1", 0), "b": ("h:2", 1), "c": ("h:3", 2)}, hashing="modulo", fresh_within=2,
                   settle=3, now=0)
    assert r4 is not None and all(s.live for s in r4.servers) and r4.legacy_epoch == 2, "frozen at the first absence"
    # A new host takes the absent member's slot; one asking for a live member's slot gets a free one.
    r5 = next_ring(r3, {"a": ("h:1", 0), "c": ("h:3", 2), "d": ("h:4", 1), "e": ("h:5", 0)}, hashing="modulo",
                   fresh_within=2, settle=3, now=0)
    assert r5 is not None
    assert [(s.member, s.slot) for s in r5.servers] == [("a", 0), ("d", 1), ("c", 2), ("e", 3)]
    assert next_ring(None, {}, hashing="modulo", fresh_within=2, settle=3, now=0) is None


def test_ring_records_round_trip_and_malformed_ones_are_named() -> None:
    r = ring(5, A, absent(B), C, legacy=2)
    assert RingRecord.decode(r.encode()) == r
    assert records.ring_epoch_of("cache", records.ring_key("cache", 5)) == 5
    assert records.ring_epoch_of("cache", "svc/cache/ring/x") is None
    for bad in (b"{", b"[]", b'{"epoch": 0, "hashing": "modulo", "servers": []}',
                b'{"epoch": 1, "hashing": "ketama", "servers": []}',
                b'{"epoch": 1, "hashing": "modulo", "servers": [1]}',
                b'{"epoch": 1, "hashing": "modulo", "servers": [{"member": "a", "address": "x:1", "slot": 1, '
                b'"live": true}, {"member": "b", "address": "x:2", "slot": 0, "live": true}]}'):
        with pytest.raises(MalformedRecord):
            RingRecord.decode(bad)


def test_values_are_encoded_as_python_memcached_encodes_them() -> None:
    pm = memcache.Client([])
    codec = Codec()
    big = "x" * 5000
    for value, compress in (("text é", 0), (42, 0), ({"a": [1, 2]}, 0), (big, 100), (3.5, 0), (None, 0)):
        ours = codec.encode(value, compress)
        theirs = pm._val_to_store_info(value, compress)
        assert ours is not None and (ours[0], ours[1]) == (theirs[0], theirs[2]), value
        assert codec.decode(ours[0], ours[1]) == (True, value)
    # bytes: python-memcached's own (flags 0) are read as they are; tenure pickles them so the epoch tag fits.
    assert codec.decode(0, b"raw") == (True, b"raw")
    flags, data = codec.encode(b"raw")  # type: ignore[misc]
    assert flags == 1 and pickle.loads(data) == b"raw"
    assert codec.decode(flags | (7 << 8), data) == (True, b"raw") and tag_of(flags | (7 << 8)) == 7
    assert codec.decode(1 << 6, b"?") == (False, None), "unknown flags: a miss, not an exception"
    assert Codec(server_max_value_length=10).encode("x" * 11) is None


def test_keys_are_checked_as_python_memcached_checks_them() -> None:
    codec = Codec()
    assert codec.key("é") == (None, "é".encode())
    assert codec.key((12, "k")) == (12, b"k")
    assert codec.key(5, b"p_", multi=True) == (None, b"p_5")
    for bad, err in ((None, MemcacheKeyNoneError), ("", MemcacheKeyNoneError), (5, MemcacheKeyTypeError),
                     ("a b", MemcacheKeyCharacterError), ("x" * 251, MemcacheKeyLengthError)):
        with pytest.raises(err):
            codec.key(bad)
    assert Client.MemcachedKeyError is MemcacheKeyError and Client.MemcachedKeyLengthError is MemcacheKeyLengthError
    assert issubclass(MemcacheKeyError, ValueError)


def test_bad_registrar_and_client_settings_are_config_errors() -> None:
    class View:
        name = "cache"

    for kw in ({"slot": -1}, {"hashing": "ketama"}, {"fresh_within": 3, "settle": 3}, {"fresh_within": 0.5},
               {"ttl": 0}, {"ttl": 3, "interval": 2}):
        with pytest.raises(ConfigError):
            MemcacheRegistrar(None, "cache", "m1", "127.0.0.1", 11211, **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="servers"):
        Client(View(), servers=["127.0.0.1:11211"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="socket_timeout"):
        Client(View(), socket_timeout=0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown"):
        Client(View(), serverz=1)  # type: ignore[arg-type]
