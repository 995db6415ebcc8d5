"""Hosts on one machine as network namespaces, and real partitions between them.

:class:`Network` makes one namespace per host, each with a veth ``eth0``
holding an address in ``127.77.0.0/24`` and plugged into a bridge that lives
in a hub namespace of its own; nothing changes in the root namespace. A
loopback-range address on a veth needs ``route_localnet`` and the removal of
the namespace's own ``local 127.0.0.0/8`` route (``127.0.0.1`` stays on
``lo``). Servers run inside a host with :meth:`Network.popen` (``ip netns
exec`` keeps the pid), and a process joins a host for good with
:func:`enter` (``setns``): from the root namespace ``127.77.x`` is plain
local loopback, so clients must live in a host too.

Cuts are iptables DROP rules inside the cut host's namespace (``tc netem``
needs a kernel module these machines lack): :meth:`Network.cut` drops traffic
between two sets of hosts in both directions, or only one way.
:meth:`Network.heal` removes every rule. Every name starts with a per-run
prefix that embeds the pid; :func:`remove_leftovers` removes the namespaces
(and kills the processes in them) of runs whose pid is gone, and
:meth:`Network.close` removes this run's, also after a failure.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..errors import TenureError

log = logging.getLogger("tenure.lab")

SUBNET = "127.77.0"
NETNS_DIR = "/run/netns"
PREFIX = "tch"  # every namespace of every run starts with this
CLONE_NEWNET = 0x40000000
_NAME = re.compile(rf"^{PREFIX}(\d+)x[0-9a-f]+-")


class NetnsUnavailable(TenureError):
    """Network namespaces cannot be made here (not root, no ``ip``, or a kernel without them)."""


def _ip(*args: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise TenureError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res


def available() -> bool:
    """Whether this process can make namespaces with iptables in them (root, ``ip`` and ``iptables``)."""
    if os.geteuid() != 0:
        return False
    try:
        ok = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=5).returncode == 0
        return ok and subprocess.run(["iptables", "--version"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def namespace_pids(ns: str) -> list[int]:
    """Pids of the processes in namespace ``ns``."""
    res = _ip("netns", "pids", ns, check=False)
    return [int(x) for x in res.stdout.split() if x.isdigit()]


def delete_namespace(ns: str) -> None:
    """SIGKILL every process in ``ns`` (SIGCONT first, for stopped ones), then delete it."""
    for _ in range(3):
        pids = [p for p in namespace_pids(ns) if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            if pid == os.getpid():  # a harness that entered the namespace itself
                continue
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        time.sleep(0.1)
    _ip("netns", "del", ns, check=False)


def remove_leftovers() -> list[str]:
    """Delete the namespaces of earlier runs whose process is gone; return their names."""
    gone = []
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return gone
    for ns in names:
        m = _NAME.match(ns)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            delete_namespace(ns)
            gone.append(ns)
    if gone:
        log.warning("removed %d namespaces left by crashed runs", len(gone))
    return gone


def enter(ns: str) -> None:
    """Move the calling thread (call it before starting any thread: the process) into namespace ``ns``."""
    fd = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise TenureError(f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class Host:
    """One host: its namespace and its address."""

    name: str
    ns: str
    address: str


@dataclass
class Network:
    """Namespaced hosts on one bridge; see the module doc. ``hosts`` maps a host name to its :class:`Host`."""

    run_id: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}x{uuid.uuid4().hex[:4]}")
    hosts: dict[str, Host] = field(default_factory=dict)
    cuts: list[tuple[str, str, str]] = field(default_factory=list)  # (host, chain, peer address)

    @property
    def hub(self) -> str:
        return f"{self.run_id}-hub"

    def create(self, names: Sequence[str]) -> "Network":
        """Make the hub and one host per name (addresses ``127.77.0.1`` upwards, in order)."""
        if not available():
            raise NetnsUnavailable("network namespaces need root, iproute2 and iptables")
        remove_leftovers()
        try:
            _ip("netns", "add", self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for i, name in enumerate(names, start=1):
                self._add_host(name, i)
        except BaseException:
            self.close()
            raise
        return self

    def _add_host(self, name: str, i: int) -> None:
        ns = f"{self.run_id}-{name}"
        addr = f"{SUBNET}.{i}"
        _ip("netns", "add", ns)
        self.hosts[name] = Host(name, ns, addr)
        _ip("-n", ns, "link", "set", "lo", "up")
        self._exec(ns, "sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1",
                   "net.ipv4.conf.default.route_localnet=1")
        _ip("-n", ns, "route", "del", "local", "127.0.0.0/8", "dev", "lo", "table", "local")
        _ip("-n", ns, "route", "replace", "local", "127.0.0.1/32", "dev", "lo", "table", "local")
        # Both ends are made inside namespaces: no interface name ever exists in the root namespace.
        _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"h{i}", "netns", self.hub)
        _ip("-n", self.hub, "link", "set", f"h{i}", "master", "br0", "up")
        self._exec(ns, "sysctl", "-q", "-w", "net.ipv4.conf.eth0.route_localnet=1")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")

    @staticmethod
    def _exec(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=10)
        if check and res.returncode != 0:
            raise TenureError(f"{ns}: {' '.join(argv)}: {res.stderr.strip() or res.returncode}")
        return res

    def address(self, host: str) -> str:
        return self.hosts[host].address

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host``."""
        return ["ip", "netns", "exec", self.hosts[host].ns, *argv]

    def popen(self, host: str, argv: Sequence[str], **kwargs: object) -> "subprocess.Popen[bytes]":
        """Start ``argv`` inside ``host`` (the returned pid is the program's own)."""
        return subprocess.Popen(self.command(host, argv), **kwargs)  # type: ignore[call-overload]

    def run(self, host: str, argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(host, argv), capture_output=True, text=True, timeout=timeout)

    # -- cuts -------------------------------------------------------------------

    def cut(self, a: Iterable[str], b: Iterable[str], *, direction: str = "both") -> None:
        """Drop traffic between hosts ``a`` and hosts ``b``.

        ``direction`` ``"both"``; ``"in"``: ``a`` hears nothing from ``b`` but
        its packets still reach ``b``; ``"out"``: the reverse.
        """
        if direction not in ("both", "in", "out"):
            raise ValueError(f"direction must be both, in or out, got {direction!r}")
        for x in a:
            for y in b:
                if x == y:
                    continue
                peer = self.address(y)
                if direction in ("both", "in"):
                    self._rule(x, "INPUT", "-s", peer)
                if direction in ("both", "out"):
                    self._rule(x, "OUTPUT", "-d", peer)

    def _rule(self, host: str, chain: str, flag: str, peer: str) -> None:
        self._exec(self.hosts[host].ns, "iptables", "-w", "-A", chain, flag, peer, "-j", "DROP")
        self.cuts.append((host, chain, peer))

    def isolate(self, hosts: Iterable[str]) -> None:
        """Cut ``hosts`` from every other host."""
        group = list(hosts)
        self.cut(group, [h for h in self.hosts if h not in group])

    def heal(self) -> None:
        """Remove every cut."""
        for host in sorted({h for h, _, _ in self.cuts}):
            for chain in ("INPUT", "OUTPUT"):
                self._exec(self.hosts[host].ns, "iptables", "-w", "-F", chain, check=False)
        self.cuts.clear()

    def rules(self, host: str) -> str:
        """The host's iptables rules (``iptables -S``), for checks."""
        return self._exec(self.hosts[host].ns, "iptables", "-w", "-S").stdout

    # -- teardown ---------------------------------------------------------------

    def close(self) -> None:
        """Kill every process in this run's namespaces and delete them (the veths and rules go with them)."""
        for host in list(self.hosts.values()):
            delete_namespace(host.ns)
        self.hosts.clear()
        self.cuts.clear()
        if os.path.exists(os.path.join(NETNS_DIR, self.hub)):
            delete_namespace(self.hub)

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
