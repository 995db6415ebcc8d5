"""psycopg2 for the web tier: a small connection pool and the PostgreSQL fence helpers.

:class:`Pool` is the part of ``psycopg_pool.ConnectionPool`` that
:class:`~tenure.web.postgres.PostgresProvider` uses (``connection()``,
``getconn()``, ``putconn()``, ``close()``), for psycopg2 connections, so
``router.postgres("db", driver="psycopg2")`` behaves as with psycopg 3: a
server that cannot be reached raises :class:`PoolTimeout` at once rather than
after the whole timeout, connections are checked when taken, and a closed
pool refuses new takers with :class:`PoolClosed`.

:func:`install_pg_fence` and :func:`pg_fence` are :mod:`tenure.fencing`'s
helpers for a psycopg2 connection.

psycopg2 is imported on first use, not here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from .. import fencing
from ..errors import ConfigError, TenureError

log = logging.getLogger("tenure.web")

_monotonic = time.monotonic


class PoolTimeout(TenureError):
    """No connection within the timeout, or the server could not be reached."""


class PoolClosed(TenureError):
    """The pool was closed (its term or its server left the view)."""


def import_psycopg2() -> Any:
    """The psycopg2 module, or ConfigError saying how to install it."""
    try:
        import psycopg2
    except ImportError:
        raise ConfigError("psycopg2 is not installed: pip install psycopg2-binary (or psycopg2)") from None
    return psycopg2


class Pool:
    """Up to ``max_size`` psycopg2 connections to ``dsn``; ``min_size`` of them opened at once, in the background."""

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 4, name: str = "pool",
                 kwargs: Mapping[str, Any] | None = None) -> None:
        self.psycopg2 = import_psycopg2()
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ConfigError(f"bad pool sizes: min_size={min_size}, max_size={max_size}")
        self.dsn = dsn
        self.name = name
        self.max_size = max_size
        self._kwargs = dict(kwargs or {})
        self._cond = threading.Condition()
        self._idle: deque[Any] = deque()
        self._size = 0  # connections open or being opened
        self._closed = False
        if min_size:
            threading.Thread(target=self._prewarm, args=(min_size,), name=f"{name}-prewarm", daemon=True).start()

    def _connect(self) -> Any:
        return self.psycopg2.connect(self.dsn, **self._kwargs)

    def _prewarm(self, n: int) -> None:
        for _ in range(n):
            with self._cond:
                if self._closed or self._size >= self.max_size:
                    return
                self._size += 1
            try:
                conn = self._connect()
            except Exception as e:
                with self._cond:
                    self._size -= 1
                log.debug("%s: prewarm: %s", self.name, e)
                return
            self._give_back(conn)

    @staticmethod
    def _usable(conn: Any) -> bool:
        if conn.closed:
            return False
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            conn.rollback()
            return True
        except Exception:
            return False

    def getconn(self, timeout: float) -> Any:
        """A checked connection; PoolTimeout after ``timeout`` s or when the server refuses, PoolClosed."""
        deadline = _monotonic() + timeout
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        raise PoolClosed(f"{self.name} is closed")
                    if self._idle:
                        conn, create = self._idle.popleft(), False
                        break
                    if self._size < self.max_size:
                        self._size += 1
                        conn, create = None, True
                        break
                    left = deadline - _monotonic()
                    if left <= 0:
                        raise PoolTimeout(f"{self.name}: no connection free within {timeout:g} s")
                    self._cond.wait(left)
            if create:
                try:
                    return self._connect()
                except Exception as e:
                    self._discard(None)
                    raise PoolTimeout(f"{self.name}: could not connect: {str(e).strip()}") from e
            if self._usable(conn):
                return conn
            self._discard(conn)  # and try again: another idle one, or a new one

    def putconn(self, conn: Any) -> None:
        """Give a connection back: rolled back if a transaction is open, closed if broken or the pool is."""
        try:
            if not conn.closed and conn.info.transaction_status != 0:  # not IDLE
                conn.rollback()
        except Exception:
            self._discard(conn)
            return
        self._give_back(conn)

    def _give_back(self, conn: Any) -> None:
        with self._cond:
            if not self._closed and not conn.closed:
                self._idle.append(conn)
                self._cond.notify()
                return
        self._discard(conn)

    def _discard(self, conn: Any) -> None:
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
        with self._cond:
            self._size -= 1
            self._cond.notify()

    @contextmanager
    def connection(self, timeout: float) -> Iterator[Any]:
        """A connection for a ``with`` block: committed on success, rolled back on error, then given back."""
        conn = self.getconn(timeout)
        try:
            with conn:  # psycopg2: commit or roll back; does not close
                yield conn
        finally:
            self.putconn(conn)

    def close(self, timeout: float = 1.0) -> None:
        """Close idle connections now; connections in use are closed when given back."""
        with self._cond:
            self._closed = True
            idle, self._idle = list(self._idle), deque()
            self._cond.notify_all()
        for conn in idle:
            self._discard(conn)


class _Compat:
    """A psycopg2 connection seen through the part of psycopg 3's API that :mod:`tenure.fencing` uses."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    @property
    def autocommit(self) -> bool:
        return bool(self._conn.autocommit)

    @property
    def info(self) -> Any:
        return self._conn.info

    def execute(self, sql: str, params: Any = None) -> Any:
        cur = self._conn.cursor()
        cur.execute(sql, params)
        return cur

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if self._conn.autocommit:
            self.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._conn.rollback() if not self._conn.autocommit else self.execute("ROLLBACK")
            raise
        self._conn.commit() if not self._conn.autocommit else self.execute("COMMIT")


def install_pg_fence(conn: Any) -> None:
    """:func:`tenure.fencing.install_pg_fence` for a psycopg2 connection (idempotent; commits)."""
    fencing.install_pg_fence(_Compat(conn))


def pg_fence(conn: Any, resource: str, token: int) -> None:
    """:func:`tenure.fencing.pg_fence` for a psycopg2 connection, inside the caller's transaction."""
    fencing.pg_fence(_Compat(conn), resource, token)
