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

from .errors import ConfigError, EtcdError, MalformedRecord as MalformedError
from .etcd import Client
from . import records
from .records import MemberRecord, check_name

log = logging.getLogger("tenure.members")


def read_members(client: Client, service: str) -> dict[str, MemberRecord]:
    """The live members' records, by member name (malformed ones are logged and skipped)."""
    kvs, _ = client.get_prefix(records.members_prefix(service))
    out = {}
    for kv in kvs:
        name = records.member_of(service, kv.key)
        if name is None:
            continue
        try:
            out[name] = MemberRecord.decode(kv.value)
        except MalformedError as e:
            log.warning("ignoring the member record at %s: %s", kv.key, e)
    return out


class MemberPublisher:
    """Keeps one member's record in etcd, bound to a lease that :meth:`publish` renews.

    Call :meth:`publish` often (at least every ttl/3); it writes only when the
    record changed and renews the lease otherwise. Failures are logged and
    retried on the next call: a record is advisory, never a lock.
    """

    def __init__(self, client: Client, service: str, member: str, *, ttl: int = 5) -> None:
        self._client = client
        self._key = records.member_key(check_name("service", service), check_name("member", member))
        if ttl < 1:
            raise ConfigError(f"member record ttl must be at least 1 s, got {ttl}")
        self._ttl = ttl
        self._lease: int | None = None
        self._written: str | None = None
        self._renewed = 0.0

    def publish(self, record: MemberRecord | dict[str, Any]) -> bool:
        """Publish ``record`` (adding ``updated``, wall-clock seconds); True if etcd has it now."""
        if isinstance(record, MemberRecord):
            record = {k: v for k, v in record.to_dict().items() if k != "updated"}
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
