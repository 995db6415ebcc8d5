"""Contract tests of SolrNode: against the lab's Solr double, or a real Solr when TENURE_SOLR_URL is set.

TENURE_SOLR_URL names two (or more) core URLs, comma-separated, of cores configured as repeaters
(see docs/solr.md), e.g. ``http://127.0.0.1:8983/solr/t1,http://127.0.0.1:8984/solr/t1``. The tests
add documents with unique ids and switch the cores' roles; use throwaway cores.
"""

from __future__ import annotations

import os
import uuid
from typing import Iterator

import pytest

from tenure.errors import ConfigError, ServiceError
from tenure.lab.etcd import free_ports
from tenure.lab.solr import LocalSolr
from tenure.services.solr import SolrNode, parse_details

from support import wait_for


@pytest.fixture(scope="module")
def solr_urls() -> Iterator[list[str]]:
    env = os.environ.get("TENURE_SOLR_URL")
    if env:
        yield [u.strip() for u in env.split(",") if u.strip()]
        return
    doubles = [LocalSolr("contract").start() for _ in range(2)]
    yield [d.url for d in doubles]
    for d in doubles:
        d.stop()


def _uid() -> str:
    return uuid.uuid4().hex


def test_ping_and_details(solr_urls: list[str]) -> None:
    node = SolrNode.from_url(solr_urls[0])
    node.ping()
    assert node.is_up()
    d = node.details()
    assert d.is_leader and d.is_follower, "the contract cores must be repeaters (docs/solr.md)"


def test_commit_advances_generation_and_select_sees_committed_only(solr_urls: list[str]) -> None:
    node = SolrNode.from_url(solr_urls[0])
    node.make_leader()
    before = node.details().generation
    doc_id = _uid()
    node.add([{"id": doc_id}], commit=False)
    assert node.get(doc_id) is not None  # real-time get sees it
    assert node.select_id(doc_id) is None
    node.commit()
    assert node.select_id(doc_id) is not None
    after = node.details()
    assert after.generation == before + 1
    assert node.index_version() == (after.index_version, after.generation)


def test_follower_copies_the_leader_and_loses_its_own_writes(solr_urls: list[str]) -> None:
    leader, follower = SolrNode.from_url(solr_urls[0]), SolrNode.from_url(solr_urls[1])
    leader.make_leader()
    leader.add([{"id": (a := _uid())}])
    follower.make_follower(leader.url)
    wait_for(lambda: follower.select_id(a), 10, "the follower to copy the leader's document")
    d = follower.details()
    assert d.generation == leader.details().generation
    assert not d.replication_enabled and d.polling_disabled
    assert d.leader_url == leader.url and d.replicated_at is not None
    # A document written to a follower is overwritten at its next replication.
    follower.add([{"id": (stray := _uid())}])
    leader.add([{"id": (b := _uid())}])
    follower.fetch(leader.url)
    wait_for(lambda: follower.select_id(b), 10, "the next replication")
    assert follower.select_id(stray) is None
    # Roles switch back at run time: the follower leads, the old leader follows it.
    follower.make_leader()
    follower.add([{"id": (c := _uid())}])
    leader.make_follower(follower.url)
    wait_for(lambda: leader.select_id(c), 10, "the old leader to copy the new one")
    assert leader.details().generation == follower.details().generation


def test_unreachable_and_unknown_core(solr_urls: list[str]) -> None:
    port = free_ports(1)[0]
    with pytest.raises(ServiceError, match="unreachable"):
        SolrNode(f"http://127.0.0.1:{port}/solr", "x", timeout=0.5).ping()
    base = solr_urls[0].rstrip("/").rpartition("/")[0]
    with pytest.raises(ServiceError, match="no such core"):
        SolrNode(base, f"nope{_uid()[:6]}").details()
    with pytest.raises(ConfigError):
        SolrNode("ftp://h/solr", "c")


def test_following_a_non_leader_changes_nothing(solr_urls: list[str]) -> None:
    a, b = SolrNode.from_url(solr_urls[0]), SolrNode.from_url(solr_urls[1])
    a.make_leader()
    b.make_leader()
    b.disable_replication()  # b is now no leader
    before = a.details()
    with pytest.raises(ServiceError, match="not a Solr leader"):
        a.make_follower(b.url)
    port = free_ports(1)[0]
    with pytest.raises(ServiceError, match="unreachable"):
        a.make_follower(f"http://127.0.0.1:{port}/solr/x")
    with pytest.raises(ServiceError, match="cannot follow itself"):
        a.make_follower(a.url)
    after = a.details()
    assert after.replication_enabled and after.generation == before.generation
    b.make_leader()


def test_credentials_never_show() -> None:
    port = free_ports(1)[0]
    node = SolrNode(f"http://solr:s3cret@127.0.0.1:{port}/solr", "c", timeout=0.5)
    assert "s3cret" not in node.url
    with pytest.raises(ServiceError) as e:
        node.ping()
    assert "s3cret" not in str(e.value)


def test_solr8_names_are_read() -> None:
    d = parse_details({"indexVersion": 17, "generation": "4", "isMaster": "true", "isSlave": "true",
                       "master": {"replicationEnabled": "false"},
                       "slave": {"masterUrl": "http://h:8983/solr/c", "isPollingDisabled": "true",
                                 "indexReplicatedAt": "Tue Dec 01 21:40:56 UTC 2026", "timesIndexReplicated": "3"}})
    assert (d.index_version, d.generation, d.is_leader, d.is_follower, d.replication_enabled) == (17, 4, True, True, False)
    assert d.leader_url == "http://h:8983/solr/c" and d.polling_disabled and d.times_replicated == 3
    assert d.replicated_at == 1796161256.0
