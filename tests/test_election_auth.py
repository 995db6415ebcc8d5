"""The election, its watches and leases against an etcd with TLS and user/password auth (short token TTL)."""

from __future__ import annotations

import threading
import time
from typing import Iterator

import pytest

import tenure
from tenure.errors import CampaignTimeout, PermissionDenied
from tenure.lab.etcd import LocalEtcd

from support import wait_for

TOKEN_TTL = 2


@pytest.fixture(scope="module")
def secured() -> Iterator[LocalEtcd]:
    cluster = LocalEtcd(size=3, tls=True, auth=True, auth_token_ttl=TOKEN_TTL).start()
    cluster.add_user("nobody", "nobody-pw")  # may log in, may touch no key
    cluster.add_user("half", "half-pw", readwrite="/tenure/svc/half/candidates/")  # may stand, may not lead
    yield cluster
    cluster.stop()


def live_leases(cluster: LocalEtcd) -> int:
    out = cluster.etcdctl("lease", "list")
    assert out.returncode == 0, out.stderr
    return sum(1 for line in out.stdout.splitlines() if line.strip() and "found" not in line)


def keepalive_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("tenure-keepalive"))


def test_refused_campaigns_leak_no_lease_or_thread(secured: LocalEtcd) -> None:
    client = tenure.connect(secured.endpoints, ca_cert=secured.certs.ca, user="nobody", password="nobody-pw")
    try:
        leases, threads = live_leases(secured), keepalive_threads()
        for _ in range(3):
            with pytest.raises(PermissionDenied):
                tenure.Election(client, "nope", member="m", ttl=2).campaign(timeout=2)
        assert keepalive_threads() == threads
        assert live_leases(secured) == leases
    finally:
        client.close()


def test_campaign_refused_the_leader_key_raises_at_once(secured: LocalEtcd, caplog: pytest.LogCaptureFixture) -> None:
    client = tenure.connect(secured.endpoints, ca_cert=secured.certs.ca, user="half", password="half-pw")
    try:
        leases, threads = live_leases(secured), keepalive_threads()
        t = time.monotonic()
        with pytest.raises(PermissionDenied):
            tenure.Election(client, "half", member="m", ttl=2).campaign(timeout=3)
        assert time.monotonic() - t < 2, "no spinning until the timeout"
        assert sum("campaign attempt failed" in r.getMessage() for r in caplog.records) <= 1
        assert keepalive_threads() == threads
        assert live_leases(secured) == leases
    finally:
        client.close()


def test_watch_logs_in_again_after_its_token_expired(secured: LocalEtcd) -> None:
    settings = secured.client_settings()
    observer_client = tenure.connect(secured.endpoints, **settings)
    leader_client = tenure.connect(secured.endpoints, **settings)
    observer = tenure.Election(observer_client, "tok", member="obs")
    seen: list[int | None] = []
    observer.on_change(lambda info: seen.append(None if info is None else info.token))
    a = tenure.Election(leader_client, "tok", member="a", ttl=2).campaign(10)
    try:
        wait_for(lambda: seen and seen[-1] == a.token, 10, "the observer sees the leader")
        watched = observer_client._current
        time.sleep(TOKEN_TTL + 1.5)  # the token is idle on every other member and expires there
        secured.kill(watched)  # the watch must resume on another member
        a.resign()
        wait_for(lambda: seen[-1] is None, 15, "the observer sees the resignation")
    finally:
        observer.close()
        observer_client.close()
        leader_client.close()
        secured.restart(watched)
        secured.wait_healthy(30)
