"""The seeded fault schedule, and how each kind of fault is made and healed on a :class:`Stack`.

:func:`schedule` is a pure function of the seed: the same seed gives the same
list of :class:`Fault` (kind, target, duration, pause). A target is a role
(``primary``/``standby``, resolved when the fault starts) or a host name;
which standby a ``standby`` fault hits is drawn from the fault's own seeded
generator, so a replay hits the same one whenever the roles are the same.
:func:`inject` makes the fault and returns what it hit and the function that
heals it.
"""

from __future__ import annotations

import logging
import random
import signal
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from .stack import DB, ETCD, CACHES, ZONES, Stack

log = logging.getLogger("tenure.lab")

# kind -> weight in the schedule
KINDS: dict[str, int] = {
    "kill_sidecar": 2, "kill_postgres": 2, "crash_host": 2,
    "freeze_sidecar": 2, "freeze_postgres": 2,
    "kill_etcd": 2, "quorum_loss": 1,
    "cut_etcd": 2, "cut_peers": 2, "isolate_etcd": 1, "cut_zone": 2, "asymmetric": 2,
    "kill_memcached": 1, "restart_sidecar": 2,
}
DB_KINDS = {"kill_sidecar", "kill_postgres", "crash_host", "freeze_sidecar", "freeze_postgres", "cut_etcd",
            "cut_peers", "asymmetric", "restart_sidecar", "cut_zone"}


@dataclass(frozen=True)
class Fault:
    round: int
    kind: str
    target: str  # "primary", "standby", or a host / zone name
    duration: float  # seconds the fault lasts before it is healed
    pause: float  # seconds of calm after recovery, before the next round
    detail: dict[str, Any] = field(default_factory=dict)
    seed: int = 0  # for choices made when the fault starts

    def describe(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.detail.items())
        return f"#{self.round} {self.kind} {self.target} {self.duration:.1f}s{extra}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def schedule(seed: int, rounds: int, ttl: int = 2, kinds: dict[str, int] | None = None) -> list[Fault]:
    """``rounds`` faults drawn from ``seed``; durations are around the ttl (0.5-3 × ttl, partitions longer)."""
    rng = random.Random(seed)
    weights = kinds or KINDS
    names = sorted(weights)
    out = []
    for i in range(rounds):
        kind = rng.choices(names, [weights[n] for n in names])[0]
        detail: dict[str, Any] = {}
        if kind in DB_KINDS and kind != "cut_zone":
            target = "primary" if rng.random() < 0.7 else "standby"
        elif kind == "cut_zone":
            target = "primary"  # the zone of the primary: its node and that zone's etcd member
        elif kind in ("kill_etcd", "isolate_etcd"):
            target = rng.choice(ETCD)
        elif kind == "quorum_loss":
            target = "+".join(rng.sample(ETCD, 2))
        else:
            target = rng.choice(CACHES)
        if kind == "asymmetric":
            detail = {"direction": rng.choice(["in", "out"]), "from": rng.choice(["etcd", "peers"])}
        if kind.startswith("freeze"):
            duration = round(rng.uniform(0.5, 3.0) * ttl, 1)
        elif kind == "restart_sidecar":
            duration = 0.0
        else:
            duration = round(rng.uniform(1.0, 4.0) * ttl, 1)
        out.append(Fault(i + 1, kind, target, duration, round(rng.uniform(0.5, 2.0), 1), detail,
                         rng.randrange(1 << 30)))
    return out


def resolve(stack: Stack, fault: Fault, primary: str | None) -> str:
    """The host (or hosts, ``+``-joined) a fault hits now."""
    rng = random.Random(fault.seed)
    if fault.target == "primary":
        return primary or rng.choice(DB)
    if fault.target == "standby":
        return rng.choice(sorted(h for h in DB if h != primary))
    return fault.target


def inject(stack: Stack, fault: Fault, host: str) -> Callable[[], None]:
    """Make ``fault`` on ``host``; return the function that heals it."""
    net = stack.net
    k = fault.kind
    if k == "kill_sidecar":
        stack.signal_sidecar(host, signal.SIGKILL)
        return lambda: stack.start_sidecar(host)
    if k == "kill_postgres":
        stack.signal_postgres(host, signal.SIGKILL)
        return lambda: None  # the sidecar starts its server again
    if k == "crash_host":
        stack.signal_sidecar(host, signal.SIGKILL)
        stack.signal_postgres(host, signal.SIGKILL)
        return lambda: stack.start_sidecar(host)
    if k == "freeze_sidecar":
        stack.signal_sidecar(host, signal.SIGSTOP)
        return lambda: stack.signal_sidecar(host, signal.SIGCONT)
    if k == "freeze_postgres":
        pids = stack.postgres_pids(host)
        for sig_pid in pids:
            _signal(sig_pid, signal.SIGSTOP)

        def thaw() -> None:
            for p in pids:
                _signal(p, signal.SIGCONT)
        return thaw
    if k == "kill_etcd":
        stack.kill_etcd(host)
        return lambda: stack.start_etcd(host)
    if k == "quorum_loss":
        members = host.split("+")
        for m in members:
            stack.kill_etcd(m)

        def restart() -> None:
            for m in members:
                stack.start_etcd(m)
        return restart
    if k == "cut_etcd":
        net.cut([host], ETCD)
    elif k == "cut_peers":
        net.cut([host], [h for h in DB if h != host])
    elif k == "isolate_etcd":
        net.isolate([host])
    elif k == "cut_zone":
        zone = next(z for z, hosts in ZONES.items() if host in hosts)
        net.isolate(list(ZONES[zone]))
    elif k == "asymmetric":
        peers = ETCD if fault.detail.get("from") == "etcd" else [h for h in DB if h != host]
        net.cut([host], peers, direction=fault.detail.get("direction", "in"))
    elif k == "kill_memcached":
        stack.kill_cache(host)
        return lambda: stack.start_cache(host)
    elif k == "restart_sidecar":
        stack.stop_sidecar_cleanly(host)
        stack.start_sidecar(host)
        return lambda: None
    else:
        raise ValueError(f"unknown fault kind {k!r}")
    return net.heal


def _signal(pid: int, sig: int) -> None:
    import os

    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
