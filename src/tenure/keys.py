"""Where tenure keeps things in etcd, and what names it accepts.

Keys are relative to the client's namespace (``/tenure`` by default):
``svc/<service>/leader``, ``svc/<service>/candidates/<member>``,
``svc/<service>/history/<token>``.
"""

from __future__ import annotations

import re

from .errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_name(kind: str, name: object) -> str:
    """Return ``name`` if it is a valid service or member name, else raise ConfigError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"invalid {kind} name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def service_key(service: str, *parts: str) -> str:
    return "/".join(("svc", service) + parts)


def leader_key(service: str) -> str:
    return service_key(service, "leader")
