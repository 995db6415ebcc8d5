"""A client that keeps writing, for the failover tests."""

from __future__ import annotations

import threading
import time

import psycopg



class Writer:
    """Writes one row at a time to a fixed DSN; records what was accepted and what was refused, and when."""

    def __init__(self, dsn: str, name: str, start_id: int, interval: float = 0.01) -> None:
        self.dsn, self.name, self.next_id, self.interval = dsn, name, start_id, interval
        self.accepted: list[tuple[float, int]] = []
        self.refused: list[tuple[float, str | None]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                    conn.execute("SET statement_timeout = 2000")
                conn.execute("INSERT INTO items VALUES (%s, %s, %s)", (self.next_id, self.name, time.monotonic()))
                self.accepted.append((time.monotonic(), self.next_id))
                self.next_id += 1
            except psycopg.Error as e:
                self.refused.append((time.monotonic(), getattr(e, "sqlstate", None)))
                if conn is not None and (conn.broken or conn.closed):
                    conn = None
            self._stop.wait(self.interval)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)
