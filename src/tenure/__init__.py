"""tenure: one primary at a time, with proof.

Lease-based leader election over etcd with fencing tokens, for services that
must have exactly one writer (PostgreSQL, Solr, singleton jobs)::

    import tenure

    client = tenure.connect(["http://10.0.0.1:2379", "http://10.0.0.2:2379"])
    election = tenure.Election(client, "db", member="db1", value={"dsn": "..."})
    with election.lead() as leadership:
        while leadership.is_valid():
            ...  # act as primary; pass leadership.token to every fenced write
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from . import errors
from .records import LeaderInfo, Term

if TYPE_CHECKING:
    from .election import Election, Leadership
    from .etcd import Client
    from .web import ReadOnlyMiddleware, Router

__all__ = ["connect", "Client", "Election", "Leadership", "LeaderInfo", "Term", "Router", "ReadOnlyMiddleware",
           "errors"]
__version__ = "0.1.0"


def connect(
    endpoints: str | Sequence[str],
    *,
    namespace: str = "/tenure",
    timeout: float = 1.0,
    retry_for: float = 5.0,
    ca_cert: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    user: str | None = None,
    password: str | None = None,
    check: bool = True,
) -> Client:
    """Connect to an etcd cluster through any of ``endpoints`` ("http://host:port").

    ``timeout`` bounds each attempt, ``retry_for`` all attempts of one call.
    Use ``https://`` endpoints with ``ca_cert`` (and ``cert``/``key`` for
    client certificates); ``user``/``password`` for etcd auth. With ``check``
    the cluster is asked for its status first, so a wrong endpoint fails here
    with :class:`~tenure.errors.EtcdUnavailable` rather than later.
    """
    from .etcd import Client

    client = Client(
        endpoints, namespace=namespace, timeout=timeout, retry_for=retry_for,
        ca_cert=ca_cert, cert=cert, key=key, user=user, password=password,
    )
    if check:
        try:
            client.status()
        except BaseException:
            client.close()
            raise
    return client


def __getattr__(name: str) -> Any:
    # Imported on first use: sidecars and jobs never load the web tier, and a web worker that reads the
    # per-host agent's view (tenure.web.agent_view) never loads gRPC.
    if name in ("Router", "ReadOnlyMiddleware"):
        from . import web

        return getattr(web, name)
    if name in ("Election", "Leadership"):
        from . import election

        return getattr(election, name)
    if name == "Client":
        from .etcd import Client

        return Client
    raise AttributeError(f"module 'tenure' has no attribute {name!r}")
