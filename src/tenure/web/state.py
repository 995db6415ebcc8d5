"""What one snapshot of a service's keys says to the web tier: its primary, replicas and members.

:func:`parse_state` is a pure function of the keys under ``svc/<service>/``
(as :mod:`tenure.records` defines them), so the routing rules can be read and
tested without etcd:

* the primary is the published :class:`~tenure.records.PrimaryRecord`, believed
  only while the leader key exists with that token as its create revision (a
  resigned term stops counting the moment its leader key goes);
* replicas are the members with role ``standby`` that are ``healthy`` and
  ``streaming``;
* reads may go to the replicas, then the primary, then any other healthy
  member (a standby whose primary died still serves slightly stale reads).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from .. import records
from ..errors import MalformedRecord
from ..records import LeaderRecord, MemberRecord, PrimaryRecord

if TYPE_CHECKING:
    from ..etcd import KeyValue

log = logging.getLogger("tenure.web")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One member a client can connect to: ``dsn`` is its DSN or address; ``token`` the term, for a primary."""

    member: str
    dsn: str
    token: int | None = None  # the fencing token of the primary's term; None for a replica
    zone: str = ""


@dataclass(frozen=True, slots=True)
class ServiceState:
    """What one snapshot of ``svc/<service>/`` says; replaced whole, never changed in place."""

    primary: Endpoint | None = None  # as published, whatever the staleness
    replicas: tuple[Endpoint, ...] = ()
    readable: tuple[Endpoint, ...] = ()  # where reads may go, best first
    members: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    member_revisions: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # create revisions
    exists: bool | None = None  # None before the first snapshot
    revision: int = 0


EMPTY = ServiceState()


def relevant(service: str, key: str) -> bool:
    """Whether ``key`` takes part in the view: the leader, primary and member keys (not history, candidates)."""
    return (key == records.leader_key(service) or key == records.primary_key(service)
            or records.member_of(service, key) is not None)


def parse_state(service: str, kvs: Mapping[str, KeyValue], revision: int, exists: bool) -> ServiceState:
    """The state that the keys ``kvs`` (by key) of ``service`` describe, as of ``revision``."""
    leader = kvs.get(records.leader_key(service))
    primary = None
    kv = kvs.get(records.primary_key(service))
    if kv is not None:
        try:
            rec = PrimaryRecord.decode(kv.value)
        except MalformedRecord as e:
            log.warning("ignoring the primary record of %s: %s", service, e)
        else:
            # Believed only while its term is the current one.
            if leader is not None and leader.create_revision == rec.token:
                try:
                    zone = str((LeaderRecord.decode(leader.value).value or {}).get("zone") or "")
                except MalformedRecord:
                    zone = ""
                primary = Endpoint(rec.member, rec.dsn, rec.token, zone)
    members: dict[str, Mapping[str, Any]] = {}
    parsed: dict[str, MemberRecord] = {}
    revisions: dict[str, int] = {}
    for key, kv in kvs.items():
        name = records.member_of(service, key)
        if name is None:
            continue
        try:
            rec_m = MemberRecord.decode(kv.value)
        except MalformedRecord as e:
            log.warning("ignoring the member record %s: %s", key, e)
            continue
        parsed[name] = rec_m
        members[name] = MappingProxyType(kv.json())
        revisions[name] = kv.create_revision
    replicas = tuple(
        Endpoint(name, m.dsn, None, m.zone)
        for name, m in sorted(parsed.items())
        if m.role == "standby" and m.healthy and m.streaming and m.dsn is not None
        and (primary is None or name != primary.member))
    readable = list(replicas)
    if primary is not None:
        readable.append(Endpoint(primary.member, primary.dsn, None, primary.zone))
    seen = {e.member for e in readable}
    for name, m in sorted(parsed.items()):
        if name not in seen and m.healthy and m.role in ("standby", "primary") and m.dsn is not None:
            readable.append(Endpoint(name, m.dsn, None, m.zone))
    return ServiceState(primary, replicas, tuple(readable), MappingProxyType(members),
                        MappingProxyType(revisions), exists, revision)
