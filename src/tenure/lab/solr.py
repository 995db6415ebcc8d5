"""A small HTTP double of one Solr core, for tests and benchmarks where Solr itself cannot be installed.

It speaks the part of Solr's HTTP API that :class:`tenure.services.solr.SolrNode`
uses, and behaves as the Solr Reference Guide describes it:

* Ping (``/solr/<core>/admin/ping``): "Ping" page of the Deployment Guide,
  https://solr.apache.org/guide/solr/latest/deployment-guide/ping.html
* Updates (``/solr/<core>/update``, JSON: a list of documents, or an object
  with ``add``/``delete``/``commit``; ``?commit=true``): "Indexing with Update
  Handlers", https://solr.apache.org/guide/solr/latest/indexing-guide/indexing-with-update-handlers.html
  -- added documents become visible to ``select`` only at a commit, and each
  commit that changed the index advances the index generation by one (Lucene's
  ``segments_N``) and sets a new index version (the commit's time in ms).
* Real-time get (``/solr/<core>/get?id=``) sees uncommitted documents:
  https://solr.apache.org/guide/solr/latest/configuration-guide/realtime-get.html;
  ``/select?q=id:X`` (or ``*:*``) sees committed ones only.
* The ReplicationHandler (``/solr/<core>/replication?command=``), "User-Managed
  Index Replication", https://solr.apache.org/guide/solr/latest/deployment-guide/user-managed-index-replication.html:
  ``indexversion`` (0/0 while replication is disabled on this leader),
  ``details`` (``isLeader``, ``isFollower``, ``indexVersion``, ``generation``,
  a ``leader`` section with ``replicationEnabled`` and a ``follower`` section
  with ``leaderUrl``, ``isPollingDisabled``, ``indexReplicatedAt``,
  ``replicationFailedAt``, ``timesIndexReplicated``, ``timesFailed``),
  ``fetchindex`` (an explicit fetch from the configured leader or from the
  ``leaderUrl`` -- or Solr 8's ``masterUrl`` -- parameter, asynchronous
  unless ``wait=true``; it does not change the leader the poller uses),
  ``enablepoll``/``disablepoll`` (the follower's own poller, every
  ``pollInterval``), ``enablereplication``/``disablereplication`` (whether
  followers may copy this leader's index).
* A fetch copies the leader's committed index whole when its version differs
  from the follower's (so documents written to a follower are overwritten at
  its next replication), and the follower then has the leader's version and
  generation. The index-file transfer itself (``filelist``/``filecontent``) is
  not modelled: the double copies documents through a private command.

A double starts as a *repeater* (leader and follower sections both enabled,
replication enabled), the configuration that lets a sidecar switch roles at
run time, unless told otherwise. Its committed index is kept in
``data_dir/index.json``, so a restart after kill -9 keeps what was committed.
Run one per process: ``python -m tenure.lab.solr --port P --data-dir D``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .etcd import free_ports


def java_date(ts: float) -> str:
    """``ts`` as Java's ``Date.toString()`` prints it in UTC (how Solr reports replication times)."""
    return time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime(ts))


class Core:
    """One core's index and replication state; thread-safe."""

    def __init__(self, name: str, data_dir: str, *, leader: bool = True, follower: bool = True,
                 leader_url: str | None = None, poll_interval: float = 60.0, polling: bool = True,
                 replication: bool = True) -> None:
        self.name = name
        self.data_dir = data_dir
        self.leader_enabled = leader
        self.follower_enabled = follower
        self.leader_url = leader_url  # the configured leader the poller uses
        self.poll_interval = poll_interval
        self.polling = polling
        self.replication_enabled = replication and leader
        self.lock = threading.RLock()
        self.docs: dict[str, dict[str, Any]] = {}
        self.pending: dict[str, dict[str, Any] | None] = {}  # id -> doc, or None for a delete
        self.generation = 0
        self.version = 0
        self.replicated_at: float | None = None
        self.failed_at: float | None = None
        self.times_replicated = 0
        self.times_failed = 0
        self.last_fetch_url: str | None = None
        self.updates = 0  # documents accepted through /update (a witness for tests)
        self._load()

    # -- persistence ----------------------------------------------------------

    def _path(self) -> str:
        return os.path.join(self.data_dir, "index.json")

    def _load(self) -> None:
        try:
            with open(self._path()) as f:
                d = json.load(f)
        except FileNotFoundError:
            return
        self.docs, self.generation, self.version = d["docs"], d["generation"], d["version"]

    def _save(self) -> None:
        tmp = self._path() + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"docs": self.docs, "generation": self.generation, "version": self.version}, f)
        os.replace(tmp, self._path())

    # -- updates --------------------------------------------------------------

    def update(self, body: Any, commit: bool) -> None:
        with self.lock:
            if isinstance(body, list):
                adds, deletes, commit_cmd = body, [], False
            elif isinstance(body, dict):
                add = body.get("add", [])
                adds = [a.get("doc", a) for a in (add if isinstance(add, list) else [add])]
                dl = body.get("delete", [])
                deletes = dl if isinstance(dl, list) else [dl]
                commit_cmd = "commit" in body
            else:
                raise ValueError("expected a JSON list of documents or an object of update commands")
            for doc in adds:
                if not isinstance(doc, dict) or "id" not in doc:
                    raise ValueError("Document is missing mandatory uniqueKey field: id")
                self.pending[str(doc["id"])] = doc
                self.updates += 1
            for d in deletes:
                self.pending[str(d.get("id") if isinstance(d, dict) else d)] = None
            if commit or commit_cmd:
                self.commit()

    def commit(self) -> None:
        with self.lock:
            if not self.pending:
                return  # an empty commit leaves the index (and its generation) as it was
            for key, doc in self.pending.items():
                if doc is None:
                    self.docs.pop(key, None)
                else:
                    self.docs[key] = doc
            self.pending.clear()
            self.generation += 1
            self.version = max(int(time.time() * 1000), self.version + 1)
            self._save()

    def get(self, key: str) -> dict[str, Any] | None:
        with self.lock:
            if key in self.pending:
                return self.pending[key]
            return self.docs.get(key)

    # -- replication ----------------------------------------------------------

    def index_version(self) -> tuple[int, int]:
        with self.lock:
            if not self.replication_enabled:
                return 0, 0
            return self.version, self.generation

    def snapshot(self) -> dict[str, Any] | None:
        with self.lock:
            if not self.replication_enabled:
                return None
            return {"docs": dict(self.docs), "generation": self.generation, "version": self.version}

    def fetch(self, leader_url: str) -> bool:
        """One fetch from the leader at ``leader_url``; True if the index is now the leader's."""
        with self.lock:
            self.last_fetch_url = leader_url
        try:
            with urllib.request.urlopen(f"{leader_url}/replication?command=indexversion&wt=json", timeout=2) as r:
                iv = json.loads(r.read())
            version, generation = int(iv["indexversion"]), int(iv["generation"])
            if version == 0:
                return False  # the leader has nothing to replicate (or replication is disabled there)
            with self.lock:
                if version == self.version and generation == self.generation:
                    return True  # already in sync
            with urllib.request.urlopen(f"{leader_url}/replication?command=x-double-copy&wt=json", timeout=5) as r:
                snap = json.loads(r.read())["index"]
            if snap is None:
                return False
        except (OSError, ValueError, KeyError, TypeError):
            with self.lock:
                self.failed_at = time.time()
                self.times_failed += 1
            return False
        with self.lock:
            self.docs, self.generation, self.version = snap["docs"], snap["generation"], snap["version"]
            self.pending.clear()
            self.replicated_at = time.time()
            self.times_replicated += 1
            self._save()
        return True

    def details(self) -> dict[str, Any]:
        with self.lock:
            d: dict[str, Any] = {
                "indexSize": f"{len(json.dumps(self.docs))} bytes", "indexPath": self.data_dir,
                "commits": [], "isLeader": str(self.leader_enabled).lower(),
                "isFollower": str(self.follower_enabled).lower(),
                "indexVersion": self.version, "generation": self.generation,
            }
            if self.leader_enabled:
                d["leader"] = {"replicateAfter": ["commit", "startup"],
                               "replicationEnabled": str(self.replication_enabled).lower(),
                               "replicableVersion": self.version, "replicableGeneration": self.generation}
            url = self.last_fetch_url or self.leader_url
            if self.follower_enabled or self.last_fetch_url:
                f: dict[str, Any] = {
                    "leaderUrl": url, "pollInterval": _interval(self.poll_interval),
                    "isPollingDisabled": str(not self.polling).lower(), "isReplicating": "false",
                    "timesIndexReplicated": str(self.times_replicated), "timesFailed": str(self.times_failed),
                    "currentDate": java_date(time.time()),
                }
                if self.replicated_at is not None:
                    f["indexReplicatedAt"] = java_date(self.replicated_at)
                    f["indexReplicatedAtList"] = [java_date(self.replicated_at)]
                if self.failed_at is not None:
                    f["replicationFailedAt"] = java_date(self.failed_at)
                    f["replicationFailedAtList"] = [java_date(self.failed_at)]
                d["follower"] = f
            return d

    def poll_forever(self, stop: threading.Event) -> None:
        while not stop.wait(self.poll_interval):
            with self.lock:
                url = self.leader_url if (self.follower_enabled and self.polling) else None
            if url:
                self.fetch(url)


def _interval(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _true(v: str | None) -> bool:
    return (v or "").lower() in ("true", "on", "yes", "1")


def handler_for(core: Core) -> type[BaseHTTPRequestHandler]:
    prefix = f"/solr/{core.name}/"

    class Handler(BaseHTTPRequestHandler):
        server_version = "solr-double"
        protocol_version = "HTTP/1.1"

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = (json.dumps(body) + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json;charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _ok(self, **fields: Any) -> None:
            self._send(200, {"responseHeader": {"status": 0, "QTime": 0}, **fields})

        def _error(self, code: int, msg: str) -> None:
            self._send(code, {"responseHeader": {"status": code, "QTime": 0}, "error": {"msg": msg, "code": code}})

        def _route(self, body: bytes | None) -> None:
            url = urllib.parse.urlsplit(self.path)
            q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
            if not url.path.startswith(prefix):
                # Jetty's answer for a core that does not exist.
                return self._error(404, f"Not Found: {url.path}")
            path = url.path[len(prefix):].rstrip("/")
            if path == "admin/ping":
                return self._ok(status="OK")
            if path in ("update", "update/json", "update/json/docs"):
                try:
                    core.update(json.loads(body or b"[]"), _true(q.get("commit")))
                except ValueError as e:
                    return self._error(400, str(e))
                return self._ok()
            if path == "get":
                return self._ok(doc=core.get(q.get("id", "")))
            if path == "select":
                query = q.get("q", "*:*")
                with core.lock:
                    if query == "*:*":
                        docs = list(core.docs.values())
                    elif query.startswith("id:"):
                        key = query[3:].strip('"')
                        docs = [core.docs[key]] if key in core.docs else []
                    else:
                        return self._error(400, f"the double only answers q=*:* and q=id:X, not {query!r}")
                rows = int(q.get("rows", "10"))
                return self._ok(response={"numFound": len(docs), "start": 0, "docs": docs[:rows]})
            if path == "replication":
                return self._replication(q)
            return self._error(404, f"Not Found: {url.path}")

        def _replication(self, q: dict[str, str]) -> None:
            cmd = q.get("command")
            if cmd == "indexversion":
                version, generation = core.index_version()
                return self._ok(indexversion=version, generation=generation)
            if cmd == "details":
                return self._ok(details=core.details())
            if cmd == "x-double-copy":
                return self._ok(index=core.snapshot())
            if cmd == "fetchindex":
                url = q.get("leaderUrl") or q.get("masterUrl")
                if url is None:
                    with core.lock:
                        url = core.leader_url if core.follower_enabled else None
                if url is None:
                    return self._ok(status="ERROR", message="No follower configured or no 'leaderUrl' specified")
                if _true(q.get("wait")):
                    core.fetch(url)
                else:
                    threading.Thread(target=core.fetch, args=(url,), daemon=True).start()
                return self._ok(status="OK")
            with core.lock:
                if cmd == "enablepoll":
                    core.polling = True
                elif cmd == "disablepoll":
                    core.polling = False
                elif cmd == "enablereplication":
                    if not core.leader_enabled:
                        return self._ok(status="ERROR", message="not a leader")
                    core.replication_enabled = True
                elif cmd == "disablereplication":
                    core.replication_enabled = False
                else:
                    return self._ok(status="OK", message="No command")
            return self._ok(status="OK")

        def do_GET(self) -> None:  # noqa: N802
            self._route(None)

        def do_POST(self) -> None:  # noqa: N802
            n = int(self.headers.get("Content-Length") or 0)
            self._route(self.rfile.read(n) if n else b"")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def serve(core: Core, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve ``core`` on a daemon thread (and run its poller); ``.shutdown()`` stops it."""
    server = ThreadingHTTPServer((host, port), handler_for(core))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="solr-double", daemon=True).start()
    stop = threading.Event()
    threading.Thread(target=core.poll_forever, args=(stop,), name="solr-double-poll", daemon=True).start()
    return server


class LocalSolr:
    """One double in its own process on a free port; ``kill()`` is SIGKILL, ``start()`` again keeps the index."""

    def __init__(self, core: str = "openlibrary", *, port: int | None = None, leader_url: str | None = None,
                 poll_interval: float = 60.0, replication: bool = True) -> None:
        self.core = core
        self.port = port or free_ports(1)[0]
        self.data_dir = tempfile.mkdtemp(prefix="tenure-solr-")
        self.leader_url = leader_url
        self.poll_interval = poll_interval
        self.replication = replication
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The core's base URL (what Solr calls the leader URL)."""
        return f"http://127.0.0.1:{self.port}/solr/{self.core}"

    def start(self, timeout: float = 10.0) -> "LocalSolr":
        cmd = [sys.executable, "-m", "tenure.lab.solr", "--port", str(self.port), "--core", self.core,
               "--data-dir", self.data_dir, "--poll-interval", str(self.poll_interval)]
        if self.leader_url:
            cmd += ["--leader-url", self.leader_url]
        if not self.replication:
            cmd.append("--replication-disabled")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/admin/ping?wt=json", timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Solr double on port {self.port} did not start") from None
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tenure.lab.solr", description="an HTTP double of one Solr core")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--core", default="openlibrary")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--leader-url", help="the leader the follower's poller uses")
    p.add_argument("--poll-interval", type=float, default=60.0)
    p.add_argument("--replication-disabled", action="store_true", help="start with replication disabled")
    args = p.parse_args(argv)
    core = Core(args.core, args.data_dir, leader_url=args.leader_url, poll_interval=args.poll_interval,
                replication=not args.replication_disabled)
    serve(core, args.port, args.host)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    sys.exit(main())
