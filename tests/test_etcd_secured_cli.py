"""The CLI reaches a TLS (client-certificate) etcd and an auth etcd with the sidecar's connection settings."""

from __future__ import annotations

import re

import os
import subprocess
import sys
from typing import Iterator

import pytest

import tenure
from tenure.errors import ConfigError, TLSFailed
from tenure.lab.etcd import ROOT_PASSWORD, LocalEtcd


@pytest.fixture(scope="module")
def tls_etcd() -> Iterator[LocalEtcd]:
    cluster = LocalEtcd(size=3, tls=True).start()
    yield cluster
    cluster.stop()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tenure", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_election_and_cli_over_client_certificate_tls(tls_etcd: LocalEtcd, service: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    certs = tls_etcd.certs
    assert certs is not None
    client = tenure.connect(tls_etcd.endpoints, **tls_etcd.client_settings())
    leadership = tenure.Election(client, service, member="a", ttl=2).campaign(10)
    try:
        flags = run_cli("--endpoints", ",".join(tls_etcd.endpoints), "--ca-cert", certs.ca, "--cert",
                        certs.client_cert, "--key", certs.client_key, "status", service)
        assert flags.returncode == 0 and re.search(rf"^\s+a\s+leader\b.*\s{leadership.token}\s", flags.stdout, re.M), \
            (flags.stdout, flags.stderr)
        env = run_cli("history", service, env={"TENURE_ENDPOINTS": ",".join(tls_etcd.endpoints),
                                               "TENURE_CA_CERT": certs.ca, "TENURE_CERT": certs.client_cert,
                                               "TENURE_KEY": certs.client_key})
        assert env.returncode == 0 and str(leadership.token) in env.stdout, env.stderr
        cfg = tmp_path / "sidecar.toml"
        cfg.write_text(f'[etcd]\nendpoints = {list(tls_etcd.endpoints)!r}\nca_cert = "{certs.ca}"\n'
                       f'cert = "{certs.client_cert}"\nkey = "{certs.client_key}"\n'.replace("'", '"'))
        viafile = run_cli("--etcd-config", str(cfg), "status", service)
        assert viafile.returncode == 0 and re.search(r"^\s+a\s+leader\b", viafile.stdout, re.M), viafile.stderr
        # A wrong CA is reported as a TLS failure at once, not as "unavailable" after the whole budget.
        bad = run_cli("--endpoints", ",".join(tls_etcd.endpoints), "--ca-cert", certs.other_ca, "--cert",
                      certs.client_cert, "--key", certs.client_key, "status", service)
        assert bad.returncode == 2 and "tenure: TLSFailed" in bad.stderr, bad.stderr
    finally:
        leadership.resign()
        client.close()


def test_credentials_with_http_endpoints_are_refused() -> None:
    with pytest.raises(ConfigError):
        tenure.connect("http://127.0.0.1:2379", user="root", password="x", check=False)
    with pytest.raises(ConfigError):
        tenure.connect("http://127.0.0.1:2379", ca_cert="/nonexistent", check=False)


def test_cli_with_user_and_password_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cluster = LocalEtcd(size=1, tls=True, auth=True, auth_token_ttl=2).start()
    try:
        assert cluster.certs is not None
        ok = run_cli("--endpoints", cluster.endpoints[0], "--ca-cert", cluster.certs.ca, "--user", "root",
                     "--password-file", cluster.password_file, "status")
        assert ok.returncode == 0, ok.stderr
        assert ROOT_PASSWORD not in ok.stdout + ok.stderr
        wrong = tmp_path / "wrong"
        wrong.write_text("nope\n")
        bad = run_cli("--endpoints", cluster.endpoints[0], "--ca-cert", cluster.certs.ca, "--user", "root",
                      "--password-file", str(wrong), "status")
        assert bad.returncode == 2 and "AuthFailed" in bad.stderr, bad.stderr
    finally:
        cluster.stop()
