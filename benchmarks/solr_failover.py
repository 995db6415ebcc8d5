"""Solr leader death -> first update accepted by the new leader; updater death -> next updater's first checkpoint.

    nice PYTHONPATH=src python benchmarks/solr_failover.py --rounds 3

Each round: a fresh local 3-member etcd is shared; 3 Solr doubles with a sidecar process each (ttl 2 s,
grace 0.3 s, poll 0.2 s); a writer posts one document with a commit every 100 ms to router.solr(...).leader. The leader's
Solr and sidecar are killed together (kill -9); the figure is kill -> first post accepted by another core.
Then two examples/solr_updater.py processes (ttl 2 s); the running one is killed -9; the figure is kill ->
the other's first checkpoint in etcd.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE / "tests"))

import tenure  # noqa: E402
from tenure.errors import ServiceError  # noqa: E402
from tenure.lab.etcd import LocalEtcd  # noqa: E402
from tenure.lab.solr import LocalSolr  # noqa: E402
from tenure.services.solr import SolrNode  # noqa: E402
from tenure.singleton import read_checkpoint  # noqa: E402

from test_singleton import Updater, append  # noqa: E402
from test_solr_failover import _sidecar  # noqa: E402


def solr_round(etcd: LocalEtcd, n: int) -> float:
    service = f"bench-solr-{os.getpid()}-{n}"
    workdir = tempfile.mkdtemp()
    solrs = [LocalSolr("search").start() for _ in range(3)]
    sidecars = [_sidecar(workdir, etcd, service, f"s{i}", s) for i, s in enumerate(solrs)]
    client = tenure.connect(etcd.endpoints)
    router = tenure.Router(client)
    view = router.solr(service)
    accepted: list[tuple[float, str]] = []
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            url = view.leader
            if url:
                try:
                    SolrNode.from_url(url, timeout=0.5).add([{"id": f"w{i}"}])
                    accepted.append((time.monotonic(), url))
                except ServiceError:
                    pass
                i += 1
            stop.wait(0.1)

    try:
        deadline = time.monotonic() + 30
        while view.leader is None and time.monotonic() < deadline:
            time.sleep(0.05)
        old = view.leader
        time.sleep(3)  # followers in sync
        t = threading.Thread(target=write, daemon=True)
        t.start()
        time.sleep(0.5)
        i = next(k for k, s in enumerate(solrs) if s.url == old)
        killed = time.monotonic()
        os.killpg(sidecars[i].pid, signal.SIGKILL)
        solrs[i].kill()
        while time.monotonic() < killed + 30:
            after = [a for a in accepted if a[0] > killed and a[1] != old]
            if after:
                return after[0][0] - killed
            time.sleep(0.01)
        raise TimeoutError("no new leader")
    finally:
        stop.set()
        router.close()
        client.close()
        for p in sidecars:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for s in solrs:
            s.stop()


def updater_round(etcd: LocalEtcd, n: int) -> float:
    service = f"bench-upd-{os.getpid()}-{n}"
    workdir = tempfile.mkdtemp()
    solr = LocalSolr("updates").start()
    client = tenure.connect(etcd.endpoints)
    log = os.path.join(workdir, "changes.jsonl")
    append(log, 0, 10, service)
    a = Updater(workdir, etcd.endpoints, service, "a", log, solr.url)
    b = None
    try:
        while (r := read_checkpoint(client, service, "offset")) is None or r.value != 10:
            time.sleep(0.02)
        b = Updater(workdir, etcd.endpoints, service, "b", log, solr.url)
        time.sleep(2)
        stop = threading.Event()

        def feed() -> None:
            k = 10
            while not stop.is_set():
                append(log, k, 1, service)
                k += 1
                stop.wait(0.02)

        threading.Thread(target=feed, daemon=True).start()
        killed = time.monotonic()
        os.killpg(a.proc.pid, signal.SIGKILL)
        while time.monotonic() < killed + 30:
            r = read_checkpoint(client, service, "offset")
            if r is not None and r.member == "b":
                stop.set()
                return time.monotonic() - killed
            time.sleep(0.01)
        raise TimeoutError("b never checkpointed")
    finally:
        a.stop()
        if b is not None:
            b.stop()
        solr.stop()
        client.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    etcd = LocalEtcd(size=3).start()
    try:
        solr_t = [solr_round(etcd, i) for i in range(args.rounds)]
        upd_t = [updater_round(etcd, i) for i in range(args.rounds)]
    finally:
        etcd.stop()
    print("settings: ttl 2 s, grace 0.3 s, follower poll 0.2 s, writer posts (with a commit) every 100 ms, 3 Solr doubles, 3-member etcd")
    print(f"solr leader kill -9 -> first update on new leader: {['%.2f' % t for t in solr_t]} s, "
          f"median {statistics.median(solr_t):.2f} s")
    print(f"updater kill -9 -> next updater's first checkpoint: {['%.2f' % t for t in upd_t]} s, "
          f"median {statistics.median(upd_t):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
