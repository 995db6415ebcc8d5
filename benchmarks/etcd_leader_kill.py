"""What a tenure leadership does when etcd's own leader is killed.

For each ttl, round after round: elect a tenure leader (one candidate and two
rivals, each with its own client, in this process), SIGKILL etcd's raft
leader, and watch for 3 x ttl whether the tenure leadership survives. If it
is lost, report when (relative to the kill) and how long until a new tenure
leader. Then restart the etcd member and wait until the cluster is healthy.

    .venv/bin/python benchmarks/etcd_leader_kill.py [--rounds 10] [--ttls 2,5]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import threading
import time

import tenure
from tenure.lab.etcd import LocalEtcd


def one_round(cluster: LocalEtcd, service: str, ttl: int) -> dict[str, float | bool | None]:
    clients = [tenure.connect(cluster.endpoints) for _ in range(3)]
    elections = [tenure.Election(c, service, member=f"m{i}", ttl=ttl) for i, c in enumerate(clients)]
    leadership = elections[0].campaign(timeout=30)
    won: list[tuple[float, tenure.Leadership]] = []
    stop = threading.Event()

    def rival(e: tenure.Election) -> None:
        while not stop.is_set():
            try:
                leadership = e.campaign(timeout=0.5)
                won.append((time.monotonic(), leadership))
                return
            except tenure.errors.TenureError:
                pass

    rivals = [threading.Thread(target=rival, args=(e,), daemon=True) for e in elections[1:]]
    for r in rivals:
        r.start()
    lost_at: list[float] = []
    leadership.on_lost(lambda _: lost_at.append(time.monotonic()))
    time.sleep(random.uniform(0, ttl / 3))  # a random point of the keepalive cycle
    t_kill = time.monotonic()
    cluster.kill(cluster.leader_index())
    survived = not leadership.lost.wait(3 * ttl)
    new_leader_after = None
    if not survived:
        end = time.monotonic() + 6 * ttl + 10
        while not won and time.monotonic() < end:
            time.sleep(0.01)
        new_leader_after = won[0][0] - t_kill if won else None
    stop.set()
    for r in rivals:
        r.join(5)
    for _, l in won:
        l.resign()
    leadership.resign()
    for e, c in zip(elections, clients):
        e.close()
        c.close()
    return {"survived": survived, "lost_after": (lost_at[0] - t_kill) if lost_at else None,
            "new_leader_after": new_leader_after}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--ttls", default="2,5")
    args = p.parse_args()
    cluster = LocalEtcd(size=3).start()
    try:
        version = tenure.connect(cluster.endpoints).status()["version"]
        print(f"etcd {version}, 3 members on loopback, heartbeat {cluster.heartbeat_ms} ms, "
              f"election timeout {cluster.election_timeout_ms} ms; Python {platform.python_version()}")
        for ttl in (int(t) for t in args.ttls.split(",")):
            results = []
            for i in range(args.rounds):
                results.append(one_round(cluster, f"ttl{ttl}-r{i}", ttl))
                for m in range(cluster.size):
                    cluster.restart(m)
                cluster.wait_healthy(60)
            kept = sum(1 for r in results if r["survived"])
            print(f"\nttl {ttl} s (margin {max(0.2, ttl / 10):.1f} s), {args.rounds} kills of etcd's leader: "
                  f"tenure leadership survived {kept}/{args.rounds}")
            lost = [r for r in results if not r["survived"]]
            if lost:
                la = [r["lost_after"] for r in lost if r["lost_after"] is not None]
                na = [r["new_leader_after"] for r in lost if r["new_leader_after"] is not None]
                print(f"  when lost: leadership ended {min(la):.2f}-{max(la):.2f} s after the kill "
                      f"(median {statistics.median(la):.2f}); next tenure leader "
                      f"{min(na):.2f}-{max(na):.2f} s after the kill (median {statistics.median(na):.2f})"
                      if la and na else f"  when lost: {lost}")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
