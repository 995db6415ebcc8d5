"""Singleton jobs: one runs at a time, checkpoints are fenced, a failing post never advances the checkpoint.

The jobs are examples/solr_updater.py processes posting to a Solr double; the witnesses are the Solr
double's documents, the checkpoint record in etcd and the updaters' own timestamped logs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from tenure.errors import Fenced
from tenure.fencing import etcd_put
from tenure.lab.etcd import free_ports
from tenure.lab.solr import LocalSolr
from tenure.services.solr import SolrNode
from tenure.singleton import Job, read_checkpoint, singleton, singleton_job

from support import wait_for

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "solr_updater.py"


class Updater:
    def __init__(self, workdir: str, etcd_endpoints: list[str], job: str, member: str, log: str, solr_url: str):
        self.member = member
        self.log_path = os.path.join(workdir, f"{member}.log")
        cfg = os.path.join(workdir, f"{member}.toml")
        with open(cfg, "w") as f:
            f.write(f"[etcd]\nendpoints = {json.dumps(etcd_endpoints)}\n[updater]\njob = {json.dumps(job)}\n"
                    f"member = {json.dumps(member)}\nttl = 2\nlog = {json.dumps(log)}\nbatch = 5\n"
                    f"retries = 1\ntimeout = 0.5\ninterval = 0.05\nsolr_url = {json.dumps(solr_url)}\n")
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--config", cfg], stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="tenure-singleton-")
    yield d


@pytest.fixture(scope="module")
def solr() -> Iterator[LocalSolr]:
    s = LocalSolr("updates").start()
    yield s
    s.stop()


def append(log: str, start: int, n: int, tag: str) -> None:
    with open(log, "a") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"id": f"{tag}-{i}", "n": i}) + "\n")


def test_one_runs_kill9_and_the_other_resumes_from_the_fenced_checkpoint(etcd, client, service, workdir, solr):
    log = os.path.join(workdir, "changes.jsonl")
    append(log, 0, 40, service)
    a = Updater(workdir, etcd.endpoints, service, "a", log, solr.url)
    b = None
    try:
        wait_for(lambda: (r := read_checkpoint(client, service, "offset")) and r.value == 40, 20, "a to catch up")
        b = Updater(workdir, etcd.endpoints, service, "b", log, solr.url)
        wait_for(lambda: "b" in json.dumps(client.get_prefix(f"svc/{service}/candidates/")[0] and
                                           [kv.json() for kv in client.get_prefix(f"svc/{service}/candidates/")[0]]),
                 10, "b to campaign")
        append(log, 40, 20, service)
        wait_for(lambda: read_checkpoint(client, service, "offset").value == 60, 10, "a to post the new entries")
        first = read_checkpoint(client, service, "offset")
        assert first.member == "a" and "running as b" not in b.log()
        os.killpg(a.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        a.proc.wait(10)
        append(log, 60, 20, service)
        rec = wait_for(lambda: (r := read_checkpoint(client, service, "offset")) and r.member == "b" and r, 15,
                       "b to take over")
        took = time.monotonic() - killed
        assert rec.token > first.token
        wait_for(lambda: read_checkpoint(client, service, "offset").value == 80, 10, "b to finish")
        assert "running as b (term %d) from offset 60" % rec.token in b.log()  # resumed where a's fence left it
        node = SolrNode.from_url(solr.url)
        assert all(node.select_id(f"{service}-{i}") for i in range(80))
        assert took < 10
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_sigstop_beyond_the_ttl_stops_the_job_and_cannot_move_the_checkpoint(etcd, client, service, workdir, solr):
    log = os.path.join(workdir, "changes.jsonl")
    append(log, 0, 10, service)
    a = Updater(workdir, etcd.endpoints, service, "a", log, solr.url)
    b = None
    try:
        wait_for(lambda: (r := read_checkpoint(client, service, "offset")) and r.value == 10, 20, "a to catch up")
        b = Updater(workdir, etcd.endpoints, service, "b", log, solr.url)
        time.sleep(0.5)  # let b campaign
        os.killpg(a.proc.pid, signal.SIGSTOP)
        append(log, 10, 10, service)
        rec = wait_for(lambda: (r := read_checkpoint(client, service, "offset")) and r.member == "b" and r, 15,
                       "b to take over while a is frozen")
        wait_for(lambda: read_checkpoint(client, service, "offset").value == 20, 10, "b to post")
        os.killpg(a.proc.pid, signal.SIGCONT)
        # A post in flight at the freeze may run out its retries (3 x 2 s) before the refused checkpoint stops
        # the job, and the resign that follows is bounded by one ttl.
        assert a.proc.wait(30) == 0, a.log()
        after = read_checkpoint(client, service, "offset")
        assert after.member == "b" and after.token == rec.token and after.value == 20
        out = a.log()
        assert "stopped" in out, out
        # Nothing a wrote after the freeze was accepted: its last accepted checkpoint is the pre-freeze one.
        assert "checkpoint 20" not in out
    finally:
        a.stop()
        if b is not None:
            b.stop()


def test_a_failing_post_never_advances_the_checkpoint(etcd, client, service, workdir):
    port = free_ports(1)[0]
    down = LocalSolr("updates", port=port)
    log = os.path.join(workdir, "changes.jsonl")
    append(log, 0, 7, service)
    a = Updater(workdir, etcd.endpoints, service, "a", log, down.url)
    try:
        wait_for(lambda: a.log().count("failed after retries") >= 3, 20, "posts to fail")
        assert read_checkpoint(client, service, "offset") is None
        down.start()
        wait_for(lambda: (r := read_checkpoint(client, service, "offset")) and r.value == 7, 15,
                 "the checkpoint once Solr is back")
        node = SolrNode.from_url(down.url)
        assert all(node.select_id(f"{service}-{i}") for i in range(7))
    finally:
        a.stop()
        down.stop()


def test_a_deposed_token_is_fenced_by_etcd(client, service):
    with singleton(client, service, member="old") as job:
        job.checkpoint().save({"offset": 5})
        old = job.token
    with singleton(client, service, member="new") as job:
        job.checkpoint().save({"offset": 9})
        stale = Job(client, service, "old", old, lambda k, v: etcd_put(client, service, old, k, v), lambda: True)
        with pytest.raises(Fenced):
            with stale.checkpoint().covering({"offset": 7}):
                pass
        assert stale.stopped
        rec = read_checkpoint(client, service)
        assert rec.value == {"offset": 9} and rec.member == "new"


def test_covering_saves_only_after_success_and_the_decorator_resigns(client, service):
    @singleton_job(client, service, member="d1")
    def work(job: Job, fail: bool) -> int:
        cp = job.checkpoint()
        start = cp.get(default=0)
        with pytest.raises(RuntimeError):
            with cp.covering(start + 10):
                raise RuntimeError("post failed")
        assert cp.get() == (start or None) and not job.stopped
        with cp.covering(start + 1):
            pass
        return job.token

    t1 = work(False)
    t2 = work(False)
    assert t2 > t1
    assert read_checkpoint(client, service).value == 2
