"""How fast leadership moves: after a kill -9 of the leader, and after a resign.

Starts a real 3-member etcd cluster on loopback (tenure.lab.etcd), then for
each ttl runs 3 candidate processes and 1 observer process
(``python -m tenure.lab.candidate``, ``--observe`` for the observer) on a fresh
service and measures:

1. kill -9 failover. Find the leader, SIGKILL its process group and measure
   the time from the kill to (a) the next ``elected`` event of another
   candidate and (b) the observer's ``leader`` event naming that new term.
   A replacement candidate is then started so there are always 3. Each kill
   falls a random 0..ttl/3 s (mod ttl/3, the keepalive period) after the
   leader's election, i.e. at a uniformly random point of its keepalive
   cycle; a kill right after a renewal is the worst case (about ttl + etcd's
   0.5 s expiry check), right before one the best (about 2/3 ttl).
2. resign handover (ttl 2 only: it does not depend on the ttl). Send
   ``resign`` to the leader and measure from its reply to the next
   ``elected`` event of another candidate, and to the observer seeing it.

All times are ``time.monotonic()`` taken in the processes themselves (one
clock for every process on Linux). Every wait has a deadline: a round that
times out is counted and printed as a failure.

Run (from the project root):

    .venv/bin/python benchmarks/election.py                  # 20 rounds x ttl 2, 5, 10: several minutes
    .venv/bin/python benchmarks/election.py --rounds 3 --ttls 2   # quick check
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import tenure
from tenure.lab.candidate import CandidateProcess
from tenure.lab.etcd import LocalEtcd

Event = dict[str, Any]

READY_TIMEOUT = 30.0  # a candidate process starting (imports, first etcd calls)
SLACK = 5.0  # beyond the expected time, before a round counts as failed


class Timeout(Exception):
    """A wait ran past its deadline."""


class Candidate(CandidateProcess):
    """One ``python -m tenure.lab.candidate`` process, with the deadline-based waits this benchmark uses."""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def mark(self) -> int:
        """Position in the event list: pass it as ``since`` to wait only for later events."""
        with self._cond:
            return len(self.events)

    def wait(self, pred: Callable[[Event], bool], deadline: float, what: str, since: int = 0) -> Event:
        """The first event from ``since`` on that matches ``pred``; Timeout past ``deadline``."""
        try:
            return self.wait_event(pred, max(0.0, deadline - time.monotonic()), what, since)
        except AssertionError as e:  # wait_event speaks pytest's language; a benchmark round counts a Timeout
            raise Timeout(str(e)) from None

    def leads(self) -> Event | None:
        """The ``elected`` event of the term this candidate holds, if its last word is that it leads."""
        with self._cond:
            evs = [e for e in self.events if e["ev"] in ("elected", "lost")]
        if evs and evs[-1]["ev"] == "elected" and self.alive:
            return evs[-1]
        return None

    def kill(self) -> float:
        """SIGKILL the process group; return the monotonic time just before the signal."""
        t = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        return t


@dataclass
class Group:
    """The candidates and the observer of one service."""

    endpoints: list[str]
    service: str
    ttl: int
    log: Any
    candidates: list[Candidate] = field(default_factory=list)
    observer: Candidate | None = None
    started: int = 0

    def spawn(self, observe: bool = False) -> Candidate:
        name = "observer" if observe else f"c{self.started}"
        self.started += 0 if observe else 1
        c = Candidate(self.endpoints, self.service, name, ttl=self.ttl, observe=observe, stderr=self.log)
        c.wait(lambda e: e["ev"] == "ready", time.monotonic() + READY_TIMEOUT, "ready")
        return c

    def start(self, n: int = 3) -> None:
        self.observer = self.spawn(observe=True)
        for _ in range(n):
            self.candidates.append(self.spawn())

    def replace(self, dead: Candidate) -> None:
        self.candidates.remove(dead)
        self.candidates.append(self.spawn())

    def leader(self, deadline: float) -> tuple[Candidate, Event]:
        """The one candidate that leads (and its elected event), once exactly one does."""
        while True:
            leading = [(c, ev) for c in self.candidates if (ev := c.leads()) is not None]
            if len(leading) == 1:
                return leading[0]
            if time.monotonic() > deadline:
                raise Timeout(f"{len(leading)} leaders: {[c.member for c, _ in leading]}")
            time.sleep(0.01)

    def next_elected(self, old: Candidate, old_token: int, marks: dict[Candidate, int],
                     deadline: float) -> tuple[Candidate, Event]:
        """The first ``elected`` event, after ``marks``, of a candidate other than ``old``."""
        others = [c for c in self.candidates if c is not old]
        while True:
            for c in others:
                for ev in c.events[marks[c]:]:
                    if ev["ev"] == "elected":
                        if ev["token"] <= old_token:
                            raise Timeout(f"{c.member} elected with token {ev['token']} <= {old_token}")
                        return c, ev
            if time.monotonic() > deadline:
                raise Timeout(f"no new leader after {old.member} (token {old_token})")
            time.sleep(0.005)

    def observed(self, token: int, since: int, deadline: float) -> Event:
        assert self.observer is not None
        return self.observer.wait(lambda e: e["ev"] == "leader" and e["token"] == token,
                                  deadline, f"leader event for token {token}", since)

    def marks(self) -> dict[Candidate, int]:
        return {c: c.mark() for c in self.candidates}

    def stop(self) -> None:
        for c in self.candidates + ([self.observer] if self.observer else []):
            c.stop()


@dataclass
class Result:
    """Samples (seconds) of one measurement, and the rounds that failed."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, name: str, value: float) -> None:
        self.samples.setdefault(name, []).append(value)


def wait_random_phase(elected_t: float, period: float, rng: random.Random) -> None:
    """Sleep until elected_t + u (+ whole periods if that has passed), u uniform in [0, period)."""
    target = elected_t + rng.uniform(0, period)
    now = time.monotonic()
    if target < now:
        target += math.ceil((now - target) / period) * period
    time.sleep(max(0.0, target - time.monotonic()))


def kill_round(g: Group, rng: random.Random, res: Result, rnd: int) -> None:
    ttl = g.ttl
    try:
        old, elected = g.leader(time.monotonic() + 3 * ttl + SLACK)
    except Timeout as e:
        res.failures.append(f"round {rnd}: no single leader before the kill: {e}")
        return
    wait_random_phase(elected["t"], ttl / 3, rng)
    marks, obs_mark = g.marks(), g.observer.mark()  # type: ignore[union-attr]
    t_kill = old.kill()
    try:
        new, ev = g.next_elected(old, elected["token"], marks, t_kill + ttl + 1 + SLACK)
        res.add("elected", ev["t"] - t_kill)
        seen = g.observed(ev["token"], obs_mark, time.monotonic() + SLACK)
        res.add("observed", seen["t"] - t_kill)
    except Timeout as e:
        res.failures.append(f"round {rnd}: after killing {old.member}: {e}")
    try:
        g.replace(old)
    except Timeout as e:
        res.failures.append(f"round {rnd}: replacement candidate: {e}")


def resign_round(g: Group, res: Result, rnd: int) -> None:
    try:
        old, elected = g.leader(time.monotonic() + 3 * g.ttl + SLACK)
    except Timeout as e:
        res.failures.append(f"round {rnd}: no single leader before resign: {e}")
        return
    # Let the leader's process settle into its term: a candidate answers a resign sent in the
    # instant after "elected" with a reply for its previous term.
    time.sleep(max(0.0, elected["t"] + 0.2 - time.monotonic()))
    marks, obs_mark, old_mark = g.marks(), g.observer.mark(), old.mark()  # type: ignore[union-attr]
    t_sent = time.monotonic()
    old.send("resign")
    try:
        reply = old.wait(lambda e: e["ev"] == "reply" and e["cmd"] == "resign",
                         time.monotonic() + SLACK, "reply to resign", old_mark)
        new, ev = g.next_elected(old, elected["token"], marks, time.monotonic() + SLACK)
        res.add("elected", ev["t"] - reply["t"])
        res.add("elected_from_send", ev["t"] - t_sent)
        res.add("reply_from_send", reply["t"] - t_sent)
        seen = g.observed(ev["token"], obs_mark, time.monotonic() + SLACK)
        res.add("observed", seen["t"] - reply["t"])
    except Timeout as e:
        res.failures.append(f"round {rnd}: resign by {old.member}: {e}")


def run_group(endpoints: list[str], service: str, ttl: int, log: Any,
              body: Callable[[Group], None]) -> None:
    g = Group(endpoints, service, ttl, log)
    try:
        g.start()
        body(g)
    finally:
        g.stop()


def bench_kill(endpoints: list[str], ttl: int, rounds: int, rng: random.Random, log: Any) -> Result:
    res = Result()

    def body(g: Group) -> None:
        for rnd in range(1, rounds + 1):
            kill_round(g, rng, res, rnd)

    run_group(endpoints, f"bench-kill-ttl{ttl}-{os.getpid()}", ttl, log, body)
    return res


def bench_resign(endpoints: list[str], ttl: int, rounds: int, log: Any) -> Result:
    res = Result()

    def body(g: Group) -> None:
        for rnd in range(1, rounds + 1):
            resign_round(g, res, rnd)

    run_group(endpoints, f"bench-resign-ttl{ttl}-{os.getpid()}", ttl, log, body)
    return res


# -- report -------------------------------------------------------------------


def p99(xs: list[float]) -> float:
    """Nearest-rank 99th percentile (the maximum for fewer than 100 samples)."""
    s = sorted(xs)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


def fmt_row(cols: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))).rstrip()


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [fmt_row(rows[0], widths), fmt_row(["-" * w for w in widths], widths)]
    return "\n".join(lines + [fmt_row(r, widths) for r in rows[1:]])


def stat_row(label: str, what: str, xs: list[float], rounds: int, failed: int, unit: float = 1.0,
             digits: int = 3) -> list[str]:
    if not xs:
        return [label, what, str(rounds), "0", str(failed), "-", "-", "-"]
    f = lambda v: f"{v * unit:.{digits}f}"  # noqa: E731
    return [label, what, str(rounds), str(len(xs)), str(failed), f(min(xs)), f(statistics.median(xs)), f(p99(xs))]


def report_settings(version: str, cluster: LocalEtcd, args: argparse.Namespace, seed: int) -> None:
    print("tenure election benchmark")
    print(f"  etcd {version}, {cluster.size} members on loopback, heartbeat {cluster.heartbeat_ms} ms, "
          f"election timeout {cluster.election_timeout_ms} ms, --unsafe-no-fsync")
    print(f"  Python {platform.python_version()} ({platform.python_implementation()}), "
          f"{os.cpu_count()} cores, {platform.system()} {platform.release()}")
    print(f"  3 candidate processes + 1 observer process per service; {args.rounds} rounds per ttl; "
          f"seed {seed}")
    print("  ttl (s) and margin = max(0.2, ttl/10) (Election's default): "
          + ", ".join(f"{t}: {max(0.2, t / 10):.2f}" for t in args.ttls))
    print()


def report_kill(results: dict[int, Result], rounds: int) -> None:
    print("kill -9 failover: seconds from SIGKILL of the leader's process")
    rows = [["ttl/margin", "until", "rounds", "n", "failed", "min", "median", "p99*"]]
    for ttl, res in results.items():
        label = f"{ttl} s/{max(0.2, ttl / 10):.1f} s"
        failed = len(res.failures)
        rows.append(stat_row(label, "another candidate is elected", res.samples.get("elected", []), rounds, failed))
        rows.append(stat_row("", "the observer sees the new leader", res.samples.get("observed", []), rounds, failed))
    print(table(rows))
    print()


def report_resign(res: Result, ttl: int, rounds: int) -> None:
    print(f"resign handover (ttl {ttl} s): milliseconds")
    rows = [["ttl", "interval", "rounds", "n", "failed", "min", "median", "p99*"]]
    failed = len(res.failures)
    for key, what in [("elected", "resign reply -> another candidate elected"),
                      ("observed", "resign reply -> observer sees it"),
                      ("reply_from_send", "'resign' sent -> resign reply"),
                      ("elected_from_send", "'resign' sent -> another candidate elected")]:
        rows.append(stat_row(f"{ttl} s" if key == "elected" else "", what, res.samples.get(key, []),
                             rounds, failed, unit=1000, digits=1))
    print(table(rows))
    print("  (the reply comes after resign() has deleted the leader key *and* revoked the lease, so the")
    print("  next leader can be elected before it: reply-based intervals can be negative)")
    print()


def report_failures(kill: dict[int, Result], resign: Result | None, logpath: str) -> int:
    lines = [f"kill ttl {ttl}: {f}" for ttl, r in kill.items() for f in r.failures]
    lines += [f"resign: {f}" for f in (resign.failures if resign else [])]
    print(f"failures: {len(lines)}")
    for line in lines:
        print(f"  {line}")
    if lines:
        print(f"  candidate stderr kept in {logpath}")
    print()
    print("* p99 is nearest-rank: with fewer than 100 samples it is the maximum.")
    return len(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=20, help="rounds per ttl and for resign (default 20)")
    p.add_argument("--ttls", type=lambda s: [int(x) for x in s.split(",")], default=[2, 5, 10],
                   help="comma-separated lease ttls in whole seconds (default 2,5,10)")
    p.add_argument("--resign-ttl", type=int, default=2, help="ttl of the resign benchmark (default 2)")
    p.add_argument("--seed", type=int, default=None, help="seed for the kill delays (default: random)")
    args = p.parse_args(argv)
    if args.rounds < 1 or any(t < 2 for t in args.ttls):
        p.error("--rounds must be >= 1 and every ttl >= 2 (the cluster's minimum lease)")
    return args


def etcd_version(endpoints: list[str]) -> str:
    client = tenure.connect(endpoints)
    try:
        return str(client.status()["version"])
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    logdir = tempfile.mkdtemp(prefix="tenure-bench-")
    logpath = os.path.join(logdir, "candidates.log")
    cluster = LocalEtcd(size=3)
    kill: dict[int, Result] = {}
    resign: Result | None = None
    failures = 0
    try:
        with open(logpath, "a") as log:
            cluster.start()
            report_settings(etcd_version(cluster.endpoints), cluster, args, seed)
            sys.stdout.flush()
            for ttl in args.ttls:
                kill[ttl] = bench_kill(cluster.endpoints, ttl, args.rounds, rng, log)
            resign = bench_resign(cluster.endpoints, args.resign_ttl, args.rounds, log)
        report_kill(kill, args.rounds)
        report_resign(resign, args.resign_ttl, args.rounds)
    finally:
        cluster.stop()
        failures = report_failures(kill, resign, logpath)
        if not failures:
            shutil.rmtree(logdir, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
