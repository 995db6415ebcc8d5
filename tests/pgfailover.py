"""A client that keeps writing, for the failover tests."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable

import psycopg



class Writer:
    """Writes one row at a time to a fixed DSN; records what was accepted and what was refused, and when."""

    def __init__(self, dsn: str, name: str, start_id: int, interval: float = 0.01) -> None:
        self.dsn, self.name, self.next_id, self.interval = dsn, name, start_id, interval
        self.accepted: list[tuple[float, int]] = []
        self.refused: list[tuple[float, str | None]] = []
        self.errors: list[str] = []  # the messages of the refusals, in order
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
                self.errors.append(str(e).strip())
                if conn is not None and (conn.broken or conn.closed):
                    conn = None
            self._stop.wait(self.interval)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)


class FollowingWriter:
    """Writes one row at a time to whichever member etcd publishes as primary; records each acknowledged id."""

    def __init__(self, primary: Callable[[], dict[str, Any] | None], name: str, start_id: int = 1,
                 interval: float = 0.005) -> None:
        self.primary, self.name, self.next_id, self.interval = primary, name, start_id, interval
        self.accepted: list[tuple[float, int, str]] = []  # (monotonic time, id, member)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, member = None, None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    p = self.primary()
                    if p is None:
                        self._stop.wait(0.005)
                        continue
                    member = p["member"]
                    conn = psycopg.connect(p["dsn"], autocommit=True, connect_timeout=2)
                    conn.execute("SET statement_timeout = 2000")
                conn.execute("INSERT INTO items VALUES (%s, %s, %s)", (self.next_id, self.name, time.monotonic()))
                self.accepted.append((time.monotonic(), self.next_id, member or ""))
                self.next_id += 1
            except psycopg.Error:
                self.next_id += 1  # an id whose fate is unknown is never reused
                if conn is not None:
                    conn.close()
                conn = None
            self._stop.wait(self.interval)
        if conn is not None:
            conn.close()

    def gaps(self) -> list[float]:
        """Seconds between the last acknowledged write on one primary and the first on the next."""
        out = []
        for (t0, _, m0), (t1, _, m1) in zip(self.accepted, self.accepted[1:]):
            if m0 != m1:
                out.append(t1 - t0)
        return out

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)


class CuttableProxy:
    """A TCP forwarder on loopback that the test can cut: a partition that drops traffic (no reset), then heal."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not self.cut.is_set():  # cut: swallow the bytes, as a dropped link would
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for s in self._socks:
                s.close()
