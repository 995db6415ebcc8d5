"""Prometheus metrics of the web tier, correct under pre-fork servers (gunicorn) with several workers.

Each worker process counts for itself. Under gunicorn a scrape of
``/metrics`` reaches one worker at random, so a plain per-process registry
would show one worker's counts. Run with prometheus_client's multiprocess
mode instead: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before
gunicorn starts (every worker then writes its counters to files there), serve
:func:`metrics_app` on some path, and call :func:`child_exit` from
gunicorn's ``child_exit`` hook so a dead worker's live gauges go with it.
Counters of dead workers are kept (they add up, as counters should).

The routing view itself (primary, read-only, etcd freshness, ring epoch) is
the same in every worker of a host: the per-host agent (``tenure agent``)
exports it once on its own ``/metrics``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, generate_latest, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CACHE_REQUESTS = Counter(
    "tenure_memcache_requests_total",
    "Cache operations by kind and outcome: hit, miss, stale (a copy refused because it may be older "
    "than one written elsewhere), down (server unreachable), unsure (view of the ring not fresh), "
    "stored, not_stored",
    ["service", "op", "result"],
)


def registry() -> Any:
    """The registry to expose: every worker's metrics in multiprocess mode, else this process's own."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        return reg
    from prometheus_client import REGISTRY

    return REGISTRY


def metrics_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A WSGI application answering with the metrics in Prometheus' text format."""
    body = generate_latest(registry())
    start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
    return [body]


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn's ``child_exit`` hook: forget the live gauges of a worker that exited (multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)
