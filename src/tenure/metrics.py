"""Prometheus metrics tenure exports (registered in the default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

IS_LEADER = Gauge("tenure_is_leader", "1 while this process holds a valid leadership", ["service", "member"])
TOKEN = Gauge("tenure_fencing_token", "Fencing token of the term this process leads (0: none)", ["service", "member"])
LEASE_REMAINING = Gauge(
    "tenure_lease_remaining_seconds",
    "Seconds left before this leader's local deadline, as of its last renewal",
    ["service", "member"],
)
KEEPALIVE_FAILURES = Counter(
    "tenure_keepalive_failures_total", "Lease keepalives that failed or timed out", ["service", "member"]
)
LEADER_CHANGES = Counter(
    "tenure_leader_changes_total", "Changes of leader seen by this process's election watches", ["service"]
)
