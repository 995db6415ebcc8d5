"""memcached itself: address validation, a real health check and a flush, knowing nothing of etcd."""

from __future__ import annotations

import os
import time

from pymemcache.client.base import Client as _Client
from pymemcache.exceptions import MemcacheError

from ..errors import ConfigError, ServiceError


def check_address(host: object, port: object) -> tuple[str, int]:
    """``(host, port)`` if they name a memcached server, else ConfigError."""
    if not isinstance(host, str) or not host or any(c in host for c in " /\t\n"):
        raise ConfigError(f"memcached host must be a host name or address, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"memcached port must be 1-65535, got {port!r}")
    return host, port


def check_memcached(host: str, port: int, *, timeout: float = 0.5, key: str = "tenure:health") -> str:
    """One health check: ``version``, then ``set`` and ``get`` of a fresh value; return the version.

    Raises :class:`~tenure.errors.ServiceError` naming what failed.
    """
    value = f"{os.getpid()}-{time.monotonic_ns()}".encode()
    c = _Client((host, port), connect_timeout=timeout, timeout=timeout, default_noreply=False)
    try:
        version = c.version()
        if not c.set(key, value, expire=60):
            raise ServiceError(f"memcached {host}:{port} did not store the health key")
        got = c.get(key)
        if got != value:
            raise ServiceError(f"memcached {host}:{port} returned {got!r} for the health key, expected {value!r}")
        return version.decode() if isinstance(version, bytes) else str(version)
    except (OSError, MemcacheError) as e:
        raise ServiceError(f"memcached {host}:{port} failed its health check: {e or type(e).__name__}",
                           detail=str(e)) from None
    finally:
        c.close()


def flush_memcached(host: str, port: int, *, timeout: float = 0.5) -> None:
    """Empty the server (``flush_all``); raises :class:`~tenure.errors.ServiceError` if it did not confirm."""
    c = _Client((host, port), connect_timeout=timeout, timeout=timeout, default_noreply=False)
    try:
        if not c.flush_all(noreply=False):
            raise ServiceError(f"memcached {host}:{port} did not confirm flush_all")
    except (OSError, MemcacheError) as e:
        raise ServiceError(f"memcached {host}:{port} could not be flushed: {e or type(e).__name__}",
                           detail=str(e)) from None
    finally:
        c.close()
