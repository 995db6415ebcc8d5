"""Leader election over etcd leases, with fencing tokens.

Clock assumptions -- read these before changing anything here.

* A leader never trusts etcd's clock or its own wall clock. It takes
  ``t_sent = time.monotonic()`` *before* sending each lease keepalive, and
  when etcd answers that the lease is alive it sets its local deadline to
  ``t_sent + ttl - margin``. Past that deadline :meth:`Leadership.is_valid`
  is False and the loss callbacks fire, whether or not etcd can be reached.
* etcd deletes the leader key no earlier than ``ttl`` after the last renewal
  it *received*, which is later than ``t_sent``; it checks for expired leases
  about every 500 ms, and a change of etcd leader re-grants every lease its
  full ttl. All of these push the global end later, never earlier.
* Followers take over only once etcd has deleted the leader key. So between
  the old leader's local end and the new leader's start lies at least
  ``margin`` (plus the network delay of the last renewal). That margin is
  what absorbs a difference in clock *rate* between this host and the etcd
  leader: CLOCK_MONOTONIC is slewed by NTP at most 500 ppm, i.e. 1 ms for a
  2 s ttl, far below the default margin (ttl/10, at least 0.2 s).
* A process that is paused (SIGSTOP, GC, VM freeze) sees the pause on its
  monotonic clock when it runs again, so its first ``is_valid()`` after the
  pause is False. A suspend that stops CLOCK_MONOTONIC itself (a suspended
  laptop; some hypervisors' VM pause) is not covered: fence shared storage
  with the token as well, as :mod:`tenure.fencing` does.

Keys and records are those of :mod:`tenure.records`: the leader key (bound to
the leader's lease; its create revision is the fencing token), one candidate
key per member, and one history record per term.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import asdict
from typing import Any, Callable, Iterator

from . import metrics
from .errors import (AuthFailed, CampaignTimeout, ClientClosed, ConfigError, EtcdError, LeaseNotFound, NotLeader,
                     PermissionDenied, UsedAfterFork)
from .etcd import Client, Event, KeyValue
from .fencing import etcd_put
from . import records
from .errors import MalformedRecord
from .records import CandidateRecord, LeaderInfo, LeaderRecord, Term, check_name, leader_key

log = logging.getLogger("tenure.election")

HISTORY_KEEP = 200  # terms kept per service
RETRY_AFTER_FAILURE = 0.1  # seconds between keepalive attempts once one failed


def _leader_info(kv: KeyValue) -> LeaderInfo:
    try:
        rec = LeaderRecord.decode(kv.value)
    except MalformedRecord:
        # The key's existence is what matters (someone holds the term); its value is for display.
        rec = LeaderRecord("?")
    return LeaderInfo(rec.member, kv.create_revision, rec.value, rec.since)


class _Lease:
    """An etcd lease kept alive by a background thread; the clock rules above live here."""

    def __init__(self, client: Client, ttl: int, margin: float, labels: tuple[str, str]) -> None:
        self._client = client
        self._labels = labels
        t_sent = time.monotonic()
        lease = client.grant(ttl)
        if lease.ttl != ttl:
            with contextlib.suppress(EtcdError):
                client.revoke(lease.id)
            raise ConfigError(
                f"etcd granted a {lease.ttl} s lease for ttl={ttl}: this cluster cannot honour a ttl below "
                f"{lease.ttl} s (its minimum is 1.5 x its election timeout); use ttl >= {lease.ttl}"
            )
        self.id = lease.id
        self.ttl = lease.ttl
        self.margin = margin
        self.renewed_ttl = float(lease.ttl)  # min(TTL etcd returned with the last renewal, ttl)
        self.renewed = t_sent  # monotonic time taken before the last request etcd answered
        self.leading = False  # set once this lease holds the leader key: then it reports to metrics
        self.on_expired: Callable[[str], None] = lambda reason: None
        self.on_renewed: Callable[[float], None] = lambda deadline: None
        self._stop = threading.Event()
        self.expired = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tenure-keepalive:{labels[0]}", daemon=True)
        self._thread.start()

    @property
    def deadline(self) -> float:
        return self.renewed + self.renewed_ttl - self.margin

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            self._renew_until_stopped()
        except Exception as e:  # never die silently: whoever waits on the lease must hear of it
            log.exception("%s/%s: lease keepalive thread failed", *self._labels)
            self._expire(f"lease keepalive thread failed: {type(e).__name__}: {e}")

    def _renew_until_stopped(self) -> None:
        interval = self.ttl / 3
        next_at = self.renewed + interval
        failing = False
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= self.deadline:
                return self._expire("no lease renewal before the local deadline")
            if self._stop.wait(max(0.0, min(next_at, self.deadline) - now)):
                return
            if time.monotonic() >= self.deadline:
                return self._expire("no lease renewal before the local deadline")
            t_sent = time.monotonic()
            try:
                left = self._client.keepalive(
                    self.id, timeout=max(0.05, min(interval, self.deadline - t_sent)), retry_for=0)
            except EtcdError as e:
                metrics.KEEPALIVE_FAILURES.labels(*self._labels).inc()
                if not failing:
                    log.warning("%s/%s: lease keepalive failed (%s); retrying until the deadline in %.2f s",
                                *self._labels, e, self.deadline - time.monotonic())
                failing = True
                next_at = time.monotonic() + RETRY_AFTER_FAILURE
                continue
            if left <= 0:
                return self._expire("etcd reports the lease expired")
            if failing:
                log.info("%s/%s: lease keepalive recovered", *self._labels)
            failing = False
            if left < self.ttl:
                log.warning("%s/%s: etcd renewed the lease for %d s, less than its ttl of %d s; the deadline "
                            "follows the shorter time", *self._labels, left, self.ttl)
            self.renewed_ttl = float(min(left, self.ttl))
            self.renewed = max(self.renewed, t_sent)
            next_at = t_sent + interval
            try:
                self.on_renewed(self.deadline)
            except Exception:
                log.exception("%s/%s: lease renewal hook failed", *self._labels)
            if self.leading:
                metrics.LEASE_REMAINING.labels(*self._labels).set(self.deadline - time.monotonic())

    def _expire(self, reason: str) -> None:
        self.expired.set()
        self.on_expired(reason)


class Leadership:
    """A term of leadership won by :meth:`Election.campaign`.

    Act as leader only while :meth:`is_valid` is True, and pass :attr:`token`
    with every write to shared storage so that storage can reject a deposed
    leader (see :mod:`tenure.fencing`).
    """

    def __init__(self, election: "Election", lease: _Lease, token: int) -> None:
        self.service = election.service
        self.member = election.member
        self.token = token
        self.lost = threading.Event()
        self.reason: str | None = None
        self._election = election
        self._lease = lease
        self._lock = threading.Lock()
        self._callbacks: list[Callable[["Leadership"], None]] = []
        self._renewed_callbacks: list[Callable[[float], None]] = []
        self._final_deadline: float | None = None
        self._pid = os.getpid()  # a forked child has no keepalive behind this term

    def _forked(self) -> bool:
        return os.getpid() != self._pid

    @property
    def deadline(self) -> float:
        """``time.monotonic()`` value past which this leadership is not valid."""
        return self._final_deadline if self._final_deadline is not None else self._lease.deadline

    @property
    def ttl(self) -> int:
        return self._lease.ttl

    def is_valid(self) -> bool:
        """True while this process may act as leader."""
        return not self.lost.is_set() and time.monotonic() < self._lease.deadline and not self._forked()

    def remaining(self) -> float:
        """Seconds left before the local deadline (0 once lost)."""
        if self.lost.is_set() or self._forked():
            return 0.0
        return max(0.0, self._lease.deadline - time.monotonic())

    def on_renewed(self, callback: Callable[[float], None]) -> None:
        """Call ``callback(deadline)`` after each lease renewal etcd confirmed, on the keepalive thread.

        ``deadline`` is the new absolute local deadline (a ``time.monotonic()``
        value). Keep the callback short: the next renewal waits for it. A
        PostgreSQL sidecar renews its in-database write guard from here, so
        the guard follows the lease rather than the sidecar's loop.
        """
        self._renewed_callbacks.append(callback)
        self._lease.on_renewed = self._renewed

    def _renewed(self, deadline: float) -> None:
        if self.lost.is_set():
            return
        for cb in list(self._renewed_callbacks):
            cb(deadline)

    def on_lost(self, callback: Callable[["Leadership"], None]) -> None:
        """Call ``callback(leadership)`` once when this term ends (at once if it already has)."""
        with self._lock:
            if not self.lost.is_set():
                self._callbacks.append(callback)
                return
        _safe_call(callback, self)

    def check(self) -> None:
        """Raise :class:`NotLeader` unless this leadership is valid (:class:`UsedAfterFork` in a forked child)."""
        if self._forked():
            raise UsedAfterFork(f"the leadership of {self.service} (term {self.token}) belongs to process "
                                f"{self._pid}; this forked child does not lead")
        if not self.is_valid():
            raise NotLeader(f"{self.member} no longer leads {self.service} (term {self.token}): {self.reason or 'deadline passed'}")

    def put(self, key: str, value: bytes | str, *, ephemeral: bool = False) -> int:
        """Write ``key`` in etcd only if this term is still current; return the revision.

        With ``ephemeral`` the key is bound to this term's lease, so etcd
        deletes it when the term ends. Raises :class:`NotLeader` if the local
        deadline has passed and :class:`Fenced` if etcd has a newer term (or none).
        """
        self.check()
        return etcd_put(self._election.client, self.service, self.token, key, value,
                        lease=self._lease.id if ephemeral else 0)

    def resign(self) -> None:
        """Step down: stop acting as leader now, then release the leader key (within ``ttl`` seconds)."""
        if self._forked():
            raise UsedAfterFork(f"resign() of {self.service} term {self.token} in a forked child: only process "
                                f"{self._pid} can resign it")
        if not self._lose("resigned"):
            return
        client = self._election.client
        end = time.monotonic() + self.ttl  # etcd ends the term by then anyway

        def left() -> float:
            return max(0.0, end - time.monotonic())

        try:
            self._election._end_term(self.token, "resigned", retry_for=left())
            client.delete(self._election._leader_key, guard=(self._election._leader_key, self.token), retry_for=left())
            client.revoke(self._lease.id, retry_for=left())
        except EtcdError as e:
            log.warning("%s/%s: could not release the leader key (%s); it expires with the lease",
                        self.service, self.member, e)

    def _lose(self, reason: str) -> bool:
        with self._lock:
            if self.lost.is_set():
                return False
            self._final_deadline = min(self._lease.deadline, time.monotonic())
            self.reason = reason
            self.lost.set()
            callbacks, self._callbacks = self._callbacks, []
        self._lease.stop()
        labels = (self.service, self.member)
        metrics.IS_LEADER.labels(*labels).set(0)
        metrics.TOKEN.labels(*labels).set(0)
        metrics.LEASE_REMAINING.labels(*labels).set(0)
        log.warning("%s/%s: leadership of term %d ended: %s", self.service, self.member, self.token, reason)
        for cb in callbacks:
            _safe_call(cb, self)
        return True

    def _release_in_background(self) -> None:
        """After a loss other than resign: free the key early if etcd is reachable."""

        def run() -> None:
            with contextlib.suppress(EtcdError):
                self._election._end_term(self.token, self.reason or "lost", retry_for=self.ttl)
            with contextlib.suppress(EtcdError):
                self._election.client.revoke(self._lease.id, retry_for=self.ttl)

        threading.Thread(target=run, name="tenure-release", daemon=True).start()

    def __repr__(self) -> str:
        state = "valid" if self.is_valid() else f"lost ({self.reason})"
        return f"<Leadership {self.service}/{self.member} token={self.token} {state}>"


class Election:
    """Leader election for one service, as one member.

    ``ttl`` (whole seconds) bounds how long the service can be without a
    leader after its leader dies; ``value`` is a JSON-able dict published
    with the candidacy and the leadership (e.g. the member's DSN or URL).
    """

    def __init__(self, client: Client, service: str, *, member: str, ttl: float = 2.0,
                 value: dict[str, Any] | None = None, margin: float | None = None) -> None:
        self.client = client
        self.service = check_name("service", service)
        self.member = check_name("member", member)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl != int(ttl) or not 1 <= ttl <= 3600:
            raise ConfigError(f"ttl must be a whole number of seconds between 1 and 3600 (etcd leases are whole seconds), got {ttl!r}")
        self.ttl = int(ttl)
        self.margin = max(0.2, self.ttl / 10) if margin is None else float(margin)
        if not 0 < self.margin <= self.ttl / 2:
            raise ConfigError(f"margin must be > 0 and at most ttl/2 = {self.ttl / 2} s, got {margin!r}")
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"value must be a dict, got {type(value).__name__}")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"value must be JSON-serialisable: {e}") from None
        self.value = value
        self._leader_key = leader_key(self.service)
        self._lock = threading.Condition()
        self._view: _LeaderView | None = None
        self._current: Leadership | None = None
        self._pid = os.getpid()

    # -- campaigning ----------------------------------------------------------

    def campaign(self, timeout: float | None = None) -> Leadership:
        """Block until this member leads the service; raise CampaignTimeout after ``timeout`` s."""
        if self._pid != os.getpid():
            raise UsedAfterFork(f"election {self.service}/{self.member} was made in process {self._pid}: "
                                f"make a new client and election in this forked child")
        give_up = None if timeout is None else time.monotonic() + timeout
        view = self._ensure_view()
        lease: _Lease | None = None
        backoff = RETRY_AFTER_FAILURE
        try:
            lease = self._new_lease()
            while True:
                if lease.expired.is_set():
                    lease.stop()
                    lease = None
                    lease = self._renew_candidacy(give_up)
                record = LeaderRecord(self.member, self.value, time.time()).encode()
                try:
                    created, kv = self.client.create(self._leader_key, record, lease=lease.id)
                except (PermissionDenied, AuthFailed, ClientClosed):
                    raise  # no later attempt can succeed
                except LeaseNotFound:
                    log.warning("%s/%s: the candidacy lease is gone; taking a new one", self.service, self.member)
                    lease.expired.set()
                    continue
                except EtcdError as e:
                    log.warning("%s/%s: campaign attempt failed: %s", self.service, self.member, e)
                    now = time.monotonic()
                    if give_up is not None and now >= give_up:
                        raise CampaignTimeout(f"{self.member} did not win {self.service} within {timeout} s: {e}") from None
                    time.sleep(backoff if give_up is None else max(0.0, min(backoff, give_up - now)))
                    backoff = min(2 * backoff, self.ttl / 2)
                    continue
                backoff = RETRY_AFTER_FAILURE
                if kv is not None and (created or kv.lease == lease.id):
                    leadership = self._begin(lease, kv.create_revision)
                    if leadership is not None:
                        return leadership
                    lease = self._renew_candidacy(give_up)
                    continue
                now = time.monotonic()
                if give_up is not None and now >= give_up:
                    raise CampaignTimeout(f"{self.member} did not win {self.service} within {timeout} s")
                # Wait for the leader key to go; re-try now and then in case a change was missed.
                wait = self.ttl / 2 if give_up is None else min(self.ttl / 2, give_up - now)
                view.wait_change(kv.create_revision if kv is not None else None, wait)
        except BaseException:
            if lease is not None:
                lease.stop()
                with contextlib.suppress(EtcdError):
                    self.client.revoke(lease.id, retry_for=1.0)
            raise

    @contextlib.contextmanager
    def lead(self, timeout: float | None = None) -> Iterator[Leadership]:
        """``with election.lead() as leadership:`` campaigns, and resigns on exit."""
        leadership = self.campaign(timeout)
        try:
            yield leadership
        finally:
            leadership.resign()

    def _renew_candidacy(self, give_up: float | None) -> _Lease:
        """A fresh lease and candidate record, retrying while etcd is unreachable."""
        while True:
            try:
                return self._new_lease()
            except (PermissionDenied, AuthFailed, ClientClosed):
                raise
            except EtcdError as e:
                if give_up is not None and time.monotonic() >= give_up:
                    raise CampaignTimeout(f"{self.member} could not campaign for {self.service}: {e}") from None
                log.warning("%s/%s: cannot renew candidacy: %s", self.service, self.member, e)
                time.sleep(RETRY_AFTER_FAILURE)

    def _new_lease(self) -> _Lease:
        lease = _Lease(self.client, self.ttl, self.margin, (self.service, self.member))
        record = CandidateRecord(self.member, self.value, time.time(), self.ttl).encode()
        try:
            self.client.put(records.candidate_key(self.service, self.member), record, lease=lease.id)
        except BaseException:
            lease.stop()  # nothing a failed attempt allocates outlives it
            with contextlib.suppress(EtcdError):
                self.client.revoke(lease.id, retry_for=1.0)
            raise
        return lease

    def _begin(self, lease: _Lease, token: int) -> Leadership | None:
        leadership = Leadership(self, lease, token)
        if not leadership.is_valid():
            # Won with a lease whose local deadline has already passed (renewals were failing):
            # give the key back rather than lead without the local guarantee.
            with contextlib.suppress(EtcdError):
                self.client.revoke(lease.id, retry_for=1.0)
            lease.stop()
            return None
        lease.on_expired = lambda reason: self._on_lost(leadership, reason)
        lease.leading = True
        if lease.expired.is_set():
            self._on_lost(leadership, "no lease renewal before the local deadline")
        with self._lock:
            self._current = leadership
        labels = (self.service, self.member)
        metrics.IS_LEADER.labels(*labels).set(1)
        metrics.TOKEN.labels(*labels).set(token)
        metrics.LEASE_REMAINING.labels(*labels).set(leadership.remaining())
        log.info("%s/%s: elected, token %d", self.service, self.member, token)
        # The term's own record is written before campaign() returns, so a resign right after finds it
        # to close; closing older terms and trimming can wait.
        start = time.time()
        try:
            rec = Term(token, self.member, start)
            self.client.put(records.history_key(self.service, token), rec.encode(),
                            guard=(self._leader_key, token), retry_for=self.ttl / 4)
        except EtcdError as e:
            log.info("%s/%s: could not record the term in the history: %s", self.service, self.member, e)
        threading.Thread(target=self._tidy_history, args=(token, start), name="tenure-history", daemon=True).start()
        return leadership

    def _on_lost(self, leadership: Leadership, reason: str) -> None:
        if leadership._lose(reason):
            leadership._release_in_background()

    # -- history --------------------------------------------------------------

    def _tidy_history(self, token: int, start: float) -> None:
        """Close terms before ``token`` that ended without saying so (their lease ran out); trim."""
        guard = (self._leader_key, token)
        try:
            kvs, _ = self.client.get_prefix(records.history_prefix(self.service))
            for kv in kvs:
                try:
                    old = Term.decode(kv.value)
                except MalformedRecord as e:
                    log.warning("%s: skipping history record %s: %s", self.service, kv.key, e)
                    continue
                if old.token < token and old.end is None:
                    self.client.put(kv.key, old.ended(start, "expired (lease ran out)").encode(), guard=guard)
            for kv in kvs[: max(0, len(kvs) - HISTORY_KEEP)]:
                self.client.delete(kv.key, guard=guard)
        except EtcdError as e:
            log.info("%s/%s: could not update the history: %s", self.service, self.member, e)

    def _end_term(self, token: int, reason: str, *, retry_for: float | None = None) -> None:
        """Close term ``token``'s record, unless someone (its successor) has written it since it was read."""
        key = records.history_key(self.service, token)
        kv = self.client.get(key, retry_for=retry_for)
        if kv is None:
            return
        rec = Term.decode(kv.value)
        if rec.end is not None:
            return
        if self.client.put(key, rec.ended(time.time(), reason).encode(), unchanged_since=kv.mod_revision,
                           retry_for=retry_for) is None:
            log.info("%s: term %d's record changed meanwhile; left as its successor wrote it", self.service, token)

    def history(self, limit: int = 50) -> list[Term]:
        """The last ``limit`` terms, oldest first."""
        kvs, _ = self.client.get_prefix(records.history_prefix(self.service))
        terms = []
        for kv in kvs[-limit:]:
            try:
                terms.append(Term.decode(kv.value))
            except MalformedRecord as e:
                log.warning("%s: skipping history record %s: %s", self.service, kv.key, e)
        return terms

    # -- observing ------------------------------------------------------------

    def leader(self) -> LeaderInfo | None:
        """The current leader, read from etcd now."""
        kv = self.client.get(self._leader_key)
        return _leader_info(kv) if kv is not None else None

    def candidates(self) -> list[dict[str, Any]]:
        """The records of every live candidate (leader included), as published."""
        kvs, _ = self.client.get_prefix(records.candidates_prefix(self.service))
        out = []
        for kv in kvs:
            try:
                out.append(asdict(CandidateRecord.decode(kv.value)))
            except MalformedRecord as e:
                log.warning("%s: skipping candidate record %s: %s", self.service, kv.key, e)
        return out

    def on_change(self, callback: Callable[[LeaderInfo | None], None]) -> Callable[[], None]:
        """Call ``callback(leader)`` on every change of leader; returns a function that unsubscribes.

        The callback runs on the election's watch thread: keep it short.
        """
        return self._ensure_view().subscribe(callback)

    def observe(self) -> Iterator[LeaderInfo | None]:
        """Yield the current leader, then each new one (None while there is none)."""
        q: queue.Queue[LeaderInfo | None] = queue.Queue()
        view = self._ensure_view()
        unsubscribe = view.subscribe(q.put)
        try:
            view.ready.wait()
            while True:
                yield q.get()
        finally:
            unsubscribe()

    def _ensure_view(self) -> "_LeaderView":
        with self._lock:
            if self._view is None:
                self._view = _LeaderView(self)
            return self._view

    def close(self) -> None:
        """Stop this election's watch (a held leadership is not resigned)."""
        with self._lock:
            view, self._view = self._view, None
        if view is not None:
            view.watch.cancel()

    def __enter__(self) -> "Election":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LeaderView:
    """The leader key as last seen through a watch, shared by one Election's users."""

    def __init__(self, election: Election) -> None:
        self._election = election
        self._cond = threading.Condition()
        self._subscribers: list[Callable[[LeaderInfo | None], None]] = []
        self.current: LeaderInfo | None = None
        self.revision = 0  # etcd revision the view is current to
        self.ready = threading.Event()
        self.watch = election.client.watch(election._leader_key, on_snapshot=self._snapshot, on_events=self._events)

    def _snapshot(self, kvs: list[KeyValue], revision: int) -> None:
        self._set(_leader_info(kvs[0]) if kvs else None, revision)

    def _events(self, events: list[Event]) -> None:
        for ev in events:
            self._set(_leader_info(ev.kv) if ev.type == "put" else None, ev.kv.mod_revision)

    def _set(self, info: LeaderInfo | None, revision: int) -> None:
        held = self._election._current
        if held is not None and revision > held.token and (info is None or info.token != held.token):
            self._election._on_lost(held, "the leader key was deleted" if info is None else
                                    f"superseded by {info.member} (token {info.token})")
        with self._cond:
            changed = not self.ready.is_set() or _token(info) != _token(self.current)
            self.current = info
            self.revision = max(self.revision, revision)
            self.ready.set()
            subscribers = list(self._subscribers) if changed else []
            self._cond.notify_all()
        if changed:
            metrics.LEADER_CHANGES.labels(self._election.service).inc()
        for cb in subscribers:
            _safe_call(cb, info)

    def subscribe(self, callback: Callable[[LeaderInfo | None], None]) -> Callable[[], None]:
        with self._cond:
            self._subscribers.append(callback)
            current, ready = self.current, self.ready.is_set()
        if ready:
            _safe_call(callback, current)

        def unsubscribe() -> None:
            with self._cond, contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def wait_change(self, token: int | None, timeout: float) -> None:
        """Wait up to ``timeout`` s until the view shows the term ``token`` has ended."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                if token is None:
                    return
                if self.ready.is_set() and (
                    (self.current is None and self.revision > token)
                    or (self.current is not None and self.current.token > token)
                ):
                    return
                left = end - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)


def _token(info: LeaderInfo | None) -> int:
    return 0 if info is None else info.token


def _safe_call(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("tenure callback %r failed", fn)
