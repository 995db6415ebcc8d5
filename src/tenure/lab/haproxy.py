"""A throwaway haproxy (Debian's binary) running a given configuration against lab servers.

:func:`render` rewrites a configuration written for real hosts (such as
``examples/haproxy.cfg``: ``server dbN HOST:5432 check port 8008``) so that
it points at local servers on free ports; :class:`LocalHaproxy` runs it in
the foreground with a stats socket, and :meth:`LocalHaproxy.servers` reads
every server's UP/DOWN state from that socket.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

from .etcd import free_ports

_SERVER = re.compile(r"^(\s*server\s+)(\S+)\s+\S+:5432(.*?)\bport\s+8008(.*)$", re.M)
_BIND = re.compile(r"^(\s*bind\s+)\*:(\d+)\s*$", re.M)


def render(config: str, servers: dict[str, tuple[int, int]], binds: dict[int, int], stats_socket: str) -> str:
    """``config`` with server ``name`` at ``127.0.0.1:pg_port`` checked on ``http_port`` (``servers[name]``),
    ``bind *:P`` moved to ``127.0.0.1:binds[P]``, and a stats socket added to ``global``."""

    def server(m: re.Match[str]) -> str:
        pg, http = servers[m.group(2)]
        return f"{m.group(1)}{m.group(2)} 127.0.0.1:{pg}{m.group(3)}port {http}{m.group(4)}"

    out = _SERVER.sub(server, config)
    out = _BIND.sub(lambda m: f"{m.group(1)}127.0.0.1:{binds[int(m.group(2))]}", out)
    return out.replace("global\n", f"global\n    stats socket {stats_socket} mode 600 level admin\n", 1)


class LocalHaproxy:
    """haproxy -db -f CFG as a child process; :meth:`stop` kills it and removes its files."""

    def __init__(self, config: str, servers: dict[str, tuple[int, int]], listen_ports: list[int],
                 binary: str = "haproxy") -> None:
        self.dir = tempfile.mkdtemp(prefix="tenure-haproxy-")
        self.socket = os.path.join(self.dir, "stats.sock")
        self.ports = dict(zip(listen_ports, free_ports(len(listen_ports))))
        self.config_path = os.path.join(self.dir, "haproxy.cfg")
        with open(self.config_path, "w") as f:
            f.write(render(config, servers, self.ports, self.socket))
        self.binary = shutil.which(binary) or binary
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> "LocalHaproxy":
        check = subprocess.run([self.binary, "-c", "-f", self.config_path], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejects the configuration: {check.stderr or check.stdout}")
        self.log_path = os.path.join(self.dir, "haproxy.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-db", "-f", self.config_path], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        end = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if time.monotonic() > end or self.proc.poll() is not None:
                raise RuntimeError("haproxy did not start")
            time.sleep(0.02)
        return self

    def port(self, configured: int) -> int:
        """The local port of the listener the configuration binds on ``configured``."""
        return self.ports[configured]

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(self.socket)
            s.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """``{backend: {server: status}}`` from ``show stat`` (status ``UP``, ``DOWN``, ``UP 1/2``...)."""
        text = self.command("show stat")
        lines = text.splitlines()
        head = lines[0].lstrip("# ").split(",")
        out: dict[str, dict[str, str]] = {}
        for line in lines[1:]:
            if not line:
                continue
            row = dict(zip(head, line.split(",")))
            if row.get("svname") in ("FRONTEND", "BACKEND"):
                continue
            out.setdefault(row["pxname"], {})[row["svname"]] = row["status"]
        return out

    def up(self, backend: str) -> list[str]:
        """Servers of ``backend`` that are UP now."""
        return sorted(n for n, st in self.servers().get(backend, {}).items() if st.startswith("UP"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
