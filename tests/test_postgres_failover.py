"""PostgreSQL failover end to end: three real servers, a sidecar process each, real etcd, real faults."""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest

from tenure.lab.cluster import FailoverCluster
from tenure.services.postgres import parse_lsn
from tenure.lab.etcd import LocalEtcd

from pgfailover import Writer
from support import wait_for

TTL = 2


def write_one(dsn: str, row_id: int, writer: str = "test") -> None:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
        conn.execute("INSERT INTO items VALUES (%s, %s, %s)", (row_id, writer, time.monotonic()))


def has_row(dsn: str, row_id: int) -> bool:
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
            return conn.execute("SELECT 1 FROM items WHERE id = %s", (row_id,)).fetchone() is not None
    except psycopg.Error:
        return False


def first_success_on(dsn: str, timeout: float, start_id: int) -> float:
    """Keep trying to write to ``dsn``; return the monotonic time of the first accepted write."""
    deadline = time.monotonic() + timeout
    i = start_id
    while time.monotonic() < deadline:
        try:
            write_one(dsn, i)
            return time.monotonic()
        except psycopg.Error:
            i += 1
            time.sleep(0.01)
    raise AssertionError(f"no write accepted by {dsn} within {timeout} s")


def test_kill9_primary_promotes_a_standby_and_the_old_node_rejoins(cluster: FailoverCluster) -> None:
    first = cluster.wait_primary(30)
    write_one(first["dsn"], 1)
    old = cluster.sidecar(first["member"])
    wait_for(lambda: old.http("/primary")[0] == 200, 10, "/primary 200 on the leader")
    for s in cluster.sidecars:
        if s is not old:
            wait_for(lambda: s.http("/replica")[0] == 200, 20, f"/replica 200 on {s.node.name}")
            assert s.http("/primary")[0] == 503

    t_kill = time.monotonic()
    old.kill_with_postgres()
    new = cluster.wait_primary(TTL + 10, not_member=first["member"])
    t_write = first_success_on(new["dsn"], 10, 1000)
    assert new["token"] > first["token"]
    print(f"kill -9 -> first write on the new primary: {t_write - t_kill:.2f} s")
    assert has_row(new["dsn"], 1), "a row committed before the crash survived (replicated before the kill)"

    # The other standby follows the new primary.
    other = next(s for s in cluster.sidecars if s.node.name not in (first["member"], new["member"]))
    write_one(new["dsn"], 2000)
    wait_for(lambda: has_row(cluster.app_dsn(other.node.name), 2000), 30, "the other standby streaming from the new primary")

    # The old node comes back (sidecar restarted, postgres down) and rejoins as a standby by itself.
    old.start()
    write_one(new["dsn"], 3000)
    wait_for(lambda: has_row(cluster.app_dsn(old.node.name), 3000), 60, "the old primary rejoined as a standby")
    assert old.node.status().role == "standby"
    wait_for(lambda: old.http("/replica")[0] == 200, 20, "/replica 200 on the rejoined node")


def test_frozen_sidecar_primary_refuses_writes_before_the_new_primary_accepts_any(cluster: FailoverCluster) -> None:
    first = cluster.wait_primary(30)
    old = cluster.sidecar(first["member"])
    write_one(first["dsn"], 1)
    writer = Writer(first["dsn"], "old-client", 100_000)  # a client that keeps writing straight to the old primary
    wait_for(lambda: len(writer.accepted) > 5, 10, "writes accepted by the primary")
    old.signal(signal.SIGSTOP)
    t_stop = time.monotonic()
    try:
        new = cluster.wait_primary(2 * TTL + 10, not_member=first["member"])
        t_new = first_success_on(new["dsn"], 10, 500_000)
        left = t_stop + 2 * TTL - time.monotonic()
        if left > 0:
            time.sleep(left)  # keep the sidecar frozen for 2 x ttl, as the issue asks
    finally:
        old.signal(signal.SIGCONT)
    writer.stop()
    refused_25006 = [t for t, code in writer.refused if code == "25006"]
    assert refused_25006, f"the old primary never refused with 25006: {writer.refused[:5]}"
    assert min(refused_25006) < t_new, "the old primary must refuse writes before the new one accepts any"
    late = [i for t, i in writer.accepted if t >= t_new]
    assert not late, f"the old primary accepted writes after the new primary's first: {late[:5]}"
    print(f"old primary refused from {min(refused_25006) - t_stop:.2f} s after SIGSTOP; "
          f"new primary accepted at {t_new - t_stop:.2f} s")
    # Once thawed, the old node steps down and rejoins as a standby.
    write_one(new["dsn"], 7000)
    wait_for(lambda: has_row(cluster.app_dsn(old.node.name), 7000), 60, "the thawed old primary rejoined as a standby")


def test_quorum_loss_makes_the_primary_read_only_then_writes_resume(cluster: FailoverCluster, healthy_etcd: LocalEtcd) -> None:
    first = cluster.wait_primary(30)
    write_one(first["dsn"], 1)
    writer = Writer(first["dsn"], "client", 100_000)
    wait_for(lambda: len(writer.accepted) > 5, 10, "writes accepted")
    t_kill = time.monotonic()
    keep = healthy_etcd.leader_index()
    for i in range(3):
        if i != keep:
            healthy_etcd.kill(i)
    # The isolated etcd leader may renew for up to 2 election timeouts (see docs/election.md).
    wait_for(lambda: [t for t, c in writer.refused if t > t_kill], TTL + 2 + 2, "writes refused after quorum loss")
    writer.stop()
    refused_at = min(t for t, c in writer.refused if t > t_kill)
    print(f"quorum lost: primary read-only {refused_at - t_kill:.2f} s after the kill")
    for i in range(3):
        healthy_etcd.restart(i)
    # The old term's primary record may outlive it for a while (etcd extends leases when its
    # leader changes): follow whatever is published until a write is accepted.
    deadline = time.monotonic() + 60
    row = 900_000
    while True:
        p = cluster.primary()
        if p is not None:
            try:
                write_one(p["dsn"], row)
                break
            except psycopg.Error:
                row += 1
        assert time.monotonic() < deadline, "no write accepted after quorum came back"
        time.sleep(0.05)


@pytest.mark.parametrize("cluster", [{"per_node": {"n2": {"nofailover": True},
                                                   "n3": {"postgres": {"max_lag_bytes": 1024}}}}], indirect=True)
def test_lagging_or_nofailover_standbys_are_never_promoted(cluster: FailoverCluster) -> None:
    first = cluster.wait_primary(30)
    assert first["member"] == "n1"
    n3 = cluster.sidecar("n3")
    wait_for(lambda: n3.http("/replica")[0] == 200, 20, "n3 streaming")
    # Make n3 fall behind: freeze its WAL receiver, then write well over 1 KiB.
    receiver = wait_for(lambda: _walreceiver_pid(n3.node.dsn), 10, "n3's walreceiver")
    os.kill(receiver, signal.SIGSTOP)
    try:
        with psycopg.connect(first["dsn"], autocommit=True) as conn:
            conn.execute("INSERT INTO items SELECT g, 'bulk', 0 FROM generate_series(1, 2000) g")
            lsn = parse_lsn(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])

        def published_wal() -> int:
            kv = cluster.client.get(f"svc/{cluster.service}/members/n1")
            return (kv.json().get("wal_current") or 0) if kv is not None else 0

        # The primary has published its new WAL position, so standbys can see how far behind n3 is.
        wait_for(lambda: published_wal() >= lsn, 10, "the primary's record to show the bulk insert")
        wait_for(lambda: "lag" in n3.http("/status")[1]["eligible"], 10, "n3 to see its own lag")
        cluster.sidecar("n1").kill_with_postgres()
        t = time.monotonic()
        while time.monotonic() < t + 3 * TTL + 2:  # the dead primary's record lasts until its lease expires
            p = cluster.primary()
            assert p is None or p["member"] == "n1", f"a nofailover or lagging standby was promoted: {p}"
            time.sleep(0.1)
        assert cluster.primary() is None
        st = n3.http("/status")[1]
        assert "lag" in st["eligible"], st
        assert "nofailover" in cluster.sidecar("n2").http("/status")[1]["eligible"]
    finally:
        os.kill(receiver, signal.SIGCONT)


def _walreceiver_pid(dsn: str) -> int | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pid FROM pg_stat_wal_receiver").fetchone()
    return row[0] if row else None


@pytest.mark.parametrize("cluster", [{"postgres": {"synchronous": True}}], indirect=True)
def test_synchronous_mode_loses_no_acknowledged_write(cluster: FailoverCluster) -> None:
    first = cluster.wait_primary(30)
    old = cluster.sidecar(first["member"])
    wait_for(lambda: len(_sync_standbys(first["dsn"], "IS NOT NULL")) == 2, 20, "both standbys streaming")
    sync = wait_for(lambda: _sync_standbys(first["dsn"]), 20, "a synchronous standby")
    standby = cluster.sidecar(sync[0])
    # Until the standbys have seen the primary name its synchronous standby, none may be promoted.
    wait_for(lambda: standby.http("/status")[1]["synchronous_standbys"] == sync, 10,
             "the standbys to learn which of them is synchronous")
    writer = Writer(first["dsn"], "sync-client", 1, interval=0.002)
    wait_for(lambda: len(writer.accepted) > 50, 10, "acknowledged writes")
    published = cluster.client.get(f"svc/{cluster.service}/members/{first['member']}").json()["sync"]
    old.kill_with_postgres()
    writer.stop()
    acked = [i for _, i in writer.accepted]
    new = cluster.wait_primary(TTL + 10, not_member=first["member"])
    with psycopg.connect(new["dsn"], autocommit=True) as conn:
        have = {r[0] for r in conn.execute("SELECT id FROM items WHERE writer = 'sync-client'")}
    missing = sorted(set(acked) - have)
    assert not missing, f"{len(missing)} acknowledged rows lost: {missing[:10]}"
    assert new["member"] in published, f"only a synchronous standby ({published}) may be promoted"
    print(f"synchronous mode: {len(acked)} acknowledged rows, all on the new primary {new['member']}")


def _sync_standbys(dsn: str, states: str = "= 'sync'") -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            f"SELECT application_name FROM pg_stat_replication WHERE state = 'streaming' AND sync_state {states}")]


def test_http_endpoints_for_haproxy(cluster: FailoverCluster) -> None:
    import urllib.request

    first = cluster.wait_primary(30)
    leader = cluster.sidecar(first["member"])
    standby = next(s for s in cluster.sidecars if s is not leader)
    wait_for(lambda: standby.http("/replica")[0] == 200, 20, "a streaming standby")
    assert leader.http("/primary")[0] == 200 and leader.http("/master")[0] == 200
    assert leader.http("/replica")[0] == 503
    assert standby.http("/primary")[0] == 503
    assert standby.http("/replica?lag=100000000")[0] == 200
    assert standby.http("/replica?lag=abc")[0] == 400
    for s in (leader, standby):
        assert s.http("/read-only")[0] == 200 and s.http("/health")[0] == 200
    code, status = leader.http("/status")
    assert code == 200 and status["leading"] and status["token"] == first["token"]
    with urllib.request.urlopen(f"http://127.0.0.1:{leader.http_port}/metrics", timeout=2) as r:
        text = r.read().decode()
    assert f'tenure_fencing_token{{member="{first["member"]}",service="{cluster.service}"}} {float(first["token"])}' in text
    req = urllib.request.Request(f"http://127.0.0.1:{leader.http_port}/primary", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=2)
    assert info.value.code == 405  # nothing changes state over HTTP
    assert leader.http("/nope")[0] == 404


@pytest.mark.parametrize("cluster", [{"postgres": {"synchronous": True}}], indirect=True)
def test_synchronous_standby_switch_then_primary_crash_loses_nothing(cluster: FailoverCluster) -> None:
    first = cluster.wait_primary(30)
    old = cluster.sidecar(first["member"])

    def published() -> list[str]:
        kv = cluster.client.get(f"svc/{cluster.service}/members/{first['member']}")
        return kv.json().get("sync", []) if kv is not None else []

    wait_for(lambda: len(_sync_standbys(first["dsn"], "IS NOT NULL")) == 2, 20, "both standbys streaming")
    sync = wait_for(published, 20, "a published synchronous standby")
    writer = Writer(first["dsn"], "switch-client", 1, interval=0.002)
    wait_for(lambda: len(writer.accepted) > 20, 10, "acknowledged writes")
    cluster.sidecar(sync[0]).kill_with_postgres()  # the synchronous standby dies; commits wait for a new one
    other = next(s.node.name for s in cluster.sidecars if s.node.name not in (first["member"], sync[0]))
    wait_for(lambda: published() == [other], 20, f"{other} published as the new synchronous standby")
    n = len(writer.accepted)
    wait_for(lambda: len(writer.accepted) > n + 20, 10, "commits acknowledged through the new synchronous standby")
    listed = published()
    old.kill_with_postgres()
    writer.stop()
    acked = [i for _, i in writer.accepted]
    new = cluster.wait_primary(TTL + 10, not_member=first["member"])
    assert new["member"] == other and other in listed
    with psycopg.connect(new["dsn"], autocommit=True) as conn:
        have = {r[0] for r in conn.execute("SELECT id FROM items WHERE writer = 'switch-client'")}
    missing = sorted(set(acked) - have)
    assert not missing, f"{len(missing)} acknowledged rows lost: {missing[:10]}"
