"""A member cut off from its quorum (its client port still answering) must not pass a stale world off as fresh."""

from __future__ import annotations

import json
import threading
import time
from typing import Iterator

import pytest

import tenure
from tenure.etcd import Watch
from tenure.lab.etcd import LocalEtcd
from tenure.web import Router

from support import wait_for

# A member notices it lost its quorum within one quorum check; the stream is dropped after STALL_AFTER.
MOVE_BOUND = Watch.STALL_AFTER + 2 * Watch.PROGRESS_EVERY + 1.0


@pytest.fixture(scope="module")
def proxied() -> Iterator[LocalEtcd]:
    """A 3-member cluster whose client and peer traffic pass through proxies the test controls."""
    cluster = LocalEtcd(size=3, proxied=True).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def isolated(proxied: LocalEtcd) -> Iterator[int]:
    """Index of a follower the test isolates (its client port still answers); healed afterwards."""
    index = next(i for i in range(3) if i != proxied.leader_index())
    yield index
    proxied.heal()
    proxied.wait_healthy(30)


def first_on(cluster: LocalEtcd, index: int) -> list[str]:
    """Endpoints with member ``index`` first, so a new client talks to it."""
    urls = cluster.endpoints
    return [urls[index]] + [u for i, u in enumerate(urls) if i != index]


def test_watch_on_an_isolated_member_moves_to_a_healthy_one(proxied: LocalEtcd, isolated: int, service: str) -> None:
    watcher = tenure.connect(first_on(proxied, isolated))
    writer = tenure.connect([u for i, u in enumerate(proxied.endpoints) if i != isolated])
    seen: list[str] = []
    w = watcher.watch(f"{service}/", prefix=True, on_snapshot=lambda kvs, rev: None,
                      on_events=lambda evs: seen.extend(e.kv.key for e in evs))
    try:
        wait_for(w.connected.is_set, 10, "watch connected")
        assert watcher._current == 0
        proxied.isolate(isolated)
        t = time.monotonic()
        writer.put(f"{service}/after-cut", "1")
        wait_for(lambda: f"{service}/after-cut" in seen, MOVE_BOUND, "the event, through a healthy member")
        print(f"watch moved off the isolated member in {time.monotonic() - t:.2f} s")
    finally:
        w.cancel()
        watcher.close()
        writer.close()


def test_leader_watch_on_an_isolated_member_sees_the_new_leader(proxied: LocalEtcd, isolated: int,
                                                               service: str) -> None:
    observer_client = tenure.connect(first_on(proxied, isolated))
    healthy = tenure.connect([u for i, u in enumerate(proxied.endpoints) if i != isolated])
    observer = tenure.Election(observer_client, service, member="obs")
    leaders: list[int | None] = []
    observer.on_change(lambda info: leaders.append(None if info is None else info.token))
    a = tenure.Election(healthy, service, member="a", ttl=2).campaign(10)
    try:
        wait_for(lambda: leaders and leaders[-1] == a.token, 10, "the observer sees the first leader")
        proxied.isolate(isolated)
        a.resign()
        b = tenure.Election(healthy, service, member="b", ttl=2).campaign(10)
        wait_for(lambda: leaders[-1] == b.token, MOVE_BOUND, "the observer sees the resignation and the new leader")
        b.resign()
    finally:
        observer.close()
        observer_client.close()
        healthy.close()


def publish_primary(client: tenure.Client, service: str) -> tenure.Leadership:
    leadership = tenure.Election(client, service, member="p", ttl=2, value={"dsn": "host=p"}).campaign(10)
    leadership.put(f"svc/{service}/primary", json.dumps({"member": "p", "dsn": "host=p", "token": leadership.token}),
                   ephemeral=True)
    return leadership


def test_router_on_an_isolated_member_moves_or_turns_read_only(proxied: LocalEtcd, isolated: int,
                                                               service: str) -> None:
    healthy = tenure.connect([u for i, u in enumerate(proxied.endpoints) if i != isolated])
    movable = Router(first_on(proxied, isolated), stale_after=4.0)
    stuck = Router([proxied.endpoints[isolated]], stale_after=4.0)  # no healthy member in reach
    try:
        leadership = publish_primary(healthy, service)
        for r in (movable, stuck):
            wait_for(lambda: r.service(service).primary is not None, 10, "the primary in each router")
        proxied.isolate(isolated)
        t = time.monotonic()
        wait_for(lambda: stuck.service(service).read_only, 4.0 + 2.0, "read-only without a healthy member")
        print(f"router with no healthy member read-only after {time.monotonic() - t:.2f} s")
        # The term ends on the healthy side; the router that can move sees it.
        leadership.resign()
        wait_for(lambda: movable.service(service).primary is None, MOVE_BOUND, "the end of the term")
        assert movable.service(service).read_only
        new = publish_primary(healthy, service)
        p = wait_for(lambda: movable.service(service).primary, MOVE_BOUND, "the new primary via a healthy member")
        assert p.token == new.token
        assert not movable.service(service).read_only
        assert stuck.service(service).read_only, "a router cut off with its member stays read-only"
        new.resign()
    finally:
        movable.close()
        stuck.close()
        healthy.close()
