"""One Solr core, over its HTTP API: ping, replication details, and the leader/follower role at run time.

Solr's user-managed replication fixes roles in ``solrconfig.xml``; a core
configured as a *repeater* (both the ``leader`` and ``follower`` sections of
its ReplicationHandler enabled) can be switched at run time with the
handler's commands, with no JVM restart:

* :meth:`SolrNode.make_leader`: ``disablepoll`` (stop copying from anyone),
  ``enablereplication`` (let followers copy this index);
* :meth:`SolrNode.make_follower`: check that the given URL is a Solr leader
  with replication enabled, then ``disablereplication``, ``disablepoll`` (the
  poller's configured leader may be the dead one) and ``fetchindex`` with
  ``leaderUrl`` (Solr 8 read ``masterUrl``; both are sent). A fetch with
  ``leaderUrl`` is one-off: the caller repeats it (:meth:`SolrNode.fetch`)
  as its poll.

Solr 9/10 field names are read (``isLeader``, ``leaderUrl``...) and Solr 8's
(``isMaster``, ``masterUrl``...) where Solr still reports them. Errors are
:class:`~tenure.errors.ServiceError` with the URL minus any credentials.
"""

from __future__ import annotations

import base64
import calendar
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..errors import ConfigError, ServiceError

log = logging.getLogger("tenure.solr")


@dataclass(frozen=True)
class ReplicationDetails:
    """What ``replication?command=details`` says of a core."""

    index_version: int
    generation: int
    is_leader: bool  # the leader section is enabled
    is_follower: bool  # the follower section is enabled
    replication_enabled: bool  # followers may copy this index now
    polling_disabled: bool | None
    leader_url: str | None  # where the last (or configured) fetch goes
    replicated_at: float | None  # epoch seconds of the last successful replication
    failed_at: float | None  # epoch seconds of the last failed one
    times_replicated: int = 0
    times_failed: int = 0


def _bool(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.lower() == "true")


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def java_date(text: Any) -> float | None:
    """Epoch seconds of a Java ``Date.toString()`` in UTC/GMT (how Solr reports replication times), else None."""
    if not isinstance(text, str):
        return None
    for fmt in ("%a %b %d %H:%M:%S UTC %Y", "%a %b %d %H:%M:%S GMT %Y"):
        try:
            return float(calendar.timegm(time.strptime(text, fmt)))
        except ValueError:
            continue
    return None


def parse_details(details: Mapping[str, Any]) -> ReplicationDetails:
    """The ``details`` object of a ReplicationHandler answer (Solr 8 names accepted)."""
    leader = details.get("leader") or details.get("master") or {}
    follower = details.get("follower") or details.get("slave") or {}
    is_leader = _bool(details.get("isLeader", details.get("isMaster")))
    polling = follower.get("isPollingDisabled")
    return ReplicationDetails(
        index_version=_int(details.get("indexVersion")), generation=_int(details.get("generation")),
        is_leader=is_leader, is_follower=_bool(details.get("isFollower", details.get("isSlave"))),
        replication_enabled=is_leader and _bool(leader.get("replicationEnabled", "true")),
        polling_disabled=None if polling is None else _bool(polling),
        leader_url=follower.get("leaderUrl") or follower.get("masterUrl"),
        replicated_at=java_date(follower.get("indexReplicatedAt")),
        failed_at=java_date(follower.get("replicationFailedAt")),
        times_replicated=_int(follower.get("timesIndexReplicated")),
        times_failed=_int(follower.get("timesFailed")),
    )


def core_url(url: str) -> str:
    """``url`` without credentials and trailing slash (safe to log, publish and compare)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


class SolrNode:
    """One core: ``SolrNode("http://host:8983/solr", "openlibrary")`` or ``SolrNode.from_url(core_url)``.

    Credentials in the URL (``http://user:pass@host``) are sent as basic auth
    and never appear in :attr:`url` or in errors.
    """

    def __init__(self, base_url: str, core: str, *, timeout: float = 2.0) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"a Solr URL is http(s)://host[:port]/solr, got {core_url(base_url)!r}")
        if not core or "/" in core:
            raise ConfigError(f"a Solr core name has no '/', got {core!r}")
        self.core = core
        self.url = f"{core_url(base_url)}/{core}"
        self.timeout = timeout
        self._auth = None
        if parts.username is not None:
            pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self._auth = "Basic " + base64.b64encode(pair.encode()).decode()

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 2.0) -> "SolrNode":
        """The node of a core URL (``http://host:8983/solr/openlibrary``)."""
        base, _, core = url.rstrip("/").rpartition("/")
        return cls(base, core, timeout=timeout)

    # -- HTTP -----------------------------------------------------------------

    def request(self, path: str, params: Mapping[str, Any] | None = None, body: Any = None,
                timeout: float | None = None) -> dict[str, Any]:
        """``GET`` (or ``POST`` of JSON ``body``) ``<core>/<path>``; the decoded answer."""
        query = urllib.parse.urlencode({**(params or {}), "wt": "json"})
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}/{path}?{query}", data=data, method="GET" if data is None else "POST")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self._auth:
            req.add_header("Authorization", self._auth)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                answer = json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise ServiceError(f"Solr at {self.url}: no such core or handler ({path}: HTTP 404)",
                                   detail="HTTP 404") from None
            msg = _error_message(e)
            raise ServiceError(f"Solr at {self.url} refused {path}: HTTP {e.code}: {msg}", detail=msg) from None
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise ServiceError(f"Solr at {self.url} unreachable: {reason}", detail=str(reason)) from None
        if not isinstance(answer, dict):
            raise ServiceError(f"Solr at {self.url}: {path} answered {type(answer).__name__}, not a JSON object")
        return answer

    def _replication(self, command: str, **params: Any) -> dict[str, Any]:
        answer = self.request("replication", {"command": command, **params}, timeout=max(self.timeout, 30.0)
                              if params.get("wait") == "true" else None)
        if str(answer.get("status", "OK")).upper() not in ("OK", ""):
            raise ServiceError(f"Solr at {self.url}: replication {command} failed: {answer.get('message')}",
                               detail=str(answer.get("message")))
        return answer

    # -- observing -------------------------------------------------------------

    def ping(self) -> None:
        """Raise ServiceError unless the core answers its ping with OK."""
        answer = self.request("admin/ping")
        if answer.get("status") != "OK":
            raise ServiceError(f"Solr at {self.url}: ping says {answer.get('status')!r}")

    def is_up(self) -> bool:
        try:
            self.ping()
            return True
        except ServiceError:
            return False

    def details(self) -> ReplicationDetails:
        d = self._replication("details").get("details")
        if not isinstance(d, dict):
            raise ServiceError(f"Solr at {self.url}: replication details missing (is the ReplicationHandler configured?)")
        return parse_details(d)

    def index_version(self) -> tuple[int, int]:
        """``(version, generation)`` this core offers followers (0, 0 while replication is disabled)."""
        a = self._replication("indexversion")
        return _int(a.get("indexversion")), _int(a.get("generation"))

    # -- roles -------------------------------------------------------------------

    def make_leader(self) -> None:
        """Stop copying from anyone and let followers copy this index."""
        self._replication("disablepoll")
        self._replication("enablereplication")
        d = self.details()
        if not d.replication_enabled:
            raise ServiceError(f"Solr at {self.url} cannot lead: its solrconfig.xml has no enabled leader section")

    def check_leader(self, leader_url: str) -> "SolrNode":
        """The node at ``leader_url``, if it is a Solr core that offers its index; else ServiceError."""
        leader = SolrNode.from_url(leader_url, timeout=self.timeout)
        if leader.url == self.url:
            raise ServiceError(f"Solr at {self.url} cannot follow itself")
        d = leader.details()
        if not d.replication_enabled:
            raise ServiceError(f"{leader.url} is not a Solr leader with replication enabled")
        return leader

    def make_follower(self, leader_url: str, *, wait: bool = True) -> None:
        """Copy from ``leader_url`` from now on (checked first: nothing changes if it is not a leader)."""
        leader = self.check_leader(leader_url)
        self._replication("disablereplication")
        self._replication("disablepoll")
        self.fetch(leader.url, wait=wait)

    def fetch(self, leader_url: str, *, wait: bool = True) -> None:
        """One ``fetchindex`` from ``leader_url`` (with ``wait``, returns once it is done)."""
        url = core_url(leader_url)
        params = {"leaderUrl": url, "masterUrl": url}
        if wait:
            params["wait"] = "true"
        self._replication("fetchindex", **params)

    def disable_replication(self) -> None:
        self._replication("disablereplication")

    # -- documents ------------------------------------------------------------------

    def add(self, docs: Iterable[Mapping[str, Any]], *, commit: bool = True) -> None:
        self.request("update", {"commit": "true"} if commit else {}, body=[dict(d) for d in docs])

    def commit(self) -> None:
        self.request("update", {"commit": "true"}, body={"commit": {}})

    def get(self, doc_id: str) -> dict[str, Any] | None:
        """Real-time get (uncommitted documents included)."""
        doc = self.request("get", {"id": doc_id}).get("doc")
        return doc if isinstance(doc, dict) else None

    def select_id(self, doc_id: str) -> dict[str, Any] | None:
        """The committed document with this id (``select?q=id:...``), or None."""
        docs = (self.request("select", {"q": f'id:"{doc_id}"'}).get("response") or {}).get("docs") or []
        return docs[0] if docs else None


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read() or b"{}")
        return str((body.get("error") or {}).get("msg") or e.reason)
    except (OSError, ValueError, AttributeError):
        return str(e.reason)
