"""A PostgreSQL cluster with a tenure sidecar process per node, for the failover tests and benchmark."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

import psycopg

import tenure
from tenure.localetcd import LocalEtcd, free_ports
from tenure.localpg import LocalPostgresCluster
from tenure.services.postgres import PostgresNode

from support import wait_for


class SidecarProc:
    """``tenure sidecar`` for one node, in its own process."""

    def __init__(self, workdir: str, etcd: LocalEtcd, service: str, node: PostgresNode, **settings: Any) -> None:
        self.node = node
        self.http_port = free_ports(1)[0]
        self.config_path = os.path.join(workdir, f"{node.name}.toml")
        self.log_path = os.path.join(workdir, f"{node.name}.log")
        pg = {"data_dir": node.data_dir, "port": node.port, "bin_dir": node.bin_dir,
              "guard_schema": "public", **settings.pop("postgres", {})}
        if node.socket_dir:
            pg["socket_dir"] = node.socket_dir
        top = {"service": service, "member": node.name, "ttl": 2, "grace": 0.3,
               "listen": f"127.0.0.1:{self.http_port}", **settings}
        with open(self.config_path, "w") as f:
            f.write("".join(f"{k} = {_toml(v)}\n" for k, v in top.items()))
            f.write(f"[etcd]\nendpoints = {_toml(etcd.endpoints)}\n[postgres]\n")
            f.write("".join(f"{k} = {_toml(v)}\n" for k, v in pg.items()))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "SidecarProc":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tenure.cli", "-v", "sidecar", "--config", self.config_path],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def kill_with_postgres(self) -> None:
        """kill -9 of the sidecar and the postmaster together, as a host crash would."""
        self.signal(signal.SIGKILL)
        pid = postmaster_pid(self.node)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert self.proc is not None
        self.proc.wait(10)

    def http(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")
        except OSError:
            return 0, None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.signal(signal.SIGCONT)
                self.signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def postmaster_pid(node: PostgresNode) -> int | None:
    try:
        with open(os.path.join(node.data_dir, "postmaster.pid")) as f:
            return int(f.readline())
    except (OSError, ValueError):
        return None


def _toml(v: Any) -> str:
    return json.dumps(v)  # strings, numbers, booleans and lists of strings read the same in TOML


class FailoverCluster:
    """etcd (shared) + a fresh 3-node PostgreSQL cluster + a sidecar per node."""

    def __init__(self, etcd: LocalEtcd, service: str, size: int = 3, per_node: dict[str, dict[str, Any]] | None = None,
                 **settings: Any) -> None:
        self.etcd = etcd
        self.service = service
        self.workdir = tempfile.mkdtemp(prefix="tenure-failover-")
        self.pg = LocalPostgresCluster(size=size).start()
        self.sidecars = [SidecarProc(self.workdir, etcd, service, n, **{**settings, **(per_node or {}).get(n.name, {})})
                         for n in self.pg.nodes]
        self.client = tenure.connect(etcd.endpoints)
        with psycopg.connect(self.pg.nodes[0].dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS items (id bigint PRIMARY KEY, writer text, at float8)")
        for s in self.sidecars:
            s.start()

    def primary(self) -> dict[str, Any] | None:
        kv = self.client.get(f"svc/{self.service}/primary")
        return kv.json() if kv is not None else None

    def wait_primary(self, timeout: float, not_member: str | None = None) -> dict[str, Any]:
        return wait_for(lambda: (p := self.primary()) and p["member"] != not_member and p, timeout,
                        f"a published primary other than {not_member}")

    def sidecar(self, member: str) -> SidecarProc:
        return next(s for s in self.sidecars if s.node.name == member)

    def logs(self) -> str:
        return "\n".join(f"----- {s.node.name}\n{s.log()[-6000:]}" for s in self.sidecars)

    def stop(self) -> None:
        for s in self.sidecars:
            s.stop()
        self.client.close()
        self.pg.stop()


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
