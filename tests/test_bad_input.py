"""Bad input gets a clear, named error and changes nothing."""

from __future__ import annotations

import time

import pytest

import tenure
from tenure.errors import ConfigError, EtcdUnavailable, TenureError
from tenure.fencing import etcd_put
from tenure.lab.etcd import free_ports


@pytest.mark.parametrize("endpoint", [
    "127.0.0.1:2379", "http://127.0.0.1", "ftp://127.0.0.1:2379", "http://:2379",
    "http://127.0.0.1:99999", "http://127.0.0.1:2379/v3", "", "http://h:1,https://h:2", "http://127.0.0.1:abc",
])
def test_malformed_endpoints(endpoint: str) -> None:
    with pytest.raises(ConfigError, match="endpoint|no etcd endpoints|mix"):
        tenure.connect(endpoint)


def test_empty_endpoint_list() -> None:
    with pytest.raises(ConfigError):
        tenure.connect([])


def test_unreachable_endpoints_fail_within_budget() -> None:
    ports = free_ports(2)
    t = time.monotonic()
    with pytest.raises(EtcdUnavailable, match="no etcd endpoint answered") as info:
        tenure.connect([f"http://127.0.0.1:{p}" for p in ports], timeout=0.2, retry_for=1.0)
    assert time.monotonic() - t < 3.0
    assert str(ports[0]) in str(info.value)
    assert isinstance(info.value, TenureError)


def test_bad_names_and_ttl(client: tenure.Client) -> None:
    for name in ["", "a/b", "-x", "x" * 64, None, "a b"]:
        with pytest.raises(ConfigError, match="service name"):
            tenure.Election(client, name, member="m")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="member name"):
        tenure.Election(client, "ok", member="")
    for ttl in [0, -1, 0.5, 2.5, "2", True, 10_000]:
        with pytest.raises(ConfigError, match="ttl"):
            tenure.Election(client, "ok", member="m", ttl=ttl)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="margin"):
        tenure.Election(client, "ok", member="m", ttl=2, margin=1.5)
    with pytest.raises(ConfigError, match="JSON"):
        tenure.Election(client, "ok", member="m", value={"x": object()})


def test_ttl_below_cluster_minimum_is_refused(client: tenure.Client, service: str) -> None:
    """etcd (default timing) grants at least 2 s: asking for 1 s is an error, not a silent 2 s."""
    election = tenure.Election(client, service, member="m", ttl=1)
    with pytest.raises(ConfigError, match="cannot honour a ttl below 2 s"):
        election.campaign(timeout=2)
    assert election.leader() is None
    assert election.candidates() == []
    election.close()


def test_fence_input(client: tenure.Client, service: str) -> None:
    for token in [0, -3, "5", None, True]:
        with pytest.raises(ConfigError, match="token"):
            etcd_put(client, service, token, "k", "v")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="leader key"):
        etcd_put(client, service, 5, f"svc/{service}/leader", "v")
    assert client.get("k") is None


def test_bad_namespace_and_auth_options() -> None:
    with pytest.raises(ConfigError, match="namespace"):
        tenure.connect("http://127.0.0.1:2379", namespace="/", check=False)
    with pytest.raises(ConfigError, match="user and password"):
        tenure.connect("http://127.0.0.1:2379", user="root", check=False)
    with pytest.raises(ConfigError, match="TLS"):
        tenure.connect("https://127.0.0.1:2379", ca_cert="/nonexistent/ca.pem", check=False)
