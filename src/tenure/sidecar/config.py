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
    passfile: str | None = None  # libpq password file for this node's own connections, rewinds and streaming
    max_lag_bytes: int = 16 * 1024 * 1024
    synchronous: bool = False
    guard_tables: list[str] = field(default_factory=list)
    guard_schema: str | None = None
    # Databases whose tables the guard covers (each gets its own lease row, renewed together);
    # default: the database of advertise_dsn (the application's), else dbname.
    guard_databases: list[str] = field(default_factory=list)

    @property
    def app_database(self) -> str:
        """The application's database: the one clients reach through ``advertise_dsn``."""
        from psycopg.conninfo import conninfo_to_dict

        if self.advertise_dsn:
            db = conninfo_to_dict(self.advertise_dsn).get("dbname")
            if db:
                return str(db)
        return self.dbname


@dataclass(frozen=True)
class SolrConfig:
    base_url: str  # e.g. http://127.0.0.1:8983/solr
    core: str = "openlibrary"
    advertise_url: str | None = None  # the core URL clients and followers use (default: base_url/core)
    poll_interval: float = 1.0  # seconds between a follower's fetches from the leader
    max_lag_generations: int = 10  # a follower further behind may not lead (each commit is one generation)
    max_replication_age: float = 5.0  # seconds since a follower was last in sync before it stops serving reads
    timeout: float = 2.0


@dataclass(frozen=True)
class SidecarConfig:
    service: str
    member: str
    etcd: EtcdConfig
    postgres: PostgresConfig | None
    ttl: int = 2
    zone: str = ""
    priority: int = 0
    nofailover: bool = False
    grace: float = 0.5  # seconds a less caught-up standby waits per rank before it races
    # A leader whose server fails its probes (but whose process runs) resigns only after this long.
    unhealthy_window: float = 5.0
    etcd_wait: float = 30.0  # seconds etcd may stay unreachable at start before the sidecar gives up
    listen: str = "127.0.0.1:8008"  # HTTP endpoints for haproxy and Prometheus; "" to disable
    solr: SolrConfig | None = None  # a Solr core instead of PostgreSQL

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
        raise ConfigError(f"[postgres] advertise_dsn is not a valid libpq connection string: {e}") from None
    if "host" not in parts:
        raise ConfigError("[postgres] advertise_dsn names no host: other members could not reach it")
    if "password" in parts or "sslpassword" in parts:
        raise ConfigError("[postgres] advertise_dsn holds a password: it would be published; put credentials "
                          "in a passfile ([postgres] passfile) instead")


def parse_config(data: dict[str, Any]) -> "SidecarConfig | RegistrarConfig":
    """Validate a configuration already read from TOML (a ``[memcache]`` section makes it a registrar's)."""
    if "memcache" in data:
        return parse_registrar_config(data)
    raw = dict(data)
    if "solr" in raw:
        return _parse_solr_config(raw)
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
    if not pg.guard_tables and not pg.guard_schema:
        raise ConfigError("[postgres] sets neither guard_schema nor guard_tables: a deposed primary would keep "
                          "taking writes (set guard_schema = \"public\" to guard every table of the schema)")
    if any(not isinstance(d, str) or not d for d in pg.guard_databases):
        raise ConfigError(f"[postgres] guard_databases must be database names, got {pg.guard_databases!r}")
    if not pg.guard_databases:
        pg = dataclasses.replace(pg, guard_databases=[pg.app_database])
    elif pg.app_database not in pg.guard_databases:
        raise ConfigError(f"[postgres] guard_databases {pg.guard_databases} leaves the application's database "
                          f"{pg.app_database!r} (of advertise_dsn) unguarded")
    if not os.path.isfile(os.path.join(pg.bin_dir, "pg_ctl")):
        raise ConfigError(f"[postgres] bin_dir {pg.bin_dir!r} has no pg_ctl")
    cfg = build_section(SidecarConfig, "top level", {**top, "etcd": etcd, "postgres": pg})
    check_name("service", cfg.service)
    check_name("member", cfg.member)
    if cfg.ttl != int(cfg.ttl) or not 1 <= cfg.ttl <= 3600:
        raise ConfigError(f"ttl must be whole seconds between 1 and 3600, got {cfg.ttl}")
    if cfg.grace < 0:
        raise ConfigError(f"grace must be >= 0, got {cfg.grace}")
    if not cfg.etcd_wait > 0:
        raise ConfigError(f"etcd_wait must be > 0 seconds, got {cfg.etcd_wait}")
    if not cfg.unhealthy_window > 0:
        raise ConfigError(f"unhealthy_window must be > 0 seconds, got {cfg.unhealthy_window}")
    if cfg.listen:
        host, sep, port = cfg.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"listen must be 'host:port', got {cfg.listen!r}")
    return cfg


def _parse_solr_config(raw: dict[str, Any]) -> SidecarConfig:
    """A sidecar for a Solr core: the ``[solr]`` section instead of ``[postgres]``."""
    if "postgres" in raw:
        raise ConfigError("a sidecar runs one service: give [postgres] or [solr], not both")
    if "etcd" not in raw:
        raise ConfigError("missing section [etcd]")
    solr = build_section(SolrConfig, "solr", raw["solr"])
    from urllib.parse import urlsplit

    for key in ("base_url", "advertise_url"):
        url = getattr(solr, key)
        if url is not None and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
            raise ConfigError(f"[solr] {key} must be an http(s) URL, got {url!r}")
    if solr.poll_interval <= 0 or solr.timeout <= 0 or solr.max_replication_age <= 0:
        raise ConfigError("[solr] poll_interval, timeout and max_replication_age must be > 0")
    if solr.max_lag_generations < 0:
        raise ConfigError(f"[solr] max_lag_generations must be >= 0, got {solr.max_lag_generations}")
    top = {k: v for k, v in raw.items() if k not in ("etcd", "solr")}
    cfg = build_section(SidecarConfig, "top level",
                        {**top, "etcd": parse_etcd_section(raw["etcd"]), "postgres": None, "solr": solr})
    return _check_common(cfg)


def _check_common(cfg: SidecarConfig) -> SidecarConfig:
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
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {e.start})") from None
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
