"""Solr from a web worker or an indexing job: where updates go, and which cores may serve reads.

:class:`SolrView` (from :meth:`tenure.web.Router.solr`) reads the view the
router keeps of a Solr service, so every lookup is a memory read that
follows failovers live:

* :attr:`SolrView.leader`: the core URL of the current leader, for updates;
  None while there is no valid leader (updates must wait, never guess);
* :attr:`SolrView.reads`: the followers that are healthy, replicating and at
  most ``max_lag`` index generations behind the leader, best first; the
  leader alone when no follower is caught up. A lagging follower is never
  listed. With no leader at all, the followers that were replicating, or
  else the ones with the newest index, keep serving (slightly stale) reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from ..errors import ConfigError

if TYPE_CHECKING:
    from .router import ServiceView


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


class SolrView:
    """One Solr service's leader and read cores, as the router sees them."""

    def __init__(self, view: "ServiceView", *, max_lag: int = 2) -> None:
        if isinstance(max_lag, bool) or not isinstance(max_lag, int) or max_lag < 0:
            raise ConfigError(f"max_lag is a number of index generations >= 0, got {max_lag!r}")
        self.view = view
        self.max_lag = max_lag

    @property
    def leader(self) -> str | None:
        """The leader's core URL for updates, or None while there is no valid leader."""
        p = self.view.primary
        return p.dsn if p is not None else None

    @property
    def token(self) -> int | None:
        """The fencing token of the leader's term (None while there is none)."""
        p = self.view.primary
        return p.token if p is not None else None

    @property
    def reads(self) -> tuple[str, ...]:
        """Core URLs reads may use, best first (see the module docs)."""
        members = self.view.members
        primary = self.view.last_primary
        followers = {name: m for name, m in members.items()
                     if (primary is None or name != primary.member) and m.get("role") == "standby"
                     and m.get("healthy") is True and isinstance(m.get("dsn"), str)}
        if primary is not None:
            leader_position = _int((members.get(primary.member) or {}).get("position"))
            caught_up = [m for m in followers.values() if m.get("streaming") is True
                         and leader_position - _int(m.get("position")) <= self.max_lag]
            return tuple(_by_position(caught_up)) or (primary.dsn,)
        replicating = [m for m in followers.values() if m.get("streaming") is True]
        if replicating:
            return tuple(_by_position(replicating))
        newest = max((_int(m.get("position")) for m in followers.values()), default=None)
        return tuple(_by_position([m for m in followers.values() if _int(m.get("position")) == newest]))

    def wait_for_leader(self, timeout: float) -> str:
        """Block until there is a valid leader and return its URL (as :meth:`ServiceView.wait_for_primary`)."""
        return self.view.wait_for_primary(timeout).dsn


def _by_position(members: list[Mapping[str, Any]]) -> list[str]:
    ordered = sorted(members, key=lambda m: (-_int(m.get("position")), str(m.get("member"))))
    return [str(m["dsn"]) for m in ordered]
