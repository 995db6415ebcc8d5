"""The router follows real elections and primary records, fails safe when etcd is out of sight, survives fork."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any, Iterator

import psycopg
import pytest

import tenure
from tenure.errors import ConfigError, ReadOnly
from tenure.lab.etcd import LocalEtcd, free_ports
from tenure.members import MemberPublisher
from tenure.errors import PrimaryUnavailable, UnknownService, WaitTimeout
from tenure.web import Endpoint, Router, ServiceView

from support import LocalPostgres, wait_for


def publish_primary(client: tenure.Client, service: str, member: str, dsn: str, *,
                    ttl: int = 2) -> tenure.Leadership:
    """Win the election for ``service`` as ``member`` and publish ``dsn`` as its primary, bound to the term."""
    leadership = tenure.Election(client, service, member=member, ttl=ttl, value={"dsn": dsn, "zone": "z1"}).campaign(10)
    leadership.put(f"svc/{service}/primary", json.dumps({"member": member, "dsn": dsn, "token": leadership.token}),
                   ephemeral=True)
    return leadership


class Changes:
    """Records what on_change callbacks were called with."""

    def __init__(self, view: ServiceView) -> None:
        self.seen: list[tuple[float, Endpoint | None, bool]] = []
        self.lock = threading.Lock()
        view.on_change(self)

    def __call__(self, view: ServiceView) -> None:
        with self.lock:
            self.seen.append((time.monotonic(), view.primary, view.read_only))

    def tokens(self) -> list[int | None]:
        with self.lock:
            return [p.token if p else None for _, p, _ in self.seen]


def test_view_follows_elections_primary_records_and_members(client: tenure.Client, service: str) -> None:
    router = Router(client)
    try:
        view = router.service(service)
        assert router.service(service) is view  # a cached object: lookups are a dict get
        changes = Changes(view)
        a = publish_primary(client, service, "a", "host=a")
        p = view.wait_for_primary(10)
        assert p == Endpoint("a", "host=a", a.token, "z1") and not view.read_only and view.reason is None

        standbys = [MemberPublisher(client, service, m, ttl=2) for m in ("b", "c")]
        standbys[0].publish({"member": "b", "dsn": "host=b", "role": "standby", "healthy": True, "streaming": True})
        standbys[1].publish({"member": "c", "dsn": "host=c", "role": "standby", "healthy": True, "streaming": False})
        wait_for(lambda: set(view.members) == {"b", "c"}, 5, "both member records")
        assert [r.member for r in view.replicas] == ["b"], "only the streaming standby is a replica"

        # Resigning deletes the leader key first: the primary stops counting at once.
        t = time.monotonic()
        a.resign()
        wait_for(lambda: view.read_only, 2, "read-only once the term ended")
        print(f"resign -> read-only in {1000 * (time.monotonic() - t):.1f} ms")
        assert view.primary is None and view.last_primary in (None, p)
        assert "no primary" in (view.reason or "")
        assert [r.member for r in view.replicas] == ["b"], "reads keep their replicas while read-only"

        # A primary record whose term is not the current leader's is not believed.
        client.put(f"svc/{service}/primary", json.dumps({"member": "x", "dsn": "host=x", "token": a.token}))
        b = publish_primary(client, service, "b", "host=b")
        p2 = wait_for(lambda: view.primary, 5, "the new primary")
        assert p2.member == "b" and p2.token == b.token > a.token
        assert [r.member for r in view.replicas] == [], "the primary is not its own replica"
        wait_for(lambda: changes.tokens()[-1:] == [b.token], 2, "on_change with the new primary")
        assert a.token in changes.tokens() and None in changes.tokens()
        b.resign()
        for s in standbys:
            s.close()
    finally:
        router.close()


@pytest.fixture
def own_etcd() -> Iterator[LocalEtcd]:
    """An etcd cluster for this test alone, so that freezing it hurts nobody else."""
    cluster = LocalEtcd(size=3).start()
    yield cluster
    for m in cluster.members:
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGCONT)
    cluster.stop()


def test_read_only_within_stale_after_when_etcd_is_out_of_sight_then_recovers(own_etcd: LocalEtcd) -> None:
    stale_after = 1.5
    client = tenure.connect(own_etcd.endpoints)
    router = Router(own_etcd.endpoints, stale_after=stale_after)
    try:
        # A long lease, so that the term outlives the freeze and only the router's sight is tested.
        term = publish_primary(client, "db", "a", "host=a", ttl=30)
        MemberPublisher(client, "db", "b", ttl=30).publish(
            {"member": "b", "dsn": "host=b", "role": "standby", "healthy": True, "streaming": True})
        view = router.service("db")
        view.wait_for_primary(10)
        wait_for(lambda: view.replicas, 5, "a replica")
        changes = Changes(view)

        # 1. Every member frozen (SIGSTOP): connections stay open, nothing answers.
        for m in own_etcd.members:
            assert m.proc is not None
            m.proc.send_signal(signal.SIGSTOP)
        t_cut = time.monotonic()
        wait_for(lambda: view.read_only, stale_after + 1, "read-only after the freeze")
        frozen_after = time.monotonic() - t_cut
        assert frozen_after <= stale_after + 0.2
        assert "not heard from" in (view.reason or "")
        assert view.replicas and view.last_primary is not None, "reads keep working from what was last seen"
        wait_for(lambda: any(ro for _, _, ro in changes.seen), 1, "on_change told of read-only")
        for m in own_etcd.members:
            m.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        t_back = time.monotonic()
        wait_for(lambda: not view.read_only, 15, "writable again once etcd answers")
        thawed_after = time.monotonic() - t_back
        assert view.primary is not None and view.primary.token == term.token

        # 2. Every member killed: connections refused (the watch keeps retrying, and must still go stale).
        for i in range(3):
            own_etcd.kill(i)
        t_cut = time.monotonic()
        wait_for(lambda: view.read_only, stale_after + 1, "read-only after etcd died")
        killed_after = time.monotonic() - t_cut
        assert killed_after <= stale_after + 0.2
        hold = time.monotonic() + 1.0
        while time.monotonic() < hold:  # and stays read-only while etcd is down, retries and all
            assert view.read_only
            time.sleep(0.02)
        for i in range(3):
            own_etcd.restart(i)
        t_back = time.monotonic()
        wait_for(lambda: not view.read_only, 30, "writable again after etcd restarted")
        restarted_after = time.monotonic() - t_back
        print(f"stale_after={stale_after} s: read-only {frozen_after:.2f} s after SIGSTOP of all etcd members, "
              f"writable {thawed_after:.2f} s after SIGCONT; read-only {killed_after:.2f} s after kill -9 of all, "
              f"writable {restarted_after:.2f} s after restart")
    finally:
        router.close()
        client.close()


def test_router_made_before_fork_works_in_the_child(client: tenure.Client, service: str) -> None:
    used = Router(client)  # used in the parent before the fork (its watch runs here)
    unused = Router(client.endpoints[0].url)  # built but never read, like a gunicorn master's
    first = publish_primary(client, service, "a", "host=a")
    assert used.service(service).wait_for_primary(10).token == first.token
    parent_watch = used.service(service)._watch
    go = os.pipe()
    out = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            os.close(go[1])
            os.close(out[0])
            lines = []
            for router in (used, unused):
                v = router.service(service)
                p = v.wait_for_primary(10)
                lines.append(f"{p.token} {v._watch is not parent_watch} {v._watch is not None}")
            os.write(out[1], ("\n".join(lines) + "\n").encode())
            lines = []
            os.read(go[0], 1)  # the parent has changed the primary
            for router in (used, unused):
                v = router.service(service)
                deadline = time.monotonic() + 10
                while (v.primary is None or v.primary.token == first.token) and time.monotonic() < deadline:
                    time.sleep(0.01)
                lines.append(str(v.primary.token if v.primary else None))
            os.write(out[1], ("\n".join(lines) + "\n").encode())
            code = 0
        except BaseException as e:  # noqa: BLE001 -- report anything to the parent
            os.write(out[1], f"error {e!r}\n".encode())
        finally:
            os._exit(code)
    os.close(go[0])
    os.close(out[1])
    try:
        data = b""
        while data.count(b"\n") < 2:  # the child's first view, before anything changes
            chunk = os.read(out[0], 4096)
            if not chunk:
                break
            data += chunk
        first.resign()
        second = publish_primary(client, service, "b", "host=b")
        os.write(go[1], b"x")
        while True:  # the pipe closes when the child exits (its own deadlines bound this)
            chunk = os.read(out[0], 4096)
            if not chunk:
                break
            data += chunk
        _, status = os.waitpid(pid, 0)
        lines = data.decode().split("\n")
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, data.decode()
        assert lines[:2] == [f"{first.token} True True"] * 2, "the child made its own watches"
        assert lines[2:4] == [str(second.token)] * 2, "the child followed a change made after the fork"
        assert used.service(service).wait_for_primary(5).token == second.token, "the parent's router still works"
        second.resign()
    finally:
        os.close(go[1])
        os.close(out[0])
        used.close()
        unused.close()


def test_bad_input_and_use_before_the_first_snapshot(client: tenure.Client, service: str, etcd: LocalEtcd,
                                                     tmp_path: Any) -> None:
    for bad in ("nonsense", "", "ftp://x:1", ["http://127.0.0.1"]):
        with pytest.raises(ConfigError, match="endpoint"):
            Router(bad)
    with pytest.raises(ConfigError, match="tenure.Client or etcd endpoints"):
        Router(12345)  # type: ignore[arg-type]
    for bad_bound in (0.5, 0, -1, "3", True):
        with pytest.raises(ConfigError, match="stale_after"):
            Router(etcd.endpoints, stale_after=bad_bound)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown section"):
        Router.from_config({"etcd": {"endpoints": etcd.endpoints}, "db": {}})
    with pytest.raises(ConfigError, match="unknown key"):
        Router.from_config({"etcd": {"endpoints": etcd.endpoints, "ttl": 2}})
    with pytest.raises(ConfigError, match="cannot read"):
        Router.from_config("/nonexistent/router.toml")

    with pytest.raises(ConfigError, match="namespace"):
        Router(etcd.endpoints, namespace="/")
    toml = tmp_path / "router.toml"
    toml.write_text(f'[etcd]\nendpoints = {json.dumps(etcd.endpoints)}\nnamespace = "/other"\n')
    assert Router.from_config(str(toml)).namespace == "/other"
    toml.write_text("[etcd\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Router.from_config(str(toml))

    router = Router.from_config({"etcd": {"endpoints": etcd.endpoints}, "router": {"stale_after": 2.5}})
    try:
        assert router.stale_after == 2.5
        for name in ("bad name", "", "a/b", None, 7):
            with pytest.raises(ConfigError, match="invalid service name"):
                router.service(name)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="callable"):
            router.service(service).on_change("not a function")  # type: ignore[arg-type]

        # A well-formed name nobody registered: read-only, and a clear error from a wait or a write.
        ghost = router.service(f"{service}-typo")
        assert ghost.read_only and ghost.primary is None
        assert ghost.ready(5)
        assert ghost.exists is False and "no keys" in (ghost.reason or "")
        t = time.monotonic()
        with pytest.raises(UnknownService, match="is the name"):
            ghost.wait_for_primary(0.5)
        assert time.monotonic() - t < 2
        with pytest.raises(UnknownService):
            with router.postgres(f"{service}-typo").write():
                pass
        # Known (it has keys) but no primary: a timeout that says why, and ReadOnly from a write.
        MemberPublisher(client, service, "b", ttl=2).publish({"member": "b", "role": "standby"})
        known = router.service(service)
        wait_for(lambda: known.exists, 5, "the member record")
        with pytest.raises(WaitTimeout, match="has no primary"):
            known.wait_for_primary(0.3)
        with pytest.raises(ReadOnly, match="read-only"):
            with router.postgres(service).write():
                pass
    finally:
        router.close()

    # Before its first snapshot (here: etcd unreachable) a router is read-only, and says so.
    nowhere = Router(f"http://127.0.0.1:{free_ports(1)[0]}", stale_after=2)
    try:
        view = nowhere.service("db")
        assert view.read_only and view.primary is None and view.exists is None
        assert "no view" in (view.reason or "")
        assert not view.ready(0.3) and not nowhere.ready(0.1)
        with pytest.raises(WaitTimeout, match="no view"):
            view.wait_for_primary(0.3)
        with pytest.raises(ReadOnly):
            with nowhere.postgres("db").write():
                pass
    finally:
        nowhere.close()


def test_postgres_provider_follows_the_primary_and_closes_a_deposed_ones_connections(
        client: tenure.Client, service: str, postgres: LocalPostgres) -> None:
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS router_t (id bigint PRIMARY KEY, token bigint)")
    router = Router(client)
    try:
        provider = router.postgres(service, timeout=1.0)
        assert router.postgres(service) is provider
        first = publish_primary(client, service, "n1", postgres.dsn)
        router.service(service).wait_for_primary(10)
        with provider.write() as conn:
            conn.execute("INSERT INTO router_t VALUES (1, %s)", (first.token,))
            old_conn = conn
        with provider.read() as conn:  # no replica: the primary serves reads
            assert conn.execute("SELECT token FROM router_t WHERE id = 1").fetchone() == (first.token,)
        old_pool = provider._write[2]  # type: ignore[index]

        first.resign()
        wait_for(lambda: router.service(service).read_only, 5, "read-only after the term ended")
        with pytest.raises(ReadOnly):
            with provider.write() as conn:
                pass
        # The same server comes back under a new term: the old term's connections are not reused.
        second = publish_primary(client, service, "n1", postgres.dsn)
        router.service(service).wait_for_primary(10)
        wait_for(lambda: old_pool.closed, 5, "the deposed term's pool closed")
        assert old_conn.closed, "an idle connection of the deposed term was closed"
        with provider.write() as conn:
            conn.execute("INSERT INTO router_t VALUES (2, %s)", (second.token,))
            assert conn is not old_conn
        # A primary that cannot be reached: ReadOnly (PrimaryUnavailable), fast the second time.
        second.resign()
        bad = publish_primary(client, service, "n9", f"host=127.0.0.1 port={free_ports(1)[0]} user=postgres")
        router.service(service).wait_for_primary(10)
        with pytest.raises(PrimaryUnavailable, match="no connection"):
            with provider.write():
                pass
        t = time.monotonic()
        with pytest.raises(PrimaryUnavailable, match="unreachable"):
            with provider.write():
                pass
        assert time.monotonic() - t < 0.1, "within the cooldown a dead primary fails fast"
        bad.resign()
    finally:
        router.close()
