"""A drop-in for python-memcached's ``memcache.Client`` over a pool's ring in etcd, never serving a stale copy.

``router.memcache("cache")`` (or ``AgentRouter.memcache``) returns a
:class:`Client` with python-memcached 1.62's methods, arguments, return
values and value flags (:mod:`tenure.web.memcache_codec`): entries written
by python-memcached are read, and python-memcached reads what this writes.
With the ring's ``modulo`` hashing a key goes to the same server as with
python-memcached over the same ordered list, so switching clients keeps the
cache warm; ``rendezvous`` is the alternative (a change moves only the
keys of the server that left or came). The ring is set by the registrars
(``tenure sidecar`` with a ``[memcache]`` section), not by the client.

What keeps reads fresh (the argument is in docs/memcache.md):

* placement follows the ring records in etcd alone, epoch by epoch, the
  same for every client; an unreachable server is a miss (and a failed
  write), never a reason to send its keys elsewhere;
* every value is stored with the epoch it was written under; a copy is
  served only if the server it was found on owned the key at every epoch
  from that one to now (:meth:`RingHistory.valid`);
* for ``settle`` seconds after a change, a write also deletes the key on the
  servers that owned it at the epochs just replaced, for clients that have
  not yet seen the change, and is acknowledged only if that worked;
* a client whose view of etcd is older than ``fresh_within`` neither reads
  nor writes (misses, failed writes);
* a timed-out connection is kept and drained, never replaced, so a write
  that runs late cannot overtake a newer one (:mod:`tenure.web.memcache_conn`).
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
import zlib
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from .. import errors
from ..errors import ConfigError, MalformedRecord
from ..records import MAX_RING_EPOCH, RingMember, RingRecord
from .memcache_codec import TAG_SHIFT, Codec, expiry, tag_of
from .memcache_conn import GET, LINE, Conn, Unavailable
from .memcache_ring import RingHistory, learn
from .metrics import CACHE_REQUESTS

log = logging.getLogger("tenure.memcache")

_OK_DELETE = (b"DELETED", b"NOT_FOUND")


class RingRecordLike(Protocol):
    key: str
    value: bytes
    mod_revision: int


class RingView(Protocol):
    """What the client needs of a service view (a router's :class:`ServiceView` or an agent reader's)."""

    name: str

    @property
    def stale_for(self) -> float: ...

    @property
    def ring_records(self) -> Sequence[RingRecordLike]: ...

    def peek(self) -> Any: ...

    def ready(self, timeout: float) -> bool: ...


class Client:
    """python-memcached's ``memcache.Client`` over the ring of ``view``'s service; see the module doc.

    Takes python-memcached's keyword arguments except ``servers`` (they come
    from etcd). ``socket_timeout`` (0.5 s) bounds each call to a server;
    ``dead_retry`` (1 s) is how long a server that failed is skipped (its
    keys miss meanwhile; they do not move). ``first_wait``: a new process
    waits up to this long, once, for its first view of the ring. Thread-safe:
    each thread has its own connections, as python-memcached's do.
    """

    MemcachedKeyError = errors.MemcacheKeyError
    MemcachedKeyLengthError = errors.MemcacheKeyLengthError
    MemcachedKeyCharacterError = errors.MemcacheKeyCharacterError
    MemcachedKeyNoneError = errors.MemcacheKeyNoneError
    MemcachedKeyTypeError = errors.MemcacheKeyTypeError

    def __init__(self, view: RingView, *, socket_timeout: float = 0.5, dead_retry: float = 1.0,
                 first_wait: float = 1.0, pickleProtocol: int = 0,  # noqa: N803 -- python-memcached's name
                 pickler: Callable[..., Any] = pickle.Pickler, unpickler: Callable[..., Any] = pickle.Unpickler,
                 compressor: Callable[[bytes], bytes] = zlib.compress,
                 decompressor: Callable[[bytes], bytes] = zlib.decompress, pload: Any = None, pid: Any = None,
                 server_max_key_length: int | None = None, server_max_value_length: int | None = None,
                 check_keys: bool = True, key_encoder: Callable[[Any], Any] | None = None, debug: int = 0,
                 cache_cas: bool = False, flush_on_reconnect: int = 0, **unknown: Any) -> None:
        if "servers" in unknown:
            raise ConfigError("tenure's memcache Client takes its servers from the ring in etcd; do not pass servers")
        if unknown:
            raise ConfigError(f"unknown memcache Client argument(s): {', '.join(sorted(unknown))}")
        for name, v in (("socket_timeout", socket_timeout), ("dead_retry", dead_retry), ("first_wait", first_wait)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (name == "socket_timeout" and v == 0):
                raise ConfigError(f"{name} must be a number of seconds{' > 0' if name == 'socket_timeout' else ' >= 0'}"
                                  f", got {v!r}")
        self.view = view
        self.service = view.name
        self.socket_timeout = float(socket_timeout)
        self.dead_retry = float(dead_retry)
        self.first_wait = float(first_wait)
        self.debug = debug
        self.codec = Codec(pickle_protocol=pickleProtocol, pickler=pickler, unpickler=unpickler,
                           compressor=compressor, decompressor=decompressor, pload=pload, pid=pid,
                           server_max_key_length=server_max_key_length,
                           server_max_value_length=server_max_value_length, check_keys=check_keys,
                           key_encoder=key_encoder)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._kvs: Any = None
        self._decoded: dict[str, tuple[int, RingRecord | None]] = {}
        self._learned: dict[int, float] = {}
        self._history: RingHistory | None = None
        self._waited_pid = 0
        self._closed = False
        self._count = {(op, r): CACHE_REQUESTS.labels(self.service, op, r)
                       for op in ("get", "set", "add", "replace", "delete", "incr", "decr")
                       for r in ("hit", "miss", "stale", "down", "unsure", "stored", "not_stored")}

    # -- the ring ---------------------------------------------------------------------------

    def ring(self) -> RingHistory | None:
        """The ring history as this process sees it now, or None while that view is not fresh enough to use."""
        view = self.view
        stale = view.stale_for  # also starts the view in a new process
        if self._waited_pid != os.getpid() and view.peek().exists is None:
            self._waited_pid = os.getpid()
            view.ready(self.first_wait)
            stale = view.stale_for
        kvs = view.ring_records
        if kvs is not self._kvs:
            self._rebuild(kvs)
        h = self._history
        if h is None or h.current is None or not stale <= h.fresh_within or h.epoch > MAX_RING_EPOCH:
            return None
        return h

    def _rebuild(self, kvs: Sequence[RingRecordLike]) -> None:
        with self._lock:
            if kvs is self._kvs:
                return
            decoded: dict[str, tuple[int, RingRecord | None]] = {}
            for kv in kvs:
                seen = self._decoded.get(kv.key)
                if seen is not None and seen[0] == kv.mod_revision:
                    decoded[kv.key] = seen
                    continue
                try:
                    decoded[kv.key] = (kv.mod_revision, RingRecord.decode(kv.value))
                except MalformedRecord as e:
                    log.warning("%s: ignoring ring record %s: %s", self.service, kv.key, e)
                    decoded[kv.key] = (kv.mod_revision, None)
            rings = [r for _, r in decoded.values() if r is not None]
            old = self._history.epoch if self._history is not None else None
            self._learned = learn(self._learned, rings, _monotonic(), time.time())
            history = RingHistory(rings, self._learned)
            self._decoded, self._history, self._kvs = decoded, history, kvs
            if history.epoch != old and history.current is not None:
                log.info("%s: ring epoch %d (%s hashing): live %s", self.service, history.epoch,
                         history.current.hashing, ", ".join(s.address for s in history.current.live) or "none")

    @property
    def servers(self) -> list[str]:
        """The live servers of the current epoch (addresses), in ring order."""
        h = self._history if self._history is not None else self.ring()
        return [s.address for s in h.current.live] if h is not None and h.current is not None else []

    def server_for(self, key: Any) -> str | None:
        """The address of the server that holds ``key`` now (None: no fresh view, or no live server)."""
        h = self.ring()
        if h is None:
            return None
        hv, k = self.codec.key(key)
        owner = h.owner(hv, k)
        return owner.address if owner is not None else None

    def _conn(self, address: str) -> Conn:
        local = self._local
        pid = os.getpid()
        conns: dict[str, Conn] | None = getattr(local, "conns", None)
        if conns is None or getattr(local, "pid", None) != pid:
            conns = local.conns = {}  # a forked child never uses its parent's sockets
            local.pid = pid
        c = conns.get(address)
        if c is None:
            c = conns[address] = Conn(address, self.socket_timeout, self.dead_retry)
        return c

    def _run(self, batches: Mapping[str, list[tuple[bytes, int | None]]]) -> dict[str, list[Any] | None]:
        """Send each server (by address) its commands, all before reading any answer; answers, None if unavailable."""
        started: list[tuple[str, Conn, float]] = []
        out: dict[str, list[Any] | None] = {}
        for address, cmds in batches.items():
            c = self._conn(address)
            try:
                started.append((address, c, c.begin(cmds)))
            except Unavailable as e:
                log.debug("%s", e)
                out[address] = None
        for address, c, deadline in started:
            try:
                out[address] = c.finish(deadline)
            except Unavailable as e:
                log.debug("%s", e)
                out[address] = None
        return out

    # -- reads --------------------------------------------------------------------------------

    def get(self, key: Any, default: Any = None) -> Any:
        """The value of ``key``; ``default`` if absent; None if its server cannot be asked."""
        hv, k = self.codec.key(key)
        h = self.ring()
        if h is None:
            self._count["get", "unsure"].inc()
            return None
        owner = h.owner(hv, k)
        if owner is None:
            self._count["get", "down"].inc()
            return None
        answers = self._run({owner.address: [(b"get " + k + b"\r\n", GET)]})[owner.address]
        if answers is None or not isinstance(answers[0], dict):
            self._count["get", "down"].inc()
            return None
        return self._value(h, hv, k, owner, answers[0].get(k), default, "get")

    def _value(self, h: RingHistory, hv: int | None, k: bytes, owner: RingMember,
               found: tuple[int, bytes, int | None] | None, default: Any, op: str) -> Any:
        if found is None:
            self._count[op, "miss"].inc()
            return default
        flags, data, _ = found
        if not h.valid(hv, k, owner, tag_of(flags)):
            self._count[op, "stale"].inc()
            return default
        ok, value = self.codec.decode(flags, data)
        self._count[op, "hit" if ok else "miss"].inc()
        return value if ok else default

    def get_multi(self, keys: Iterable[Any], key_prefix: Any = "") -> dict[Any, Any]:
        """The values found for ``keys`` (without ``key_prefix`` in the returned keys), one request per server."""
        prefix = self.codec.prefix(key_prefix)
        mapped = [(orig, *self.codec.key(orig, prefix, multi=True)) for orig in keys]
        h = self.ring()
        if h is None:
            self._count["get", "unsure"].inc(len(mapped))
            return {}
        by_server: dict[RingMember, list[tuple[Any, int | None, bytes]]] = {}
        for orig, hv, k in mapped:
            owner = h.owner(hv, k)
            if owner is None:
                self._count["get", "down"].inc()
                continue
            by_server.setdefault(owner, []).append((orig, hv, k))
        answers = self._run({s.address: [(b"get " + b" ".join(k for _, _, k in items) + b"\r\n", GET)]
                             for s, items in by_server.items()})
        out: dict[Any, Any] = {}
        miss = object()
        for s, items in by_server.items():
            got = answers.get(s.address)
            if got is None or not isinstance(got[0], dict):
                self._count["get", "down"].inc(len(items))
                continue
            for orig, hv, k in items:
                v = self._value(h, hv, k, s, got[0].get(k), miss, "get")
                if v is not miss:
                    out[orig] = v
        return out

    # -- writes ---------------------------------------------------------------------------------

    def _plan(self, h: RingHistory, hv: int | None, k: bytes, now: float) -> tuple[RingMember | None,
                                                                               list[RingMember]]:
        return h.owner(hv, k), h.previous_owners(hv, k, now)

    def _store_cmd(self, cmd: bytes, k: bytes, flags: int, exptime: int, data: bytes, noreply: bool,
                   cas: int | None = None) -> tuple[bytes, int | None]:
        head = b"%s %s %d %d %d" % (cmd, k, flags, exptime, len(data))
        if cas is not None:
            head += b" %d" % cas
        return head + (b" noreply\r\n" if noreply else b"\r\n") + data + b"\r\n", (None if noreply else LINE)

    def _cleared(self, answers: dict[str, list[Any] | None], others: list[RingMember], index: int = 0) -> bool:
        """Whether the deletes sent to ``others`` (the ``index``-th command of each) all went through."""
        for o in others:
            got = answers.get(o.address)
            if got is None or got[index] not in _OK_DELETE:
                return False
        return True

    def _write(self, op: str, owner: RingMember, cmds: list[tuple[bytes, int | None]], k: bytes,
               others: list[RingMember]) -> tuple[list[Any] | None, bool]:
        """Run ``cmds`` on ``owner`` and delete ``k`` on ``others``; (owner's answers, deletes all done)."""
        batches: dict[str, list[tuple[bytes, int | None]]] = {owner.address: cmds}
        for o in others:
            batches[o.address] = [(b"delete " + k + b"\r\n", LINE)]
        answers = self._run(batches)
        got = answers.get(owner.address)
        if got is None:
            self._count[op, "down"].inc()
        return got, self._cleared(answers, others)

    def set(self, key: Any, val: Any, time: Any = 0, min_compress_len: int = 0, noreply: bool = False) -> bool:
        """Store ``val`` under ``key`` (``time``: expiry in seconds or a timedelta; 0: never). True once stored."""
        return self._set(b"set", "set", key, val, time, min_compress_len, noreply)

    def _set(self, cmd: bytes, op: str, key: Any, val: Any, time_: Any, min_compress_len: int,
             noreply: bool) -> bool:
        hv, k = self.codec.key(key)
        enc = self.codec.encode(val, min_compress_len)
        h = self.ring()
        if h is None:
            self._count[op, "unsure"].inc()
            return False
        if enc is None:
            self._count[op, "not_stored"].inc()
            return False
        owner, others = self._plan(h, hv, k, _monotonic())
        if owner is None:
            self._count[op, "down"].inc()
            return False
        flags = enc[0] | (h.epoch << TAG_SHIFT)
        got, cleared = self._write(op, owner, [self._store_cmd(cmd, k, flags, expiry(time_), enc[1], noreply)], k,
                                   others)
        ok = got is not None and (noreply or got[0] == b"STORED") and cleared
        if got is not None:
            self._count[op, "stored" if ok else "not_stored"].inc()
        return ok

    def add(self, key: Any, val: Any, time: Any = 0, min_compress_len: int = 0, noreply: bool = False) -> bool:
        """Store ``val`` only if ``key`` has no (valid) value. True if stored."""
        hv, k = self.codec.key(key)
        enc = self.codec.encode(val, min_compress_len)
        h = self.ring()
        if h is None or enc is None:
            self._count["add", "unsure" if h is None else "not_stored"].inc()
            return False
        owner, others = self._plan(h, hv, k, _monotonic())
        if owner is None:
            self._count["add", "down"].inc()
            return False
        flags, exptime = enc[0] | (h.epoch << TAG_SHIFT), expiry(time)
        for _ in range(3):
            got, cleared = self._write("add", owner, [self._store_cmd(b"add", k, flags, exptime, enc[1], noreply)],
                                       k, others)
            if got is None:
                return False
            if noreply or got[0] == b"STORED":
                self._count["add", "stored" if cleared else "not_stored"].inc()
                return cleared
            # Present on the server: a copy this client must not serve counts as absent.
            found = self._gets(owner, k)
            if found is None:
                return False
            if k not in found:
                continue  # deleted meanwhile: try the add again
            f, _, cas = found[k]
            if h.valid(hv, k, owner, tag_of(f)):
                self._count["add", "not_stored"].inc()
                return False
            got, cleared = self._write("add", owner, [self._store_cmd(b"cas", k, flags, exptime, enc[1], False, cas)],
                                       k, others)
            if got is not None and got[0] == b"STORED":
                self._count["add", "stored" if cleared else "not_stored"].inc()
                return cleared
        self._count["add", "not_stored"].inc()
        return False

    def _gets(self, owner: RingMember, k: bytes) -> dict[bytes, tuple[int, bytes, int | None]] | None:
        got = self._run({owner.address: [(b"gets " + k + b"\r\n", GET)]})[owner.address]
        return got[0] if got is not None and isinstance(got[0], dict) else None

    def replace(self, key: Any, val: Any, time: Any = 0, min_compress_len: int = 0, noreply: bool = False) -> bool:
        """Store ``val`` only if ``key`` has a (valid) value. True if stored."""
        hv, k = self.codec.key(key)
        enc = self.codec.encode(val, min_compress_len)
        h = self.ring()
        if h is None or enc is None:
            self._count["replace", "unsure" if h is None else "not_stored"].inc()
            return False
        owner, others = self._plan(h, hv, k, _monotonic())
        if owner is None:
            self._count["replace", "down"].inc()
            return False
        flags, exptime = enc[0] | (h.epoch << TAG_SHIFT), expiry(time)
        for _ in range(3):
            found = self._gets(owner, k)
            if found is None:
                self._count["replace", "down"].inc()
                return False
            if k not in found or not h.valid(hv, k, owner, tag_of(found[k][0])):
                self._count["replace", "not_stored"].inc()
                return False
            got, cleared = self._write("replace", owner,
                                       [self._store_cmd(b"cas", k, flags, exptime, enc[1], False, found[k][2])],
                                       k, others)
            if got is None:
                return False
            if got[0] == b"STORED":
                self._count["replace", "stored" if cleared else "not_stored"].inc()
                return cleared
            if got[0] == b"NOT_FOUND":
                break  # gone meanwhile: nothing to replace
        self._count["replace", "not_stored"].inc()
        return False

    def incr(self, key: Any, delta: int = 1, noreply: bool = False) -> int | None:
        """Add ``delta`` to the integer stored under ``key``; the new value, or None if absent (or noreply)."""
        return self._incrdecr(b"incr", "incr", key, delta, noreply)

    def decr(self, key: Any, delta: int = 1, noreply: bool = False) -> int | None:
        """Subtract ``delta`` (memcached stops at 0); the new value, or None if absent (or noreply)."""
        return self._incrdecr(b"decr", "decr", key, delta, noreply)

    def _incrdecr(self, cmd: bytes, op: str, key: Any, delta: int, noreply: bool) -> int | None:
        hv, k = self.codec.key(key)
        h = self.ring()
        if h is None:
            self._count[op, "unsure"].inc()
            return None
        owner, others = self._plan(h, hv, k, _monotonic())
        if owner is None:
            self._count[op, "down"].inc()
            return None
        found = self._gets(owner, k)
        if found is None:
            self._count[op, "down"].inc()
            return None
        if k not in found or not h.valid(hv, k, owner, tag_of(found[k][0])):
            self._count[op, "miss" if k not in found else "stale"].inc()
            return None
        line = b"%s %s %d%s\r\n" % (cmd, k, int(delta), b" noreply" if noreply else b"")
        got, cleared = self._write(op, owner, [(line, None if noreply else LINE)], k, others)
        if got is None or noreply:
            return None
        try:
            value = int(got[0])
        except ValueError:
            self._count[op, "miss"].inc()
            return None
        self._count[op, "stored" if cleared else "not_stored"].inc()
        return value if cleared else None

    def delete(self, key: Any, noreply: bool = False) -> int:
        """Remove ``key``: 1 if it was there (and every copy a slower client could read is gone), else 0."""
        hv, k = self.codec.key(key)
        h = self.ring()
        if h is None:
            self._count["delete", "unsure"].inc()
            return 0
        owner, others = self._plan(h, hv, k, _monotonic())
        if owner is None:
            self._count["delete", "down"].inc()
            return 0
        cmd = b"delete " + k + (b" noreply\r\n" if noreply else b"\r\n")
        got, cleared = self._write("delete", owner, [(cmd, None if noreply else LINE)], k, others)
        ok = got is not None and (noreply or got[0] == b"DELETED") and cleared
        if got is not None:
            self._count["delete", "stored" if ok else "not_stored"].inc()
        return 1 if ok else 0

    def set_multi(self, mapping: Mapping[Any, Any], time: Any = 0, key_prefix: Any = "", min_compress_len: int = 0,
                  noreply: bool = False) -> list[Any]:
        """Store every pair of ``mapping``, one request per server; the keys that were not stored."""
        prefix = self.codec.prefix(key_prefix)
        items = [(orig, *self.codec.key(orig, prefix, multi=True)) for orig in mapping]
        h = self.ring()
        if h is None:
            self._count["set", "unsure"].inc(len(items))
            return list(mapping)
        now = _monotonic()
        exptime = expiry(time)
        failed: list[Any] = []
        batches: dict[str, list[tuple[bytes, int | None]]] = {}
        plan: list[tuple[Any, str, int, list[tuple[str, int]]]] = []
        for orig, hv, k in items:
            enc = self.codec.encode(mapping[orig], min_compress_len)
            owner, others = self._plan(h, hv, k, now)
            if enc is None or owner is None:
                failed.append(orig)
                continue
            cmds = batches.setdefault(owner.address, [])
            index = len(cmds)
            cmds.append(self._store_cmd(b"set", k, enc[0] | (h.epoch << TAG_SHIFT), exptime, enc[1], noreply))
            dels = []
            for o in others:
                d = batches.setdefault(o.address, [])
                dels.append((o.address, len(d)))
                d.append((b"delete " + k + b"\r\n", LINE))
            plan.append((orig, owner.address, index, dels))
        answers = self._run(batches)
        positions = _answer_positions(batches)
        for orig, owner, index, dels in plan:
            got = answers.get(owner)
            ok = got is not None and (noreply or got[positions[owner][index]] == b"STORED")
            for o, i in dels:
                g = answers.get(o)
                ok = ok and g is not None and g[positions[o][i]] in _OK_DELETE
            self._count["set", "stored" if ok else ("down" if got is None else "not_stored")].inc()
            if not ok:
                failed.append(orig)
        return failed

    def delete_multi(self, keys: Iterable[Any], time: Any = None, key_prefix: Any = "",
                     noreply: bool = False) -> int:
        """Delete ``keys``, one request per server: 1 if every server involved answered, else 0."""
        prefix = self.codec.prefix(key_prefix)
        items = [self.codec.key(orig, prefix, multi=True) for orig in keys]
        h = self.ring()
        if h is None:
            self._count["delete", "unsure"].inc(len(items))
            return 0
        now = _monotonic()
        batches: dict[str, list[tuple[bytes, int | None]]] = {}
        rc = 1
        for hv, k in items:
            owner, others = self._plan(h, hv, k, now)
            if owner is None:
                rc = 0
                continue
            batches.setdefault(owner.address, []).append(
                (b"delete " + k + (b" noreply\r\n" if noreply else b"\r\n"), None if noreply else LINE))
            for o in others:
                batches.setdefault(o.address, []).append((b"delete " + k + b"\r\n", LINE))
        answers = self._run(batches)
        for address in batches:
            got = answers.get(address)
            if got is None or any(a not in _OK_DELETE for a in got):
                rc = 0
        self._count["delete", "stored" if rc else "not_stored"].inc(len(items))
        return rc

    # -- python-memcached's housekeeping ----------------------------------------------------------

    def flush_all(self) -> None:
        """Empty every live server of the current epoch."""
        h = self.ring()
        if h is not None and h.current is not None:
            self._run({s.address: [(b"flush_all\r\n", LINE)] for s in h.current.live})

    def forget_dead_hosts(self) -> None:
        """Try failed servers again at the next call (this thread's connections)."""
        for c in getattr(self._local, "conns", {}).values():
            c.down_until = 0.0

    def disconnect_all(self) -> None:
        """Close this thread's idle connections (one still owed an answer stays open, to keep the order)."""
        for c in getattr(self._local, "conns", {}).values():
            c.close()

    def debuglog(self, msg: str) -> None:
        if self.debug:
            log.debug("%s", msg)

    def close(self) -> None:
        self.disconnect_all()

    def after_fork(self) -> None:
        """Nothing to do: a forked child opens its own connections on first use."""


_monotonic = time.monotonic


def _answer_positions(batches: Mapping[str, list[tuple[bytes, int | None]]]) -> dict[str, list[int]]:
    """For each server, the index in its answers of each command (noreply commands have no answer)."""
    out: dict[str, list[int]] = {}
    for s, cmds in batches.items():
        pos, n = [], 0
        for _, kind in cmds:
            pos.append(n)
            if kind is not None:
                n += 1
        out[s] = pos
    return out
