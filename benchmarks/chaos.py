"""A long chaos run: the whole stack in network namespaces, seeded faults (or a stress soak), the checker, a report.

    sudo nice .venv/bin/python benchmarks/chaos.py --minutes 30 --seed 1 --synchronous [--out DIR]
    sudo nice .venv/bin/python benchmarks/chaos.py --minutes 10 --seed 1 --synchronous --soak

Prints the seed first (the same seed replays the same schedule), one line per fault round, then the
figures: rounds, faults by kind, violations, acknowledged writes lost, leader changes, failover write
gaps (median, p99), write and read availability. DIR (default chaos-<seed>) gets report.md,
timeline.png and result.json (every write and read try). Exit status 0: no violation; 1: violations
(listed); 2: the stack could not be made. See docs/chaos.md.
"""

from __future__ import annotations

import sys

from tenure.lab.chaos.run import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args:
        seed = args[args.index("--seed") + 1] if "--seed" in args else "random"
        args += ["--out", f"chaos-{seed}{'-soak' if '--soak' in args else ''}"]
    sys.exit(main(args))
