"""Open Library's two migration phases through a primary crash and a switchover: what the clients saw.

Each round starts ``examples/openlibrary/`` on loopback (etcd from the example
member files, a 3-node PostgreSQL cluster whose sidecars run with the example
settings, the example haproxy.cfg, the example web.py app under gunicorn sync
workers once per phase), puts load on both apps (GET /, GET /recent in phase
2, POST /items, POST /account/login), kills the primary (kill -9 of sidecar
and postmaster), waits for every live standby to stream from the new primary,
then has the new primary's sidecar hand over cleanly (SIGTERM).

Printed per phase and fault: GETs answered 200 / all; logins answered 200;
the POST gap (last write acknowledged by the old primary -> first by the new
one), split into the part before the new primary's record appeared in etcd
(tenure's own handover) and the part after (haproxy's or the router's share).

    .venv/bin/python benchmarks/openlibrary_failover.py [--rounds 3] [--workers 3]

Run as root on a machine with PostgreSQL 15, haproxy and gunicorn; use nice on
a shared machine and read the load average printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from tenure.lab.wait import wait_for
from tenure.lab.openlibrary import (Load, OpenLibraryLab, first_write, post_gap, run_faults,  # noqa: E402
                                    streams)

EXAMPLES = os.path.join(os.path.dirname(HERE), "examples", "openlibrary")


def one_round(workers: int) -> dict[str, dict[str, list[float]]]:
    lab = OpenLibraryLab(EXAMPLES, workers=workers, env={"OL_LOG_LEVEL": "INFO"})
    out: dict[str, dict[str, list[float]]] = {}
    try:
        lab.warm()
        load = Load(streams(lab))
        try:
            wait_for(lambda: sum(r.status == 200 and r.method == "POST" for r in load.snapshot()) > 20, 30,
                       "writes flowing")
            events = run_faults(lab, load)
        finally:
            results = load.finish()
        for phase in lab.apps:
            rs = [r for r in results if r.app == phase]
            gets = [r for r in rs if r.method == "GET"]
            logins = [r for r in rs if r.path == "/account/login"]
            fig = out.setdefault(phase, {})
            fig.setdefault("gets_ok", []).append(sum(r.status == 200 for r in gets))
            fig.setdefault("gets", []).append(len(gets))
            fig.setdefault("logins_ok", []).append(sum(r.status == 200 for r in logins))
            fig.setdefault("logins", []).append(len(logins))
            fig.setdefault("get_max", []).append(max(r.end - r.start for r in gets))
            failed = [r for r in gets if r.status != 200]
            if failed:  # say why, from the app's own log
                with open(lab.apps[phase].log_path, errors="replace") as f:
                    why = sorted({line.split(" INFO ", 1)[1][:160] for line in f
                                  if " INFO " in line and ("GET" in line or "read" in line)})
                at = [f"{r.path} {r.start - events[0].at:+.2f}s" for r in failed[:10]]
                print(f"  {phase}: {len(failed)} GETs not answered 200 (since the crash: {at}); the app said:\n    "
                      + "\n    ".join(why[:12]), flush=True)
            for ev in events:
                gap = post_gap(lab, results, phase, ev)
                t = first_write(lab, results, phase, ev)
                fig.setdefault(f"{ev.kind}_gap", []).append(gap)
                fig.setdefault(f"{ev.kind}_tenure", []).append(ev.published - ev.at)
                fig.setdefault(f"{ev.kind}_web", []).append(t - ev.published)
    finally:
        lab.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=3)
    args = ap.parse_args()
    total: dict[str, dict[str, list[float]]] = {}
    for i in range(args.rounds):
        fig = one_round(args.workers)
        for phase, f in fig.items():
            for k, v in f.items():
                total.setdefault(phase, {}).setdefault(k, []).extend(v)
        print(f"round {i + 1}: load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\n{args.rounds} rounds, {args.workers} gunicorn sync workers per phase, ttl 2 s, 2 haproxy listeners")
    for phase, f in total.items():
        print(f"{phase}: GETs answered {int(sum(f['gets_ok']))}/{int(sum(f['gets']))} "
              f"({100 * sum(f['gets_ok']) / max(1, sum(f['gets'])):.2f} %), slowest {max(f['get_max']):.3f} s; "
              f"logins answered {int(sum(f['logins_ok']))}/{int(sum(f['logins']))}")
        for kind in ("crash", "switchover"):
            g, t, w = f[f"{kind}_gap"], f[f"{kind}_tenure"], f[f"{kind}_web"]
            print(f"  {kind:<10} POST gap median {statistics.median(g):.3f} s (min {min(g):.3f}, max {max(g):.3f});"
                  f" of which tenure's handover {statistics.median(t):.3f} s, after it {statistics.median(w):+.3f} s"
                  f" (each: {', '.join(f'{x:.2f}' for x in g)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
