"""PostgreSQL failover safety on real servers and real etcd: per-term state, clean stops, stale primaries."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import psycopg
import pytest

from tenure import records
from tenure.lab.cluster import FailoverCluster
from tenure.lab.etcd import LocalEtcd

from pgfailover import CuttableProxy, FollowingWriter, Writer
from support import wait_for

TTL = 2


def member_record(cluster: FailoverCluster, member: str) -> dict[str, Any]:
    kv = cluster.client.get(f"svc/{cluster.service}/members/{member}")
    return kv.json() if kv is not None else {}


def show(dsn: str, setting: str) -> str:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
        return str(conn.execute(f"SHOW {setting}").fetchone()[0])


@pytest.mark.parametrize("cluster", [{"postgres": {"synchronous": True}}], indirect=True)
def test_second_term_in_the_same_process_names_a_synchronous_standby(cluster: FailoverCluster) -> None:
    first = cluster.wait_primary(30)
    assert first["member"] == "n1"
    n1, n2, n3 = (cluster.sidecar(m) for m in ("n1", "n2", "n3"))
    wait_for(lambda: member_record(cluster, "n1").get("sync") == ["n2"] or
             member_record(cluster, "n1").get("sync") == ["n3"], 20, "n1 to list a synchronous standby")
    # Freeze n1's sidecar past the ttl: a listed standby takes over; n1 thaws and rejoins.
    n1.signal(signal.SIGSTOP)
    try:
        second = cluster.wait_primary(2 * TTL + 10, not_member="n1")
    finally:
        n1.signal(signal.SIGCONT)
    mid = cluster.sidecar(second["member"])
    other = next(s for s in (n2, n3) if s is not mid)
    wait_for(lambda: n1.node.status().streaming, 60, "n1 rejoined as a standby")
    other.kill_with_postgres()
    wait_for(lambda: member_record(cluster, mid.node.name).get("sync") == ["n1"], 30,
             "n1 listed as the synchronous standby")
    mid.kill_with_postgres()
    third = cluster.wait_primary(2 * TTL + 10, not_member=mid.node.name)
    assert third["member"] == "n1"
    names = show(n1.node.dsn, "synchronous_standby_names")
    assert names.strip(), "a synchronous-mode primary must name a synchronous standby"
    # Nobody is connected: a commit must wait, not be acknowledged.
    done = threading.Event()

    def write() -> None:
        with psycopg.connect(cluster.app_dsn("n1"), autocommit=True) as conn:
            conn.execute("INSERT INTO items VALUES (1, 'lonely', 0)")
        done.set()

    threading.Thread(target=write, daemon=True).start()
    assert not done.wait(3), "a commit was acknowledged with no synchronous standby connected"
    assert member_record(cluster, "n1").get("sync") == []
    # A standby comes back: the commit is acknowledged once it is the named synchronous standby.
    other.start()
    assert done.wait(60), "the commit was not acknowledged once a standby was back"
    wait_for(lambda: member_record(cluster, "n1").get("sync") == [other.node.name], 30,
             f"{other.node.name} listed as synchronous standby")
    assert other.node.name in show(n1.node.dsn, "synchronous_standby_names")


def test_clean_stop_of_the_primary_ten_times_loses_no_acknowledged_write(cluster: FailoverCluster) -> None:
    cluster.wait_primary(30)
    for s in cluster.sidecars:
        wait_for(lambda: s.node.status().role in ("primary", "standby") and
                 (s.node.status().role == "primary" or s.node.status().streaming), 30, f"{s.node.name} up")
    writer = FollowingWriter(cluster.primary, "clean-stop")
    try:
        for _ in range(10):
            p = cluster.wait_primary(30)
            wait_for(lambda: any(m == p["member"] for _, _, m in writer.accepted[-5:]), 20,
                     f"writes acknowledged by {p['member']}")
            old = cluster.sidecar(p["member"])
            old.signal(signal.SIGTERM)
            assert old.proc is not None and old.proc.wait(30) == 0
            cluster.wait_primary(30, not_member=p["member"])
            old.start()
            wait_for(lambda: old.node.status().streaming, 60, f"{p['member']} rejoined")
        last = cluster.wait_primary(30)
        wait_for(lambda: any(m == last["member"] for _, _, m in writer.accepted[-5:]), 20, "writes on the last primary")
    finally:
        writer.stop()
    acked = [i for _, i, _ in writer.accepted]
    with psycopg.connect(cluster.wait_primary(10)["dsn"], autocommit=True) as conn:
        have = {r[0] for r in conn.execute("SELECT id FROM items WHERE writer = 'clean-stop'")}
    lost = sorted(set(acked) - have)
    gaps = sorted(writer.gaps())
    print(f"clean stop x10: acknowledged rows lost: {len(lost)} of {len(acked)}; write gap median "
          f"{gaps[len(gaps) // 2]:.2f} s, max {gaps[-1]:.2f} s ({len(gaps)} hand-overs)")
    assert not lost, f"{len(lost)} acknowledged rows lost: {lost[:10]}"
    assert len(gaps) >= 10


@pytest.mark.parametrize("cluster", [{"per_node": {"n3": {"nofailover": True}}}], indirect=True)
def test_stale_primary_is_not_promoted_over_a_later_terms_writes(cluster: FailoverCluster) -> None:
    first = cluster.wait_primary(30)
    assert first["member"] == "n1"
    n1, n2 = cluster.sidecar("n1"), cluster.sidecar("n2")
    wait_for(lambda: n2.http("/replica")[0] == 200, 20, "n2 streaming")
    n1.signal(signal.SIGSTOP)
    try:
        second = cluster.wait_primary(2 * TTL + 10, not_member="n1")
        assert second["member"] == "n2"
        with psycopg.connect(second["dsn"], autocommit=True) as conn:
            conn.execute("INSERT INTO items SELECT g, 'on-n2', 0 FROM generate_series(1, 100) g")
        start = cluster.client.get(records.history_key(cluster.service, second["token"]))
        n2.kill_with_postgres()
    finally:
        n1.signal(signal.SIGCONT)
    # n1 comes back: an old primary on the old timeline. It must not lead over n2's writes.
    wait_for(lambda: "stale" in str((n1.http("/status")[1] or {}).get("eligible")), 30, "n1 to judge itself stale")
    # Restarted while nobody leads, it is read-only in a way no client can override: the guard refuses.
    with psycopg.connect(cluster.app_dsn("n1"), autocommit=True) as conn:
        conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            with conn.transaction():
                conn.execute("SET TRANSACTION READ WRITE")
                conn.execute("INSERT INTO items VALUES (-1, 'override', 0)")
    t = time.monotonic()
    while time.monotonic() < t + 3 * TTL:
        p = cluster.primary()
        assert p is None, f"promoted over a later term's writes: {p}"
        time.sleep(0.1)
    # n2 comes back and leads again: it holds its own term's start.
    n2.start()
    third = cluster.wait_primary(60)
    assert third["member"] == "n2"
    with psycopg.connect(third["dsn"], autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM items WHERE writer = 'on-n2'").fetchone()[0] == 100
    assert start is not None and start.json()["timeline"] == 2 and start.json()["start_position"] > 0


def test_primary_cut_off_from_etcd_refuses_writes_at_its_deadline(etcd: LocalEtcd, service: str) -> None:
    from urllib.parse import urlsplit

    proxies = [CuttableProxy((u.hostname or "127.0.0.1", u.port or 2379)) for u in map(urlsplit, etcd.endpoints)]
    cluster = FailoverCluster(etcd, service, per_node={
        "n1": {"etcd_endpoints": [f"http://127.0.0.1:{p.port}" for p in proxies]}})
    try:
        first = cluster.wait_primary(30)
        assert first["member"] == "n1"
        n1 = cluster.sidecar("n1")
        writer = Writer(first["dsn"], "cut-off", 1, interval=0.005)
        wait_for(lambda: len(writer.accepted) > 20, 10, "writes accepted")
        for p in proxies:
            p.cut.set()
        time.sleep(0.05)  # a renewal already on its way when the link went is no longer answered
        status = n1.http("/status")[1]
        deadline = time.monotonic() + status["lease_remaining"]
        wait_for(lambda: writer.refused and writer.refused[-1][0] > deadline, 2 * TTL + 5, "writes refused")
        writer.stop()
        late = [t - deadline for t, _ in writer.accepted if t > deadline]
        refused_from = min(t for t, _ in writer.refused if t > deadline - 1) - deadline
        print(f"cut off from etcd: last write accepted {max(t for t, _ in writer.accepted) - deadline:+.3f} s "
              f"from the deadline, refused from {refused_from:+.3f} s")
        assert not [d for d in late if d > 0.1], f"writes accepted more than 100 ms after the deadline: {late[:5]}"
        assert refused_from <= 0.1
        for p in proxies:
            p.cut.clear()
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
        for p in proxies:
            p.close()


@pytest.mark.parametrize("cluster", [{"databases": ("coverstore",),
                                      "postgres": {"guard_databases": ["app", "coverstore"]}}], indirect=True)
def test_every_guarded_database_refuses_writes_when_the_term_ends(cluster: FailoverCluster) -> None:
    first = cluster.wait_primary(30)
    n = next(node for node in cluster.pg.nodes if node.name == first["member"])
    targets = ((cluster.app_dsn(n.name), "items"), (n.dsn_for("coverstore"), "covers"))
    with psycopg.connect(n.dsn_for("coverstore"), autocommit=True) as conn:
        conn.execute("CREATE TABLE covers (id int)")  # a table created later in the guarded schema
        conn.execute("INSERT INTO covers VALUES (0)")
    leader = cluster.sidecar(n.name)
    leader.signal(signal.SIGSTOP)  # a deposed primary, frozen: each database refuses writes by itself
    try:
        time.sleep(TTL + 0.5)
        for dsn, table in targets:
            with psycopg.connect(dsn, autocommit=True) as conn:
                with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                    conn.execute(f"INSERT INTO {table} (id) VALUES (1)")
    finally:
        leader.signal(signal.SIGCONT)


def test_no_password_leaves_the_node(etcd: LocalEtcd, service: str) -> None:
    import os
    import shutil
    import tempfile

    secret = "s3cret-pw-7f"
    d = tempfile.mkdtemp(prefix="tenure-passfile-")
    os.chmod(d, 0o755)
    passfile = os.path.join(d, "pgpass")
    with open(passfile, "w") as f:
        f.write(f"*:*:*:postgres:{secret}\n")
    os.chmod(passfile, 0o600)
    shutil.chown(passfile, "postgres", "postgres")  # the server binaries (pg_rewind) read it as postgres
    cluster = FailoverCluster(etcd, service, postgres={"passfile": passfile})
    try:
        first = cluster.wait_primary(30)
        # From now on every TCP connection needs the password.
        with psycopg.connect(cluster.pg.nodes[0].dsn, autocommit=True) as conn:
            conn.execute(f"ALTER ROLE postgres PASSWORD '{secret}'")
        for n in cluster.pg.nodes:
            with open(os.path.join(n.data_dir, "pg_hba.conf"), "w") as f:
                f.write("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
                        "host replication all 127.0.0.1/32 scram-sha-256\n")
            with psycopg.connect(n.dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_reload_conf()")
        authed = lambda dsn: f"{dsn} passfile={passfile}"  # noqa: E731
        cluster.wait_streaming(30)  # only a standby seen streaming from the primary may take over
        cluster.sidecar(first["member"]).kill_with_postgres()
        new = cluster.wait_primary(2 * TTL + 10, not_member=first["member"])
        with psycopg.connect(authed(new["dsn"]), autocommit=True) as conn:
            conn.execute("INSERT INTO items VALUES (1, 'pw', 0)")
        old = cluster.sidecar(first["member"])
        old.start()  # rejoins with pg_rewind, authenticating through the passfile
        wait_for(lambda: old.http("/replica")[0] == 200, 60, "the old primary rejoined")
        kvs, _ = cluster.client.get_prefix(f"svc/{service}/")
        assert kvs and not [kv.key for kv in kvs if secret.encode() in kv.value or b"pgpass" in kv.value]
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    assert secret.encode() not in f.read(), f"password on the command line of {pid}"
            except OSError:
                pass
        assert secret not in cluster.logs()
        assert secret not in str(cluster.sidecar(new["member"]).http("/status")[1])
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()
        shutil.rmtree(d, ignore_errors=True)
