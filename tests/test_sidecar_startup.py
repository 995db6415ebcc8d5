"""Startup errors of ``tenure sidecar``: one clear line and a non-zero exit, with real etcd and PostgreSQL."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

from tenure.lab.etcd import LocalEtcd, free_ports

from support import PG_BIN, LocalPostgres


def write_config(path: Path, etcd: list[str], pg: LocalPostgres, **top: Any) -> Path:
    node = pg.node
    settings: dict[str, Any] = {"service": "startup", "member": node.name, "ttl": 2, "listen": "", "etcd_wait": 2}
    pgs: dict[str, Any] = {"data_dir": node.data_dir, "port": node.port, "bin_dir": PG_BIN, "guard_schema": "public",
                           "socket_dir": node.socket_dir, "advertise_dsn": node.dsn}
    pgs.update(top.pop("postgres", {}))
    settings.update(top)
    with open(path, "w") as f:
        f.write("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
        f.write(f"[etcd]\nendpoints = {json.dumps(etcd)}\n[postgres]\n")
        f.write("".join(f"{k} = {json.dumps(v)}\n" for k, v in pgs.items()))
    return path


def run(config: Path) -> tuple[int, str]:
    res = subprocess.run([sys.executable, "-m", "tenure.cli", "sidecar", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    return res.returncode, res.stderr.strip()


def assert_one_line(code: int, err: str, text: str) -> None:
    assert code != 0, err
    assert len(err.splitlines()) == 1, err
    assert text in err, err


def test_ttl_below_what_etcd_grants(tmp_path: Path, etcd: LocalEtcd, postgres: LocalPostgres) -> None:
    assert_one_line(*run(write_config(tmp_path / "c.toml", etcd.endpoints, postgres, ttl=1)), "below what etcd grants")


def test_config_that_is_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_bytes(b'service = "caf\xe9"\n')
    assert_one_line(*run(p), "not UTF-8")


def test_listen_address_in_use(tmp_path: Path, etcd: LocalEtcd, postgres: LocalPostgres) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path / "c.toml", etcd.endpoints, postgres, listen=f"127.0.0.1:{port}")
        assert_one_line(*run(cfg), "cannot listen")


def test_etcd_unreachable_at_start(tmp_path: Path, postgres: LocalPostgres) -> None:
    cfg = write_config(tmp_path / "c.toml", [f"http://127.0.0.1:{free_ports(1)[0]}"], postgres)
    assert_one_line(*run(cfg), "did not answer for 2 s")


def test_advertise_dsn_that_does_not_reach_this_server(tmp_path: Path, etcd: LocalEtcd,
                                                       postgres: LocalPostgres) -> None:
    cfg = write_config(tmp_path / "c.toml", etcd.endpoints, postgres,
                       postgres={"advertise_dsn": f"host=127.0.0.1 port={free_ports(1)[0]} dbname=postgres"})
    assert_one_line(*run(cfg), "advertise_dsn does not reach this server")


def test_prerequisite_replication_access_is_checked(tmp_path: Path, etcd: LocalEtcd,
                                                     postgres: LocalPostgres) -> None:
    hba = os.path.join(postgres.node.data_dir, "pg_hba.conf")
    with open(hba) as f:
        saved = f.read()

    def reload() -> None:
        with psycopg.connect(postgres.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")

    try:
        with open(hba, "w") as f:
            f.write("\n".join(ln for ln in saved.splitlines() if "replication" not in ln) + "\n")
        reload()
        assert_one_line(*run(write_config(tmp_path / "c.toml", etcd.endpoints, postgres)), "no replication rule")
    finally:
        with open(hba, "w") as f:
            f.write(saved)
        reload()
