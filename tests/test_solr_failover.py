"""Solr leader failover with real sidecar processes, Solr doubles and etcd; the router follows."""

from __future__ import annotations

import pytest

import json
import os
import signal
import subprocess
import sys
import tempfile

import tenure
from tenure.lab.etcd import free_ports
from tenure.lab.solr import LocalSolr
from tenure.services.solr import SolrNode

from support import wait_for


def _sidecar(workdir: str, etcd, service: str, member: str, solr: LocalSolr) -> subprocess.Popen:
    port = free_ports(1)[0]
    path = os.path.join(workdir, f"{member}.toml")
    with open(path, "w") as f:
        f.write(f'service = "{service}"\nmember = "{member}"\nttl = 2\ngrace = 1.0\nlisten = "127.0.0.1:{port}"\n'
                f"[etcd]\nendpoints = {json.dumps(etcd.endpoints)}\n"
                f'[solr]\nbase_url = "http://127.0.0.1:{solr.port}/solr"\ncore = "{solr.core}"\n'
                "poll_interval = 0.2\nmax_replication_age = 3.0\n")
    out = open(os.path.join(workdir, f"{member}.log"), "ab")
    return subprocess.Popen([sys.executable, "-m", "tenure.cli", "-v", "sidecar", "--config", path],
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.xfail(reason="known bug: a follower whose sidecar was frozen can win the rank over a more caught-up "
                          "one when the leader dies right after it thaws (its lag is judged against a stale "
                          "leader position); the promotion rule must compare the followers' own generations",
                   strict=False)
def test_leader_killed_most_caught_up_follower_leads_and_reads_skip_laggards(etcd, client, service):
    workdir = tempfile.mkdtemp(prefix="tenure-solrfo-")
    solrs = [LocalSolr("search").start() for _ in range(3)]
    # grace 1 s per better-placed member: the rank wait must outlast a busy machine's scheduling delays.
    sidecars = [_sidecar(workdir, etcd, service, f"s{i}", s) for i, s in enumerate(solrs)]
    router = tenure.Router(client)
    view = router.solr(service, max_lag=0)
    try:
        leader_url = wait_for(lambda: view.leader, 30, "a Solr leader")
        by_url = {s.url: (i, s) for i, s in enumerate(solrs)}
        li, lsolr = by_url[leader_url]
        leader = SolrNode.from_url(leader_url)
        for n in range(5):
            leader.add([{"id": f"d{n}"}])
        followers = [i for i in range(3) if i != li]
        wait_for(lambda: len(view.reads) == 2 and leader_url not in view.reads, 20, "both followers caught up")
        # One follower freezes: it lags, and reads stop going to it.
        lag_i = followers[0]
        os.killpg(sidecars[lag_i].pid, signal.SIGSTOP)
        for n in range(5, 8):
            leader.add([{"id": f"d{n}"}])
        wait_for(lambda: solrs[lag_i].url not in view.reads and view.reads, 10, "the lagging follower out of reads")
        # The leader's host dies: Solr and its sidecar.
        os.killpg(sidecars[li].pid, signal.SIGKILL)
        lsolr.kill()
        os.killpg(sidecars[lag_i].pid, signal.SIGCONT)
        new_url = wait_for(lambda: view.leader not in (None, leader_url) and view.leader, 30, "a new leader")
        assert new_url == solrs[followers[1]].url, "the most caught-up follower must win"
        new = SolrNode.from_url(new_url)
        assert new.select_id("d7") is not None
        new.add([{"id": "after"}])
        wait_for(lambda: SolrNode.from_url(solrs[lag_i].url).select_id("after"), 20,
                 "the other follower to replicate from the new leader")
        assert SolrNode.from_url(solrs[lag_i].url).details().leader_url == new_url
        # The old leader returns and becomes a follower of the new one.
        lsolr.start()
        sidecars[li] = _sidecar(workdir, etcd, service, f"s{li}", lsolr)
        wait_for(lambda: SolrNode.from_url(lsolr.url).select_id("after"), 30, "the old leader to follow")
        assert not SolrNode.from_url(lsolr.url).details().replication_enabled
        assert view.leader == new_url
    finally:
        router.close()
        for p in sidecars:
            try:
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)
        for s in solrs:
            s.stop()
