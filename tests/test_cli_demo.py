"""``tenure demo``: the full demo runs, explains itself, and leaves nothing running."""

from __future__ import annotations

import io
import os
import re
import subprocess

from tenure.lab import demo, fulldemo


def children() -> list[str]:
    out = subprocess.run(["pgrep", "-a", "-P", str(os.getpid())], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_full_demo_fails_over_switches_over_and_cleans_up() -> None:
    assert fulldemo.missing() is None
    before = children()
    out = io.StringIO()
    rc = demo.run(ttl=2, out=out)
    text = out.getvalue()
    assert rc in (0, 1), text
    assert "kill -9" in text and "promoted and published, token" in text, text
    assert "first write on" in text and "is a streaming standby of" in text, text
    m = re.search(r"planned switchover (\S+) -> (\S+): .* (\d+) refused, (\d+) failed\.", text)
    assert m is not None, text
    assert m.group(4) == "0", text  # nothing but a 503 after the hold bound, ever
    if rc == 0:
        assert m.group(3) == "0" and "result: OK" in text
    assert "stopped the web app, the sidecars, PostgreSQL and etcd" in text
    assert children() == before, "the demo left processes running"


def test_demo_falls_back_to_the_election_demo_without_postgres(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TENURE_PG_BIN", "/nonexistent")
    out = io.StringIO()
    assert demo.run(ttl=2, out=out) == 0, out.getvalue()
    text = out.getvalue()
    assert "initdb is not in /nonexistent" in text and "Running the election demo instead" in text
    assert "tokens strictly increased: True" in text
