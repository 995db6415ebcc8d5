"""The per-host agent (``tenure agent``) and the workers that read its view without gRPC."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

import tenure
from tenure.lab.etcd import LocalEtcd, free_ports
from tenure.web.agent_view import AgentRouter

from support import wait_for
from test_memcache import Pool, live

BOUND = 1.0  # the agent's heartbeat bound in these tests


def make_primary(client: tenure.Client, service: str, member: str) -> Any:
    term = tenure.Election(client, service, member=member, ttl=30, value={"dsn": f"host={member}"}).campaign(10)
    term.put(f"svc/{service}/primary", json.dumps({"member": member, "dsn": f"host={member}", "token": term.token}),
             ephemeral=True)
    return term


class AgentProc:
    """``tenure agent --config`` in its own process."""

    def __init__(self, etcd: LocalEtcd, services: list[str], workdir: Path) -> None:
        self.path = str(workdir / "agent.view")
        self.port = free_ports(1)[0]
        self.config = workdir / "agent.toml"
        self.config.write_text(textwrap.dedent(f"""\
            [etcd]
            endpoints = {json.dumps(etcd.endpoints)}
            [agent]
            services = {json.dumps(services)}
            path = "{self.path}"
            listen = "127.0.0.1:{self.port}"
            heartbeat_bound = {BOUND}
            """))
        self.log = open(workdir / "agent.log", "ab")
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tenure", "-v", "agent", "--config", str(self.config)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def get(self, path: str) -> tuple[int, bytes]:
        def once() -> tuple[int, bytes] | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()
            except OSError:
                return None  # not listening yet (it serves HTTP once its view file is written)

        return wait_for(once, 30, f"the agent to answer {path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def agent(etcd: LocalEtcd, service: str, tmp_path: Path) -> Iterator[AgentProc]:
    a = AgentProc(etcd, [service, f"{service}-cache"], tmp_path)
    yield a
    a.stop()
    a.log.close()


def test_workers_follow_the_agent_without_grpc_and_turn_read_only_when_it_stops(
        agent: AgentProc, client: tenure.Client, service: str) -> None:
    term = make_primary(client, service, "a")
    # A worker process: imports only the reader; no gRPC, no protobuf, no etcd client.
    worker = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""\
        import sys, json
        from tenure.web.agent_view import AgentRouter
        r = AgentRouter({agent.path!r})
        v = r.service({service!r})
        assert v.ready(30), v.reason
        p = v.wait_for_primary(10)
        print(json.dumps({{"primary": p.member, "token": p.token,
                          "grpc": any(m == "grpc" or m.startswith(("grpc.", "google.protobuf", "etcd3"))
                                      for m in sys.modules)}}))
        """)], capture_output=True, text=True, timeout=120)
    assert worker.returncode == 0, worker.stderr[-2000:]
    got = json.loads(worker.stdout)
    assert got == {"primary": "a", "token": term.token, "grpc": False}

    reader = AgentRouter(agent.path)
    view = reader.service(service)
    strict = AgentRouter(agent.path, heartbeat_bound=0.5).service(service)  # a worker's own, tighter bound
    assert view.ready(30) and view.wait_for_primary(10).member == "a"
    assert view.members == {} and view.replicas == () and view.exists is True
    changes: list[Any] = []
    view.on_change(lambda v: changes.append(v.last_primary))

    # A failover: seen at the next lookup.
    term.resign()
    wait_for(lambda: view.primary is None, 5, "the resign seen through the agent")
    term2 = make_primary(client, service, "b")
    p = wait_for(lambda: view.primary, 5, "the new primary seen through the agent")
    assert (p.member, p.token) == ("b", term2.token)
    assert any(c is not None and c.member == "b" for c in changes), "on_change called at a lookup"

    # The agent frozen: its beat stops; the worker is read-only within the bound, and back after.
    agent.proc.send_signal(signal.SIGSTOP)
    t = time.monotonic()
    wait_for(lambda: strict.primary is None, BOUND + 2, "read-only first where the bound is tighter")
    took_strict = time.monotonic() - t
    wait_for(lambda: view.primary is None, BOUND + 2, "read-only while the agent is frozen")
    took = time.monotonic() - t
    assert took_strict < took
    assert "agent has not written" in (view.reason or "")
    assert view.stale_for == float("inf")
    agent.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: view.primary is not None, 5, "writable again when the agent resumes")

    # The agent killed and restarted: it writes a new file; workers move to it.
    agent.proc.kill()
    agent.proc.wait(10)
    wait_for(lambda: view.primary is None, BOUND + 2, "read-only while there is no agent")
    agent.start()
    p = wait_for(lambda: view.primary, 30, "following the restarted agent")
    assert p.member == "b"
    print(f"agent frozen: workers read-only after {took:.2f} s (bound {BOUND} s; {took_strict:.2f} s with 0.5 s)")

    status, body = agent.get("/health")
    assert status == 503 or status == 200  # the cache service has no keys: not an error, it has no view yet
    detail = json.loads(body)
    assert detail[service]["primary"]["member"] == "b" and detail[service]["fresh"] is True
    status, metrics = agent.get("/metrics")
    text = metrics.decode()
    assert status == 200 and f'tenure_agent_primary_token{{service="{service}"}} {float(term2.token)}' in text
    assert f'tenure_agent_read_only{{service="{service}"}} 0.0' in text
    term2.resign()


def test_memcache_through_the_agent(etcd: LocalEtcd, client: tenure.Client, agent: AgentProc, service: str) -> None:
    cache = f"{service}-cache"
    pool = Pool(etcd, cache)
    try:
        reader = AgentRouter(agent.path)
        mc = reader.memcache(cache)
        wait_for(lambda: live(mc) == pool.addresses, 20, "the ring through the agent")
        assert mc.set("k", "v") and mc.get("k") == "v"
        assert mc.set_multi({"a": 1, "b": 2}) == [] and mc.get_multi(["a", "b"]) == {"a": 1, "b": 2}
        pool.stop_registrar(2)
        wait_for(lambda: pool.servers[2].address not in live(mc), 10, "a ring change through the agent")
        agent.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: mc.ring() is None, 5, "no cache use while the agent is frozen")
            assert mc.get("k") is None and mc.set("k", "w") is False
        finally:
            agent.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: mc.get("k") == "v", 5, "the cache back when the agent resumes")
    finally:
        pool.close()


def test_agent_bad_config(tmp_path: Path) -> None:
    cases = {
        "no agent section": '[etcd]\nendpoints = ["http://127.0.0.1:2379"]\n',
        "no services": '[etcd]\nendpoints = ["http://127.0.0.1:2379"]\n[agent]\nservices = []\n',
        "bad name": '[etcd]\nendpoints = ["http://127.0.0.1:2379"]\n[agent]\nservices = ["a b"]\n',
        "bad dir": '[etcd]\nendpoints = ["http://127.0.0.1:2379"]\n[agent]\nservices = ["db"]\n'
                   'path = "/nonexistent/x"\n',
        "unknown key": '[etcd]\nendpoints = ["http://127.0.0.1:2379"]\n[agent]\nservices = ["db"]\ncolour = 1\n',
        "bad endpoint": '[etcd]\nendpoints = ["nonsense"]\n[agent]\nservices = ["db"]\n',
    }
    for what, text in cases.items():
        f = tmp_path / "a.toml"
        f.write_text(text)
        out = subprocess.run([sys.executable, "-m", "tenure", "agent", "--config", str(f)], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "ConfigError" in out.stderr, (what, out)
    with pytest.raises(tenure.errors.ConfigError):
        AgentRouter("/x", heartbeat_bound=0)
    r = AgentRouter(str(tmp_path / "missing.view"))
    v = r.service("db")
    assert v.primary is None and not v.ready(0.05) and "no agent view" in (v.reason or "")
