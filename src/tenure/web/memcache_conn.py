"""One connection to one memcached server, speaking the text protocol, that never reorders this client's commands.

A command that timed out may still be applied later: a frozen server keeps
it in its socket buffer and runs it when it resumes. A client that dropped
that connection and sent a newer command on a fresh one could have the two
run in either order (memcached serves connections on several threads), so a
newer value could be overwritten by an older one. Here a timed-out
connection is kept, not closed: what was left unsent stays queued, the
answers still owed are read (and dropped) before the next command is sent,
and only a connection the server itself closed or reset (its process is
gone) is replaced. A call that finds its reused connection closed or reset
before any answer is sent again once on a new connection (nothing sent on
the old one can run any more). After a failure the server is skipped for
``retry_after`` seconds (each call fails at once), then tried again.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from typing import Any

GET, LINE = 0, 1  # what answer a command expects: VALUE...END, or one line

Values = dict[bytes, tuple[int, bytes, int | None]]  # key -> (flags, data, cas unique or None)


class Unavailable(Exception):
    """The server could not be used for this call (down, timed out, or skipped for a while)."""


class _Reset(Exception):
    pass


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class Conn:
    """A connection to ``address`` (host:port) for one thread; see the module doc."""

    def __init__(self, address: str, timeout: float, retry_after: float) -> None:
        self.address = address
        self.host, self.port = split_address(address)
        self.timeout = timeout
        self.retry_after = retry_after
        self.sock: socket.socket | None = None
        self.out = bytearray()  # bytes not yet sent
        self.inbuf = bytearray()
        self.pending: deque[int] = deque()  # answers expected, in order
        self.owed = 0  # how many of the first ``pending`` belong to calls that gave up waiting
        self.down_until = 0.0
        self._mine = 0
        self._last: list[tuple[bytes, int | None]] | None = None  # the last call's commands, for one resend
        self._reused = False

    # -- one call ------------------------------------------------------------------------

    def call(self, commands: list[tuple[bytes, int | None]]) -> list[Any]:
        """Send ``commands`` (bytes, answer kind or None for noreply) and return their answers, in order."""
        deadline = self.begin(commands)
        return self.finish(deadline)

    def begin(self, commands: list[tuple[bytes, int | None]]) -> float:
        """Send ``commands`` (after settling what is owed); returns the deadline to pass to :meth:`finish`."""
        now = time.monotonic()
        if now < self.down_until:
            raise Unavailable(f"{self.address}: skipped for {self.down_until - now:.2f} s after a failure")
        deadline = now + self.timeout
        self._last, self._reused = commands, self.sock is not None
        try:
            if self.sock is None:
                self._connect(deadline)
            if self.owed:
                self._send(deadline)
                while self.owed:
                    self._answer(deadline)
                    self.owed -= 1
            for data, kind in commands:
                self.out += data
                if kind is not None:
                    self.pending.append(kind)
            self._mine = sum(1 for _, k in commands if k is not None)
            self._send(deadline)
        except (TimeoutError, socket.timeout):
            self._gave_up()
            raise Unavailable(f"{self.address}: no answer within {self.timeout:g} s") from None
        except (OSError, ValueError, _Reset) as e:
            if self._resend():
                return self.begin(commands)
            raise Unavailable(f"{self.address}: {e or type(e).__name__}") from None
        return deadline

    def finish(self, deadline: float) -> list[Any]:
        """The answers to the commands of the last :meth:`begin`."""
        out = []
        try:
            while self._mine:
                out.append(self._answer(deadline))
                self._mine -= 1
        except (TimeoutError, socket.timeout):
            self._gave_up()
            raise Unavailable(f"{self.address}: no answer within {self.timeout:g} s") from None
        except (OSError, ValueError, _Reset) as e:
            commands = self._last
            if not out and commands is not None and self._resend():
                return self.finish(self.begin(commands))
            raise Unavailable(f"{self.address}: {e or type(e).__name__}") from None
        return out

    def _resend(self) -> bool:
        """After a reset: True (and no pause) if the call may be sent again once, on a new connection."""
        again = self._reused and not self.owed
        self._reset(pause=not again)
        self._reused = False
        return again

    # -- plumbing ------------------------------------------------------------------------

    def _gave_up(self) -> None:
        self.owed = len(self.pending)  # still read (and dropped) before anything else is sent
        self._mine = 0
        self.down_until = time.monotonic() + self.retry_after

    def _reset(self, pause: bool = True) -> None:
        """The server closed or reset the connection: nothing sent on it can run any more."""
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self.out.clear()
        self.inbuf.clear()
        self.pending.clear()
        self.owed = self._mine = 0
        if pause:
            self.down_until = time.monotonic() + self.retry_after

    def _connect(self, deadline: float) -> None:
        s = socket.create_connection((self.host, self.port), timeout=max(0.001, deadline - time.monotonic()))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s

    def _left(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError()
        return left

    def _send(self, deadline: float) -> None:
        sock = self.sock
        assert sock is not None
        while self.out:
            sock.settimeout(self._left(deadline))
            n = sock.send(self.out)
            del self.out[:n]

    def _recv(self, deadline: float) -> None:
        sock = self.sock
        assert sock is not None
        sock.settimeout(self._left(deadline))
        data = sock.recv(262144)
        if not data:
            raise _Reset("connection closed by the server")
        self.inbuf += data

    def _answer(self, deadline: float) -> Any:
        """Read one answer (of the kind at the head of ``pending``)."""
        kind = self.pending[0]
        while True:
            parsed = parse_get(self.inbuf) if kind == GET else parse_line(self.inbuf)
            if parsed is not None:
                result, used = parsed
                del self.inbuf[:used]
                self.pending.popleft()
                return result
            self._recv(deadline)

    def idle(self) -> bool:
        return not self.pending and not self.out

    def close(self) -> None:
        """Close the socket if nothing is owed on it (an owed answer keeps it, to keep this client's order)."""
        if self.sock is not None and self.idle():
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


def parse_line(buf: bytearray) -> tuple[bytes, int] | None:
    i = buf.find(b"\r\n")
    return None if i < 0 else (bytes(buf[:i]), i + 2)


def parse_get(buf: bytearray) -> tuple[Values | bytes, int] | None:
    """``(values, bytes used)`` for a complete VALUE...END answer; the error line instead of values on an error."""
    pos = 0
    values: Values = {}
    while True:
        i = buf.find(b"\r\n", pos)
        if i < 0:
            return None
        line = bytes(buf[pos:i])
        if line == b"END":
            return values, i + 2
        if not line.startswith(b"VALUE "):
            return line, i + 2  # ERROR / CLIENT_ERROR / SERVER_ERROR
        parts = line.split()
        if len(parts) < 4:
            raise _Reset(f"malformed answer {line[:80]!r}")
        n = int(parts[3])
        start = i + 2
        if len(buf) < start + n + 2:
            return None
        if buf[start + n:start + n + 2] != b"\r\n":
            raise _Reset("malformed value framing")
        values[parts[1]] = (int(parts[2]), bytes(buf[start:start + n]), int(parts[4]) if len(parts) > 4 else None)
        pos = start + n + 2
