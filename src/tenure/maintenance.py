"""Operator requests stored in etcd: maintenance mode, planned switchovers, restarts.

The ``tenure`` command writes these records and the sidecars read them (see
:mod:`tenure.records` for the keys). Readers fail closed: a pause record that
cannot be read counts as a pause.
"""

from __future__ import annotations

import logging
import time

from . import records
from .errors import ConfigError, MalformedRecord
from .etcd import Client
from .records import MemberRecord, PauseRecord, RestartRecord, SwitchoverRecord

log = logging.getLogger("tenure.maintenance")


def paused(client: Client, service: str) -> PauseRecord | None:
    """The service's pause record, None if it is not paused (raises EtcdError when etcd cannot tell)."""
    kv = client.get(records.pause_key(service))
    if kv is None:
        return None
    try:
        return PauseRecord.decode(kv.value)
    except MalformedRecord as e:
        log.warning("%s: unreadable pause record counts as paused: %s", service, e)
        return PauseRecord(since=0.0, reason="unreadable pause record")


def pause(client: Client, service: str, reason: str = "") -> PauseRecord:
    """Put ``service`` in maintenance mode: no automatic failover until :func:`resume`."""
    rec = PauseRecord(since=time.time(), reason=reason)
    client.put(records.pause_key(records.check_name("service", service)), rec.encode())
    return rec


def resume(client: Client, service: str) -> bool:
    """Leave maintenance mode; True if the service was paused."""
    return client.delete(records.pause_key(records.check_name("service", service)))


def switchover(client: Client, service: str) -> SwitchoverRecord | None:
    """The pending switchover request of ``service`` (None if there is none or it is unreadable)."""
    kv = client.get(records.switchover_key(service))
    if kv is None:
        return None
    try:
        return SwitchoverRecord.decode(kv.value)
    except MalformedRecord as e:
        log.warning("%s: ignoring an unreadable switchover request: %s", service, e)
        return None


def request_switchover(client: Client, service: str, target: str, token: int, *, at: float | None = None,
                       timeout: float = 10.0) -> SwitchoverRecord:
    """Ask the primary of term ``token`` to hand over to ``target`` at wall-clock ``at`` (now by default).

    Raises ConfigError if another request is pending.
    """
    records.check_name("member", target)
    records.check_token(token)
    if timeout <= 0:
        raise ConfigError(f"switchover timeout must be positive, got {timeout!r}")
    now = time.time()
    start = now if at is None else max(now, at)
    rec = SwitchoverRecord(target=target, token=token, at=start, deadline=start + timeout, requested=now)
    created, existing = client.create(records.switchover_key(service), rec.encode())
    if not created:
        pending = switchover(client, service)
        if pending is not None and pending.in_force(now):
            raise ConfigError(f"{service}: a switchover to {pending.target} is already pending "
                              f"(until {time.strftime('%H:%M:%S', time.gmtime(pending.deadline))} UTC)")
        client.put(records.switchover_key(service), rec.encode())
    return rec


def clear_switchover(client: Client, service: str) -> bool:
    """Withdraw a switchover request; True if there was one."""
    return client.delete(records.switchover_key(service))


def restart_request(client: Client, service: str, member: str) -> RestartRecord | None:
    """The pending restart request for ``member`` (None if none or unreadable)."""
    kv = client.get(records.restart_key(service, member))
    if kv is None:
        return None
    try:
        return RestartRecord.decode(kv.value)
    except MalformedRecord as e:
        log.warning("%s/%s: ignoring an unreadable restart request: %s", service, member, e)
        return None


def request_restart(client: Client, service: str, member: str, *, timeout: float = 60.0) -> RestartRecord:
    """Ask ``member``'s sidecar to restart its server once (a standby's sidecar acts on it)."""
    now = time.time()
    rec = RestartRecord(member=records.check_name("member", member), requested=now, deadline=now + timeout)
    client.put(records.restart_key(service, member), rec.encode())
    return rec


def clear_restart(client: Client, service: str, member: str) -> bool:
    return client.delete(records.restart_key(service, member))


def refusal(target: MemberRecord | None) -> str:
    """Why ``target`` may not take a planned handover ('' if it may)."""
    if target is None:
        return "no such live member"
    if target.nofailover:
        return "nofailover is set"
    if not target.healthy:
        return "not healthy"
    if target.role != "standby" or not target.streaming:
        return f"not a streaming standby (role {target.role})"
    if not target.eligible:
        return "not eligible (lagging, or not a synchronous standby)"
    return ""
