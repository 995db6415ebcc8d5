from __future__ import annotations

import itertools
import os
from typing import Iterator

import pytest

import tenure
from tenure.lab.cluster import FailoverCluster
from tenure.lab.etcd import LocalEtcd

from support import PG_BIN, LocalPostgres

_names = itertools.count(1)


@pytest.fixture(scope="session")
def etcd() -> Iterator[LocalEtcd]:
    """A real 3-member etcd cluster on loopback, with etcd's default timing (minimum lease 2 s)."""
    cluster = LocalEtcd(size=3).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def healthy_etcd(etcd: LocalEtcd) -> LocalEtcd:
    """The session cluster with every member running again after a test that killed some."""
    yield etcd
    for i in range(etcd.size):
        etcd.restart(i)
    etcd.wait_healthy(60)


@pytest.fixture
def client(etcd: LocalEtcd) -> Iterator[tenure.Client]:
    c = tenure.connect(etcd.endpoints)
    yield c
    c.close()


@pytest.fixture
def service() -> str:
    """A service name no other test uses."""
    return f"svc{next(_names)}-{os.getpid()}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres]:
    if not os.path.exists(f"{PG_BIN}/initdb"):
        pytest.fail(f"PostgreSQL 15 binaries not found in {PG_BIN} (apt-get install postgresql-15)")
    pg = LocalPostgres().start()
    yield pg
    pg.stop()


@pytest.fixture
def cluster(etcd: LocalEtcd, service: str, request: pytest.FixtureRequest) -> Iterator[FailoverCluster]:
    """Three PostgreSQL nodes with a sidecar process each (settings from ``request.param``); their logs on failure."""
    c = FailoverCluster(etcd, service, **getattr(request, "param", {}))
    yield c
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(c.logs())  # the sidecars' own account of what they did, next to the failure
    c.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """Expose each phase's report as ``item.rep_<phase>`` so fixtures can tell a failed test at teardown."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
