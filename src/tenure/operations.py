"""What the operator commands do: read a service's state for ``tenure status``, drive switchovers and restarts.

Everything here goes through etcd only (the sidecars act on the records that
:mod:`tenure.maintenance` writes), so the commands run from any machine that
reaches etcd. Results are plain dicts, ready for ``--json``.
"""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import urlsplit

from . import maintenance, records
from .errors import ConfigError, MalformedRecord, UnknownService, WaitTimeout
from .etcd import Client, parse_endpoints
from .members import read_members
from .records import CandidateRecord, LeaderRecord, MemberRecord, PrimaryRecord

_HOST = re.compile(r"(?:^|\s)host\s*=\s*'?([^\s']+)")


def host_of(address: str | None) -> str | None:
    """The host part of a libpq DSN or a URL (None if it names none)."""
    if not address:
        return None
    m = _HOST.search(address)
    if m:
        return m.group(1)
    if "://" in address:
        return urlsplit(address).hostname
    return None


def _leader(client: Client, service: str) -> tuple[str, int, int, list[str]] | None:
    """(member, token, lease id, synchronous standbys) of the current term, or None."""
    kv = client.get(records.leader_key(service))
    if kv is None:
        return None
    try:
        member = LeaderRecord.decode(kv.value).member
    except MalformedRecord:
        member = "?"
    return member, kv.create_revision, kv.lease, []


def service_status(client: Client, service: str) -> dict[str, Any]:
    """One service as ``tenure status`` shows it: members, primary, verdict and placement warnings."""
    kvs, _ = client.get_prefix(records.service_prefix(service))
    leader = _leader(client, service)
    token = leader[1] if leader else None
    lease_left = None
    if leader is not None and leader[2]:
        ttl = client.time_to_live(leader[2])
        lease_left = ttl if ttl >= 0 else None
    primary = None
    pkv = client.get(records.primary_key(service))
    if pkv is not None:
        try:
            rec = PrimaryRecord.decode(pkv.value)
            if rec.token == token:
                primary = rec
        except MalformedRecord:
            primary = None
    pause = maintenance.paused(client, service)
    request = maintenance.switchover(client, service)
    members = read_members(client, service)
    rows: list[dict[str, Any]] = []
    if members:
        lead = members.get(leader[0]) if leader else None
        primary_pos = lead.position if lead is not None and lead.position is not None else max(
            (m.position or 0 for m in members.values()), default=0)
        sync = set(lead.get("sync", []) or []) if lead is not None else set()
        for name, m in sorted(members.items()):
            is_leader = leader is not None and name == leader[0]
            rows.append({
                "member": name, "role": m.role, "healthy": m.healthy,
                "lag_bytes": None if is_leader or m.position is None else max(0, primary_pos - m.position),
                "lag_seconds": m.get("lag_seconds"),
                "timeline": m.timeline, "zone": m.zone or None, "token": token if is_leader else None,
                "lease_left": lease_left if is_leader else None,
                "sync": None if is_leader else (name in sync), "paused": pause is not None,
                "streaming": m.streaming, "eligible": m.eligible, "nofailover": m.nofailover,
                "host": host_of(m.dsn or m.address), "dsn": m.dsn,
            })
    else:  # a plain election (singleton job): its candidates
        ckvs, _ = client.get_prefix(records.candidates_prefix(service))
        for kv in ckvs:
            try:
                c = CandidateRecord.decode(kv.value)
            except MalformedRecord:
                continue
            is_leader = leader is not None and c.member == leader[0]
            value = c.value or {}
            rows.append({"member": c.member, "role": "leader" if is_leader else "candidate", "healthy": True,
                         "lag_bytes": None, "lag_seconds": None, "timeline": None,
                         "zone": value.get("zone") or None, "token": token if is_leader else None,
                         "lease_left": lease_left if is_leader else None, "sync": None,
                         "paused": pause is not None, "host": host_of(value.get("dsn")), "value": value})
    has_primary = primary is not None or (not members and leader is not None)
    warnings = placement_warnings(rows)
    now = time.time()
    pending = request if request is not None and request.in_force(now) else None
    return {
        "service": service, "exists": bool(kvs),
        "leader": None if leader is None else {"member": leader[0], "token": leader[1]},
        "primary": (primary.member if primary is not None else (leader[0] if has_primary and leader else None)),
        "token": token, "paused": pause is not None,
        "switchover": None if pending is None else {"to": pending.target, "at": pending.at,
                                                    "deadline": pending.deadline},
        "members": rows, "warnings": warnings,
        "verdict": _verdict(service, rows, leader, has_primary, pause is not None, pending),
    }


def _verdict(service: str, rows: list[dict[str, Any]], leader: Any, has_primary: bool, paused: bool,
             pending: Any) -> str:
    notes = []
    if paused:
        notes.append("PAUSED: no automatic failover")
    if pending is not None:
        notes.append(f"switchover to {pending.target} pending")
    tail = ("; " + "; ".join(notes)) if notes else ""
    if not has_primary:
        why = "a term is starting or ending" if leader is not None else "nobody holds the term"
        return f"NO PRIMARY: {service} is read-only ({why}){tail}"
    standbys = [r for r in rows if r["role"] == "standby"]
    streaming = [r for r in standbys if r.get("streaming") and r["healthy"]]
    lags = [r["lag_bytes"] for r in standbys if r["lag_bytes"] is not None]
    if not standbys:
        extra = "" if rows and rows[0]["role"] in ("leader", "candidate") else "; no standby: no failover possible"
        return f"OK: {leader[0]} leads (token {leader[1]}){extra}{tail}"
    level = "OK" if len(streaming) == len(standbys) else "DEGRADED"
    return (f"{level}: {leader[0]} is primary (token {leader[1]}), {len(streaming)} of {len(standbys)} standbys "
            f"streaming, max lag {max(lags) if lags else 0} B{tail}")


def placement_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """Members of one service that share a host or a zone (failover pairs belong on different machines)."""
    out = []
    by_host: dict[str, list[str]] = {}
    by_zone: dict[str, list[str]] = {}
    for r in rows:
        if r.get("host"):
            by_host.setdefault(r["host"], []).append(r["member"])
        by_zone.setdefault(r.get("zone") or "", []).append(r["member"])
    for host, names in sorted(by_host.items()):
        if len(names) > 1:
            out.append(f"members {', '.join(names)} share host {host}: one machine failing takes them all")
    for zone, names in sorted(by_zone.items()):
        if len(names) > 1:
            where = f"zone {zone}" if zone else "no zone (set `zone` in each sidecar's config)"
            out.append(f"members {', '.join(names)} share {where}")
    return out


def etcd_placement(endpoints: str, zones: list[str]) -> list[str]:
    """Warnings when etcd's members cannot keep quorum through the loss of one zone."""
    eps = parse_endpoints(endpoints)
    hosts = {e.host for e in eps}
    out = []
    if len(eps) < 3:
        out.append(f"etcd: {len(eps)} endpoint(s) given; a cluster needs 3 or 5 members to survive one failing")
    if zones:
        if len(set(zones)) < 3:
            out.append(f"etcd: members span {len(set(zones))} zone(s) ({', '.join(sorted(set(zones)))}); "
                       "quorum through a zone loss needs 3")
    elif len(hosts) < 3:
        out.append(f"etcd: {len(eps)} endpoint(s) on {len(hosts)} host(s); zones unknown "
                   "(pass --etcd-zones or set TENURE_ETCD_ZONES); quorum through a zone loss needs 3 zones")
    return out


# -- switchover and restart ------------------------------------------------------------


def choose_target(members: dict[str, MemberRecord], leader: str) -> str | None:
    """The best member to hand over to: caught up, healthy, streaming, not nofailover; most WAL, then priority."""
    ok = [m for name, m in members.items() if name != leader and not maintenance.refusal(m)]
    ok.sort(key=lambda m: (-(m.position or 0), -m.priority, m.member))
    return ok[0].member if ok else None


def switchover(client: Client, service: str, *, target: str | None = None, at: float | None = None,
               timeout: float = 10.0) -> dict[str, Any]:
    """Request a planned handover and, unless it is scheduled for later, wait for it.

    Raises ConfigError when the request is refused (no primary, a bad target)
    and WaitTimeout when it did not happen in ``timeout`` s (then the old
    primary still leads: the sidecar left everything as it was).
    """
    leader = _leader(client, service)
    if leader is None:
        if not client.get_prefix(records.service_prefix(service))[0]:
            raise UnknownService(f"service {service!r} has no keys in etcd")
        raise ConfigError(f"{service}: no primary to switch over from (a failover is what happens now)")
    members = read_members(client, service)
    if leader[0] not in members:
        raise ConfigError(f"{service}: {leader[0]} leads but publishes no member record: not a sidecar service")
    if target is None:
        target = choose_target(members, leader[0])
        if target is None:
            raise ConfigError(f"{service}: no healthy, caught-up standby to switch over to")
    elif target == leader[0]:
        raise ConfigError(f"{service}: {target} is already the primary")
    else:
        why = maintenance.refusal(members.get(target))
        if why:
            raise ConfigError(f"{service}: cannot switch over to {target}: {why}")
    req = maintenance.request_switchover(client, service, target, leader[1], at=at, timeout=timeout)
    result: dict[str, Any] = {"service": service, "from": leader[0], "to": target, "at": req.at,
                              "old_token": leader[1]}
    if req.at > time.time() + 0.5:
        return {**result, "state": "scheduled"}
    t0 = time.monotonic()
    gone = None
    end = t0 + timeout + 2.0  # the old primary needs a moment to restore itself after its deadline
    while time.monotonic() < end:
        now_leader = _leader(client, service)
        pkv = client.get(records.primary_key(service))
        published = None
        if pkv is not None:
            try:
                published = PrimaryRecord.decode(pkv.value)
            except MalformedRecord:
                published = None
        if published is None and gone is None:
            gone = time.monotonic()
        if (now_leader is not None and now_leader[1] == leader[1] and published is not None
                and published.token == leader[1] and time.monotonic() - t0 > 0.5
                and maintenance.switchover(client, service) is None):
            # The request is gone and the old term is still published: the primary's sidecar refused it
            # or timed out and restored everything.
            raise WaitTimeout(f"{service}: the primary {leader[0]} did not hand over to {target} "
                              "(refused or timed out; see its sidecar's log); nothing changed")
        if (now_leader is not None and now_leader[0] == target and published is not None
                and published.token == now_leader[1]):
            done = time.monotonic()
            return {**result, "state": "done", "token": now_leader[1], "seconds": round(done - t0, 3),
                    "gap": round(done - (gone if gone is not None else done), 3)}
        time.sleep(0.01)
    maintenance.clear_switchover(client, service)
    still = _leader(client, service)
    who = f"{still[0]} (token {still[1]}) still leads" if still else "nobody leads now"
    raise WaitTimeout(f"{service}: switchover to {target} did not complete within {timeout:g} s; {who}")


def find_member(client: Client, member: str, services: list[str], service: str | None) -> str:
    """The service that has a live member ``member``."""
    names = [service] if service else services
    found = [s for s in names if member in read_members(client, s)]
    if not found:
        where = f"service {service!r}" if service else "any service"
        raise ConfigError(f"no live member {member!r} in {where}")
    if len(found) > 1:
        raise ConfigError(f"member {member!r} is in services {', '.join(found)}: pass --service")
    return found[0]


def restart(client: Client, member: str, *, service: str | None, services: list[str],
            timeout: float = 60.0) -> dict[str, Any]:
    """Restart ``member``'s server as a standby, switching over first if it is the primary; wait until it streams."""
    svc = find_member(client, member, services, service)
    t0 = time.monotonic()
    result: dict[str, Any] = {"service": svc, "member": member, "switchover": None}
    leader = _leader(client, svc)
    if leader is not None and leader[0] == member:
        result["switchover"] = switchover(client, svc, timeout=min(timeout, 10.0))
        # The old primary rejoins as a standby on its own; wait for that before restarting it.
        _wait_streaming(client, svc, member, t0 + timeout, after=0.0)
    req = maintenance.request_restart(client, svc, member, timeout=timeout)
    end = t0 + timeout
    while time.monotonic() < end and maintenance.restart_request(client, svc, member) is not None:
        time.sleep(0.05)
    if maintenance.restart_request(client, svc, member) is not None:
        maintenance.clear_restart(client, svc, member)
        raise WaitTimeout(f"{svc}/{member}: its sidecar did not restart the server within {timeout:g} s")
    _wait_streaming(client, svc, member, end, after=req.requested)
    return {**result, "seconds": round(time.monotonic() - t0, 3)}


def _wait_streaming(client: Client, service: str, member: str, end: float, *, after: float) -> None:
    while time.monotonic() < end:
        m = read_members(client, service).get(member)
        if (m is not None and m.role == "standby" and m.healthy and m.streaming
                and (m.updated or 0) > after):
            return
        time.sleep(0.05)
    raise WaitTimeout(f"{service}/{member}: not a streaming standby again in time")
