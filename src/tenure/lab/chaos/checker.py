"""What a chaos run's records prove: pure functions of the writers' and readers' records and the final data.

The witness is outside the library: each acknowledged write carries the name
and the lease token of the server that committed it (read in the write's own
transaction) and the client's monotonic send and acknowledge times.

* **at most one writer**: a write sent after another was acknowledged never
  commits under an older token; a token belongs to one server only; rows on
  the final primary, in commit-sequence order, never go back in token;
* **nothing lost**: every acknowledged id is on the final primary (counted;
  zero is required in synchronous mode), and in synchronous mode no write is
  acknowledged by a primary without a synchronous standby (it would exist on
  one server only);
* **liveness**: each round recovered (exactly one primary, writes acknowledged)
  within the bound after its fault healed;
* **availability**: the share of time with acknowledged writes, each
  failover's duration (last acknowledgement of a term to the first of the
  next), reads' success rate and longest read outage.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .workload import ReadRecord, WriteRecord

BIN = 0.25  # seconds: the availability resolution


@dataclass
class Verdict:
    violations: list[str] = field(default_factory=list)
    acked: int = 0
    lost: list[str] = field(default_factory=list)
    failovers: list[float] = field(default_factory=list)  # seconds without acknowledgements around a term change
    write_availability: float = 0.0
    read_availability: float = 0.0
    longest_read_outage: float = 0.0
    terms: list[tuple[int, str, float, float]] = field(default_factory=list)  # token, server, first, last ack
    unreplicated: list[str] = field(default_factory=list)  # synchronous mode: acked with no synchronous standby

    @property
    def ok(self) -> bool:
        return not self.violations


def one_writer(writes: Sequence[WriteRecord]) -> list[str]:
    """Violations of "at most one writer" among acknowledged writes."""
    out = []
    acks = sorted((w for w in writes if w.outcome == "ok"), key=lambda w: w.acked)
    owner: dict[int, str] = {}
    for w in acks:
        if w.server_token is None:
            out.append(f"{w.id} acknowledged by {w.server} without a lease token")
            continue
        prev = owner.setdefault(w.server_token, w.server or "?")
        if prev != w.server:
            out.append(f"token {w.server_token} acknowledged by two servers: {prev} and {w.server} ({w.id})")
    # For each write, the newest token among writes acknowledged before it was sent.
    ack_times = [w.acked for w in acks]
    newest, best = [], 0
    for w in acks:
        best = max(best, w.server_token or 0)
        newest.append(best)
    for w in acks:
        i = bisect.bisect_left(ack_times, w.sent) - 1
        if i >= 0 and w.server_token is not None and w.server_token < newest[i]:
            out.append(f"{w.id} sent at {w.sent:.3f} after token {newest[i]} was acknowledged, yet committed "
                       f"by {w.server} under older token {w.server_token} (acked {w.acked:.3f})")
    return out


def rows_in_order(rows: Sequence[tuple[int, str, int | None, str | None]]) -> list[str]:
    """Rows (seq, id, token, server) of the final primary: tokens never decrease in commit-sequence order."""
    out, best, by = [], 0, ""
    for seq, wid, token, server in sorted(rows):
        if token is not None and token < best:
            out.append(f"row {wid} (seq {seq}, {server}) has token {token} after token {best} ({by})")
        if token is not None and token > best:
            best, by = token, wid
    return out


def lost(writes: Iterable[WriteRecord], final_ids: set[str]) -> list[str]:
    return sorted(w.id for w in writes if w.outcome == "ok" and w.id not in final_ids)


def terms(writes: Sequence[WriteRecord]) -> list[tuple[int, str, float, float]]:
    spans: dict[int, list[Any]] = {}
    for w in writes:
        if w.outcome == "ok" and w.server_token is not None:
            s = spans.setdefault(w.server_token, [w.server, w.acked, w.acked])
            s[1], s[2] = min(s[1], w.acked), max(s[2], w.acked)
    return sorted((tok, s[0], s[1], s[2]) for tok, s in spans.items())


def failovers(ts: Sequence[tuple[int, str, float, float]]) -> list[float]:
    """Gap between the last acknowledgement of each term and the first of the next."""
    return [max(0.0, b[2] - a[3]) for a, b in zip(ts, ts[1:])]


def write_availability(writes: Sequence[WriteRecord], start: float, end: float) -> float:
    if end <= start:
        return 0.0
    n = max(1, int((end - start) / BIN))
    hit = {int((w.acked - start) / BIN) for w in writes if w.outcome == "ok" and start <= w.acked < end}
    return len(hit & set(range(n))) / n


def read_outage(reads: Sequence[ReadRecord]) -> float:
    """Longest time between two successful reads (or a run of failures)."""
    worst, last_ok = 0.0, None
    for r in sorted(reads, key=lambda r: r.t):
        if r.ok:
            if last_ok is not None:
                worst = max(worst, r.t - last_ok)
            last_ok = r.t + r.latency
    return worst


def check(writes: Sequence[WriteRecord], reads: Sequence[ReadRecord],
          final_rows: Sequence[tuple[int, str, int | None, str | None]], *, synchronous: bool,
          start: float, end: float, liveness: Sequence[str] = ()) -> Verdict:
    """Everything above, over a whole run; ``liveness`` holds the rounds that did not recover in time."""
    v = Verdict()
    v.violations += one_writer(writes)
    v.violations += rows_in_order(final_rows)
    v.acked = sum(1 for w in writes if w.outcome == "ok")
    v.lost = lost(writes, {r[1] for r in final_rows})
    if synchronous and v.lost:
        v.violations.append(f"{len(v.lost)} acknowledged writes missing on the final primary "
                            f"(synchronous mode), e.g. {v.lost[:5]}")
    if synchronous:
        v.unreplicated = [w.id for w in writes if w.outcome == "ok" and w.sync_names == ""]
        if v.unreplicated:
            v.violations.append(f"{len(v.unreplicated)} writes acknowledged in synchronous mode by a primary with "
                                f"no synchronous standby (synchronous_standby_names empty), e.g. "
                                f"{v.unreplicated[:3]}")
    v.violations += list(liveness)
    v.terms = terms(writes)
    v.failovers = failovers(v.terms)
    v.write_availability = write_availability(writes, start, end)
    reads = [r for r in reads if start <= r.t < end]
    v.read_availability = sum(r.ok for r in reads) / len(reads) if reads else 0.0
    v.longest_read_outage = read_outage(reads)
    return v


def percentile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]
