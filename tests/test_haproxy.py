"""The shipped examples/haproxy.cfg, run by a real haproxy in front of the lab cluster, through a switchover."""

from __future__ import annotations

import os
import threading
import time
from typing import Iterator

import psycopg
import pytest

from tenure import operations
from tenure.lab.cluster import FailoverCluster
from tenure.lab.etcd import LocalEtcd
from tenure.lab.haproxy import LocalHaproxy
from tenure.lab.load import DirectWriter, lost_writes
from tenure.members import read_members

from support import wait_for

CONFIG = os.path.join(os.path.dirname(__file__), "..", "examples", "haproxy.cfg")


@pytest.fixture(scope="module")
def lab(etcd: LocalEtcd) -> Iterator[tuple[FailoverCluster, LocalHaproxy]]:
    cluster = FailoverCluster(etcd, "hadb")
    servers = {f"db{i + 1}": (s.node.port, s.http_port) for i, s in enumerate(cluster.sidecars)}
    with open(CONFIG) as f:
        proxy = LocalHaproxy(f.read(), servers, [5000, 5001]).start()
    yield cluster, proxy
    proxy.stop()
    cluster.stop()


def dsn(proxy: LocalHaproxy, port: int) -> str:
    return f"host=127.0.0.1 port={proxy.port(port)} user=postgres dbname=app"


def can_read(d: str) -> bool:
    try:
        with psycopg.connect(d, autocommit=True, connect_timeout=2) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.Error:
        return False


def test_shipped_config_switchover_gap_and_one_server_up(lab: tuple[FailoverCluster, LocalHaproxy]) -> None:
    cluster, proxy = lab
    first = cluster.wait_primary(30)
    member_to_server = {s.node.name: f"db{i + 1}" for i, s in enumerate(cluster.sidecars)}
    wait_for(lambda: proxy.up("postgres_primary") == [member_to_server[first["member"]]], 20,
             "haproxy's write backend on the primary alone")
    wait_for(lambda: len(proxy.up("postgres_replicas")) == 2, 20, "two replicas in the read pool")
    wait_for(lambda: sum(1 for m in read_members(cluster.client, "hadb").values() if m.eligible) == 3, 20,
             "both standbys eligible")

    seen_write: list[list[str]] = []
    seen_read: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            state = proxy.servers()
            seen_write.append(sorted(n for n, s in state["postgres_primary"].items() if s.startswith("UP")))
            seen_read.append(sum(1 for b in ("postgres_replicas", "postgres_readable")
                                 for s in state[b].values() if s.startswith("UP")))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    writer = DirectWriter(dsn(proxy, 5000), interval=0.01)
    try:
        wait_for(lambda: len(writer.accepted) > 20, 20, "writes through haproxy")
        t_switch = time.monotonic()
        result = operations.switchover(cluster.client, "hadb", timeout=10)
        new_server = member_to_server[result["to"]]
        wait_for(lambda: writer.accepted and writer.accepted[-1] > t_switch + result["seconds"] + 0.5, 20,
                 "writes through haproxy after the switchover")
        # The just-promoted primary leaves the read pool within a second.
        wait_for(lambda: new_server not in proxy.up("postgres_replicas"), 1.5, "the new primary out of the read pool")
        wait_for(lambda: can_read(dsn(proxy, 5001)), 3, "a read through the read listener")
    finally:
        writer.stop()
        stop.set()
        watcher.join(5)
    gap = writer.gap_around(t_switch)
    print(f"haproxy write gap {gap:.3f} s (switchover {result['seconds']:.3f} s)")
    assert max(len(s) for s in seen_write) <= 1, "two servers UP in the write backend"
    assert min(seen_read) >= 1, "the read listener had no server"
    assert proxy.up("postgres_primary") == [new_server]
    # haproxy adds at most about one check interval (500 ms) and one connect timeout (300 ms) to the handover.
    assert gap < result["seconds"] + 1.0, f"write gap through haproxy {gap:.2f} s, handover {result['seconds']:.2f} s"
    assert lost_writes(cluster.primary()["dsn"], writer.acked) == []
