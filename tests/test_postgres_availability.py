"""No self-inflicted failover: a full connection table or a starved server is not a failure (real PostgreSQL, etcd)."""

from __future__ import annotations

import os
import signal
import time

import psycopg

from tenure.lab.cluster import FailoverCluster, postmaster_pid

from support import wait_for

TTL = 2


def assert_no_failover(cluster: FailoverCluster, first: dict, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        p = cluster.primary()
        assert p is not None and p["token"] == first["token"], f"failed over: {p}"
        time.sleep(0.1)


def test_connection_table_full_is_not_a_failure(cluster: FailoverCluster) -> None:
    first = cluster.wait_primary(30)
    leader = cluster.sidecar(first["member"])
    wait_for(lambda: leader.http("/primary")[0] == 200, 10, "/primary 200")
    hogs = []
    try:
        while True:  # the application takes every connection slot, the reserved ones too
            try:
                hogs.append(psycopg.connect(first["dsn"], autocommit=True, connect_timeout=2))
            except psycopg.OperationalError as e:
                assert "too many clients" in str(e) or "reserved" in str(e), e
                break
            assert len(hogs) < 500
        assert_no_failover(cluster, first, 7.0)  # longer than unhealthy_window (5 s)
        assert leader.http("/primary")[0] == 200
        hogs[0].execute("INSERT INTO items VALUES (1, 'hog', 0)")  # the guard stayed armed
    finally:
        for c in hogs:
            c.close()


def _server_pids(pid: int) -> list[int]:
    out = [pid]
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def test_starved_server_is_not_a_failure(cluster: FailoverCluster) -> None:
    first = cluster.wait_primary(30)
    leader = cluster.sidecar(first["member"])
    wait_for(lambda: leader.http("/primary")[0] == 200, 10, "/primary 200")
    pids = _server_pids(postmaster_pid(leader.node) or 0)
    end = time.monotonic() + 4.0
    try:
        # The server gets 10 % of the CPU for 4 s: probes time out, the process is there.
        while time.monotonic() < end:
            for p in pids:
                os.kill(p, signal.SIGSTOP)
            time.sleep(0.18)
            for p in pids:
                os.kill(p, signal.SIGCONT)
            time.sleep(0.02)
            p = cluster.primary()
            assert p is not None and p["token"] == first["token"], f"failed over: {p}"
    finally:
        for p in pids:
            os.kill(p, signal.SIGCONT)
    assert_no_failover(cluster, first, 2.0)
    wait_for(lambda: leader.http("/primary")[0] == 200, 10, "/primary 200 again")


def test_a_thousand_idle_http_connections_change_nothing(cluster: FailoverCluster) -> None:
    import socket

    first = cluster.wait_primary(30)
    leader = cluster.sidecar(first["member"])
    wait_for(lambda: leader.http("/primary")[0] == 200, 10, "/primary 200")
    idle = []
    try:
        for _ in range(1000):
            s = socket.socket()
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", leader.http_port))
            except OSError:
                s.close()
                continue
            idle.append(s)
        times = []
        for _ in range(10):
            t = time.monotonic()
            code, _ = leader.http("/primary")
            times.append(time.monotonic() - t)
            assert code == 200
        print(f"/primary with 1000 idle connections open: max {max(times) * 1000:.0f} ms")
        assert sorted(times)[len(times) // 2] < 0.1
        assert_no_failover(cluster, first, 2 * TTL)
        assert len(os.listdir(f"/proc/{leader.proc.pid}/fd")) < 300
    finally:
        for s in idle:
            s.close()


def test_a_node_whose_rewind_fails_is_recloned(cluster: FailoverCluster) -> None:
    first = cluster.wait_streaming(30)  # only a standby seen streaming from the primary may take over
    old = cluster.sidecar(first["member"])
    old.kill_with_postgres()
    new = cluster.wait_primary(2 * TTL + 10, not_member=first["member"])
    # The old primary's directory can no longer be rewound (as after a rewind interrupted mid-run).
    os.unlink(os.path.join(old.node.data_dir, "global", "pg_control"))
    old.start()
    wait_for(lambda: old.http("/replica")[0] == 200, 90, "the broken node streaming again after a re-clone")
    assert "re-cloning" in old.log()
    with psycopg.connect(new["dsn"], autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (424242, 'after-clone', 0)")
    wait_for(lambda: _has(cluster.app_dsn(old.node.name), 424242), 30, "replication to the re-cloned node")


def _has(dsn: str, row: int) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM items WHERE id = %s", (row,)).fetchone() is not None


def test_a_standby_keeps_serving_reads_through_a_primary_crash(cluster: FailoverCluster) -> None:
    first = cluster.wait_primary(30)
    standbys = [s for s in cluster.sidecars if s.node.name != first["member"]]
    for s in standbys:
        wait_for(lambda: s.http("/replica")[0] == 200, 20, f"{s.node.name} streaming")
    pids = {s.node.name: postmaster_pid(s.node) for s in standbys}
    cluster.sidecar(first["member"]).kill_with_postgres()
    t0 = time.monotonic()
    answers: dict[str, list[int]] = {s.node.name: [] for s in standbys}
    new = None
    while time.monotonic() < t0 + 4 * TTL + 4:
        if new is None:
            p = cluster.primary()
            new = p if p is not None and p["member"] != first["member"] else None
        for s in standbys:
            if new is None or s.node.name != new["member"]:
                answers[s.node.name].append(s.http("/replica")[0])
        time.sleep(0.05)
    assert new is not None and new["member"] != first["member"]
    survivor = next(s for s in standbys if s.node.name != new["member"])
    codes = answers[survivor.node.name]
    assert codes and all(c == 200 for c in codes), f"/replica on {survivor.node.name}: {codes}"
    assert postmaster_pid(survivor.node) == pids[survivor.node.name], "the surviving standby was restarted"
    with psycopg.connect(new["dsn"], autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (515151, 'after', 0)")
    wait_for(lambda: _has(cluster.app_dsn(survivor.node.name), 515151), 20, "the survivor following the new primary")
