"""Settings shared by every part of tenure: how to reach etcd, and how a config section is checked.

The sidecar, the CLI and the web tier's router all read the same ``[etcd]``
table (TOML, or a mapping from YAML), so one secured cluster is reached the
same way from each of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ConfigError
from .etcd import check_client_settings


@dataclass(frozen=True)
class EtcdConfig:
    """The ``[etcd]`` table: endpoints, namespace, per-attempt timeout, TLS files and auth."""

    endpoints: list[str]
    namespace: str = "/tenure"
    timeout: float = 1.0
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = None



def build_section(cls: type, section: str, raw: Any) -> Any:
    """Build dataclass ``cls`` from table ``raw``, or raise ConfigError naming the key at fault."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{section}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} in [{section}]: {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(fields))})")
    missing = [n for n, f in fields.items() if n not in raw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and not dataclasses.is_dataclass(f.type)]
    if missing:
        raise ConfigError(f"missing key{'s' if len(missing) > 1 else ''} in [{section}]: {', '.join(missing)}")
    hints = {n: str(f.type) for n, f in fields.items()}
    for name, value in raw.items():
        hint = hints[name]
        ok = {
            "str": isinstance(value, str), "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool), "bool": isinstance(value, bool),
            "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
            "str | None": isinstance(value, str), "int | None": isinstance(value, int),
        }.get(hint, True)
        if not ok:
            raise ConfigError(f"[{section}] {name} must be {hint.replace(' | None', '')}, got {value!r}")
    return cls(**dict(raw))



def parse_etcd_section(raw: Any, section: str = "etcd") -> EtcdConfig:
    """Validate an ``[etcd]`` table; ConfigError for anything wrong, before any connection is made."""
    etcd = build_section(EtcdConfig, section, raw)
    check_client_settings(etcd.endpoints, namespace=etcd.namespace, timeout=etcd.timeout, retry_for=0.0,
                          ca_cert=etcd.ca_cert, cert=etcd.cert, key=etcd.key, user=etcd.user,
                          password=etcd.password)
    return etcd


def connect_etcd(etcd: EtcdConfig, *, check: bool = True, retry_for: float = 5.0) -> Any:
    """A :class:`tenure.Client` for these settings (see :func:`tenure.connect`)."""
    from . import connect

    return connect(etcd.endpoints, namespace=etcd.namespace, timeout=etcd.timeout, retry_for=retry_for,
                   ca_cert=etcd.ca_cert, cert=etcd.cert, key=etcd.key, user=etcd.user, password=etcd.password,
                   check=check)
