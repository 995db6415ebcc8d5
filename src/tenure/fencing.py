"""Fences: shared storage that rejects writes from a deposed leader.

A leader's local deadline keeps an honest, running leader from acting after
its term. A fence protects the data from everything else: a leader that was
paused past its deadline and resumes mid-write, a request that was in flight
when the term ended. Each write carries the term's fencing token, and the
storage refuses a token older than the newest it has seen.

* etcd: :func:`etcd_put` writes only if the service's leader key still has
  the writer's token as its create revision (one transaction).
* PostgreSQL: :func:`install_pg_fence` creates ``tenure.fence``;
  :func:`pg_fence`, called inside the writer's own transaction, records the
  token for a resource and raises :class:`Fenced` if a newer one is there.
  The row lock it takes holds back an older writer until the newer one's
  transaction ends, after which the older one is refused.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError, Fenced
from .etcd import Client
from .records import check_name, check_token, leader_key

_PG_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS tenure;
CREATE TABLE IF NOT EXISTS tenure.fence (
    resource   text PRIMARY KEY,
    token      bigint NOT NULL CHECK (token > 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""

_PG_FENCE = """
INSERT INTO tenure.fence AS f (resource, token) VALUES (%s, %s)
ON CONFLICT (resource) DO UPDATE SET token = EXCLUDED.token, updated_at = now()
    WHERE f.token <= EXCLUDED.token
RETURNING token
"""


def etcd_put(client: Client, service: str, token: int, key: str, value: bytes | str, *, lease: int = 0) -> int:
    """Write ``key`` only while ``token`` is the current term of ``service``; return the revision.

    With ``lease``, the key is bound to that etcd lease and vanishes with it.
    Raises :class:`Fenced` if the service has a newer leader, or none.
    """
    check_name("service", service)
    check_token(token)
    lk = leader_key(service)
    if key == lk:
        raise ConfigError("the leader key is written by the election, not through a fence")
    revision = client.put(key, value, lease=lease, guard=(lk, token))
    if revision is None:
        current = client.get(lk)
        now = current.create_revision if current is not None else None
        raise Fenced(
            f"etcd refused a write to {key!r} with token {token}: the current term of {service} is "
            f"{now if now is not None else 'none (no leader)'}",
            token=token, current=now,
        )
    return revision


def install_pg_fence(conn: Any) -> None:
    """Create the ``tenure.fence`` table if it is missing (idempotent); commits."""
    with conn.transaction():
        conn.execute(_PG_SCHEMA)


def pg_fence(conn: Any, resource: str, token: int) -> None:
    """Inside the caller's transaction: accept ``token`` for ``resource`` or raise :class:`Fenced`.

    Call it first in every transaction that writes on behalf of a term, so the
    transaction fails (and rolls back) if a newer term has already written.
    """
    if not isinstance(resource, str) or not resource:
        raise ConfigError(f"a fence resource is a non-empty string, got {resource!r}")
    check_token(token)
    if conn.autocommit and conn.info.transaction_status == 0:  # IDLE: no transaction to protect
        raise ConfigError("pg_fence must run inside the transaction it protects (use `with conn.transaction():`)")
    row = conn.execute(_PG_FENCE, (resource, token)).fetchone()
    if row is None:
        cur = conn.execute("SELECT token FROM tenure.fence WHERE resource = %s", (resource,)).fetchone()
        current = cur[0] if cur else None
        raise Fenced(
            f"PostgreSQL fence {resource!r} refused token {token}: it has already seen token {current}",
            token=token, current=current,
        )
