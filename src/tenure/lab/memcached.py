"""Throwaway memcached servers on loopback, for the tests, benchmarks and examples.

Runs Debian's ``memcached`` in the foreground as a child process
(``memcached -u memcache -l 127.0.0.1 -p PORT -U 0 -m 64``; ``-u`` only when
running as root, which memcached requires), on a port picked at start and kept
across :meth:`LocalMemcached.restart`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from ..errors import ConfigError, TenureError
from .etcd import free_ports


def memcached_binary() -> str:
    found = shutil.which("memcached") or ("/usr/bin/memcached" if os.path.exists("/usr/bin/memcached") else None)
    if found is None:
        raise ConfigError("no memcached binary: apt-get install memcached")
    return found


class LocalMemcached:
    """One memcached on 127.0.0.1: ``kill()`` SIGKILL, ``freeze()``/``thaw()`` SIGSTOP/SIGCONT, ``restart()`` empty.

    The port is kept across restarts.
    """

    def __init__(self, port: int | None = None, memory_mb: int = 64) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_ports(1)[0]
        self.memory_mb = memory_mb
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> "LocalMemcached":
        cmd = [memcached_binary(), "-l", self.host, "-p", str(self.port), "-U", "0", "-m", str(self.memory_mb)]
        if os.geteuid() == 0:
            user = "memcache"
            try:
                import pwd

                pwd.getpwnam(user)
            except KeyError:
                user = "nobody"
            cmd[1:1] = ["-u", user]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise TenureError(f"memcached on port {self.port} exited with {self.proc.returncode}: {err.strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise TenureError(f"memcached on port {self.port} did not accept connections within {timeout} s")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)
            if self.proc.stderr is not None:
                self.proc.stderr.close()

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its data and its connections, and answers nothing (a VM pause, a GC stall)."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP)
            _wait_stopped(self.proc.pid)

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze`: it goes on with what it held, and with what was sent to it meanwhile."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> "LocalMemcached":
        self.kill()
        return self.start()

    stop = kill

    def __enter__(self) -> "LocalMemcached":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Return once every thread of ``pid`` is stopped: kill() returns before a busy worker thread has halted."""
    deadline = time.monotonic() + timeout
    task_dir = f"/proc/{pid}/task"
    while time.monotonic() < deadline:
        try:
            states = []
            for tid in os.listdir(task_dir):
                with open(f"{task_dir}/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
        except OSError:
            return  # gone: nothing left to answer
        if all(st in ("T", "t") for st in states):
            return
        time.sleep(0.005)
    raise TenureError(f"memcached {pid} did not stop within {timeout} s of SIGSTOP")
