"""The etcd schema: every key tenure writes, and every record stored under it.

This is the only module that spells a key or parses a record. Keys are
relative to the client's namespace (``/tenure`` by default); everything of
one service lives under ``svc/<service>/``:

=============================  ==========================================  =====================
key                            record                                      bound to
=============================  ==========================================  =====================
``leader``                     :class:`LeaderRecord` (its create revision  the leader's lease
                               is the term's fencing token)
``candidates/<member>``        :class:`CandidateRecord`                    the candidate's lease
``history/<token:020d>``       :class:`Term`                               nothing (kept, trimmed)
``primary``                    :class:`PrimaryRecord`                      the leader's lease
``members/<member>``           :class:`MemberRecord`                       the member's own lease
``pause``                      :class:`PauseRecord`                        nothing (until resumed)
``switchover``                 :class:`SwitchoverRecord`                   nothing (has a deadline)
``restart/<member>``           :class:`RestartRecord`                      nothing (has a deadline)
``checkpoints/<name>``         :class:`CheckpointRecord` (a singleton      nothing (written
                               job's progress)                             through the fence)
``ring/<epoch:020d>``          :class:`RingRecord` (a memcached pool's     nothing (kept, trimmed)
                               placement, one per membership change)
=============================  ==========================================  =====================

Each record type has ``encode() -> bytes`` and ``decode(bytes)``; decode
raises :class:`~tenure.errors.MalformedRecord` (never ``KeyError`` or
``JSONDecodeError``) for a value that is not a valid record, so a reader can
skip it and fail closed.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from .errors import ConfigError, MalformedRecord

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_name(kind: str, name: object) -> str:
    """Return ``name`` if it is a valid service or member name, else raise ConfigError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"invalid {kind} name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_token(token: object) -> int:
    """Return ``token`` if it is a fencing token (a positive int), else raise ConfigError."""
    if isinstance(token, bool) or not isinstance(token, int) or token <= 0:
        raise ConfigError(f"a fencing token is a positive int, got {token!r}")
    return token


# -- keys -------------------------------------------------------------------------

SERVICES_PREFIX = "svc/"


def service_prefix(service: str) -> str:
    """``svc/<service>/``: everything of one service."""
    return f"{SERVICES_PREFIX}{service}/"


def leader_key(service: str) -> str:
    return service_prefix(service) + "leader"


def primary_key(service: str) -> str:
    return service_prefix(service) + "primary"


def candidates_prefix(service: str) -> str:
    return service_prefix(service) + "candidates/"


def candidate_key(service: str, member: str) -> str:
    return candidates_prefix(service) + member


def history_prefix(service: str) -> str:
    return service_prefix(service) + "history/"


def history_key(service: str, token: int) -> str:
    return f"{history_prefix(service)}{token:020d}"


def members_prefix(service: str) -> str:
    return service_prefix(service) + "members/"


def member_key(service: str, member: str) -> str:
    return members_prefix(service) + member


def pause_key(service: str) -> str:
    return service_prefix(service) + "pause"


def switchover_key(service: str) -> str:
    return service_prefix(service) + "switchover"


def restart_key(service: str, member: str) -> str:
    return service_prefix(service) + "restart/" + member


def checkpoints_prefix(service: str) -> str:
    return service_prefix(service) + "checkpoints/"


def checkpoint_key(service: str, name: str) -> str:
    return checkpoints_prefix(service) + check_name("checkpoint", name)


RING_HISTORY = 128  # ring records kept per service; older epochs are deleted by the registrars


def ring_prefix(service: str) -> str:
    return service_prefix(service) + "ring/"


def ring_key(service: str, epoch: int) -> str:
    return f"{ring_prefix(service)}{epoch:020d}"


def ring_epoch_of(service: str, key: str) -> int | None:
    """The epoch of a ``ring/<epoch>`` key of ``service``, else None."""
    prefix = ring_prefix(service)
    rest = key[len(prefix):] if key.startswith(prefix) else ""
    return int(rest) if len(rest) == 20 and rest.isdigit() and int(rest) > 0 else None


def split_service_key(key: str) -> tuple[str, str] | None:
    """``("db", "members/n1")`` for ``svc/db/members/n1``; None for a key outside the schema."""
    if not key.startswith(SERVICES_PREFIX):
        return None
    service, sep, rest = key[len(SERVICES_PREFIX):].partition("/")
    return (service, rest) if sep and service else None


def member_of(service: str, key: str) -> str | None:
    """The member name of a ``members/<member>`` key of ``service``, else None."""
    prefix = members_prefix(service)
    return key[len(prefix):] if key.startswith(prefix) and len(key) > len(prefix) else None


# -- records ----------------------------------------------------------------------


def _load(kind: str, raw: bytes | str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedRecord(f"malformed {kind} record: {e}") from None
    if not isinstance(data, dict):
        raise MalformedRecord(f"malformed {kind} record: expected a JSON object, got {type(data).__name__}")
    return data


def _get(kind: str, data: Mapping[str, Any], name: str, types: type | tuple[type, ...],
         default: Any = ..., *, nullable: bool = False) -> Any:
    if name not in data:
        if default is ...:
            raise MalformedRecord(f"malformed {kind} record: no {name!r}")
        return default
    value = data[name]
    if value is None and nullable:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise MalformedRecord(f"malformed {kind} record: {name!r} is {value!r}")
    if not isinstance(value, types):
        raise MalformedRecord(f"malformed {kind} record: {name!r} is {value!r}")
    return value


def _dumps(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class LeaderRecord:
    """The value of the leader key. The term's token is the key's create revision, not stored here."""

    member: str
    value: dict[str, Any] | None = None
    since: float = 0.0  # wall-clock start, for display only

    def encode(self) -> bytes:
        return _dumps({"member": self.member, "value": self.value, "since": self.since})

    @classmethod
    def decode(cls, raw: bytes | str) -> "LeaderRecord":
        d = _load("leader", raw)
        value = _get("leader", d, "value", dict, None, nullable=True)
        return cls(_get("leader", d, "member", str), value, float(_get("leader", d, "since", (int, float), 0.0)))


@dataclass(frozen=True)
class LeaderInfo:
    """Who leads a service: ``token`` is the term's fencing token."""

    member: str
    token: int
    value: dict[str, Any] | None
    since: float  # wall-clock time the term began, for display only


@dataclass(frozen=True)
class CandidateRecord:
    """A live candidate of an election, bound to its lease."""

    member: str
    value: dict[str, Any] | None = None
    since: float = 0.0
    ttl: int = 0

    def encode(self) -> bytes:
        return _dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> "CandidateRecord":
        d = _load("candidate", raw)
        return cls(_get("candidate", d, "member", str), _get("candidate", d, "value", dict, None, nullable=True),
                   float(_get("candidate", d, "since", (int, float), 0.0)), int(_get("candidate", d, "ttl", int, 0)))


@dataclass(frozen=True)
class Term:
    """One past or current term of a service, as recorded in its history.

    ``timeline`` and ``start_position`` are what the new primary had when it
    took over (for PostgreSQL: its timeline and WAL position after promotion);
    a node may lead again only if it holds at least that much.
    """

    token: int
    member: str
    start: float
    end: float | None = None
    reason: str | None = None
    timeline: int | None = None
    start_position: int | None = None

    def encode(self) -> bytes:
        return _dumps(asdict(self))

    def ended(self, end: float, reason: str) -> "Term":
        return Term(self.token, self.member, self.start, end, reason, self.timeline, self.start_position)

    @classmethod
    def decode(cls, raw: bytes | str) -> "Term":
        d = _load("history", raw)
        k = "history"
        return cls(check_token_field(k, d), _get(k, d, "member", str),
                   float(_get(k, d, "start", (int, float))),
                   _float_or_none(_get(k, d, "end", (int, float), None, nullable=True)),
                   _get(k, d, "reason", str, None, nullable=True),
                   _get(k, d, "timeline", int, None, nullable=True),
                   _get(k, d, "start_position", int, None, nullable=True))


def check_token_field(kind: str, d: Mapping[str, Any]) -> int:
    token = _get(kind, d, "token", int)
    if token <= 0:
        raise MalformedRecord(f"malformed {kind} record: token {token!r}")
    return int(token)


def _float_or_none(v: Any) -> float | None:
    return None if v is None else float(v)


@dataclass(frozen=True)
class PrimaryRecord:
    """Where the current primary takes writes, published once it is writable; ``token`` is its term.

    ``dsn`` is how clients reach it: a libpq connection string without
    secrets for PostgreSQL, a URL for an HTTP service.
    """

    member: str
    dsn: str
    token: int

    def encode(self) -> bytes:
        return _dumps({"member": self.member, "dsn": self.dsn, "token": self.token})

    @classmethod
    def decode(cls, raw: bytes | str) -> "PrimaryRecord":
        d = _load("primary", raw)
        return cls(_get("primary", d, "member", str), _get("primary", d, "dsn", str), check_token_field("primary", d))


# Fields of a member record that tenure itself reads, with their types; a
# service policy may publish more (kept in ``extra``).
_MEMBER_FIELDS: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "role": (str, "unknown"),
    "healthy": (bool, False),
    "dsn": (str, None),
    "address": (str, None),
    "zone": (str, ""),
    "priority": (int, 0),
    "nofailover": (bool, False),
    "streaming": (bool, False),
    "eligible": (bool, False),
    "leader": (bool, False),
    "timeline": (int, None),
    "position": (int, None),
    "updated": ((int, float), None),
}


@dataclass(frozen=True)
class MemberRecord:
    """One member's published state: who it is, how healthy, how far along.

    ``position`` is how much of the primary's history the member holds
    (PostgreSQL: WAL bytes; Solr: index generation); ``extra`` holds the
    service-specific fields (WAL positions, synchronous standbys, cache
    versions...) as published.
    """

    member: str
    role: str = "unknown"
    healthy: bool = False
    dsn: str | None = None
    address: str | None = None
    zone: str = ""
    priority: int = 0
    nofailover: bool = False
    streaming: bool = False
    eligible: bool = False
    leader: bool = False
    timeline: int | None = None
    position: int | None = None
    updated: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The record as published (JSON object)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**dict(self.extra), **out}

    def encode(self) -> bytes:
        return _dumps(self.to_dict())

    @classmethod
    def decode(cls, raw: bytes | str) -> "MemberRecord":
        d = _load("member", raw)
        kw: dict[str, Any] = {"member": _get("member", d, "member", str)}
        for name, (types, default) in _MEMBER_FIELDS.items():
            kw[name] = _get("member", d, name, types, default, nullable=True)
            if kw[name] is None and default is not None:
                kw[name] = default
        extra = {k: v for k, v in d.items() if k not in _MEMBER_FIELDS and k != "member"}
        return cls(**kw, extra=extra)

    def get(self, name: str, default: Any = None) -> Any:
        """A field by its published name, service-specific ones included."""
        if name in _MEMBER_FIELDS or name == "member":
            value = getattr(self, name)
            return default if value is None else value
        return self.extra.get(name, default)


@dataclass(frozen=True)
class PauseRecord:
    """Maintenance mode: while this record exists no member campaigns on its own (the primary keeps serving)."""

    since: float  # wall clock
    reason: str = ""

    def encode(self) -> bytes:
        return _dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> "PauseRecord":
        d = _load("pause", raw)
        return cls(float(_get("pause", d, "since", (int, float))), _get("pause", d, "reason", str, ""))


@dataclass(frozen=True)
class SwitchoverRecord:
    """A planned handover from the primary of term ``token`` to ``target``.

    The primary hands over once the wall clock passes ``at``; nobody acts on
    the record once the wall clock passes ``deadline`` (then everything stays
    as it was). While it is in force only ``target`` campaigns.
    """

    target: str
    token: int  # the term being handed over
    at: float
    deadline: float
    requested: float = 0.0

    def encode(self) -> bytes:
        return _dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> "SwitchoverRecord":
        k = "switchover"
        d = _load(k, raw)
        target = _get(k, d, "target", str)
        if not _NAME.match(target):
            raise MalformedRecord(f"malformed {k} record: 'target' is {target!r}")
        return cls(target, check_token_field(k, d), float(_get(k, d, "at", (int, float))),
                   float(_get(k, d, "deadline", (int, float))), float(_get(k, d, "requested", (int, float), 0.0)))

    def in_force(self, now: float) -> bool:
        """Whether the request still stands at wall-clock ``now``."""
        return now < self.deadline

    def due(self, now: float) -> bool:
        """Whether the primary should hand over now."""
        return self.at <= now < self.deadline


@dataclass(frozen=True)
class RestartRecord:
    """A request that ``member``'s sidecar restart its server (as a standby) once, before ``deadline``."""

    member: str
    requested: float
    deadline: float

    def encode(self) -> bytes:
        return _dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> "RestartRecord":
        k = "restart"
        d = _load(k, raw)
        return cls(_get(k, d, "member", str), float(_get(k, d, "requested", (int, float))),
                   float(_get(k, d, "deadline", (int, float))))


@dataclass(frozen=True)
class CheckpointRecord:
    """How far a singleton job got: ``value`` is the job's own JSON (an offset, a timestamp...).

    ``token`` is the term that wrote it (etcd accepted the write only while
    that term was current); ``updated`` is wall-clock, for display only.
    """

    value: Any
    token: int
    member: str
    updated: float = 0.0

    def encode(self) -> bytes:
        return _dumps({"value": self.value, "token": self.token, "member": self.member, "updated": self.updated})

    @classmethod
    def decode(cls, raw: bytes | str) -> "CheckpointRecord":
        d = _load("checkpoint", raw)
        if "value" not in d:
            raise MalformedRecord("malformed checkpoint record: no 'value'")
        return cls(d["value"], check_token_field("checkpoint", d), _get("checkpoint", d, "member", str),
                   float(_get("checkpoint", d, "updated", (int, float), 0.0)))


RING_HASHINGS = ("modulo", "rendezvous")
MAX_RING_EPOCH = (1 << 24) - 1  # epochs travel in the upper 24 bits of memcached's 32-bit flags


@dataclass(frozen=True)
class RingMember:
    """One server of a memcached pool's ring: ``slot`` orders the pool, ``live`` says whether it takes keys."""

    member: str
    address: str  # host:port
    slot: int
    live: bool


@dataclass(frozen=True)
class RingRecord:
    """A memcached pool's placement at one epoch: which servers, in which order, with which hashing.

    A new record (epoch + 1) is written whenever the set of live members,
    an address or a slot changes, so every client sees the same sequence
    of placements. ``servers`` are sorted by slot and keep absent members
    (``live`` False) so that modulo hashing keeps its list.
    ``legacy_epoch``: entries written without an epoch tag (by
    python-memcached, over the same list) count as written at this epoch:
    the newest one while the pool has only grown, frozen at the first
    absence.
    ``fresh_within`` bounds how old a client's view may be for it to use
    the cache; ``settle`` is how long after a change writers also clear a
    moved key on its previous owners.
    """

    epoch: int
    hashing: str
    servers: tuple[RingMember, ...]
    legacy_epoch: int | None = None
    fresh_within: float = 2.0
    settle: float = 3.0
    since: float = 0.0  # wall-clock time of the change, for display only

    @property
    def live(self) -> tuple[RingMember, ...]:
        return tuple(s for s in self.servers if s.live)

    def encode(self) -> bytes:
        return _dumps({"epoch": self.epoch, "hashing": self.hashing, "servers": [asdict(s) for s in self.servers],
                       "legacy_epoch": self.legacy_epoch, "fresh_within": self.fresh_within,
                       "settle": self.settle, "since": self.since})

    @classmethod
    def decode(cls, raw: bytes | str) -> "RingRecord":
        k = "ring"
        d = _load(k, raw)
        epoch = _get(k, d, "epoch", int)
        if not 0 < epoch <= MAX_RING_EPOCH:
            raise MalformedRecord(f"malformed ring record: epoch {epoch!r}")
        hashing = _get(k, d, "hashing", str)
        if hashing not in RING_HASHINGS:
            raise MalformedRecord(f"malformed ring record: hashing {hashing!r}")
        raw_servers = _get(k, d, "servers", list)
        servers = []
        for s in raw_servers:
            if not isinstance(s, dict):
                raise MalformedRecord(f"malformed ring record: server {s!r}")
            servers.append(RingMember(_get(k, s, "member", str), _get(k, s, "address", str),
                                      _get(k, s, "slot", int), _get(k, s, "live", bool)))
        if [s.slot for s in servers] != sorted({s.slot for s in servers}) \
                or len({s.member for s in servers}) != len(servers):
            raise MalformedRecord("malformed ring record: slots must be distinct and sorted, members distinct")
        legacy = _get(k, d, "legacy_epoch", int, None, nullable=True)
        fresh = float(_get(k, d, "fresh_within", (int, float), 2.0))
        settle = float(_get(k, d, "settle", (int, float), 3.0))
        if not 0 < fresh <= settle:
            raise MalformedRecord(f"malformed ring record: fresh_within {fresh!r} must be > 0 and <= settle {settle!r}")
        return cls(epoch, hashing, tuple(servers), legacy, fresh, settle,
                   float(_get(k, d, "since", (int, float), 0.0)))
