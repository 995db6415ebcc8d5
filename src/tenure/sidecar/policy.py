"""What a kind of service must offer the sidecar loop: its state, and the means to change its role.

The loop (:mod:`tenure.sidecar.loop`) knows elections, member records and
ranking, and nothing of PostgreSQL or Solr; a :class:`ServicePolicy` knows its
server, and nothing of etcd. The loop hands the policy a :class:`Host` for the
little it needs of the loop (notes for ``/status``, the other members'
records, publishing this member's record now).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Protocol

if TYPE_CHECKING:
    from ..election import Leadership
    from ..records import MemberRecord, PrimaryRecord


@dataclass(frozen=True)
class NodeState:
    """One observation of the local server, in the loop's terms.

    * ``role``: ``"primary"``, ``"standby"``, ``"down"`` (no answer) or a
      service's own word for something else;
    * ``healthy``: it answered its probe;
    * ``writable``: a primary that accepts writes (not demoted read-only);
    * ``streaming``: a standby receiving from ``upstream`` (``host:port``) now;
    * ``position``: how much of the primary's history it holds (PostgreSQL:
      WAL bytes; Solr: index generation);
    * ``details``: the service's own fields, published in the member record
      and shown in ``/status``.
    """

    role: str
    healthy: bool
    writable: bool = False
    streaming: bool = False
    upstream: str | None = None
    position: int = 0
    timeline: int | None = None
    error: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


class Host(Protocol):
    """The loop, as a policy sees it."""

    service: str
    member: str
    ttl: int

    def note(self, what: str, **fields: Any) -> None:
        """Record a decision (logged, and shown in ``/status``)."""

    def members(self) -> dict[str, "MemberRecord"]:
        """Every live member's record, read from etcd now (raises EtcdError when it cannot tell)."""

    def publish_now(self) -> bool:
        """Publish this member's record now; True once etcd has it."""


class ServicePolicy(Protocol):
    """One kind of service, as the sidecar loop drives it."""

    kind: str
    address: str  # how clients and other members reach this server (no secrets)

    def preflight(self) -> None:
        """Check at start that the server can be run safely (raise TenureError with one clear line if not)."""

    def status(self) -> NodeState:
        """Probe the local server once."""

    def is_running(self) -> bool:
        """Whether the server process exists (a definite fact, unlike a failed probe)."""

    def start(self) -> None:
        """Start the stopped server as it was (read-only and guarded when it was a primary)."""

    def upstream_of(self, leader_address: str) -> str | None:
        """How a standby following the leader at ``leader_address`` names its upstream (``host:port``)."""

    def eligible(self, st: NodeState, primary_position: int) -> tuple[bool, str]:
        """The service's own promotion checks for a standby, beyond the loop's (lag, synchronous mode)."""

    def term_timeline(self, st: NodeState) -> int | None:
        """The timeline the server will write on once it leads a new term from state ``st``."""

    def record_fields(self, st: NodeState, leading: bool) -> dict[str, Any]:
        """Service-specific fields of this member's record."""

    def promote(self, host: Host, leadership: "Leadership", st: NodeState) -> None:
        """Make the server the writable primary of ``leadership``'s term (raise TenureError to give it up)."""

    def lead(self, host: Host, leadership: "Leadership", st: NodeState) -> None:
        """Each tick while leading: keep the write guard current, manage standbys."""

    def refuse_writes(self) -> None:
        """Stop the server accepting writes now (it may be down: then nothing to do)."""

    def demote(self) -> None:
        """Make the server a non-writer after its term ended."""

    def follow(self, host: Host, st: NodeState, primary: "PrimaryRecord") -> None:
        """Make the server a standby of ``primary`` if it is not one already."""

    def stop(self) -> None:
        """Stop the server cleanly (on the sidecar's own shutdown as leader), writes already refused."""

    def final_position(self) -> int | None:
        """After :meth:`stop`: the position a successor must hold to have every acknowledged write."""

    def hand_over(self, host: Host, leadership: "Leadership", target: str, deadline: float) -> bool:
        """Planned handover to ``target``: stop taking writes, wait until ``target`` holds all of them.

        True once the server refuses writes and ``target`` holds everything
        it acknowledged (the loop then releases the term at once, so that the
        target can be promoted, and demotes this server). False if that cannot
        be done by ``deadline`` (monotonic): the server is then writable
        again, as it was.
        """

    def learn(self, records: Mapping[str, "MemberRecord"]) -> None:
        """See the other members' records (e.g. the primary's synchronous standbys)."""

    def snapshot(self) -> dict[str, Any]:
        """The policy's own state for ``/status``."""
