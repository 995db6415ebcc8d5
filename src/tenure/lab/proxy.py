"""A TCP proxy a test or benchmark controls: forward, cut, heal, cut one way.

A cut stops moving bytes (in one direction or both) without closing
anything, as a network partition does: senders fill their socket buffers and
block, receivers hear nothing, connections opened during the cut are
accepted but carry nothing. Healing lets the held bytes flow again, as TCP
retransmission would.

A proxy can tag each connection from the first bytes the client sends (see
:func:`http_header_tag`), and cut only the connections with a given tag:
that is how :class:`tenure.lab.etcd.LocalEtcd` cuts one member's raft
traffic out of a peer port that every member shares.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("tenure.lab.proxy")

UP = "up"  # client -> server
DOWN = "down"  # server -> client
BOTH = (UP, DOWN)

_SNIFF_LIMIT = 16384
_SNIFF_TIMEOUT = 2.0


def http_header_tag(name: str) -> Callable[[bytes], str | None]:
    """A tagger that reads HTTP header ``name`` from a connection's first request."""
    wanted = name.lower().encode() + b":"

    def tag(head: bytes) -> str | None:
        for line in head.split(b"\r\n"):
            if line.lower().startswith(wanted):
                return line[len(wanted):].strip().decode("latin-1")
        return None

    return tag


@dataclass
class _Conn:
    client: socket.socket
    server: socket.socket
    tag: str | None = None
    closed: bool = False


@dataclass
class Proxy:
    """Listen on 127.0.0.1:``port`` (0: a free one) and forward to ``upstream``."""

    upstream: tuple[str, int]
    port: int = 0
    tagger: Callable[[bytes], str | None] | None = None
    _cuts: dict[str | None, set[str]] = field(default_factory=dict)  # tag (None: all) -> directions cut
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _conns: list[_Conn] = field(default_factory=list)
    _sock: socket.socket | None = None
    _stopped: bool = False

    def start(self) -> "Proxy":
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        self.port = s.getsockname()[1]
        self._sock = s
        threading.Thread(target=self._accept, name=f"proxy:{self.port}", daemon=True).start()
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self, directions: tuple[str, ...] | str = BOTH, *, tag: str | None = None) -> None:
        """Stop forwarding in ``directions`` (UP, DOWN or both) for connections tagged ``tag`` (None: all)."""
        dirs = {directions} if isinstance(directions, str) else set(directions)
        if not dirs <= set(BOTH):
            raise ValueError(f"directions must be among {BOTH}, got {directions!r}")
        with self._cond:
            self._cuts.setdefault(tag, set()).update(dirs)

    def heal(self) -> None:
        """Forward everything again."""
        with self._cond:
            self._cuts.clear()
            self._cond.notify_all()

    def reset(self) -> None:
        """Close every open connection (new ones are still accepted)."""
        with self._cond:
            conns, self._conns = self._conns, []
        for c in conns:
            self._close(c)

    def stop(self) -> None:
        self._stopped = True
        if self._sock is not None:
            self._sock.close()
        self.heal()
        self.reset()

    def _is_cut(self, conn: _Conn, direction: str) -> bool:
        return direction in self._cuts.get(None, ()) or (
            conn.tag is not None and direction in self._cuts.get(conn.tag, ()))

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stopped:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._open, args=(client,), daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        head = b""
        if self.tagger is not None:
            client.settimeout(_SNIFF_TIMEOUT)
            try:
                while b"\r\n\r\n" not in head and len(head) < _SNIFF_LIMIT:
                    chunk = client.recv(4096)
                    if not chunk:
                        break
                    head += chunk
            except OSError:
                pass
            client.settimeout(None)
        try:
            server = socket.create_connection(self.upstream, timeout=2)
            server.settimeout(None)
        except OSError:
            client.close()
            return
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(client, server, self.tagger(head) if self.tagger is not None and head else None)
        with self._cond:
            if self._stopped:
                self._close(conn)
                return
            self._conns.append(conn)
        threading.Thread(target=self._pump, args=(conn, client, server, UP, head), daemon=True).start()
        threading.Thread(target=self._pump, args=(conn, server, client, DOWN, b""), daemon=True).start()

    def _pump(self, conn: _Conn, src: socket.socket, dst: socket.socket, direction: str, first: bytes) -> None:
        data = first
        try:
            while True:
                if data:
                    with self._cond:
                        while self._is_cut(conn, direction) and not conn.closed:
                            self._cond.wait(0.5)
                    if conn.closed:
                        return
                    dst.sendall(data)
                data = src.recv(65536)
                if not data:
                    break
        except OSError:
            pass
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        with self._cond:
            conn.closed = True
            self._cond.notify_all()
            if conn in self._conns:
                self._conns.remove(conn)
        for s in (conn.client, conn.server):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
