"""PostgreSQL failover time with tenure sidecars: crash and clean shutdown.

A local 3-member etcd, a PostgreSQL 15 primary with two streaming standbys,
and one ``tenure sidecar`` process per node (ttl 2 s). Each round either
kills the primary's sidecar and postmaster together with SIGKILL (a crash),
or sends the primary's sidecar SIGTERM (a clean shutdown: it fences the
server, resigns and stops it). The figure is the time from the signal to the
first INSERT accepted by the new primary, found through the primary record
the sidecars publish in etcd. The old node's sidecar is then restarted and
must rejoin as a standby before the next round, so every round starts from
three healthy nodes.

    .venv/bin/python benchmarks/postgres_failover.py [--rounds 10] [--clean-rounds 10]

Run as root (PostgreSQL runs as the postgres user) on a machine with
/usr/lib/postgresql/15/bin.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import statistics
import sys
import time

import psycopg

import tenure
from tenure.lab.cluster import FailoverCluster
from tenure.lab.etcd import LocalEtcd


def try_write(dsn: str, row_id: int) -> bool:
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
            conn.execute("SET statement_timeout = 1000")
            conn.execute("INSERT INTO items VALUES (%s, 'bench', 0)", (row_id,))
        return True
    except psycopg.Error:
        return False


def first_write_after(cluster: FailoverCluster, old: str, start_id: int, timeout: float) -> float:
    """Poll the published primary and write to it; the monotonic time of the first accepted write."""
    end = time.monotonic() + timeout
    row = start_id
    while time.monotonic() < end:
        p = cluster.primary()
        if p is not None and p["member"] != old:
            if try_write(p["dsn"], row):
                return time.monotonic()
            row += 1
        time.sleep(0.005)
    raise TimeoutError(f"no write accepted by a new primary within {timeout} s")


def wait_healthy(cluster: FailoverCluster, timeout: float) -> None:
    """Until a primary is published and both other nodes stream as standbys."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        p = cluster.primary()
        if p is not None:
            others = [s for s in cluster.sidecars if s.node.name != p["member"]]
            if all(s.http("/replica")[0] == 200 for s in others):
                return
        time.sleep(0.1)
    raise TimeoutError(f"cluster not back to one primary and two streaming standbys within {timeout} s")


def one_round(cluster: FailoverCluster, how: str, row: int) -> float:
    wait_healthy(cluster, 90)
    time.sleep(random.uniform(0, 2 / 3))  # a random point of the keepalive cycle
    p = cluster.primary()
    assert p is not None
    old = cluster.sidecar(p["member"])
    t0 = time.monotonic()
    if how == "crash":
        old.kill_with_postgres()
    else:
        old.signal(signal.SIGTERM)
    t1 = first_write_after(cluster, p["member"], row, 30)
    if old.proc is not None:
        old.proc.wait(30)
    old.start()  # the old node's sidecar comes back and must rejoin by itself
    return t1 - t0


def summary(name: str, xs: list[float]) -> str:
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(round(0.99 * len(xs) + 0.5)) - 1)]
    return f"{name:<34} n={len(xs):<3} min {xs[0]:.3f}  median {statistics.median(xs):.3f}  p99* {p99:.3f} s"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clean-rounds", type=int, default=10)
    args = ap.parse_args()
    etcd = LocalEtcd(size=3).start()
    cluster = None
    try:
        cluster = FailoverCluster(etcd, "bench-db")
        version = tenure.connect(etcd.endpoints).status()["version"]
        with psycopg.connect(cluster.pg.nodes[0].dsn) as conn:
            pg_version = conn.execute("SHOW server_version").fetchone()[0]
        print("tenure PostgreSQL failover benchmark")
        print(f"  etcd {version}: 3 members on loopback, heartbeat {etcd.heartbeat_ms} ms, "
              f"election timeout {etcd.election_timeout_ms} ms")
        print(f"  PostgreSQL {pg_version}: primary + 2 async streaming standbys, fsync off, on loopback")
        print("  sidecar: ttl 2 s, margin 0.2 s, tick 0.25 s, grace 0.3 s per rank, guard on schema public")
        print(f"  Python {platform.python_version()}, {os.cpu_count()} cores")
        results: dict[str, list[float]] = {"crash": [], "clean": []}
        row = 1_000_000
        for how, n in (("crash", args.rounds), ("clean", args.clean_rounds)):
            for i in range(n):
                row += 1000
                took = one_round(cluster, how, row)
                results[how].append(took)
                print(f"  {how} round {i + 1}: {took:.3f} s", flush=True)
        print()
        if results["crash"]:
            print(summary("kill -9 sidecar+postmaster -> write", results["crash"]))
        if results["clean"]:
            print(summary("SIGTERM sidecar -> write", results["clean"]))
        print("* p99 is nearest-rank: with fewer than 100 samples it is the maximum")
        return 0
    except Exception:
        if cluster is not None:
            print(cluster.logs(), file=sys.stderr)
        raise
    finally:
        if cluster is not None:
            cluster.stop()
        etcd.stop()


if __name__ == "__main__":
    sys.exit(main())
