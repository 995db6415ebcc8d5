"""Planned switchovers under continuous write load: through the router, and through haproxy with the shipped config.

A local 3-member etcd, a PostgreSQL 15 primary with two streaming standbys,
one ``tenure sidecar`` process per node (ttl 2 s), and the load:

* router: two writer threads and one reader through ``Router.postgres()``
  (writes held up to 2 s while there is no primary), one request every
  10 ms each. Per round: ``tenure switchover`` to the best standby. Figures:
  failed requests (must be 0), the longest time a request waited,
  acknowledged writes missing on the final primary (must be 0), switchover
  time (request to new primary published) and no-primary time.
* haproxy: one client writing through ``examples/haproxy.cfg`` (rendered
  for the lab's ports), reconnecting after an error. Figure: the write gap,
  the longest time between two acknowledged writes around each switchover.

Every round starts from a primary with two eligible, streaming standbys.

    .venv/bin/python benchmarks/switchover.py [--rounds 10] [--haproxy-rounds 10]

Run as root on a machine with /usr/lib/postgresql/15/bin and haproxy. The
machine's load shows in the figures: run it alone, with ``nice`` if shared.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from tenure import operations
from tenure.errors import WaitTimeout
from tenure.lab.cluster import FailoverCluster
from tenure.lab.etcd import LocalEtcd
from tenure.lab.haproxy import LocalHaproxy
from tenure.lab.load import DirectWriter, RouterLoad, lost_writes, streaming_standbys
from tenure.members import read_members
from tenure.web import Router

SERVICE = "bench"
LOGS = "/tmp/tenure-switchover-bench-sidecars.log"
CONFIG = os.path.join(os.path.dirname(__file__), "..", "examples", "haproxy.cfg")


def settle(cluster: FailoverCluster, timeout: float = 120) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        p = cluster.primary()
        ms = read_members(cluster.client, SERVICE)
        if (p and len(ms) == 3 and all(m.eligible and (m.leader or (m.streaming and m.healthy)) for m in ms.values())
                and len(streaming_standbys(p["dsn"])) == 2):
            return p
        time.sleep(0.05)
    raise TimeoutError("the cluster did not settle")


def spread(xs: list[float]) -> str:
    return f"min {min(xs):.3f} / median {statistics.median(xs):.3f} / max {max(xs):.3f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--haproxy-rounds", type=int, default=10)
    args = ap.parse_args()
    print(f"python {platform.python_version()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}; "
          f"ttl 2 s, hold 2 s, rounds {args.rounds} + {args.haproxy_rounds}")
    etcd = LocalEtcd(size=3).start()
    cluster = FailoverCluster(etcd, SERVICE)
    proxy = None
    try:
        settle(cluster)
        router = Router(etcd.endpoints)
        provider = router.postgres(SERVICE)
        load = RouterLoad(provider, writers=2, readers=1, interval=0.01)
        times, gaps, timeouts = [], [], 0
        for i in range(args.rounds):
            settle(cluster)
            try:
                r = operations.switchover(cluster.client, SERVICE, timeout=10)
            except WaitTimeout as e:
                timeouts += 1
                print(f"  router round {i + 1}: {e}")
                with open(LOGS, "a") as f:
                    f.write(cluster.logs())
                continue
            times.append(r["seconds"])
            gaps.append(r["gap"])
            print(f"  router round {i + 1}: {r['from']} -> {r['to']} in {r['seconds']:.3f} s "
                  f"(no primary {r['gap']:.3f} s)")
        settle(cluster)
        time.sleep(0.5)
        score = load.stop()
        provider.close()
        router.close()
        lost = lost_writes(cluster.primary()["dsn"], score.acked)
        print(f"router: {args.rounds} switchovers, {score.writes} writes + {score.reads} reads; "
              f"failed requests {score.writes_failed + score.reads_failed} "
              f"(writes {score.writes_failed}, reads {score.reads_failed}); writes held {score.writes_held}; "
              f"longest wait {score.longest_wait:.3f} s; acknowledged writes lost {len(lost)}")
        print(f"router: switchover time {spread(times)}; no-primary time {spread(gaps)}; "
              f"timed out (left as it was) {timeouts}" + (f" (sidecar logs in {LOGS})" if timeouts else ""))
        for e in score.errors[:5]:
            print(f"  error: {e}")

        servers = {f"db{i + 1}": (s.node.port, s.http_port) for i, s in enumerate(cluster.sidecars)}
        with open(CONFIG) as f:
            proxy = LocalHaproxy(f.read(), servers, [5000, 5001]).start()
        dsn = f"host=127.0.0.1 port={proxy.port(5000)} user=postgres dbname=app"
        hgaps, hswitch = [], []
        for i in range(args.haproxy_rounds):
            settle(cluster)
            writer = DirectWriter(dsn, interval=0.01, start_id=3_000_000 + 100_000 * i)
            while len(writer.accepted) < 20:
                time.sleep(0.01)
            t = time.monotonic()
            try:
                r = operations.switchover(cluster.client, SERVICE, timeout=10)
            except WaitTimeout as e:
                writer.stop()
                print(f"  haproxy round {i + 1}: {e}")
                continue
            time.sleep(max(0.0, t + r["seconds"] + 1.5 - time.monotonic()))
            writer.stop()
            gap = writer.gap_around(t)
            hgaps.append(gap)
            hswitch.append(r["seconds"])
            print(f"  haproxy round {i + 1}: {r['from']} -> {r['to']} in {r['seconds']:.3f} s; write gap {gap:.3f} s")
        if hgaps:
            print(f"haproxy (examples/haproxy.cfg): write gap {spread(hgaps)}; switchover {spread(hswitch)}")
    finally:
        if proxy is not None:
            proxy.stop()
        cluster.stop()
        etcd.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
