"""What a database error means to a web request, for psycopg 3 and psycopg2 alike.

:func:`classify` looks at an exception and the exceptions it was raised from
(``__cause__`` and ``__context__``: web.py's own rollback raises
``InterfaceError: connection already closed`` on top of the real cause) and
answers:

* :data:`READ_ONLY` -- the server refused a write because it is read-only:
  SQLSTATE 25006 (``ReadOnlySqlTransaction``: a standby, a demoted primary,
  or the write guard of a deposed one) from either driver, or a
  :class:`tenure.errors.ReadOnly` other than ``PrimaryUnavailable``;
* :data:`UNAVAILABLE` -- the server could not be reached or the connection
  was lost: an ``OperationalError`` without SQLSTATE or with class 08
  (connection exception), 57P (shutdown, crash, cannot connect now) or 53
  (insufficient resources), a closed connection, or
  :class:`tenure.errors.PrimaryUnavailable`;
* None -- anything else (a query error, a bug): not the web tier's business.

Both kinds mean "answer 503 with Retry-After", never 500. Drivers are not
imported here: an exception is recognised by the module its class comes from.
"""

from __future__ import annotations

from typing import Literal

from ..errors import PrimaryUnavailable, ReadOnly

READ_ONLY: Literal["read_only"] = "read_only"
UNAVAILABLE: Literal["unavailable"] = "unavailable"
Kind = Literal["read_only", "unavailable"]

READ_ONLY_SQLSTATE = "25006"
_UNAVAILABLE_CLASSES = ("08", "57P", "53")
_DRIVERS = ("psycopg", "psycopg2", "psycopg_pool")
_CHAIN_LIMIT = 16


def is_driver_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from psycopg 3, psycopg_pool or psycopg2."""
    return type(exc).__module__.split(".", 1)[0] in _DRIVERS


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error (psycopg 3 ``sqlstate``, psycopg2 ``pgcode``), else None."""
    if not is_driver_error(exc):
        return None
    code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    return str(code) if code else None


def _class_names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def classify_one(exc: BaseException) -> Kind | None:
    """What ``exc`` alone means (its causes are not looked at); see the module doc."""
    if isinstance(exc, PrimaryUnavailable):
        return UNAVAILABLE
    if isinstance(exc, ReadOnly):
        return READ_ONLY
    if not is_driver_error(exc):
        return None
    code = sqlstate(exc)
    if code == READ_ONLY_SQLSTATE:
        return READ_ONLY
    names = _class_names(exc)
    if "OperationalError" in names and (code is None or code.startswith(_UNAVAILABLE_CLASSES)):
        return UNAVAILABLE
    if "InterfaceError" in names and "closed" in str(exc):
        return UNAVAILABLE  # psycopg2: "connection already closed"; psycopg 3: "the connection is closed"
    return None


def chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during, nearest first (bounded, cycle-safe)."""
    out: list[BaseException] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen and len(out) < _CHAIN_LIMIT:
        seen.add(id(cur))
        out.append(cur)
        cur = cur.__cause__ if cur.__cause__ is not None else cur.__context__
    return out


def classify(exc: BaseException) -> Kind | None:
    """READ_ONLY if anything in the chain of ``exc`` is, else UNAVAILABLE if anything is, else None."""
    kinds = {classify_one(e) for e in chain(exc)}
    if READ_ONLY in kinds:
        return READ_ONLY
    if UNAVAILABLE in kinds:
        return UNAVAILABLE
    return None


def is_read_only_error(exc: BaseException) -> bool:
    """SQLSTATE 25006 (``ReadOnlySqlTransaction``) from either driver."""
    return sqlstate(exc) == READ_ONLY_SQLSTATE


def is_connection_error(exc: BaseException) -> bool:
    """A driver error that left its connection unusable (server gone or going), not a query error."""
    return is_driver_error(exc) and classify_one(exc) == UNAVAILABLE
