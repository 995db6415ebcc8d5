"""Member records: who is there, how healthy, how far behind.

Each member publishes one JSON record under ``svc/<service>/members/<member>``,
bound to a lease of its own that it renews while it publishes. A member that
stops publishing (dead, frozen, cut off) disappears within its ttl.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from .errors import ConfigError, EtcdError
from .etcd import Client
from .keys import check_name, service_key

log = logging.getLogger("tenure.members")


def members_prefix(service: str) -> str:
    return service_key(service, "members", "")


def read_members(client: Client, service: str) -> dict[str, dict[str, Any]]:
    """The live members' records, by member name."""
    kvs, _ = client.get_prefix(members_prefix(service))
    out = {}
    for kv in kvs:
        try:
            out[kv.key.rsplit("/", 1)[1]] = kv.json()
        except ValueError:
            log.warning("ignoring a malformed member record at %s", kv.key)
    return out


class MemberPublisher:
    """Keeps one member's record in etcd, bound to a lease that :meth:`publish` renews.

    Call :meth:`publish` often (at least every ttl/3); it writes only when the
    record changed and renews the lease otherwise. Failures are logged and
    retried on the next call: a record is advisory, never a lock.
    """

    def __init__(self, client: Client, service: str, member: str, *, ttl: int = 5) -> None:
        self._client = client
        self._key = service_key(check_name("service", service), "members", check_name("member", member))
        if ttl < 1:
            raise ConfigError(f"member record ttl must be at least 1 s, got {ttl}")
        self._ttl = ttl
        self._lease: int | None = None
        self._written: str | None = None
        self._renewed = 0.0

    def publish(self, record: dict[str, Any]) -> bool:
        """Publish ``record`` (adding ``updated``, wall-clock seconds); True if etcd has it now."""
        body = json.dumps(record, sort_keys=True)
        try:
            now = time.monotonic()
            if self._lease is not None and now - self._renewed >= self._ttl / 3:
                if self._client.keepalive(self._lease, retry_for=0) <= 0:
                    self._lease, self._written = None, None
                else:
                    self._renewed = now
            if self._lease is None:
                self._lease = self._client.grant(self._ttl).id
                self._renewed = now
                self._written = None
            if body != self._written:
                self._client.put(self._key, json.dumps({**record, "updated": time.time()}), lease=self._lease)
                self._written = body
            return True
        except EtcdError as e:
            log.warning("could not publish member record %s: %s", self._key, e)
            return False

    def close(self) -> None:
        """Withdraw the record."""
        if self._lease is not None:
            try:
                self._client.revoke(self._lease, retry_for=1.0)
            except EtcdError as e:
                log.warning("could not withdraw member record %s: %s", self._key, e)
            self._lease = None
