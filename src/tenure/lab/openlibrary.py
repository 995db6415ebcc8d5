"""The Open Library migration on loopback: the example configs made local, haproxy, gunicorn and load.

For tests and benchmarks of ``examples/openlibrary/``:

* :func:`start_etcd_from_configs` -- an etcd cluster started from the
  example member files (``etcd --config-file``), hosts and paths made local;
* :func:`local_sidecar_settings` -- the settings of an example sidecar TOML
  that a :class:`~tenure.lab.cluster.FailoverCluster` node can run with
  (everything but its paths, ports and addresses);
* :func:`render_haproxy` and :class:`Haproxy` -- the example haproxy.cfg
  pointed at the lab's servers and run, with a stats socket;
* :class:`Gunicorn` and :class:`Load` -- real gunicorn sync workers, and
  threads that keep requesting pages and record every answer.
"""

from __future__ import annotations

import http.client
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import TenureError
from .etcd import LocalEtcd, Member, etcd_binary, free_ports
from .wait import wait_for

# Keys of an example sidecar file that describe the node's place, not how tenure behaves there.
_LOCAL_TOP = {"service", "member", "listen"}
_LOCAL_PG = {"data_dir", "port", "host", "bin_dir", "user", "dbname", "run_as", "socket_dir", "advertise_dsn"}


def start_etcd_from_configs(texts: list[str], timeout: float = 30.0) -> LocalEtcd:
    """Start one etcd member per example config file text (YAML), on free loopback ports; wait until healthy."""
    import yaml

    workdir = tempfile.mkdtemp(prefix="tenure-ol-etcd-")
    configs = [yaml.safe_load(t) for t in texts]
    ports = free_ports(2 * len(configs))
    members = [Member(str(c["name"]), ports[2 * i], ports[2 * i + 1], os.path.join(workdir, str(c["name"])))
               for i, c in enumerate(configs)]
    cluster = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in members)
    etcd = LocalEtcd(size=len(members), members=members, workdir=workdir)
    try:
        for c, m in zip(configs, members):
            c.update({"data-dir": m.data_dir, "listen-client-urls": m.url, "advertise-client-urls": m.url,
                      "listen-peer-urls": f"http://127.0.0.1:{m.peer_port}",
                      "initial-advertise-peer-urls": f"http://127.0.0.1:{m.peer_port}",
                      "initial-cluster": cluster, "unsafe-no-fsync": True})
            path = os.path.join(workdir, f"{m.name}.yml")
            with open(path, "w") as f:
                yaml.safe_dump(c, f)
            with open(os.path.join(workdir, f"{m.name}.log"), "ab") as log:
                m.proc = subprocess.Popen([etcd_binary(), "--config-file", path], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        etcd.wait_healthy(timeout)
    except BaseException:
        etcd.stop()
        raise
    return etcd


def local_sidecar_settings(text: str) -> dict[str, Any]:
    """What of an example sidecar TOML a lab node runs with: top-level and ``[postgres]`` behaviour settings."""
    data = tomllib.loads(text)
    top = {k: v for k, v in data.items() if k not in _LOCAL_TOP and k not in ("etcd", "postgres")}
    top["postgres"] = {k: v for k, v in data.get("postgres", {}).items() if k not in _LOCAL_PG}
    return top


@dataclass(frozen=True)
class Target:
    """Where one server of the example haproxy.cfg is in the lab."""

    host: str
    port: int  # PostgreSQL
    check_port: int  # its sidecar's HTTP endpoints


def render_haproxy(text: str, servers: Mapping[str, Target], binds: Mapping[str, int], stats_socket: str) -> str:
    """The example haproxy.cfg with each ``server NAME[-any]`` line and listener ``bind`` made local.

    ``binds`` maps listener names to local ports. Every server and listener
    of the file must be mapped (KeyError otherwise): a config the test did
    not fully point at the lab would quietly test something else.
    """
    out, section = [], None
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in ("listen", "backend", "frontend", "global", "defaults"):
            section = words[1] if len(words) > 1 else words[0]
        elif words[:1] == ["bind"]:
            line = f"    bind 127.0.0.1:{binds[section]}"
        elif words[:1] == ["server"]:
            name = words[1]
            t = servers[name[:-4] if name.endswith("-any") else name]
            rest = " ".join(words[3:])
            rest = re.sub(r"\bport \d+", f"port {t.check_port}", rest)
            line = f"    server {name} {t.host}:{t.port} {rest}"
        elif words[:2] == ["stats", "socket"]:
            line = f"    stats socket {stats_socket} mode 600 level admin"
        out.append(line)
    return "\n".join(out) + "\n"


class Haproxy:
    """``haproxy -db -f CFG`` as a child process; :meth:`states` reads its stats socket."""

    def __init__(self, config: str, workdir: str) -> None:
        self.workdir = workdir
        self.path = os.path.join(workdir, "haproxy.cfg")
        self.log_path = os.path.join(workdir, "haproxy.log")
        with open(self.path, "w") as f:
            f.write(config)
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        check = subprocess.run([binary, "-c", "-f", self.path], capture_output=True, text=True)
        if check.returncode != 0:
            raise TenureError(f"haproxy rejects the config: {check.stdout}{check.stderr}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([binary, "-db", "-f", self.path], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        m = re.search(r"stats socket (\S+)", config)
        self.socket = m.group(1) if m else None
        if self.socket is not None:
            wait_for(lambda: os.path.exists(self.socket or "") or self.proc.poll() is not None, 10,
                       "haproxy's stats socket")
            if self.proc.poll() is not None:
                raise TenureError(f"haproxy exited at start; see {self.log_path}")

    def states(self) -> dict[tuple[str, str], str]:
        """``{(proxy, server): "UP" | "DOWN" | "MAINT" | ...}`` from ``show stat``."""
        if self.socket is None:
            raise TenureError("no stats socket in the config")
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(self.socket)
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        out = {}
        for row in lines[1:]:
            if not row:
                continue
            rec = dict(zip(header, row.split(",")))
            if rec.get("svname") not in ("FRONTEND", "BACKEND"):
                out[(rec["pxname"], rec["svname"])] = rec.get("status", "")
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


class Gunicorn:
    """``gunicorn -w N APP`` (sync workers) on a free port, as its own process group."""

    def __init__(self, app: str, chdir: str, env: Mapping[str, str], log_path: str, workers: int = 3,
                 timeout: int = 30) -> None:
        self.port = free_ports(1)[0]
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-w", str(workers), "-k", "sync", "-b", f"127.0.0.1:{self.port}",
                 "--chdir", chdir, "--timeout", str(timeout), "--graceful-timeout", "3", "--log-level", "warning",
                 app],
                env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def worker_pids(self) -> set[int]:
        """The pids of the master's children now (a restarted worker shows up as a new pid)."""
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return {int(p) for p in f.read().split()}
        except OSError:
            return set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-8000:]


@dataclass
class Result:
    """One request as the load generator saw it (monotonic times; status 0: no answer)."""

    app: str
    method: str
    path: str
    start: float
    end: float
    status: int
    body: bytes
    retry_after: str | None = None
    error: str | None = None


def request(port: int, method: str, path: str, timeout: float = 5.0) -> tuple[int, bytes, str | None]:
    """One HTTP request to 127.0.0.1:port: ``(status, body, Retry-After)``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("Retry-After")
    finally:
        conn.close()


class Load:
    """One thread per ``(app, port, method, path)`` stream, each requesting in a loop, every answer recorded.

    A path containing ``{id}`` gets a fresh integer each time.
    """

    def __init__(self, streams: list[tuple[str, int, str, str]], *, interval: float = 0.01,
                 timeout: float = 5.0, first_id: int = 1_000_000) -> None:
        self.results: list[Result] = []
        self.timeout = timeout
        self.interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ids = itertools.count(first_id)
        self._threads = [threading.Thread(target=self._run, args=s, daemon=True) for s in streams]
        for t in self._threads:
            t.start()

    def _run(self, app: str, port: int, method: str, path: str) -> None:
        while not self._stop.is_set():
            p = path.format(id=next(self._ids)) if "{id}" in path else path
            start = time.monotonic()
            try:
                status, body, retry = request(port, method, p, self.timeout)
                r = Result(app, method, path, start, time.monotonic(), status, body, retry)
            except Exception as e:  # noqa: BLE001 -- a timeout or a reset is a result to report
                r = Result(app, method, path, start, time.monotonic(), 0, b"", None, repr(e))
            with self._lock:
                self.results.append(r)
            self._stop.wait(self.interval)

    def snapshot(self) -> list[Result]:
        with self._lock:
            return list(self.results)

    def finish(self) -> list[Result]:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        return self.snapshot()


# -- the whole setup: example configs on a lab cluster, both phases' apps --------------------------

PHASES = ("phase1", "phase2")


class OpenLibraryLab:
    """etcd from the example member files, a 3-node PostgreSQL cluster whose sidecars run with the example
    settings, the example haproxy.cfg, and the example web.py app under gunicorn for each phase.

    Example host ``ol-db0``, ``ol-db1``, ``ol-db3`` (in that order) is lab node n1, n2, n3.
    """

    def __init__(self, examples: str, *, workers: int = 3, service: str = "db",
                 env: Mapping[str, str] | None = None) -> None:
        extra_env = dict(env or {})
        import yaml

        from .cluster import APP_DB, FailoverCluster

        self.examples = examples
        self.workdir = tempfile.mkdtemp(prefix="tenure-ol-")
        self.etcd: LocalEtcd | None = None
        self.cluster: FailoverCluster | None = None
        self.haproxy: Haproxy | None = None
        self.apps: dict[str, Gunicorn] = {}
        try:
            etcd_files = sorted(os.listdir(os.path.join(examples, "etcd")))
            self.etcd = start_etcd_from_configs([self._read("etcd", f) for f in etcd_files])
            self.hosts = ["ol-db0", "ol-db1", "ol-db3"]
            per_node = {f"n{i + 1}": local_sidecar_settings(self._read(f"sidecar-{h}.toml"))
                        for i, h in enumerate(self.hosts)}
            self.cluster = FailoverCluster(self.etcd, service, size=3, per_node=per_node)
            self.cluster.wait_primary(60)
            nodes = {h: self.cluster.pg.nodes[i] for i, h in enumerate(self.hosts)}
            servers = {h: Target("127.0.0.1", n.port, self.cluster.sidecar(n.name).http_port)
                       for h, n in nodes.items()}
            self.binds = dict(zip(("ol_db_primary", "ol_db_replicas"), free_ports(2)))
            cfg = render_haproxy(self._read("haproxy.cfg"), servers, self.binds,
                                 os.path.join(self.workdir, "haproxy.sock"))
            self.haproxy = Haproxy(cfg, self.workdir)
            self.ports = {n.port: n.name for n in self.cluster.pg.nodes}  # PostgreSQL port -> lab member

            local_db = {"database": APP_DB, "user": "postgres"}
            p1 = yaml.safe_load(self._read("openlibrary.phase1.yml"))
            p1["db_parameters"].update(local_db, host="127.0.0.1", port=self.binds["ol_db_primary"])
            p1["read_db_parameters"].update(local_db, host="127.0.0.1", port=self.binds["ol_db_replicas"])
            p2 = yaml.safe_load(self._read("openlibrary.phase2.yml"))
            p2["db_parameters"].update(local_db)
            p2["tenure"]["etcd"]["endpoints"] = list(self.etcd.endpoints)
            self.configs = {"phase1": p1, "phase2": p2}
            src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            for phase, conf in self.configs.items():
                path = os.path.join(self.workdir, f"openlibrary.{phase}.yml")
                with open(path, "w") as f:
                    yaml.safe_dump(conf, f)
                app_env = {"OL_CONFIG": path, **extra_env,
                           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
                self.apps[phase] = Gunicorn("olapp:application", examples, app_env,
                                            os.path.join(self.workdir, f"gunicorn-{phase}.log"), workers=workers)
        except BaseException:
            self.stop()
            raise

    def _read(self, *parts: str) -> str:
        with open(os.path.join(self.examples, *parts)) as f:
            return f.read()

    def member_of_port(self, port: int | None) -> str | None:
        return self.ports.get(port) if port is not None else None

    def warm(self, timeout: float = 60.0) -> None:
        """Wait until every app answers a GET and a POST with 200."""
        ids = itertools.count(1)

        def ok(port: int, method: str, path: str) -> bool:
            try:
                return request(port, method, path)[0] == 200
            except OSError:
                return False

        for phase, g in self.apps.items():
            wait_for(lambda: ok(g.port, "GET", "/"), timeout, f"{phase}: GET / 200")
            wait_for(lambda: ok(g.port, "POST", f"/items?id={next(ids)}"), timeout, f"{phase}: POST 200")

    def logs(self) -> str:
        out = [self.cluster.logs()] if self.cluster is not None else []
        for phase, g in self.apps.items():
            out.append(f"----- gunicorn {phase}\n{g.log()}")
        if self.haproxy is not None:
            with open(self.haproxy.log_path, errors="replace") as f:
                out.append(f"----- haproxy\n{f.read()[-3000:]}")
        return "\n".join(out)

    def stop(self) -> None:
        for g in self.apps.values():
            g.stop()
        if self.haproxy is not None:
            self.haproxy.stop()
        if self.cluster is not None:
            self.cluster.stop()
        if self.etcd is not None:
            self.etcd.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def streams(lab: OpenLibraryLab) -> list[tuple[str, int, str, str]]:
    """The load of the scenario: per app two GET / streams, writes, logins; phase 2 also GET /recent."""
    out = []
    for phase, g in lab.apps.items():
        out += [(phase, g.port, "GET", "/"), (phase, g.port, "GET", "/"), (phase, g.port, "POST", "/items?id={id}"),
                (phase, g.port, "POST", "/account/login")]
        if phase == "phase2":
            out.append((phase, g.port, "GET", "/recent"))
    return out


def served_by(lab: OpenLibraryLab, r: Result) -> str | None:
    """The lab member whose PostgreSQL served a 200 answer (from the port it reports)."""
    import json

    if r.status != 200:
        return None
    try:
        return lab.member_of_port(json.loads(r.body).get("port"))
    except ValueError:
        return None


@dataclass
class Event:
    """A fault and what followed: ``old`` primary, ``new`` primary, monotonic time of the fault."""

    kind: str  # "crash" | "switchover"
    at: float
    old: str
    new: str
    published: float  # when the new primary's record was seen in etcd (polled every 10 ms)


def run_faults(lab: OpenLibraryLab, load: Load, kinds: tuple[str, ...] = ("crash", "switchover"),
               settle: float = 1.0, timeout: float = 60.0) -> list[Event]:
    """Under ``load``: for each kind, hurt the primary (kill -9 of sidecar and postmaster, or SIGTERM of its
    sidecar: a clean handover), wait for the next primary and until every app has written there, then
    ``settle`` s more."""
    from ..members import read_members

    cluster = lab.cluster
    assert cluster is not None
    events = []
    for kind in kinds:
        old = cluster.wait_primary(timeout)["member"]
        live = [s.node.name for s in cluster.sidecars if s.proc is not None and s.proc.poll() is None]

        def whole() -> bool:
            # Every live standby streams from the primary again: only then is a standby eligible.
            recs = read_members(cluster.client, cluster.service)
            return all(m in recs and recs[m].healthy and (m == old or recs[m].streaming) for m in live)

        wait_for(whole, timeout, "every live standby streaming from the primary")
        at = time.monotonic()
        if kind == "crash":
            cluster.sidecar(old).kill_with_postgres()
        else:
            cluster.sidecar(old).signal(signal.SIGTERM)
        new = cluster.wait_primary(timeout, not_member=old)["member"]
        published = time.monotonic()
        for phase in lab.apps:
            wait_for(lambda: any(r.app == phase and r.method == "POST" and r.path.startswith("/items")
                                   and r.start > at and served_by(lab, r) == new for r in load.snapshot()),
                       timeout, f"{phase}: a write on {new} after the {kind}")
        end = time.monotonic() + settle
        wait_for(lambda: time.monotonic() > end, settle + 1, "settling")
        events.append(Event(kind, at, old, new, published))
    return events


def first_write(lab: OpenLibraryLab, results: list[Result], app: str, ev: Event) -> float:
    """When this app's first write acknowledged by the new primary after ``ev`` came back."""
    return min(r.end for r in results if r.app == app and r.path.startswith("/items") and r.status == 200
               and r.start >= ev.at and served_by(lab, r) == ev.new)


def post_gap(lab: OpenLibraryLab, results: list[Result], app: str, ev: Event) -> float:
    """Seconds from the last write the old primary acknowledged to the first the new one did (this app)."""
    writes = [r for r in results if r.app == app and r.path.startswith("/items") and r.status == 200]
    first_new = min(r.end for r in writes if served_by(lab, r) == ev.new and r.start >= ev.at)
    last_old = max((r.end for r in writes if served_by(lab, r) == ev.old and r.end <= first_new), default=ev.at)
    return first_new - last_old
