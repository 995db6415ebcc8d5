"""Where a key lives, at each epoch of a memcached pool's ring, and whether a stored copy may be served.

Pure functions of the ring records (:class:`tenure.records.RingRecord`):

* :func:`cmemcache_hash` and the ``modulo`` placement are python-memcached
  1.62's own: ``servers[hash % len(servers)]`` over the ordered list, and
  when that server is absent, python-memcached's rehash sequence
  (``crc(str(hash) + str(i))``, ten tries) -- where python-memcached skips a
  server its own socket found dead, this skips one the ring lists as absent,
  so every client skips the same ones;
* the ``rendezvous`` placement gives each key to the live server with the
  highest ``blake2b(server, key)``: a change moves only the keys of the
  server that left or came;
* :class:`RingHistory` answers the two questions that keep reads fresh: is a
  copy found on server S with epoch tag T valid now (S owned the key at every
  epoch from T to now), and which other servers owned the key at epochs that
  a slower client may still be using (a write clears the key there too).
"""

from __future__ import annotations

import binascii
import hashlib
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from ..records import RingMember, RingRecord

_REHASH_TRIES = 10  # python-memcached's Client._SERVER_RETRIES


def cmemcache_hash(key: bytes) -> int:
    """python-memcached's server hash (``memcache.cmemcache_hash``)."""
    return ((binascii.crc32(key) & 0xFFFFFFFF) >> 16) & 0x7FFF


@dataclass(frozen=True)
class Placement:
    """One epoch's function from key to server."""

    hashing: str
    servers: tuple[RingMember, ...]  # sorted by slot, absent ones included

    @classmethod
    def of(cls, rec: RingRecord) -> "Placement":
        if rec.hashing == "rendezvous":  # absent servers do not matter to rendezvous: leave them out
            return cls(rec.hashing, tuple((s for s in rec.servers if s.live)))
        return cls(rec.hashing, rec.servers)

    def owner(self, hashvalue: int | None, key: bytes) -> RingMember | None:
        """The server that holds ``key`` (hashed as python-memcached does, or by the given hash value)."""
        servers = self.servers
        if not servers:
            return None
        if self.hashing == "modulo":
            n = len(servers)
            h = cmemcache_hash(key) if hashvalue is None else hashvalue
            for i in range(_REHASH_TRIES):
                s = servers[h % n]
                if s.live:
                    return s
                h = cmemcache_hash((str(h) + str(i)).encode("ascii"))
            return None
        data = key if hashvalue is None else str(hashvalue).encode("ascii")
        best, best_score = None, b""
        for s in servers:
            score = hashlib.blake2b(s.address.encode() + b"\0" + data, digest_size=8).digest()
            if best is None or score > best_score:
                best, best_score = s, score
        return best


def same_server(a: RingMember | None, b: RingMember | None) -> bool:
    return a is not None and b is not None and a.member == b.member and a.address == b.address


class RingHistory:
    """The epochs of one pool's ring a client knows (contiguous, oldest first) and when it learnt of each.

    ``learned`` maps an epoch to the ``time.monotonic()`` at which this
    client first saw it. An epoch stays *in use* by slower clients until
    ``settle`` seconds after this client learnt of the next one.
    """

    def __init__(self, rings: Sequence[RingRecord], learned: Mapping[int, float]) -> None:
        by_epoch = {r.epoch: r for r in rings}
        newest = max(by_epoch, default=0)
        chain: list[RingRecord] = []
        e = newest
        while e in by_epoch:  # only the contiguous run ending at the newest epoch can be checked
            chain.append(by_epoch[e])
            e -= 1
        chain.reverse()
        self.rings: tuple[RingRecord, ...] = tuple(chain)
        self.current: RingRecord | None = chain[-1] if chain else None
        self.epoch = self.current.epoch if self.current else 0
        self.first = chain[0].epoch if chain else 0
        cur = self.current
        self.fresh_within = cur.fresh_within if cur else 0.0
        self.settle = max((r.settle for r in chain), default=0.0)
        placements: dict[Placement, int] = {}
        ids = []
        for r in chain:
            p = Placement.of(r)
            ids.append(placements.setdefault(p, len(placements)))
        self._placements = list(placements)
        self.placement = self._placements[ids[-1]] if ids else Placement("modulo", ())
        # For a tag at index i: the distinct placements from epoch i to now.
        suffix: list[tuple[Placement, ...]] = [()] * len(chain)
        seen: dict[int, None] = {}
        for i in range(len(chain) - 1, -1, -1):
            seen.setdefault(ids[i], None)
            suffix[i] = tuple(self._placements[j] for j in seen)
        self._suffix = suffix
        # Older placements still in use by slower clients, with the time they stop being so.
        recent: list[tuple[float, Placement]] = []
        for i in range(len(chain) - 1):
            until = learned.get(chain[i + 1].epoch, time.monotonic()) + self.settle
            if self._placements[ids[i]] != self.placement:
                recent.append((until, self._placements[ids[i]]))
        self._recent = recent
        self._recent_until = max((u for u, _ in recent), default=-1.0)
        self.legacy = cur.legacy_epoch if cur else None

    def owner(self, hashvalue: int | None, key: bytes) -> RingMember | None:
        return self.placement.owner(hashvalue, key)

    def valid(self, hashvalue: int | None, key: bytes, server: RingMember, tag: int) -> bool:
        """Whether a copy of ``key`` found on ``server`` and written under epoch ``tag`` may be served.

        True only if ``server`` owned the key at every epoch from ``tag`` to
        now: a copy written while the key lived elsewhere, or before an epoch
        at which it did, may be older than one written meanwhile on another
        server. Untagged copies count as written at the ring's legacy epoch.
        """
        if tag == self.epoch:
            return True  # the reader found it on the current owner
        if tag == 0:
            if self.legacy is None:
                return False
            tag = self.legacy
        if tag > self.epoch or tag < self.first:
            return False  # a newer epoch than this client knows of, or older than the history it holds
        return all(same_server(p.owner(hashvalue, key), server) for p in self._suffix[tag - self.first])

    def previous_owners(self, hashvalue: int | None, key: bytes, now: float) -> list[RingMember]:
        """Servers other than the current owner that owned ``key`` at an epoch slower clients may still use."""
        if now >= self._recent_until:
            return []
        current = self.placement.owner(hashvalue, key)
        out: list[RingMember] = []
        for until, p in self._recent:
            if until > now:
                o = p.owner(hashvalue, key)
                if o is not None and not same_server(o, current) and not any(same_server(o, x) for x in out):
                    out.append(o)
        return out


CLOCK_SKEW = 30.0  # seconds the wall clocks of registrar and web hosts may differ, at most


def learn(learned: dict[int, float], rings: Iterable[RingRecord], now: float, wall: float) -> dict[int, float]:
    """``learned`` with each epoch of ``rings`` not yet in it stamped with when this client learnt of it.

    That is ``now`` for a ring written moments ago; a ring found already
    old (in a new process's first snapshot) is dated back by its age as
    its ``since`` (wall clock) says, less :data:`CLOCK_SKEW`, so that a
    process that starts does not treat long-settled changes as fresh.
    """
    out = {}
    for r in rings:
        if r.epoch in learned:
            out[r.epoch] = learned[r.epoch]
        else:
            out[r.epoch] = now - max(0.0, wall - r.since - CLOCK_SKEW) if r.since > 0 else now
    return out
