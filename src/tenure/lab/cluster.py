"""Throwaway PostgreSQL clusters with a ``tenure sidecar`` process per node.

The application's table ``items`` lives in database ``app`` (:data:`APP_DB`), which every
sidecar advertises and guards; ``postgres`` is left to the sidecars themselves.

For the tests, benchmarks and demo: a local etcd (passed in), a fresh
PostgreSQL primary with streaming standbys on free ports, one sidecar process
per node with its own TOML config and HTTP port, and the means to hurt them
(kill -9 of sidecar and postmaster together, signals).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

import psycopg

from .. import connect, records
from .etcd import LocalEtcd, free_ports
from .postgres import LocalPostgresCluster
from ..services.postgres import PostgresNode



APP_DB = "app"  # the application's tables live in a database of their own, as in production


class SidecarProc:
    """``tenure sidecar`` for one node, in its own process."""

    def __init__(self, workdir: str, etcd: LocalEtcd, service: str, node: PostgresNode, **settings: Any) -> None:
        """``settings``: top-level keys of the sidecar's TOML; ``postgres`` (a dict) adds to its [postgres]
        section and ``etcd_endpoints`` replaces the endpoints (e.g. through a proxy the test can cut)."""
        self.node = node
        endpoints = settings.pop("etcd_endpoints", None) or etcd.endpoints
        self.http_port = free_ports(1)[0]
        self.config_path = os.path.join(workdir, f"{node.name}.toml")
        self.log_path = os.path.join(workdir, f"{node.name}.log")
        pg = {"data_dir": node.data_dir, "port": node.port, "bin_dir": node.bin_dir,
              "guard_schema": "public", "advertise_dsn": node.dsn_for(APP_DB), **settings.pop("postgres", {})}
        if node.socket_dir:
            pg["socket_dir"] = node.socket_dir
        top = {"service": service, "member": node.name, "ttl": 2, "grace": 0.3,
               "listen": f"127.0.0.1:{self.http_port}", **settings}
        with open(self.config_path, "w") as f:
            f.write("".join(f"{k} = {_toml(v)}\n" for k, v in top.items()))
            f.write(f"[etcd]\nendpoints = {_toml(endpoints)}\n[postgres]\n")
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
    """The pid ``postmaster.pid`` names, only if that process is this server's postmaster now.

    The file outlives a crash, and its pid may since belong to another process: a postgres
    binary whose command line names this data directory, or nothing.
    """
    try:
        with open(os.path.join(node.data_dir, "postmaster.pid")) as f:
            pid = int(f.readline())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except (OSError, ValueError):
        return None
    if not argv or os.path.basename(argv[0]) not in ("postgres", "postmaster"):
        return None
    data_dir = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-D"), None)
    if data_dir is None or os.path.realpath(data_dir) != os.path.realpath(node.data_dir):
        return None
    return pid


def _toml(v: Any) -> str:
    return json.dumps(v)  # strings, numbers, booleans and lists of strings read the same in TOML


class FailoverCluster:
    """etcd (shared) + a fresh 3-node PostgreSQL cluster + a sidecar per node."""

    def __init__(self, etcd: LocalEtcd, service: str, size: int = 3, per_node: dict[str, dict[str, Any]] | None = None,
                 databases: tuple[str, ...] = (), **settings: Any) -> None:
        """``databases``: more application databases to create besides :data:`APP_DB` (empty)."""
        self.etcd = etcd
        self.service = service
        self.workdir = tempfile.mkdtemp(prefix="tenure-failover-")
        self.pg = LocalPostgresCluster(size=size).start()
        self.sidecars = [SidecarProc(self.workdir, etcd, service, n, **{**settings, **(per_node or {}).get(n.name, {})})
                         for n in self.pg.nodes]
        self.client = connect(etcd.endpoints)
        with psycopg.connect(self.pg.nodes[0].dsn, autocommit=True) as conn:
            for db in (APP_DB, *databases):
                conn.execute(f"CREATE DATABASE {db}")
        with psycopg.connect(self.app_dsn("n1"), autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS items (id bigint PRIMARY KEY, writer text, at float8)")
        for s in self.sidecars:
            s.start()

    def primary(self) -> dict[str, Any] | None:
        kv = self.client.get(records.primary_key(self.service))
        return kv.json() if kv is not None else None

    def wait_primary(self, timeout: float, not_member: str | None = None) -> dict[str, Any]:
        """Wait for a published primary (other than ``not_member``); raise TimeoutError."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            p = self.primary()
            if p is not None and p["member"] != not_member:
                return p
            time.sleep(0.01)
        raise TimeoutError(f"no published primary other than {not_member} within {timeout} s")

    def wait_streaming(self, timeout: float) -> dict[str, Any]:
        """Wait for a primary and for every other node to answer ``/replica`` 200 (streaming from it); the primary.

        Only a standby seen streaming from the primary may take over, so a crash test starts from here.
        """
        end = time.monotonic() + timeout
        first = self.wait_primary(timeout)
        for s in self.sidecars:
            if s.node.name == first["member"]:
                continue
            while s.http("/replica")[0] != 200:
                if time.monotonic() > end:
                    raise TimeoutError(f"{s.node.name} not streaming from {first['member']} within {timeout} s")
                time.sleep(0.02)
        return first

    def app_dsn(self, member: str) -> str:
        """How to reach the application's database on ``member``'s server."""
        return next(n for n in self.pg.nodes if n.name == member).dsn_for(APP_DB)

    def sidecar(self, member: str) -> SidecarProc:
        return next(s for s in self.sidecars if s.node.name == member)

    def logs(self) -> str:
        return "\n".join(f"----- {s.node.name}\n{s.log()[-6000:]}" for s in self.sidecars)

    def stop(self) -> None:
        for s in self.sidecars:
            s.stop()
        self.client.close()
        self.pg.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
