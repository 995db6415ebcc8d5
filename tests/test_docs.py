"""Every shell block in the docs marked ``sh test`` runs, in order, against a real cluster; so the docs cannot rot.

Blocks are fenced with ```` ```sh test ```` (run here) or ```` ```sh no-test ````
(commands for real machines: package installs, systemd, etcdctl); an
unmarked shell block is an error, so nothing slips through untested by
accident. The commands run under bash with ``set -euo pipefail``, with
``tenure`` on the PATH and ``TENURE_ENDPOINTS`` pointing at the test etcd,
against service ``db`` (members n1, n2, n3).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Iterator

import pytest

from tenure.lab.cluster import FailoverCluster
from tenure.lab.etcd import LocalEtcd
from tenure.members import read_members

from support import wait_for

ROOT = os.path.join(os.path.dirname(__file__), "..")
DOCS = ["docs/runbook.md", "docs/placement.md", "docs/failover.md", "docs/configuration.md"]
FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```\s*$", re.M | re.S)


def blocks(path: str) -> list[tuple[str, str]]:
    """(marker, text) of each shell block of ``path``."""
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    return [(m.group(2).strip(), m.group(3)) for m in FENCE.finditer(text) if m.group(1) in ("sh", "bash", "shell")]


def test_every_shell_block_is_marked() -> None:
    for path in DOCS:
        for marker, body in blocks(path):
            assert marker in ("test", "no-test"), f"{path}: shell block without 'test' or 'no-test': {body[:60]!r}"


@pytest.fixture(scope="module")
def cluster(etcd: LocalEtcd) -> Iterator[FailoverCluster]:
    c = FailoverCluster(etcd, "db")
    yield c
    c.stop()


def settled(cluster: FailoverCluster) -> None:
    def ok() -> bool:
        ms = read_members(cluster.client, "db")
        return cluster.primary() is not None and len(ms) == 3 and all(
            m.eligible and (m.leader or m.streaming) for m in ms.values())
    wait_for(ok, 60, "a settled cluster")


def test_shell_blocks_in_the_docs_run(cluster: FailoverCluster, etcd: LocalEtcd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "tenure"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m tenure \"$@\"\n")
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "TENURE_ENDPOINTS": ",".join(etcd.endpoints)}
    ran = 0
    for path in DOCS:
        for marker, body in blocks(path):
            if marker != "test":
                continue
            settled(cluster)
            t0 = time.monotonic()
            res = subprocess.run(["bash", "-euo", "pipefail", "-c", body], env=env, capture_output=True, text=True,
                                 timeout=120)
            assert res.returncode == 0, (f"{path}: block failed (rc {res.returncode}, {time.monotonic() - t0:.1f} s):"
                                         f"\n{body}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}\n{cluster.logs()}")
            ran += 1
    assert ran >= 7
