"""PostgreSQL connections for web workers: writes to the current primary, reads from replicas.

:class:`PostgresProvider` (from :meth:`tenure.web.Router.postgres`) follows a
service's :class:`~tenure.web.router.ServiceView`: one pool per term for
writes, one per replica for reads, closed when the term or the replica goes.
``driver="psycopg"`` (psycopg 3 with psycopg_pool, the default) or
``driver="psycopg2"`` (with :class:`tenure.web.pg2.Pool`).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from ..errors import ConfigError, PrimaryUnavailable, ReadOnly, TenureError
from . import hold as holding
from .dberrors import is_connection_error, is_read_only_error

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

    from .router import ServiceView

log = logging.getLogger("tenure.web")

_monotonic = time.monotonic


class PostgresProvider:
    """Connections to a service's PostgreSQL primary (writes) and replicas (reads), following failover.

    ``with provider.write() as conn:`` runs on the current primary through a
    ``psycopg_pool.ConnectionPool`` of that term; it raises
    :class:`~tenure.errors.ReadOnly` while the view is read-only, and
    :class:`PrimaryUnavailable` (a ReadOnly) when the primary cannot be reached
    or refuses the write as deposed. When the primary's token changes the old
    pool is closed: its idle connections at once, connections in use when
    they are returned. ``with provider.read() as conn:`` uses a healthy
    streaming replica if there is one, else the primary, else any healthy
    standby, moving to the next when one cannot be reached (after at most
    0.5 s while others remain).

    While the service has no primary (a switchover or failover in progress),
    a new write waits up to ``hold`` s for the next one before raising
    ReadOnly; a write whose outcome is unknown is never retried.

    ``timeout`` bounds the wait for a connection (s); a server that could not
    be reached is skipped for ``cooldown`` s, so requests during a failover
    fail fast rather than each wait. ``kwargs`` go to the driver's
    ``connect``; ``pool`` to ``ConnectionPool`` (psycopg 3 only).
    """

    def __init__(self, view: "ServiceView", *, timeout: float = 2.0, cooldown: float = 1.0, min_size: int = 1,
                 max_size: int = 4, kwargs: Mapping[str, Any] | None = None, pool: Mapping[str, Any] | None = None,
                 prewarm: bool = True, hold: float = holding.DEFAULT_HOLD,
                 driver: str = "psycopg") -> None:
        if driver == "psycopg":
            try:
                from psycopg_pool import PoolClosed, PoolTimeout
            except ImportError:
                raise ConfigError("router.postgres() needs psycopg_pool: pip install 'tenure[postgres]'") from None
            self._pool_errors: tuple[type[Exception], type[Exception]] = (PoolTimeout, PoolClosed)
        elif driver == "psycopg2":
            from . import pg2

            pg2.import_psycopg2()
            if pool:
                raise ConfigError("pool settings apply to psycopg_pool only, not to driver='psycopg2'")
            self._pool_errors = (pg2.PoolTimeout, pg2.PoolClosed)
        else:
            raise ConfigError(f"driver must be 'psycopg' or 'psycopg2', got {driver!r}")
        self.driver = driver
        if timeout <= 0 or cooldown < 0 or not 0 <= min_size <= max_size or max_size < 1:
            raise ConfigError(f"bad pool settings: timeout={timeout}, cooldown={cooldown}, "
                              f"min_size={min_size}, max_size={max_size}")
        self.view = view
        self.hold = holding.check_hold(hold)  # how long a new write waits for a primary during a change
        self.timeout = float(timeout)
        self.cooldown = float(cooldown)
        self._sizes = (min_size, max_size)
        self._kwargs = {"connect_timeout": max(2, math.ceil(timeout)), **(kwargs or {})}
        self._pool_args = dict(pool or {})
        self._prewarm = prewarm
        self._lock = threading.Lock()
        self._write: tuple[int, str, ConnectionPool] | None = None  # (token, dsn, pool)
        self._read: dict[str, ConnectionPool] = {}
        self._down: dict[str, float] = {}  # dsn -> monotonic time until which it is skipped
        self._closed = False
        view.on_change(self._changed)

    # -- writes ---------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator["psycopg.Connection[Any]"]:
        """A connection to the current primary, committed on success, rolled back on error."""
        PoolTimeout, PoolClosed = self._pool_errors

        p = self.view.primary
        if p is None and self.view.peek().exists is None:
            self.view.ready(self.timeout)  # first use in this process: its view is milliseconds away
            p = self.view.primary
        if p is None:
            p = holding.wait_for_primary(self.view, self.hold)
        if p is None:
            if self.view.exists is False:
                raise self.view.unknown_error()
            raise ReadOnly(f"{self.view.name} is read-only: {self.view.reason}")
        assert p.token is not None
        if self._down.get(p.dsn, 0.0) > _monotonic():
            raise PrimaryUnavailable(f"{self.view.name}: primary {p.member} (token {p.token}) was unreachable "
                                     f"less than {self.cooldown:g} s ago")
        pool = self._write_pool(p.token, p.dsn)
        try:
            with pool.connection(timeout=self.timeout) as conn:
                yield conn
        except PoolTimeout as e:
            self._mark_down(p.dsn)
            raise PrimaryUnavailable(f"{self.view.name}: no connection to primary {p.member} "
                                     f"(token {p.token}) within {self.timeout:g} s") from e
        except PoolClosed as e:  # the term ended while this write waited for a connection
            raise PrimaryUnavailable(f"{self.view.name}: the term of {p.member} (token {p.token}) ended "
                                     "while waiting for a connection") from e
        except Exception as e:
            if is_read_only_error(e):
                # The deposed primary's guard (or a demoted server) refused: nothing was written.
                raise PrimaryUnavailable(f"{self.view.name}: {p.member} (token {p.token}) refused the write "
                                         f"as read-only: {e}") from e
            if is_connection_error(e):
                self._mark_down(p.dsn)
                raise PrimaryUnavailable(f"{self.view.name}: lost the connection to primary {p.member} "
                                         f"(token {p.token}): {e}") from e
            raise

    def _write_pool(self, token: int, dsn: str) -> "ConnectionPool":
        cur = self._write
        if cur is not None and cur[0] == token and cur[1] == dsn:
            return cur[2]
        with self._lock:
            cur = self._write
            if cur is not None and cur[0] == token and cur[1] == dsn:
                return cur[2]
            if self._closed:
                raise TenureError("provider is closed")
            old, self._write = cur, (token, dsn, self._new_pool(dsn, f"{self.view.name}-primary-{token}"))
        if old is not None:
            self._close_later(old[2])
        return self._write[2]

    # -- reads ----------------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator["psycopg.Connection[Any]"]:
        """A connection to a replica (or the primary, or any healthy standby), for reads."""
        PoolTimeout, PoolClosed = self._pool_errors

        candidates = self._read_candidates()
        if not candidates and self.view.peek().exists is None:
            self.view.ready(self.timeout)  # first use in this process: its view is milliseconds away
            candidates = self._read_candidates()
        if not candidates:
            raise ReadOnly(f"{self.view.name}: no server to read from ({self.view.reason or 'no members'})")
        now = _monotonic()
        candidates.sort(key=lambda dsn: self._down.get(dsn, 0.0) > now)  # stable: skipped ones last
        errors = []
        for i, dsn in enumerate(candidates):
            pool = self._read_pool(dsn)
            # A server that is up hands out a connection in milliseconds: while others remain to be
            # tried, do not give one the whole timeout.
            wait = self.timeout if i == len(candidates) - 1 else min(self.timeout, 0.5)
            try:
                conn = pool.getconn(timeout=wait)
            except PoolTimeout:
                self._mark_down(dsn)
                errors.append(dsn)
                continue
            except PoolClosed:  # the server left the view while this read waited: try the next
                errors.append(dsn)
                continue
            try:
                with conn:  # commit or roll back; a pooled connection is not closed
                    yield conn
            finally:
                pool.putconn(conn)
            return
        raise PrimaryUnavailable(f"{self.view.name}: could not reach any server to read from: {errors}")

    def _read_candidates(self) -> list[str]:
        self.view.readable  # noqa: B018 -- starts the view in a new process
        state = self.view.peek()  # one state: replicas and readable agree
        readable, n = state.readable, len(state.replicas)
        replicas = [e.dsn for e in readable[:n]]
        random.shuffle(replicas)  # spread reads over the replicas; the rest keep their order
        return list(dict.fromkeys(replicas + [e.dsn for e in readable[n:]]))

    def _read_pool(self, dsn: str) -> "ConnectionPool":
        pool = self._read.get(dsn)
        if pool is None:
            with self._lock:
                pool = self._read.get(dsn)
                if pool is None:
                    if self._closed:
                        raise TenureError("provider is closed")
                    pool = self._new_pool(dsn, f"{self.view.name}-read")
                    self._read = {**self._read, dsn: pool}
        return pool

    # -- pools ----------------------------------------------------------------------

    def _new_pool(self, dsn: str, name: str) -> "ConnectionPool":
        if self.driver == "psycopg2":
            from .pg2 import Pool

            return Pool(dsn, min_size=self._sizes[0], max_size=self._sizes[1], name=name,  # type: ignore[return-value]
                        kwargs=dict(self._kwargs))
        from psycopg_pool import ConnectionPool

        args = {"min_size": self._sizes[0], "max_size": self._sizes[1], "name": name,
                "check": ConnectionPool.check_connection, "reconnect_timeout": 3600.0, **self._pool_args}
        return ConnectionPool(dsn, kwargs=dict(self._kwargs), open=True, **args)

    def _mark_down(self, dsn: str) -> None:
        if self.cooldown > 0:
            self._down[dsn] = _monotonic() + self.cooldown

    def _close_later(self, pool: "ConnectionPool") -> None:
        # close() waits for the pool's workers: not on the watch thread, nor in a request.
        threading.Thread(target=_close_pool, args=(pool,), name="tenure-pool-close", daemon=True).start()

    def _changed(self, view: "ServiceView") -> None:
        p = view.last_primary
        cur = self._write
        if cur is not None and (p is None or p.token != cur[0] or p.dsn != cur[1]):
            with self._lock:
                if self._write is cur:
                    self._write = None
            log.info("%s: primary changed from token %d: closing its pool", view.name, cur[0])
            self._close_later(cur[2])
        if p is not None and (cur is None or p.token != cur[0]):
            self._down.pop(p.dsn, None)  # a new term on a server deserves a fresh try, whatever its past
        if (p is not None and p.token is not None and self._prewarm and cur is not None and p.token != cur[0]
                and view.valid_primary() is not None):
            # A process that writes will write again: have connections ready on the new primary.
            try:
                self._write_pool(p.token, p.dsn)
            except TenureError:
                pass
        live = {r.dsn for r in view.replicas} | {rec.get("dsn") for rec in view.members.values()}
        if p is not None:
            live.add(p.dsn)
        with self._lock:
            gone = [pl for dsn, pl in self._read.items() if dsn not in live]
            if gone:
                self._read = {dsn: pl for dsn, pl in self._read.items() if dsn in live}
        for pool in gone:
            self._close_later(pool)

    def after_fork(self, keep: list[Any]) -> None:
        """In a child: the parent's pools hold the parent's sockets; keep them unclosed and start afresh."""
        self._lock = threading.Lock()
        if self._write is not None:
            keep.append(self._write[2])
        keep.extend(self._read.values())
        self._write, self._read, self._down = None, {}, {}

    def close(self) -> None:
        """Close every pool."""
        with self._lock:
            self._closed = True
            pools = ([self._write[2]] if self._write is not None else []) + list(self._read.values())
            self._write, self._read = None, {}
        for pool in pools:
            _close_pool(pool)


def _close_pool(pool: "ConnectionPool") -> None:
    try:
        pool.close(timeout=1.0)
    except Exception:
        log.exception("closing pool %s", pool.name)


