"""A short seeded chaos run of the whole stack: faults of every family, then the checker must find nothing.

Replays a fixed seed (the schedule is printed by the run) for about a minute of faults in
synchronous mode: no two servers acknowledge in overlapping terms, no acknowledged write is missing on the
final primary, and every round recovers (one primary taking writes) within the liveness bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SEED = int(os.environ.get("TENURE_CHAOS_SEED", "7"))
MINUTES = float(os.environ.get("TENURE_CHAOS_MINUTES", "1.0"))


@pytest.mark.timeout(420)
def test_short_seeded_run_finds_no_violation(tmp_path):
    out = tmp_path / "chaos"
    res = subprocess.run([sys.executable, "-m", "tenure.lab.chaos.run", "--minutes", str(MINUTES), "--seed",
                          str(SEED), "--synchronous", "--out", str(out)], capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 0, f"{res.stdout[-4000:]}\n{res.stderr[-2000:]}"
    data = json.loads((out / "result.json").read_text())
    v = data["verdict"]
    assert v["violations"] == [] and v["lost"] == []
    assert v["acked"] > 100
    assert len(data["run"]["events"]) >= 2
    assert all(e["recovered"] is not None for e in data["run"]["events"])
    assert (out / "report.md").read_text().startswith(f"# Chaos run, seed {SEED}")
    assert (out / "timeline.png").stat().st_size > 10_000
