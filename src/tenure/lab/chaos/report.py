"""A chaos run's report: ``report.md`` (figures, faults, violations) and ``timeline.png`` (matplotlib, optional).

The picture has one row per database host showing when the server itself
acknowledged writes (coloured by term), one row for what the router believed
(the primary it named), shaded spans for each fault, and the reads' and the
cache's failures as ticks.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

from .checker import percentile
from .stack import DB

log = logging.getLogger("tenure.lab")


def markdown(data: dict[str, Any]) -> str:
    run, v = data["run"], data["verdict"]
    t0 = run["t0"]
    kinds = Counter(e["fault"]["kind"] for e in run["events"])
    fo = v["failovers"]
    tokens = sorted({t[0] for t in v["terms"]})
    outcomes = Counter(w["outcome"] for w in data["writes"])
    # A round that changed the primary without touching the primary's host or zone, nor etcd's leader.
    untouched = [e for e in run["events"] if e["primary_before"] and e["primary_after"]
                 and e["primary_before"] != e["primary_after"] and e["host"] != e["primary_before"]
                 and e["fault"]["target"] != "primary" and e.get("etcd_leader") not in e["host"].split("+")]
    cache = [c for c in data["cache"] if t0 <= c[0] < run["end"]]
    lines = [
        f"# Chaos run, seed {run['seed']}",
        "",
        f"Mode: {'synchronous' if run['synchronous'] else 'asynchronous'}{', stress soak' if run['soak'] else ''}; "
        f"{run['minutes']} min requested, {(run['end'] - t0) / 60:.1f} min run. "
        f"Replay: `benchmarks/chaos.py --minutes {run['minutes']} --seed {run['seed']}"
        f"{' --synchronous' if run['synchronous'] else ''}{' --soak' if run['soak'] else ''}`.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| rounds (faults) | {len(run['events'])} |",
        f"| violations | {len(v['violations'])} |",
        f"| writes tried / acknowledged | {len(data['writes'])} / {v['acked']} |",
        f"| acknowledged writes lost | {len(v['lost'])} |",
        f"| acknowledged with no synchronous standby (synchronous mode) | {len(v.get('unreplicated', []))} |",
        f"| nodes rebuilt because they did not come back | {len(run.get('repairs', []))} |",
        f"| terms seen by writers (leader changes) | {len(tokens)} ({max(0, len(tokens) - 1)}) |",
        f"| failover write gap median / p99 / max | {percentile(fo, 0.5):.2f} / {percentile(fo, 0.99):.2f} / "
        f"{max(fo, default=0):.2f} s |",
        f"| write availability (share of {0.25} s bins with an acknowledgement) | {v['write_availability']:.3f} |",
        f"| read availability (reads that succeeded) | {v['read_availability']:.4f} |",
        f"| longest read outage | {v['longest_read_outage']:.2f} s |",
        f"| cache availability (set+get that succeeded) | "
        f"{(sum(ok for _, ok in cache) / len(cache)) if cache else 0:.4f} |",
        f"| rounds that moved the primary without touching it or etcd's leader | {len(untouched)} |",
        f"| final primary | {data['final_primary']} |",
        "",
        "Faults by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ".",
        "",
        "Write outcomes: " + ", ".join(f"{k} {n}" for k, n in sorted(outcomes.items())) + ".",
        "",
    ]
    if run.get("stress"):
        lines += [f"Load: `{run['stress']}`.", ""]
    lines += ["## Violations", ""]
    lines += [f"- {x}" for x in v["violations"]] or ["None."]
    lines += ["", "## Nodes rebuilt (did not come back on their own)", ""]
    lines += [f"- {x}" for x in run.get("repairs", [])] or ["None."]
    lines += ["", "## Rounds", "", "| # | fault | host | etcd leader | start s | dur s | primary before -> after | "
              "recovered after heal s | settled |", "|---|---|---|---|---|---|---|---|---|"]
    for e in run["events"]:
        f = e["fault"]
        rec = f"{e['recovered'] - e['healed']:.2f}" if e["recovered"] else "NO"
        detail = "".join(f" {k}={val}" for k, val in f["detail"].items())
        lines.append(f"| {f['round']} | {f['kind']}{detail} | {e['host']} | {e.get('etcd_leader')} | "
                     f"{e['start'] - t0:.1f} | "
                     f"{f['duration']} | {e['primary_before']} -> {e['primary_after']} | {rec} | "
                     f"{'yes' if e['settled'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def timeline(data: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = data["run"]
    t0 = run["t0"]
    rows = {h: i for i, h in enumerate(reversed([*DB, "router", "failed writes", "failed reads"]))}
    fig, ax = plt.subplots(figsize=(14, 4.2))
    for e in run["events"]:
        ax.axvspan(e["start"] - t0, max(e["healed"], e["start"] + 0.2) - t0, color="tab:red", alpha=0.12)
        ax.text(e["start"] - t0, len(rows) - 0.4, e["fault"]["kind"].replace("_", " "), rotation=90,
                fontsize=6, va="top", color="tab:red")
    cmap = plt.get_cmap("tab10")
    acks = [w for w in data["writes"] if w["outcome"] == "ok" and w["server"] in rows]
    ax.scatter([w["acked"] - t0 for w in acks], [rows[w["server"]] for w in acks], s=2, marker="|",
               c=[cmap((w["server_token"] or 0) % 10) for w in acks])
    mon = [(t - t0, m) for t, m, _ in data["monitor"] if m in rows]
    ax.scatter([t for t, _ in mon], [rows["router"] + (DB.index(m) - 1) * 0.2 for _, m in mon], s=1,
               c=[cmap(DB.index(m)) for _, m in mon])
    bad = [w["acked"] - t0 for w in data["writes"] if w["outcome"] != "ok"]
    ax.scatter(bad, [rows["failed writes"]] * len(bad), s=3, marker="|", color="black")
    badr = [r["t"] - t0 for r in data["reads"] if not r["ok"]]
    ax.scatter(badr, [rows["failed reads"]] * len(badr), s=3, marker="|", color="black")
    ax.set_yticks(list(rows.values()), [f"{k} acks" if k in DB else k for k in rows])
    ax.set_ylim(-0.6, len(rows) - 0.2)
    ax.set_xlim(0, max(1.0, run["end"] - t0))
    ax.set_xlabel("seconds since the first fault (red: fault active; colours: terms)")
    ax.set_title(f"chaos seed {run['seed']} ({'sync' if run['synchronous'] else 'async'}"
                 f"{', soak' if run['soak'] else ''}): {len(run['events'])} faults, "
                 f"{len(data['verdict']['violations'])} violations, {len(data['verdict']['lost'])} lost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(data: dict[str, Any], out: str, png: bool = True) -> str:
    """Write ``report.md`` (and ``timeline.png`` when ``png`` and matplotlib is installed); return the markdown."""
    os.makedirs(out, exist_ok=True)
    text = markdown(data)
    if png:
        try:
            timeline(data, os.path.join(out, "timeline.png"))
            text += "\n![timeline](timeline.png)\n"
        except ImportError:
            log.warning("matplotlib is not installed: no timeline picture")
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    return text
