"""Exceptions raised by tenure.

Every error tenure raises derives from :class:`TenureError`, so callers can
catch one name. gRPC and etcd client errors never escape raw: they arrive as
:class:`EtcdUnavailable` (the cluster could not be reached or did not answer
in time) or :class:`EtcdError` (it answered with an error).
"""

from __future__ import annotations


class TenureError(Exception):
    """Base class of every tenure error."""


class ConfigError(TenureError, ValueError):
    """Bad input: a malformed endpoint, an impossible ttl, an invalid name.

    Raised before anything is changed.
    """


class EtcdError(TenureError):
    """etcd answered a request with an error."""


class EtcdUnavailable(EtcdError):
    """No etcd endpoint answered within the allowed time."""


class MalformedRecord(EtcdError):
    """A key in etcd holds a value that is not a valid tenure record (see :mod:`tenure.records`).

    Readers that must decide something treat it as "cannot tell": not
    eligible, no promotion, read-only.
    """


class CampaignTimeout(TenureError, TimeoutError):
    """A campaign did not win leadership before its timeout."""


class NotLeader(TenureError):
    """The caller acted as leader but its leadership is not (or no longer) valid."""


class Fenced(TenureError):
    """Shared storage rejected a write because a newer term's token was seen.

    ``token`` is the token that was rejected; ``current`` the newest token the
    storage knows, when it could tell.
    """

    def __init__(self, message: str, *, token: int | None = None, current: int | None = None):
        super().__init__(message)
        self.token = token
        self.current = current


class ServiceError(TenureError):
    """A local service (PostgreSQL, Solr, memcached) failed an operation.

    The message includes the service's own error message; ``detail`` holds it
    alone when there is one.
    """

    def __init__(self, message: str, *, detail: str | None = None):
        super().__init__(message)
        self.detail = detail


class ReadOnly(TenureError):
    """A write was attempted while the service has no valid primary."""


class UnknownService(ConfigError):
    """A service name that has no key at all in etcd (never had a sidecar or registrar): most likely a typo."""


class PrimaryUnavailable(ReadOnly):
    """The published primary could not be reached, or refused the write (it has been deposed).

    A write interrupted by the primary's death may or may not have committed,
    as with any lost connection; make writes idempotent.
    """


class WaitTimeout(TenureError, TimeoutError):
    """A wait for a view or a primary ran out of time."""


class ClientClosed(EtcdError):
    """The :class:`tenure.Client` was closed (or its connections were) while a call was made or running."""


class AuthFailed(EtcdError):
    """etcd refused the credentials (unknown user, wrong password): retrying does not help."""


class TLSFailed(EtcdUnavailable):
    """The TLS handshake with etcd failed (unknown CA, bad or expired certificate): retrying does not help."""


class PermissionDenied(EtcdError):
    """etcd's auth refused the request: the user may not read or write that key."""


class LeaseNotFound(EtcdError):
    """The lease a request named no longer exists in etcd (it expired or was revoked)."""


class IndeterminateWrite(EtcdError):
    """A conditional write may or may not have been applied.

    An attempt timed out after it was sent, and a later attempt found its
    condition false, which is also what etcd answers when the first attempt
    had succeeded. Read the key back before acting on either outcome.
    """


class UsedAfterFork(TenureError):
    """A leadership, election or client made in a parent process was used in a forked child.

    The child has no keepalive, watch or connection behind it: make new ones there.
    """


class MemcacheKeyError(TenureError, ValueError):
    """A memcached key that cannot be sent: None or empty, not a string, too long, or with spaces or control characters.

    The subclasses carry python-memcached's names as aliases on
    :class:`tenure.web.memcache.Client` (``Client.MemcachedKeyError`` ...),
    so code written for python-memcached catches them unchanged.
    """


class MemcacheKeyLengthError(MemcacheKeyError):
    """A memcached key longer than the server's limit (250 bytes)."""


class MemcacheKeyCharacterError(MemcacheKeyError):
    """A memcached key with a space or a control character."""


class MemcacheKeyNoneError(MemcacheKeyError):
    """A memcached key that is None or empty."""


class MemcacheKeyTypeError(MemcacheKeyError):
    """A memcached key that is neither str nor bytes."""
