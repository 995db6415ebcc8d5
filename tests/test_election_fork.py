"""A leadership inherited by a forked child is not a leadership there; resign is bounded when etcd is unreachable."""

from __future__ import annotations

import os
import time

import tenure
from tenure.errors import UsedAfterFork
from tenure.lab.etcd import LocalEtcd


def test_forked_child_does_not_lead(client: tenure.Client, service: str) -> None:
    election = tenure.Election(client, service, member="a", ttl=2)
    leadership = election.campaign(10)
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, then leave without running the parent's cleanup
            out = []
            out.append("valid" if leadership.is_valid() else "invalid")
            for fn in (leadership.check, lambda: election.campaign(1)):
                try:
                    fn()
                    out.append("no error")
                except UsedAfterFork:
                    out.append("UsedAfterFork")
                except BaseException as e:
                    out.append(type(e).__name__)
            os.write(w, ",".join(out).encode())
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        assert os.read(r, 1000).decode() == "invalid,UsedAfterFork,UsedAfterFork"
        assert leadership.is_valid(), "the parent still leads"
    finally:
        leadership.resign()


def test_resign_with_etcd_unreachable_is_bounded_by_the_ttl(service: str) -> None:
    cluster = LocalEtcd(size=1, proxied=True).start()
    try:
        client = tenure.connect(cluster.endpoints)
        leadership = tenure.Election(client, service, member="a", ttl=2).campaign(10)
        cluster.cut_clients(0)
        t = time.monotonic()
        leadership.resign()
        took = time.monotonic() - t
        assert not leadership.is_valid()
        assert took <= leadership.ttl + 1.5, f"resign took {took:.2f} s"
        client.close()
    finally:
        cluster.stop()
