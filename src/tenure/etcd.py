"""The one module that talks to etcd.

It speaks etcd's v3 gRPC API through the protobuf stubs that ship with
python3-etcd3, not through that package's client class, because the client
class has three traps that matter for failover (see docs/etcd.md): one timeout
blacklists an endpoint for five minutes, its watch thread dies on a stream
error, and a blocked watch iterator never wakes up. Here instead:

* every call has a per-attempt timeout and a total retry budget (tenacity);
  a failed attempt moves on to the next endpoint at once, and nothing retries
  forever;
* a watch owns its stream, asks the server for progress every second so a
  silent (frozen or partitioned) member is noticed, resumes after any stream
  error from the last revision it delivered, and re-reads the whole state if
  that revision was compacted. It never stops until it is cancelled.

Keys given to and returned by :class:`Client` are relative to its namespace.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlsplit

import grpc
import tenacity
from etcd3.etcdrpc import kv_pb2, rpc_pb2 as rpc, rpc_pb2_grpc as rpc_grpc

from .errors import (AuthFailed, ClientClosed, ConfigError, EtcdError, EtcdUnavailable, IndeterminateWrite,
                     LeaseNotFound, PermissionDenied, TLSFailed)

log = logging.getLogger("tenure.etcd")

# Codes after which another endpoint may well succeed.
_RETRY_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

# Codes after which a request that was sent may have been applied all the same.
_AMBIGUOUS_CODES = {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}

# Words in an UNAVAILABLE error's details that mean the TLS handshake failed: no other member will do better.
_TLS_FAILURE_WORDS = ("ssl", "handshake", "certificate", "tls")

# Sent with every watch, as clientv3.WithRequireLeader does: a member that has lost its raft leader
# cancels the stream instead of answering from its own, possibly stale, store.
_REQUIRE_LEADER = ("hasleader", "true")

_CHANNEL_OPTIONS = [
    # A restarted member should be reachable again within a second, not after
    # gRPC's default reconnect backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # etcd refuses pings more often than every 5 s (GOAWAY too_many_pings).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 3_000),
]


@dataclass(frozen=True)
class Endpoint:
    """One etcd member's client URL."""

    scheme: str
    host: str
    port: int

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.target}"


def parse_endpoints(endpoints: str | Sequence[str]) -> list[Endpoint]:
    """Parse ``"http://host:port"`` strings (a list, or one comma-separated string)."""
    if isinstance(endpoints, str):
        items = [e.strip() for e in endpoints.split(",")]
    else:
        items = [str(e).strip() for e in endpoints]
    if not items or not any(items):
        raise ConfigError("no etcd endpoints given: expected e.g. 'http://127.0.0.1:2379'")
    out: list[Endpoint] = []
    for item in items:
        bad = f"malformed etcd endpoint {item!r}: expected 'http://host:port' or 'https://host:port'"
        try:
            parts = urlsplit(item)
            port = parts.port
        except ValueError:
            raise ConfigError(bad) from None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
            raise ConfigError(bad)
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ConfigError(bad)
        out.append(Endpoint(parts.scheme, parts.hostname, port))
    schemes = {e.scheme for e in out}
    if len(schemes) > 1:
        raise ConfigError(f"etcd endpoints mix http and https: {items}")
    return out


def check_client_settings(endpoints: str | Sequence[str], *, namespace: str, timeout: float, retry_for: float,
                          ca_cert: str | None = None, cert: str | None = None, key: str | None = None,
                          user: str | None = None, password: str | None = None) -> list[Endpoint]:
    """Validate a client's settings without connecting; return the parsed endpoints or raise ConfigError."""
    parsed = parse_endpoints(endpoints)
    if not isinstance(namespace, str) or not namespace.strip("/"):
        raise ConfigError(f"namespace must be a non-empty path such as '/tenure', got {namespace!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 \
            or isinstance(retry_for, bool) or not isinstance(retry_for, (int, float)) or not retry_for >= 0:
        raise ConfigError(f"timeout must be > 0 and retry_for >= 0 (got {timeout!r}, {retry_for!r})")
    if (user is None) != (password is None):
        raise ConfigError("etcd auth needs both user and password")
    if (cert is None) != (key is None):
        raise ConfigError("a TLS client certificate needs both cert and key")
    if parsed[0].scheme == "http":
        given = [name for name, v in (("ca_cert", ca_cert), ("cert", cert), ("key", key), ("user", user)) if v]
        if given:
            raise ConfigError(f"{', '.join(given)} given with http:// endpoints: use https:// endpoints "
                              f"(credentials and certificates are never sent in clear)")
    return parsed


@dataclass(frozen=True)
class KeyValue:
    """A key as etcd stores it; ``key`` is relative to the client's namespace."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    def json(self) -> Any:
        return json.loads(self.value) if self.value else None


@dataclass(frozen=True)
class Event:
    """One change seen by a watch: ``type`` is ``"put"`` or ``"delete"``."""

    type: str
    kv: KeyValue


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: int  # what etcd granted, which may exceed what was asked


class Client:
    """A connection to an etcd cluster through any of several endpoints.

    Thread-safe. Use :func:`tenure.connect` to make one.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        namespace: str = "/tenure",
        timeout: float = 1.0,
        retry_for: float = 5.0,
        ca_cert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        self.endpoints = check_client_settings(endpoints, namespace=namespace, timeout=timeout, retry_for=retry_for,
                                               ca_cert=ca_cert, cert=cert, key=key, user=user, password=password)
        self._settings = {"namespace": namespace, "timeout": timeout, "retry_for": retry_for, "ca_cert": ca_cert,
                          "cert": cert, "key": key, "user": user, "password": password}
        self.namespace = "/" + namespace.strip("/")
        self._prefix = (self.namespace + "/").encode()
        self.timeout = float(timeout)
        self.retry_for = float(retry_for)
        self._creds = self._tls_credentials(ca_cert, cert, key) if self.endpoints[0].scheme == "https" else None
        self._user, self._password = user, password
        self._token: str | None = None
        self._lock = threading.Lock()
        self._channels: dict[int, grpc.Channel] = {}
        self._current = 0
        self._closed = False
        self._watches: list[Watch] = []

    def clone(self) -> "Client":
        """A new client with the same endpoints and settings, and connections of its own (e.g. after fork)."""
        return Client([e.url for e in self.endpoints], **self._settings)

    # -- plumbing ---------------------------------------------------------

    @staticmethod
    def _tls_credentials(ca_cert: str | None, cert: str | None, key: str | None) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise ConfigError(f"cannot read TLS file {path}: {e.strerror}") from None

        return grpc.ssl_channel_credentials(read(ca_cert), read(key), read(cert))

    def _channel(self, index: int) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(index)
            if ch is None:
                target = self.endpoints[index].target
                if self._creds is not None:
                    ch = grpc.secure_channel(target, self._creds, options=_CHANNEL_OPTIONS)
                else:
                    ch = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
                self._channels[index] = ch
            return ch

    def _rotate(self, failed: int) -> None:
        with self._lock:
            if self._current == failed:
                self._current = (failed + 1) % len(self.endpoints)

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("token", self._token),) if self._token else None

    def _authenticate(self, index: int, timeout: float) -> None:
        stub = rpc_grpc.AuthStub(self._channel(index))
        resp = stub.Authenticate(rpc.AuthenticateRequest(name=self._user, password=self._password), timeout=timeout)
        self._token = resp.token

    def _login_again(self, retry_for: float | None = None) -> None:
        """Drop the auth token and get a new one (a watch calls this when its token was refused)."""
        self._token = None
        if self._user is not None:
            self._call("Authenticate", lambda ch, t: None, retry_for=retry_for)

    def _call(self, what: str, fn: Callable[[grpc.Channel, float], Any], *, timeout: float | None = None,
              retry_for: float | None = None, ambiguous: list[grpc.StatusCode] | None = None) -> Any:
        """Run ``fn(channel, per_try_timeout)``, moving across endpoints until the budget runs out.

        Codes of failed attempts that may have been applied are appended to ``ambiguous``.
        """
        if self._closed:
            raise ClientClosed("client is closed")
        per_try = self.timeout if timeout is None else timeout
        budget = self.retry_for if retry_for is None else retry_for
        last: list[grpc.RpcError] = []

        def attempt() -> Any:
            index = self._current
            url = self.endpoints[index].url
            authenticating = False
            try:
                if self._user is not None and self._token is None:
                    authenticating = True
                    self._authenticate(index, per_try)
                    authenticating = False
                return fn(self._channel(index), per_try)
            except grpc.RpcError as e:
                code = e.code()
                last[:] = [e]
                details = e.details() or ""
                if code == grpc.StatusCode.UNAUTHENTICATED and self._user is not None and not authenticating:
                    self._token = None  # expired token: log in again on the next try
                    raise _Retry() from e
                if code == grpc.StatusCode.UNAVAILABLE and self._creds is not None \
                        and any(w in details.lower() for w in _TLS_FAILURE_WORDS):
                    raise TLSFailed(f"TLS with etcd at {url} failed: {details}") from None
                if code in _RETRY_CODES:
                    if ambiguous is not None and code in _AMBIGUOUS_CODES and not authenticating:
                        ambiguous.append(code)
                    self._rotate(index)
                    raise _Retry() from e
                raise _refusal(url, what, code, details, authenticating) from None
            except ValueError as e:  # grpc: "Cannot invoke RPC on closed channel!"
                if self._closed:
                    raise ClientClosed(f"client closed during {what}") from None
                raise EtcdError(f"etcd call {what} failed: {e}") from None

        try:
            for try_ in tenacity.Retrying(
                stop=tenacity.stop_after_delay(budget),
                wait=tenacity.wait_exponential(multiplier=0.02, max=0.25),
                retry=tenacity.retry_if_exception_type(_Retry),
                reraise=True,
            ):
                with try_:
                    return attempt()
        except _Retry:
            detail = _describe(last[0]) if last else "none"
            raise EtcdUnavailable(
                f"no etcd endpoint answered {what} within {budget:g}s "
                f"(endpoints: {', '.join(e.url for e in self.endpoints)}; last error: {detail})"
            ) from None
        raise AssertionError("unreachable")

    def _unary(self, stub_cls: type, method: str, request: Any, **kw: Any) -> Any:
        # Reads are linearizable (RangeRequest.serializable stays False): decisions depend on them.
        return self._call(method, lambda ch, t: getattr(stub_cls(ch), method)(
            request, timeout=t, metadata=self._metadata()), **kw)

    def _range(self, k: bytes, range_end: bytes | None = None, *,
               retry_for: float | None = None) -> tuple[list[KeyValue], int]:
        req = rpc.RangeRequest(key=k, sort_order=rpc.RangeRequest.ASCEND, sort_target=rpc.RangeRequest.KEY)
        if range_end is not None:
            req.range_end = range_end
        resp = self._unary(rpc_grpc.KVStub, "Range", req, retry_for=retry_for)
        return [self._kv(kv) for kv in resp.kvs], resp.header.revision

    def _k(self, key: str) -> bytes:
        return self._prefix + key.encode()

    def _kv(self, kv: kv_pb2.KeyValue) -> KeyValue:
        return KeyValue(
            # A key that is not UTF-8 decodes to one no valid key equals, and back to the same bytes.
            key=kv.key[len(self._prefix):].decode("utf-8", "surrogateescape"),
            value=kv.value,
            create_revision=kv.create_revision,
            mod_revision=kv.mod_revision,
            version=kv.version,
            lease=kv.lease,
        )

    # -- cluster ------------------------------------------------------------

    def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Version, leader and member id reported by the first endpoint that answers."""
        resp = self._unary(rpc_grpc.MaintenanceStub, "Status", rpc.StatusRequest(), timeout=timeout)
        return {
            "version": resp.version,
            "leader": resp.leader,
            "member_id": resp.header.member_id,
            "raft_term": resp.raftTerm,
            "revision": resp.header.revision,
            "endpoint": self.endpoints[self._current].url,
        }

    # -- keys ---------------------------------------------------------------

    def get(self, key: str, *, retry_for: float | None = None) -> KeyValue | None:
        """Read ``key`` (linearizable: a member cut off from its quorum cannot answer)."""
        kvs, _ = self._range(self._k(key), retry_for=retry_for)
        return kvs[0] if kvs else None

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """All keys under ``prefix`` (sorted by key) and the revision they were read at."""
        k = self._k(prefix)
        return self._range(k, _prefix_end(k))

    def put(self, key: str, value: bytes | str, *, lease: int = 0,
            guard: tuple[str, int] | None = None, unchanged_since: int | None = None,
            retry_for: float | None = None) -> int | None:
        """Write ``key``; return the revision of the write.

        With ``guard=(other_key, create_revision)`` the write happens only if
        ``other_key`` currently has that create revision (0: does not exist),
        and with ``unchanged_since=mod_revision`` only if ``key`` was last
        written at that revision, atomically; otherwise nothing is written
        and None is returned. If an attempt timed out and a retry then found
        the condition false, the first may have been applied:
        :class:`IndeterminateWrite`. ``retry_for`` overrides the client's
        retry budget for this call.
        """
        put = rpc.PutRequest(key=self._k(key), value=_b(value), lease=lease)
        if guard is None and unchanged_since is None:
            return self._unary(rpc_grpc.KVStub, "Put", put, retry_for=retry_for).header.revision
        compare = [] if guard is None else [_create_is(self._k(guard[0]), guard[1])]
        if unchanged_since is not None:
            compare.append(rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, key=self._k(key),
                                       mod_revision=unchanged_since))
        ambiguous: list[grpc.StatusCode] = []
        resp = self._unary(rpc_grpc.KVStub, "Txn", rpc.TxnRequest(compare=compare, success=[rpc.RequestOp(request_put=put)]),
                           retry_for=retry_for, ambiguous=ambiguous)
        if resp.succeeded:
            return resp.header.revision
        if ambiguous:
            raise IndeterminateWrite(
                f"conditional write of {key!r}: an attempt ended with {ambiguous[0].name} after it was sent, and a "
                f"retry found the condition false; the first attempt may have been applied")
        return None

    def create(self, key: str, value: bytes | str, *, lease: int = 0) -> tuple[bool, KeyValue | None]:
        """Create ``key`` only if it does not exist.

        Returns ``(True, new)`` or ``(False, existing)``; ``existing`` may be
        None if the key vanished between the two halves of the answer.
        """
        k = self._k(key)
        resp = self._unary(rpc_grpc.KVStub, "Txn", rpc.TxnRequest(
            compare=[_create_is(k, 0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=_b(value), lease=lease)),
                     rpc.RequestOp(request_range=rpc.RangeRequest(key=k))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=k))],
        ))
        kvs = resp.responses[-1].response_range.kvs
        return bool(resp.succeeded), (self._kv(kvs[0]) if kvs else None)

    def delete(self, key: str, *, guard: tuple[str, int] | None = None, retry_for: float | None = None) -> bool:
        """Delete ``key``; with ``guard`` as in :meth:`put`. True if a key was deleted."""
        req = rpc.DeleteRangeRequest(key=self._k(key))
        if guard is None:
            return self._unary(rpc_grpc.KVStub, "DeleteRange", req, retry_for=retry_for).deleted > 0
        resp = self._unary(rpc_grpc.KVStub, "Txn", rpc.TxnRequest(
            compare=[_create_is(self._k(guard[0]), guard[1])],
            success=[rpc.RequestOp(request_delete_range=req)],
        ), retry_for=retry_for)
        return bool(resp.succeeded) and resp.responses[0].response_delete_range.deleted > 0

    def delete_prefix(self, prefix: str) -> int:
        k = self._k(prefix)
        return self._unary(rpc_grpc.KVStub, "DeleteRange", rpc.DeleteRangeRequest(key=k, range_end=_prefix_end(k))).deleted

    # -- leases -------------------------------------------------------------

    def grant(self, ttl: int) -> Lease:
        resp = self._unary(rpc_grpc.LeaseStub, "LeaseGrant", rpc.LeaseGrantRequest(TTL=int(ttl)))
        if resp.error:
            raise EtcdError(f"lease grant failed: {resp.error}")
        return Lease(resp.ID, resp.TTL)

    def time_to_live(self, lease_id: int) -> int:
        """Whole seconds left on a lease as etcd sees it (truncated); -1 if the lease is gone."""
        resp = self._unary(rpc_grpc.LeaseStub, "LeaseTimeToLive", rpc.LeaseTimeToLiveRequest(ID=int(lease_id)))
        return int(resp.TTL)

    def keepalive(self, lease_id: int, *, timeout: float | None = None, retry_for: float | None = None) -> int:
        """Renew a lease once; return the TTL etcd reset it to (0: the lease is gone)."""
        def once(channel: grpc.Channel, per_try: float) -> int:
            call = rpc_grpc.LeaseStub(channel).LeaseKeepAlive(
                iter([rpc.LeaseKeepAliveRequest(ID=lease_id)]), timeout=per_try, metadata=self._metadata())
            try:
                for resp in call:
                    return int(resp.TTL)
                raise EtcdError("lease keepalive stream closed without an answer")
            finally:
                call.cancel()

        return self._call("LeaseKeepAlive", once, timeout=timeout, retry_for=retry_for)

    def revoke(self, lease_id: int, *, retry_for: float | None = None) -> None:
        """Revoke a lease, deleting every key attached to it. A lease already gone is fine."""
        try:
            self._unary(rpc_grpc.LeaseStub, "LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease_id), retry_for=retry_for)
        except LeaseNotFound:
            pass

    # -- watches ------------------------------------------------------------

    def watch(self, key: str, *, prefix: bool = False,
              on_snapshot: Callable[[list[KeyValue], int], None],
              on_events: Callable[[list[Event]], None]) -> "Watch":
        """Follow ``key`` (or every key under it) until cancelled.

        ``on_snapshot(kvs, revision)`` is called first with the current state,
        and again whenever the watch had to re-read it (its resume revision
        was compacted); ``on_events(events)`` with each batch of changes.
        Callbacks run on the watch's own thread.
        """
        w = Watch(self, key, prefix, on_snapshot, on_events)
        with self._lock:
            self._watches = [x for x in self._watches if x._thread.is_alive()] + [w]
        w.start()
        return w

    def close(self) -> None:
        """Cancel this client's watches and close its connections."""
        self._closed = True
        with self._lock:
            watches, self._watches = self._watches, []
        for w in watches:
            w.cancel()
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Watch:
    """A watch that survives stream errors; see :meth:`Client.watch`.

    ``last_contact`` is the ``time.monotonic()`` of the last sign that the
    member it streams from is part of a working cluster: a linearizable read,
    or an event (events are committed by a quorum). A progress answer is not
    such a sign, since a member cut off from its quorum answers those from its
    own store. ``connected`` is set while a stream is open.
    """

    PROGRESS_EVERY = 1.0  # seconds between progress requests and quorum checks
    STALL_AFTER = 3.0  # no sign of a quorum for this long: drop the stream, try another member

    def __init__(self, client: Client, key: str, prefix: bool,
                 on_snapshot: Callable[[list[KeyValue], int], None],
                 on_events: Callable[[list[Event]], None]) -> None:
        self._client = client
        self._key = key
        self._prefix = prefix
        self._on_snapshot = on_snapshot
        self._on_events = on_events
        self._stop = threading.Event()
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name=f"tenure-watch:{key}", daemon=True)
        self._next_rev: int | None = None  # None: (re-)read the state first
        self.last_contact: float = 0.0
        self.connected = threading.Event()
        self.failures = 0  # unexpected errors caught on the watch thread (each one logged)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            index = self._client._current
            try:
                if self._next_rev is None:
                    k = self._client._k(self._key)
                    kvs, rev = self._client._range(k, _prefix_end(k) if self._prefix else None)
                    self.last_contact = time.monotonic()
                    self._deliver(self._on_snapshot, kvs, rev)
                    self._next_rev = rev + 1
                self._stream(index, self._next_rev)
                backoff = 0.05
            except _Compacted:
                log.info("watch %s: revision %s was compacted; re-reading state", self._key, self._next_rev)
                self._next_rev = None
            except _AuthRefused as e:
                self.connected.clear()
                if self._stop.is_set():
                    break
                log.warning("watch %s: %s; logging in again", self._key, e)
                try:
                    self._client._login_again()
                except EtcdError as le:
                    log.error("watch %s: cannot log in again: %s", self._key, le)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except ClientClosed:
                break
            except (grpc.RpcError, EtcdError, _Stalled) as e:
                self.connected.clear()
                if self._stop.is_set():
                    break
                log.warning("watch %s: stream lost (%s); resuming from revision %s",
                            self._key, _describe(e), self._next_rev)
                self._client._rotate(index)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
            except Exception:
                # Anything else (a closed channel, a bug): say so, show the view as not live, start afresh.
                self.connected.clear()
                self.failures += 1
                if self._stop.is_set():
                    break
                log.exception("watch %s: unexpected error; re-reading state", self._key)
                self._next_rev = None
                self._client._rotate(index)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
        self.connected.clear()

    def _deliver(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("watch %s: callback failed", self._key)

    def _quorum_check(self, channel: grpc.Channel, k: bytes) -> None:
        """One linearizable read through this stream's member: it answers only while it has a quorum."""
        t_sent = time.monotonic()
        try:
            rpc_grpc.KVStub(channel).Range(rpc.RangeRequest(key=k, count_only=True),
                                           timeout=self.PROGRESS_EVERY, metadata=self._client._metadata())
        except grpc.RpcError as e:
            log.debug("watch %s: quorum check failed: %s", self._key, _describe(e))
            return
        except ValueError:  # the channel was closed under us
            return
        self.last_contact = max(self.last_contact, t_sent)

    def _stream(self, index: int, start: int) -> None:
        client = self._client
        k = client._k(self._key)
        create = rpc.WatchCreateRequest(key=k, start_revision=start, progress_notify=True)
        if self._prefix:
            create.range_end = _prefix_end(k)
        stop = self._stop
        stalled = threading.Event()
        channel = client._channel(index)

        def requests() -> Iterator[rpc.WatchRequest]:
            yield rpc.WatchRequest(create_request=create)
            while not stop.wait(self.PROGRESS_EVERY):
                self._quorum_check(channel, k)
                if time.monotonic() - max(self.last_contact, opened) > self.STALL_AFTER:
                    stalled.set()
                    call = self._call
                    if call is not None:
                        call.cancel()
                    return
                yield rpc.WatchRequest(progress_request=rpc.WatchProgressRequest())

        opened = time.monotonic()  # bounds the stall check on a new stream
        metadata = (*(client._metadata() or ()), _REQUIRE_LEADER)
        call = rpc_grpc.WatchStub(channel).Watch(requests(), metadata=metadata)
        self._call = call
        if stop.is_set():
            call.cancel()
        try:
            for resp in call:
                self.connected.set()
                if resp.compact_revision:
                    raise _Compacted()
                if resp.canceled:
                    reason = resp.cancel_reason or "no reason given"
                    if client._user is not None and ("permission denied" in reason or "auth" in reason):
                        raise _AuthRefused(f"etcd refused the watch: {reason}")
                    raise EtcdError(f"watch cancelled by etcd: {reason}")
                if resp.events:
                    self.last_contact = time.monotonic()
                    events = [Event("put" if ev.type == kv_pb2.Event.PUT else "delete", client._kv(ev.kv))
                              for ev in resp.events]
                    self._next_rev = resp.events[-1].kv.mod_revision + 1
                    self._deliver(self._on_events, events)
        except grpc.RpcError as e:
            if stalled.is_set():
                raise _Stalled(f"no sign of a quorum for {self.STALL_AFTER:g}s") from None
            if stop.is_set():
                return
            if e.code() == grpc.StatusCode.UNAUTHENTICATED and client._user is not None:
                raise _AuthRefused(f"etcd refused the watch's token: {e.details()}") from None
            raise EtcdUnavailable(f"{e.code().name}: {e.details()}") from None
        finally:
            self._call = None
        if stop.is_set():
            return
        raise EtcdUnavailable("watch stream closed by the server")


def _refusal(url: str, what: str, code: grpc.StatusCode, details: str, authenticating: bool) -> EtcdError:
    """The named error for an answer no other endpoint would change."""
    text = f"etcd at {url} refused {what}: {code.name}: {details}"
    if authenticating or "authentication failed" in details:
        return AuthFailed(f"etcd at {url} refused the credentials: {code.name}: {details}")
    if code == grpc.StatusCode.PERMISSION_DENIED or "permission denied" in details:
        return PermissionDenied(text)
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
        return LeaseNotFound(text)
    return EtcdError(text)


class _Retry(Exception):
    pass


class _Compacted(Exception):
    pass


class _Stalled(Exception):
    pass


class _AuthRefused(Exception):
    pass


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e) or type(e).__name__


def _b(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _create_is(key: bytes, revision: int) -> rpc.Compare:
    return rpc.Compare(result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=key, create_revision=revision)


def _prefix_end(prefix: bytes) -> bytes:
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"
