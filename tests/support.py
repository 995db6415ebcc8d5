"""Helpers for tests: waiting with deadlines, candidate processes, a throwaway PostgreSQL."""

from __future__ import annotations

import os
from typing import Any

from tenure.lab.wait import wait_for  # noqa: F401 (the tests import it from here)
from tenure.lab.candidate import CandidateProcess as CandidateProc
from tenure.lab.postgres import LocalPostgres as _LocalPostgres

PG_BIN = os.environ.get("TENURE_PG_BIN", "/usr/lib/postgresql/15/bin")


def current_leaders(cands: list[CandidateProc]) -> list[CandidateProc]:
    """Candidates whose last elected/lost event says they lead."""
    out = []
    for c in cands:
        evs = [e for e in list(c.events) if e["ev"] in ("elected", "lost")]
        if evs and evs[-1]["ev"] == "elected" and c.proc.poll() is None:
            out.append(c)
    return out


def terms(cands: list[CandidateProc]) -> list[tuple[int, str, float, float]]:
    """Every term seen: (token, member, start, end of validity; inf while it lasts)."""
    out = []
    for c in cands:
        open_: dict[int, dict[str, Any]] = {}
        for e in list(c.events):
            if e["ev"] == "elected":
                open_[e["token"]] = e
            elif e["ev"] == "lost" and e["token"] in open_:
                s = open_.pop(e["token"])
                out.append((e["token"], c.member, s["t"], min(e["t"], e["valid_until"])))
        for tok, s in open_.items():
            out.append((tok, c.member, s["t"], c.killed_at))
    return sorted(out)


def assert_one_writer(cands: list[CandidateProc]) -> list[tuple[int, str, float, float]]:
    """Terms never overlap in time, and tokens grow with time."""
    ts = terms(cands)
    by_start = sorted(ts, key=lambda t: t[2])
    for a, b in zip(by_start, by_start[1:]):
        assert a[3] <= b[2], f"terms overlap: {a} and {b}"
        assert a[0] < b[0], f"token did not grow: {a} then {b}"
    assert len({t[0] for t in ts}) == len(ts), f"a token repeated: {ts}"
    return ts


class LocalPostgres(_LocalPostgres):
    """One PostgreSQL 15 server on loopback (tenure.lab.postgres), with the binaries from ``TENURE_PG_BIN``."""

    def __init__(self) -> None:
        super().__init__(bin_dir=PG_BIN)
