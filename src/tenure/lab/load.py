"""A light read/write load through the web tier's router, that keeps score: for tests, benchmarks and the demo.

Each writer thread inserts one row at a time into ``items`` through
``router.postgres(service).write()``, each reader selects through ``read()``.
Every request is timed, so the score tells how many were served, how many
waited for a new primary (held), how many failed, and the longest wait.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import TenureError

HELD_AFTER = 0.05  # a request slower than this waited for a new primary


@dataclass
class Score:
    """What the load saw; times are time.monotonic()."""

    reads: int = 0
    reads_failed: int = 0
    writes: int = 0
    writes_held: int = 0
    writes_failed: int = 0
    longest_wait: float = 0.0
    acked: list[int] = field(default_factory=list)  # ids of acknowledged writes
    last_write: tuple[float, str, int] | None = None  # (time, member, token) of the newest acknowledged write
    first_write_by_token: dict[int, tuple[float, str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class RouterLoad:
    """Writers and readers through ``provider`` (a :class:`tenure.web.postgres.PostgresProvider`) until :meth:`stop`."""

    def __init__(self, provider: Any, *, writers: int = 2, readers: int = 1, interval: float = 0.02,
                 start_id: int = 1_000_000) -> None:
        self.provider = provider
        self.interval = interval
        self.score = Score()
        self._ids = itertools.count(start_id)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._write_loop, daemon=True, name=f"load-w{i}")
                         for i in range(writers)]
        self._threads += [threading.Thread(target=self._read_loop, daemon=True, name=f"load-r{i}")
                          for i in range(readers)]
        for t in self._threads:
            t.start()

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            row = next(self._ids)
            t0 = time.monotonic()
            try:
                p = None
                with self.provider.write() as conn:
                    p = self.provider.view.primary
                    conn.execute("INSERT INTO items VALUES (%s, %s, %s)", (row, "load", t0))
                took = time.monotonic() - t0
                with self._lock:
                    s = self.score
                    s.writes += 1
                    s.acked.append(row)
                    s.longest_wait = max(s.longest_wait, took)
                    if took > HELD_AFTER:
                        s.writes_held += 1
                    if p is not None and p.token is not None:
                        s.last_write = (time.monotonic(), p.member, p.token)
                        s.first_write_by_token.setdefault(p.token, (time.monotonic(), p.member))
            except Exception as e:  # noqa: BLE001 -- every failure counts, whatever it is
                with self._lock:
                    self.score.writes_failed += 1
                    self.score.longest_wait = max(self.score.longest_wait, time.monotonic() - t0)
                    self.score.errors.append(f"write: {type(e).__name__}: {e}"[:300])
            self._stop.wait(self.interval)

    def _read_loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self.provider.read() as conn:
                    conn.execute("SELECT count(*) FROM items").fetchone()
                with self._lock:
                    self.score.reads += 1
            except (TenureError, Exception) as e:  # noqa: BLE001
                with self._lock:
                    self.score.reads_failed += 1
                    self.score.errors.append(f"read: {type(e).__name__}: {e}"[:300])
            self._stop.wait(self.interval)

    def stop(self) -> Score:
        self._stop.set()
        for t in self._threads:
            t.join(15)
        return self.score


def lost_writes(dsn: str, acked: list[int]) -> list[int]:
    """Acknowledged ids missing from the server at ``dsn``."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute("SELECT id FROM items WHERE id = ANY(%s)", (acked,)).fetchall()
    have = {r[0] for r in rows}
    return [i for i in acked if i not in have]


class DirectWriter:
    """One client writing through a fixed address (haproxy), reconnecting after errors; times every write."""

    def __init__(self, dsn: str, *, interval: float = 0.01, start_id: int = 2_000_000) -> None:
        self.dsn = dsn
        self.interval = interval
        self.next_id = start_id
        self.accepted: list[float] = []  # monotonic times of acknowledged writes
        self.acked: list[int] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="direct-writer")
        self._thread.start()

    def _run(self) -> None:
        import psycopg

        conn = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                row = self.next_id
                self.next_id += 1
                conn.execute("INSERT INTO items VALUES (%s, 'haproxy', %s)", (row, time.monotonic()))
                self.accepted.append(time.monotonic())
                self.acked.append(row)
            except psycopg.Error:
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
            self._stop.wait(self.interval)
        if conn is not None:
            conn.close()

    def gap_around(self, t: float) -> float:
        """The longest time between two acknowledged writes in the window from 1 s before ``t`` on."""
        times = [x for x in self.accepted if x >= t - 1.0]
        return max((b - a for a, b in zip(times, times[1:])), default=float("inf"))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def streaming_standbys(dsn: str) -> set[str]:
    """Names of the standbys streaming from the server at ``dsn`` now (empty if it cannot be asked)."""
    import psycopg

    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
            rows = conn.execute("SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'").fetchall()
    except psycopg.Error:
        return set()
    return {r[0] for r in rows}
