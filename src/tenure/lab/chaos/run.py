"""One chaos run: bring the stack up, run the clients, inject the seeded faults (or the stress soak), check, report.

``python -m tenure.lab.chaos.run --minutes N --seed S [--synchronous] [--soak] --out DIR`` (as root) writes
``DIR/result.json``, ``DIR/report.md`` and ``DIR/timeline.png`` and exits 0 when the checker found nothing,
1 when it found violations, 2 when the run could not be made. The process moves itself into the stack's client
host before it starts any thread; every namespace and process it made is removed when it ends, also on
failure (and those of crashed runs at the start of the next).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from .checker import Verdict, check, percentile
from .faults import inject, resolve, schedule
from .stack import DB, TABLE, Stack
from .workload import CacheUser, Monitor, Reader, Writer

log = logging.getLogger("tenure.lab")

RECOVERY_BOUND = 30.0  # s after a heal within which one primary must take writes again (liveness)
SETTLE_BOUND = 60.0  # s to wait for every member to be back before the next fault


@dataclass
class Event:
    fault: dict[str, Any]
    host: str
    start: float
    healed: float = 0.0
    recovered: float | None = None  # first acknowledged write after the heal, with one primary
    settled: float | None = None  # every member back (etcd healthy, standbys streaming)
    primary_before: str | None = None
    primary_after: str | None = None
    etcd_leader: str | None = None  # the raft leader when the fault started


@dataclass
class Run:
    seed: int
    minutes: float
    synchronous: bool
    soak: bool
    t0: float = 0.0
    end: float = 0.0
    events: list[Event] = field(default_factory=list)
    liveness: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)  # nodes that did not come back and were rebuilt
    stress: str = ""


def _primary(stack: Stack) -> str | None:
    found = [h for h, r in stack.roles().items() if r == "primary"]
    return found[0] if len(found) == 1 else None


def _acked_after(writers: list[Writer], t: float) -> float | None:
    best = None
    for w in writers:
        for r in reversed(w.records):
            if r.sent < t:
                break
            if r.outcome == "ok":
                best = r.acked if best is None else min(best, r.acked)
    return best


def _settled(stack: Stack) -> bool:
    if not all(stack.etcd_alive(e) for e in stack.etcd) or not stack.etcd_healthy():
        return False
    roles = stack.roles()
    if sorted(roles.values(), key=str) != ["primary", "standby", "standby"]:
        return False
    return all(stack.sidecar_alive(h) for h in DB) and all(p is not None and p.poll() is None
                                                           for p in stack.caches.values())


def _recover(stack: Stack, writers: list[Writer], ev: Event, run: Run) -> None:
    deadline = ev.healed + RECOVERY_BOUND
    while time.monotonic() < deadline:
        t = _acked_after(writers, ev.healed)
        if t is not None and _primary(stack) is not None:
            ev.recovered = t
            break
        time.sleep(0.2)
    else:
        run.liveness.append(f"round {ev.fault['round']} ({ev.fault['kind']} on {ev.host}): no single primary "
                            f"taking writes within {RECOVERY_BOUND:.0f} s of the heal")
    if not _settle(stack, ev):
        # A node that did not come back on its own is a finding; rebuild it so that the run goes on.
        primary = _primary(stack)
        roles = stack.roles()
        for h in DB:
            if primary is not None and roles.get(h) not in ("primary", "standby"):
                tail = _last_lines(stack.db[h].node.log_file)
                run.repairs.append(f"round {ev.fault['round']} ({ev.fault['kind']} on {ev.host}): {h} did not "
                                   f"come back within {SETTLE_BOUND:.0f} s (role {roles.get(h)}); server log: {tail}")
                print(f"chaos: rebuilding {h}: {run.repairs[-1]}", flush=True)
                try:
                    stack.reclone(h, primary)
                except Exception as e:
                    log.warning("%s: rebuild failed: %s", h, e)
        _settle(stack, ev)
    ev.primary_after = _primary(stack)


def _last_lines(path: str, n: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.strip() for line in f.readlines()[-n:])
    except OSError:
        return "(no log)"


def _settle(stack: Stack, ev: Event) -> bool:
    deadline = time.monotonic() + SETTLE_BOUND
    while time.monotonic() < deadline:
        if _settled(stack):
            ev.settled = time.monotonic()
            return True
        for h in DB:  # a server the sidecar could not bring back (e.g. it was killed while starting)
            if stack.sidecar_alive(h) and not stack.db[h].node.is_running() and time.monotonic() > ev.healed + 10:
                try:
                    stack.start_postgres(h)
                except Exception as e:  # logged; the round records that it did not settle
                    log.warning("%s: %s", h, e)
        time.sleep(0.3)
    return False


def run_faults(stack: Stack, writers: list[Writer], run: Run) -> None:
    budget = run.minutes * 60
    faults = schedule(run.seed, rounds=10_000, ttl=stack.ttl)
    print(f"chaos: seed {run.seed}; first faults: " + "; ".join(f.describe() for f in faults[:5]), flush=True)
    for f in faults:
        if time.monotonic() - run.t0 > budget:
            break
        before = _primary(stack)
        host = resolve(stack, f, before)
        ev = Event(f.as_dict(), host, time.monotonic(), primary_before=before, etcd_leader=stack.etcd_leader())
        run.events.append(ev)
        log.info("fault %s on %s", f.describe(), host)
        heal = inject(stack, f, host)
        time.sleep(f.duration)
        heal()
        ev.healed = time.monotonic()
        _recover(stack, writers, ev, run)
        print(f"chaos: {f.describe()} on {host}: primary {before} -> {ev.primary_after}, "
              f"recovered {(ev.recovered or float('nan')) - ev.healed:+.2f}s, "
              f"settled {'yes' if ev.settled else 'NO'}", flush=True)
        time.sleep(f.pause)


def run_soak(stack: Stack, run: Run) -> None:
    seconds = int(run.minutes * 60)
    cmd = ["stress-ng", "--cpu", "2", "--io", "1", "--hdd", "1", "--hdd-bytes", "128M", "--vm", "1",
           "--vm-bytes", "256M", "--timeout", f"{seconds}s", "--metrics-brief", "-q"]
    run.stress = " ".join(cmd)
    print(f"chaos: soak for {seconds}s under {run.stress}", flush=True)
    res = subprocess.run(["nice", "-n", "5", *cmd], capture_output=True, text=True, timeout=seconds + 60,
                         cwd=stack.workdir)
    if res.returncode != 0:
        log.warning("stress-ng exited %d: %s", res.returncode, res.stderr[-500:])


def final_rows(stack: Stack, primary: str | None) -> list[tuple[int, str, int | None, str | None]]:
    if primary is None:
        return []
    with psycopg.connect(stack.dsn(primary), autocommit=True, connect_timeout=3) as conn:
        return [tuple(r) for r in conn.execute(f"SELECT seq, id, token, server FROM {TABLE}")]  # type: ignore[misc]


def execute(run: Run, out: str, writers_n: int = 3) -> tuple[Verdict, dict[str, Any]]:
    stack = Stack(synchronous=run.synchronous)
    clients: list[Any] = []
    try:
        stack.create_network()
        stack.enter_client()  # before any thread: setns moves only the calling thread
        stack.start()
        monitor = Monitor(stack.endpoints).start()
        clients.append(monitor)
        deadline = time.monotonic() + 60
        while not _settled(stack):
            if time.monotonic() > deadline:
                raise RuntimeError("the stack did not come up within 60 s")
            time.sleep(0.2)
        writers = [Writer(f"w{i + 1}", stack.endpoints) for i in range(writers_n)]
        reader = Reader("r1", stack.endpoints)
        cache = CacheUser("c1", stack.endpoints)
        clients += [*writers, reader, cache]
        for c in clients[1:]:
            c.start()
        time.sleep(3)
        run.t0 = time.monotonic()
        if run.soak:
            run_soak(stack, run)
        else:
            run_faults(stack, writers, run)
        stack.net.heal()
        time.sleep(2)
        run.end = time.monotonic()
        for c in clients:
            c.stop()
        primary = _primary(stack)
        if primary is None:
            run.liveness.append("no single primary at the end of the run")
        rows = final_rows(stack, primary)
        writes = [r for w in writers for r in w.records]
        verdict = check(writes, reader.records, rows, synchronous=run.synchronous, start=run.t0, end=run.end,
                        liveness=run.liveness)
        data = {"run": asdict(run), "verdict": asdict(verdict), "final_primary": primary,
                "writes": [asdict(w) for w in writes], "reads": [asdict(r) for r in reader.records],
                "cache": cache.records, "monitor": monitor.samples}
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(data, f)
        with open(os.path.join(out, "logs.txt"), "w") as f:
            f.write(stack.logs(20000))
        return verdict, data
    finally:
        for c in clients:
            try:
                c.stop(2)
            except Exception:
                pass
        stack.stop()


def summary(v: Verdict, data: dict[str, Any]) -> str:
    from collections import Counter

    run = data["run"]
    kinds = Counter(e["fault"]["kind"] for e in run["events"])
    tokens = sorted({t[0] for t in v.terms})
    return (f"seed {run['seed']} {'sync' if run['synchronous'] else 'async'}{' soak' if run['soak'] else ''}: "
            f"rounds {len(run['events'])}, faults {dict(sorted(kinds.items()))}, violations {len(v.violations)}, "
            f"acked {v.acked}, lost {len(v.lost)}, terms {len(tokens)} (leader changes {max(0, len(tokens) - 1)}), "
            f"failover median {percentile(v.failovers, 0.5):.2f}s p99 {percentile(v.failovers, 0.99):.2f}s, "
            f"write availability {v.write_availability:.3f}, read availability {v.read_availability:.4f}, "
            f"longest read outage {v.longest_read_outage:.2f}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tenure.lab.chaos.run", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--synchronous", action="store_true")
    p.add_argument("--soak", action="store_true", help="no faults: CPU, memory and disk saturated by stress-ng")
    p.add_argument("--out", default="chaos-out")
    p.add_argument("--no-png", action="store_true")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    # The clients' own warnings (refused connections, lost watches) are expected under faults: to a file.
    logging.basicConfig(level=logging.INFO, filename=os.path.join(a.out, "harness.log"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    seed = a.seed if a.seed is not None else random.randrange(1 << 31)
    run = Run(seed, a.minutes, a.synchronous, a.soak)
    print(f"chaos: seed {seed} (replay with --seed {seed})", flush=True)
    try:
        verdict, data = execute(run, a.out)
    except Exception as e:
        print(f"chaos: the run failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    from .report import write_report

    write_report(data, a.out, png=not a.no_png)
    print("chaos: " + summary(verdict, data), flush=True)
    for line in verdict.violations[:50]:
        print(f"chaos: VIOLATION {line}", flush=True)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
