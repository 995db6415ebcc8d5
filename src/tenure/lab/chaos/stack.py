"""The whole stack on one machine, one network namespace per host, for chaos runs.

Hosts (see :mod:`tenure.lab.netns`): ``e1``-``e3`` run one etcd member each;
``n1``-``n3`` run a PostgreSQL server and its ``tenure sidecar`` (a database
host); ``m1``, ``m2`` a memcached and its registrar; ``client`` the harness
itself (writers, readers, checker), which joins that namespace with
:meth:`Stack.enter_client` before it starts any thread. Zones pair a database
host with an etcd member (``a`` = n1 + e1, ...). Every server listens on its
host's own address with the service's usual port, so names never clash
between runs. The etcd launcher lives here because members must listen on the
hosts' addresses.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from ...errors import TenureError
from ...services.postgres import DEFAULT_BIN_DIR, PostgresNode
from ..etcd import etcd_binary
from ..memcached import memcached_binary
from ..netns import SUBNET, Network, enter
from ..postgres import SETTINGS

log = logging.getLogger("tenure.lab")

SERVICE = "db"
CACHE = "cache"
ETCD = ["e1", "e2", "e3"]
DB = ["n1", "n2", "n3"]
CACHES = ["m1", "m2"]
CLIENT = "client"
ZONES = {"a": ("n1", "e1"), "b": ("n2", "e2"), "c": ("n3", "e3")}
PG_PORT, ETCD_PORT, PEER_PORT, HTTP_PORT, MC_PORT = 5432, 2379, 2380, 8008, 11211
TABLE = "chaos_writes"


@dataclass
class DbHost:
    name: str
    address: str
    node: PostgresNode
    config: str
    sidecar: "subprocess.Popen[bytes] | None" = None
    stopped: set[str] = field(default_factory=set)  # "sidecar", "postgres": frozen with SIGSTOP


@dataclass
class Stack:
    """3 etcd members, 3 PostgreSQL nodes with sidecars, 2 memcached with registrars; see the module doc."""

    synchronous: bool = False
    ttl: int = 2
    workdir: str = ""
    net: Network = field(default_factory=Network)
    etcd: dict[str, "subprocess.Popen[bytes] | None"] = field(default_factory=dict)
    db: dict[str, DbHost] = field(default_factory=dict)
    caches: dict[str, "subprocess.Popen[bytes] | None"] = field(default_factory=dict)
    registrars: dict[str, "subprocess.Popen[bytes] | None"] = field(default_factory=dict)

    # -- addresses ---------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [f"http://{self.net.address(e)}:{ETCD_PORT}" for e in ETCD]

    def dsn(self, host: str) -> str:
        return self.db[host].node.dsn

    # -- bring-up ----------------------------------------------------------------

    def create_network(self) -> None:
        """Make the hosts (call before :meth:`enter_client` and before any thread starts)."""
        self.workdir = tempfile.mkdtemp(prefix="tenure-chaos-")
        os.chmod(self.workdir, 0o755)
        self.net.create([*ETCD, *DB, *CACHES, CLIENT])

    def enter_client(self) -> None:
        enter(self.net.hosts[CLIENT].ns)

    def start(self, timeout: float = 60.0) -> None:
        """Start everything and wait until a primary is published and both standbys stream."""
        for e in ETCD:
            self.start_etcd(e, "new")
        self.wait_etcd(timeout)
        self._start_postgres(timeout)
        for h in DB:
            self.start_sidecar(h)
        for m in CACHES:
            self.start_cache(m)
            self.start_registrar(m)

    def _log(self, name: str) -> Any:
        return open(os.path.join(self.workdir, f"{name}.log"), "ab")

    def start_etcd(self, name: str, state: str = "existing") -> None:
        addr = self.net.address(name)
        cluster = ",".join(f"{e}=http://{self.net.address(e)}:{PEER_PORT}" for e in ETCD)
        url = f"http://{addr}:{ETCD_PORT}"
        with self._log(name) as out:
            self.etcd[name] = self.net.popen(name, [
                etcd_binary(), "--name", name, "--data-dir", os.path.join(self.workdir, name),
                "--listen-client-urls", url, "--advertise-client-urls", url,
                "--listen-peer-urls", f"http://{addr}:{PEER_PORT}",
                "--initial-advertise-peer-urls", f"http://{addr}:{PEER_PORT}",
                "--initial-cluster", cluster, "--initial-cluster-state", state,
                "--initial-cluster-token", self.net.run_id, "--log-level", "warn", "--unsafe-no-fsync"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def etcd_alive(self, name: str) -> bool:
        p = self.etcd.get(name)
        return p is not None and p.poll() is None

    def kill_etcd(self, name: str) -> None:
        p = self.etcd.get(name)
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()

    def etcd_healthy(self) -> bool:
        """Whether every running member answers and the cluster has a leader (asked from the client host)."""
        running = [f"http://{self.net.address(e)}:{ETCD_PORT}" for e in ETCD if self.etcd_alive(e)]
        try:
            res = subprocess.run([etcd_binary("etcdctl"), "--endpoints", ",".join(running), "endpoint", "health",
                                  "--command-timeout=1s"], capture_output=True, timeout=5,
                                 env={**os.environ, "ETCDCTL_API": "3"})
        except subprocess.TimeoutExpired:
            return False
        return res.returncode == 0

    def etcd_leader(self) -> str | None:
        """The member etcd has as its raft leader (None if it cannot tell within a second)."""
        running = {f"http://{self.net.address(e)}:{ETCD_PORT}": e for e in ETCD if self.etcd_alive(e)}
        try:
            res = subprocess.run([etcd_binary("etcdctl"), "--endpoints", ",".join(running), "endpoint", "status",
                                  "-w", "json", "--command-timeout=1s"], capture_output=True, text=True,
                                 timeout=5, env={**os.environ, "ETCDCTL_API": "3"})
            for st in json.loads(res.stdout or "[]"):
                if st["Status"]["header"]["member_id"] == st["Status"]["leader"]:
                    return running.get(st["Endpoint"])
        except (subprocess.TimeoutExpired, ValueError, KeyError):
            pass
        return None

    def wait_etcd(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.etcd_healthy():
            if time.monotonic() > deadline:
                raise TenureError(f"etcd not healthy within {timeout} s; logs in {self.workdir}")
            time.sleep(0.2)

    def _start_postgres(self, timeout: float) -> None:
        sockets = os.path.join(self.workdir, "sock")
        os.mkdir(sockets)
        shutil.chown(sockets, "postgres", "postgres")
        pgdir = os.path.join(self.workdir, "pg")
        os.mkdir(pgdir)
        shutil.chown(pgdir, "postgres", "postgres")
        for h in DB:
            sock = os.path.join(sockets, h)  # a socket directory per host: the file system is shared
            os.mkdir(sock)
            shutil.chown(sock, "postgres", "postgres")
            node = PostgresNode(h, os.path.join(self.workdir, "pg", h), PG_PORT, host=self.net.address(h),
                                socket_dir=sock, log_file=os.path.join(pgdir, f"{h}.log"))
            self.db[h] = DbHost(h, self.net.address(h), node, os.path.join(self.workdir, f"{h}.toml"))
        first = self.db[DB[0]].node
        # Each namespace has its own addresses: '*' binds that host's only.
        first.initdb({**SETTINGS, "listen_addresses": "*"}, timeout=timeout)
        with open(os.path.join(first.data_dir, "pg_hba.conf"), "a") as f:  # copied to the clones
            f.write(f"host all all {SUBNET}.0/24 trust\nhost replication all {SUBNET}.0/24 trust\n")
        self.start_postgres(DB[0])
        with psycopg.connect(first.dsn, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {TABLE} (seq bigserial PRIMARY KEY, id text UNIQUE NOT NULL, "
                         "client text NOT NULL, token bigint, server text)")
        for h in DB[1:]:
            self.db[h].node.clone_from(first.dsn, timeout=timeout)  # pg_basebackup from the client host
            self.start_postgres(h)
        for h in DB:
            self._write_sidecar_config(self.db[h])

    def start_postgres(self, host: str) -> None:
        """``pg_ctl start`` inside ``host``, with the options the sidecar itself uses."""
        node = self.db[host].node
        if node.is_running():
            return
        opts = shlex.join(["-p", str(PG_PORT), "-c", f"cluster_name={host}", "-k", node.socket_dir or ""])
        res = self.net.run(host, ["runuser", "-u", "postgres", "--", os.path.join(DEFAULT_BIN_DIR, "pg_ctl"),
                                  "start", "-D", node.data_dir, "-l", node.log_file, "-w", "-t", "30", "-o", opts])
        if res.returncode != 0:
            raise TenureError(f"{host}: pg_ctl start failed: {(res.stderr or res.stdout).strip()}")

    def reclone(self, host: str, primary: str) -> None:
        """Rebuild ``host`` from scratch as a standby of ``primary`` (pg_basebackup), as an operator would."""
        self.signal_sidecar(host, signal.SIGKILL)
        for pid in self.postgres_pids(host):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node = self.db[host].node
        time.sleep(0.2)
        shutil.rmtree(node.data_dir, ignore_errors=True)
        node.clone_from(self.dsn(primary), timeout=60)
        self.start_postgres(host)
        self.start_sidecar(host)

    def _write_sidecar_config(self, h: DbHost) -> None:
        node = h.node
        top = {"service": SERVICE, "member": h.name, "ttl": self.ttl, "grace": 0.3,
               "zone": next(z for z, hosts in ZONES.items() if h.name in hosts),
               "listen": f"{h.address}:{HTTP_PORT}"}
        pg = {"data_dir": node.data_dir, "port": PG_PORT, "host": h.address, "bin_dir": node.bin_dir,
              "socket_dir": node.socket_dir, "guard_schema": "public", "synchronous": self.synchronous}
        with open(h.config, "w") as f:
            f.write("".join(f"{k} = {json.dumps(v)}\n" for k, v in top.items()))
            f.write(f"[etcd]\nendpoints = {json.dumps(self.endpoints)}\n[postgres]\n")
            f.write("".join(f"{k} = {json.dumps(v)}\n" for k, v in pg.items()))

    def start_sidecar(self, host: str) -> None:
        h = self.db[host]
        h.stopped.discard("sidecar")
        with self._log(f"sidecar-{host}") as out:
            h.sidecar = self.net.popen(host, [sys.executable, "-m", "tenure.cli", "-v", "sidecar", "--config",
                                              h.config], stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)

    def sidecar_alive(self, host: str) -> bool:
        p = self.db[host].sidecar
        return p is not None and p.poll() is None

    def signal_sidecar(self, host: str, sig: int) -> None:
        p = self.db[host].sidecar
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL and p is not None:
            p.wait(10)

    def stop_sidecar_cleanly(self, host: str, timeout: float = 20.0) -> None:
        """SIGTERM and wait (a rolling restart's first half); SIGKILL if it does not finish."""
        p = self.db[host].sidecar
        if p is None or p.poll() is not None:
            return
        self.signal_sidecar(host, signal.SIGCONT)
        self.signal_sidecar(host, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s: sidecar did not stop within %.0f s of SIGTERM", host, timeout)
            self.signal_sidecar(host, signal.SIGKILL)

    def postgres_pids(self, host: str) -> list[int]:
        """The postmaster and its children (checked against /proc: a stale postmaster.pid may name anything)."""
        node = self.db[host].node
        try:
            with open(os.path.join(node.data_dir, "postmaster.pid")) as f:
                pid = int(f.readline())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except (OSError, ValueError):
            return []
        if not cmd or not cmd[0].endswith(b"postgres") or node.data_dir.encode() not in cmd:
            return []
        pids = [pid]
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                            pids.append(int(d))
                except (OSError, ValueError, IndexError):
                    pass
        return pids

    def signal_postgres(self, host: str, sig: int) -> None:
        pids = self.postgres_pids(host)
        if sig == signal.SIGKILL:
            pids = pids[:1]  # a crashed postmaster: its backends notice and exit
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def start_cache(self, host: str) -> None:
        self.caches[host] = self.net.popen(host, [memcached_binary(), "-u", "memcache", "-l", self.net.address(host),
                                                  "-p", str(MC_PORT), "-U", "0", "-m", "16"],
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True)

    def kill_cache(self, host: str) -> None:
        p = self.caches.get(host)
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()

    def start_registrar(self, host: str) -> None:
        with self._log(f"registrar-{host}") as out:
            self.registrars[host] = self.net.popen(host, [
                sys.executable, "-m", "tenure.lab.chaos.registrar", "--endpoints", ",".join(self.endpoints),
                "--service", CACHE, "--member", host, "--host", self.net.address(host), "--port", str(MC_PORT),
                "--ttl", str(self.ttl)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    # -- state -------------------------------------------------------------------

    def roles(self) -> dict[str, str | None]:
        """Each database host's role as its server says ("primary", "standby"; None: not answering)."""
        out: dict[str, str | None] = {}
        for h, d in self.db.items():
            try:
                with psycopg.connect(d.node.dsn, autocommit=True, connect_timeout=1,
                                     options="-c statement_timeout=1000") as conn:
                    rec, ro = conn.execute("SELECT pg_is_in_recovery(), "
                                           "current_setting('default_transaction_read_only')").fetchone()
                    out[h] = "standby" if rec else ("primary" if ro == "off" else "demoted")
            except psycopg.Error:
                out[h] = None
        return out

    def logs(self, tail: int = 4000) -> str:
        parts = []
        names = sorted(os.listdir(self.workdir)) + [f"pg/{h}.log" for h in DB]
        for name in names:
            if name.endswith(".log") and os.path.exists(os.path.join(self.workdir, name)):
                with open(os.path.join(self.workdir, name), errors="replace") as f:
                    parts.append(f"----- {name}\n{f.read()[-tail:]}")
        return "\n".join(parts)

    # -- teardown ----------------------------------------------------------------

    def stop(self, keep_workdir: bool = False) -> None:
        """Kill everything (every process in every host), delete the hosts and, unless kept, the files."""
        for p in [*self.etcd.values(), *self.caches.values(), *self.registrars.values(),
                  *(d.sidecar for d in self.db.values())]:
            if p is not None and p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGCONT)
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for h in self.db:
            for pid in self.postgres_pids(h):
                try:
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.net.close()
        if self.workdir and not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
