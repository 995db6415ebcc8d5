"""The sidecar's TOML configuration: parsing and validation.

Every key is checked: an unknown key, a wrong type or an impossible value is a
:class:`~tenure.errors.ConfigError` naming the key, raised before anything is
started. See ``examples/sidecar-postgres.toml`` for a full example.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from ..config import EtcdConfig, build_section, parse_etcd_section
from ..errors import ConfigError
from ..records import check_name


@dataclass(frozen=True)
class PostgresConfig:
    data_dir: str
    port: int = 5432
    host: str = "127.0.0.1"
    bin_dir: str = "/usr/lib/postgresql/15/bin"
    user: str = "postgres"
    dbname: str = "postgres"
    run_as: str | None = None  # default: "postgres" when the sidecar runs as root
    socket_dir: str | None = None
    advertise_dsn: str | None = None  # what clients and other members use to reach this server
    max_lag_bytes: int = 16 * 1024 * 1024
    synchronous: bool = False
    guard_tables: list[str] = field(default_factory=list)
    guard_schema: str | None = None


@dataclass(frozen=True)
class SidecarConfig:
    service: str
    member: str
    etcd: EtcdConfig
    postgres: PostgresConfig
    ttl: int = 2
    zone: str = ""
    priority: int = 0
    nofailover: bool = False
    grace: float = 0.5  # seconds a less caught-up standby waits per rank before it races
    listen: str = "127.0.0.1:8008"  # HTTP endpoints for haproxy and Prometheus; "" to disable

    @property
    def http_address(self) -> tuple[str, int] | None:
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host or "0.0.0.0", int(port)


def _check_dsn(dsn: str) -> None:
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(dsn)
    except Exception as e:  # psycopg.ProgrammingError, with libpq's own words
        raise ConfigError(f"[postgres] advertise_dsn {dsn!r} is not a valid libpq connection string: {e}") from None
    if "host" not in parts:
        raise ConfigError(f"[postgres] advertise_dsn {dsn!r} names no host: other members could not reach it")


def parse_config(data: dict[str, Any]) -> "SidecarConfig | RegistrarConfig":
    """Validate a configuration already read from TOML (a ``[memcache]`` section makes it a registrar's)."""
    if "memcache" in data:
        return parse_registrar_config(data)
    raw = dict(data)
    sections = {"etcd", "postgres"}
    top = {k: v for k, v in raw.items() if k not in sections}
    for s in sections:
        if s not in raw:
            raise ConfigError(f"missing section [{s}]")
    etcd = parse_etcd_section(raw["etcd"])
    pg = build_section(PostgresConfig, "postgres", raw["postgres"])
    if not 0 < pg.port < 65536:
        raise ConfigError(f"[postgres] port must be 1-65535, got {pg.port}")
    if pg.max_lag_bytes < 0:
        raise ConfigError(f"[postgres] max_lag_bytes must be >= 0, got {pg.max_lag_bytes}")
    if not os.path.isfile(os.path.join(pg.data_dir, "PG_VERSION")):
        raise ConfigError(f"[postgres] data_dir {pg.data_dir!r} is not a PostgreSQL data directory (no PG_VERSION)")
    if pg.advertise_dsn is not None:
        _check_dsn(pg.advertise_dsn)
    if not os.path.isfile(os.path.join(pg.bin_dir, "pg_ctl")):
        raise ConfigError(f"[postgres] bin_dir {pg.bin_dir!r} has no pg_ctl")
    cfg = build_section(SidecarConfig, "top level", {**top, "etcd": etcd, "postgres": pg})
    check_name("service", cfg.service)
    check_name("member", cfg.member)
    if cfg.ttl != int(cfg.ttl) or not 1 <= cfg.ttl <= 3600:
        raise ConfigError(f"ttl must be whole seconds between 1 and 3600, got {cfg.ttl}")
    if cfg.grace < 0:
        raise ConfigError(f"grace must be >= 0, got {cfg.grace}")
    if cfg.listen:
        host, sep, port = cfg.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"listen must be 'host:port', got {cfg.listen!r}")
    return cfg


def load_config(path: str) -> "SidecarConfig | RegistrarConfig":
    """Read and validate a sidecar TOML file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path} is not valid TOML: {e}") from None
    return parse_config(data)


# -- [memcache]: the registrar of one memcached server (no election) ------------------------------


@dataclass(frozen=True)
class MemcacheConfig:
    """The ``[memcache]`` table: the local server, how clients reach it, and the pool's ring settings."""

    port: int = 11211
    host: str = "127.0.0.1"
    advertise: str | None = None  # host:port clients use (default: host:port)
    slot: int | None = None  # place in the pool's ordered list (default: lowest free at first join)
    hashing: str = "modulo"  # or "rendezvous"; used when the pool has no ring yet
    interval: float | None = None  # seconds between checks (default and maximum: ttl/3)
    timeout: float = 0.5
    fresh_within: float = 2.0  # see docs/memcache.md
    settle: float = 3.0


@dataclass(frozen=True)
class RegistrarConfig:
    """A sidecar config with ``[etcd]`` and ``[memcache]``: ``tenure sidecar`` runs the memcached registrar."""

    service: str
    member: str
    etcd: EtcdConfig
    memcache: MemcacheConfig
    ttl: int = 2


def parse_registrar_config(data: dict[str, Any]) -> RegistrarConfig:
    """Validate a registrar configuration already read from TOML."""
    from ..records import RING_HASHINGS
    from ..services.memcache import check_address

    raw = dict(data)
    if "postgres" in raw:
        raise ConfigError("a sidecar config has either a [postgres] or a [memcache] section, not both "
                          "(run one sidecar per server)")
    if "etcd" not in raw:
        raise ConfigError("missing section [etcd]")
    etcd = parse_etcd_section(raw["etcd"])
    m = build_section(MemcacheConfig, "memcache", raw["memcache"])
    check_address(m.host, m.port)
    if m.advertise is not None:
        host, sep, port = m.advertise.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"[memcache] advertise must be 'host:port', got {m.advertise!r}")
        check_address(host, int(port))
    if m.slot is not None and m.slot < 0:
        raise ConfigError(f"[memcache] slot must be >= 0, got {m.slot}")
    if m.hashing not in RING_HASHINGS:
        raise ConfigError(f"[memcache] hashing must be one of {', '.join(RING_HASHINGS)}, got {m.hashing!r}")
    for name in ("interval", "timeout", "fresh_within", "settle"):
        v = getattr(m, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise ConfigError(f"[memcache] {name} must be a number of seconds > 0, got {v!r}")
    if not 1.0 < m.fresh_within < m.settle:
        raise ConfigError(f"[memcache] fresh_within must be above 1 s (the watch's progress interval) and below "
                          f"settle, got {m.fresh_within} and {m.settle}")
    top = {k: v for k, v in raw.items() if k not in ("etcd", "memcache")}
    cfg = build_section(RegistrarConfig, "top level", {**top, "etcd": etcd, "memcache": m})
    check_name("service", cfg.service)
    check_name("member", cfg.member)
    if cfg.ttl != int(cfg.ttl) or not 1 <= cfg.ttl <= 3600:
        raise ConfigError(f"ttl must be whole seconds between 1 and 3600, got {cfg.ttl}")
    if m.interval is not None and m.interval > cfg.ttl / 3:
        raise ConfigError(f"[memcache] interval must be at most ttl/3 = {cfg.ttl / 3:.2f} s, got {m.interval}")
    return cfg
