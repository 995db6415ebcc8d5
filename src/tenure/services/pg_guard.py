"""The self-fencing primary: a guard inside PostgreSQL that refuses writes once the lease is over.

The sidecar that holds the service's etcd lease also keeps a lease row in the
database current (:func:`renew_guard`, at each keepalive). A trigger on every
guarded table checks it on each write statement and raises SQLSTATE 25006
(``read_only_sql_transaction``) once the lease's ``valid_until`` has passed by
the database server's clock. So a deposed primary stops taking writes on its
own, even when its sidecar is frozen (SIGSTOP, VM pause) and clients still
point at it: nothing has to reach the database to end its term.

Objects, all in schema ``tenure`` (which :mod:`tenure.fencing` shares):

``tenure.lease``
    one row: ``token`` (the term's fencing token), ``valid_until``,
    ``renewed_at``. Renewals never move ``token`` backwards.
``tenure.lease_until``
    a sequence that mirrors ``valid_until`` in microseconds since 1970 (a
    trigger on ``tenure.lease`` keeps it in step). The check reads this
    instead of the table: a sequence is read without a snapshot, which makes
    the check about twice as cheap as a table read, and makes the newest
    renewal or expiry count at once, in every isolation level.
``tenure.guard_check()``
    the trigger function. Each guarded table gets ``tenure_guard``, a
    ``BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ... FOR EACH STATEMENT``
    trigger, and with ``at_commit=True`` also ``tenure_guard_commit``, a
    deferred constraint trigger that checks again at COMMIT.
``tenure.guarded_schemas`` and event trigger ``tenure_guard_ddl``
    cover tables created later in a guarded schema, and new partitions of
    guarded tables.

What the guard guarantees, and what it does not (docs/pg_guard.md has more):

* Every write statement on a guarded table is checked against the server's
  clock when it starts. No write statement starts after ``valid_until``.
* A statement that started before ``valid_until``, and the transaction it
  belongs to, can still commit after it. With ``at_commit=True`` the check is
  repeated at COMMIT for transactions that changed rows (not for TRUNCATE),
  which shrinks that window to the commit itself, at a cost per row written.
  :func:`expire_guard` with ``drain`` ends such transactions on demotion.
* ``valid_until`` is server wall-clock time (``clock_timestamp()``). A step
  of the database host's clock moves the end of the lease: forward ends it
  early (safe), backward extends it by the size of the step (unsafe). Run
  the database hosts' time sync in slew-only mode.

Every function takes a psycopg 3 connection. Bad input raises
:class:`~tenure.errors.ConfigError` before anything changes; a failure of the
database raises :class:`~tenure.errors.ServiceError`.
"""

from __future__ import annotations

import logging
from importlib import resources
import math
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

import psycopg
from psycopg import pq

from ..errors import ConfigError, ServiceError
from ..records import check_token

log = logging.getLogger("tenure.pg_guard")

__all__ = ["install_guard", "remove_guard", "renew_guard", "expire_guard", "guard_status"]

# Key of the transaction-level advisory lock that serialises install and
# remove: concurrent CREATE ... IF NOT EXISTS can otherwise fail on a race.
_LOCK_KEY = 0x74656E757265  # "tenure"

# The largest lease one renewal may grant; anything near it is a unit mix-up
# (milliseconds for seconds) rather than a real lease.
_MAX_REMAINING = 1e9

_SYSTEM_SCHEMAS = ("tenure", "pg_catalog", "information_schema", "pg_toast")

# Schema objects, created or brought up to date by every install; the SQL
# lives beside this module. No parameters are ever passed with it (it
# contains % signs).
_OBJECTS = resources.files(__package__).joinpath("pg_guard.sql").read_text(encoding="utf-8")


_EVENT_TRIGGER = """
CREATE EVENT TRIGGER tenure_guard_ddl ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
    EXECUTE FUNCTION tenure.guard_ddl()
"""

_RENEW = """
INSERT INTO tenure.lease AS l (id, token, valid_until, renewed_at)
VALUES (true, %(token)s, %(at)s::timestamptz + pg_catalog.make_interval(secs => %(left)s),
        pg_catalog.clock_timestamp())
ON CONFLICT (id) DO UPDATE
   SET token = EXCLUDED.token, valid_until = EXCLUDED.valid_until, renewed_at = EXCLUDED.renewed_at
 WHERE l.token <= EXCLUDED.token
RETURNING l.valid_until
"""

# Sessions whose transaction has passed at least one guard check: the check
# reads the sequence, which takes a RowExclusiveLock held to the end of the
# transaction (setval in a renewal takes the same lock).
_HOLDERS = """
SELECT l.pid FROM pg_catalog.pg_locks l
 WHERE l.locktype = 'relation' AND l.relation = 'tenure.lease_until'::regclass
   AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = pg_catalog.current_database())
   AND l.mode = 'RowExclusiveLock' AND l.granted
   AND l.pid IS DISTINCT FROM pg_catalog.pg_backend_pid()
"""


# --- input checks -------------------------------------------------------------------------------


def _check_token(token: object) -> int:
    check_token(token)
    assert isinstance(token, int)
    if token >= 2**63:
        raise ConfigError(f"a fencing token must fit in a bigint, got {token!r}")
    return token


def _check_remaining(remaining: object) -> float:
    if isinstance(remaining, bool) or not isinstance(remaining, (int, float)):
        raise ConfigError(f"remaining is a number of seconds, got {remaining!r}")
    value = float(remaining)
    if not math.isfinite(value) or abs(value) > _MAX_REMAINING:
        raise ConfigError(f"remaining must be a finite number of seconds below {_MAX_REMAINING:g}, got {remaining!r}")
    return value


def _check_names(tables: object) -> list[str]:
    if tables is None:
        return []
    if isinstance(tables, (str, bytes)) or not isinstance(tables, (list, tuple)):
        raise ConfigError(f"tables is a list of table names, got {tables!r}")
    for name in tables:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"a table name is a non-empty string, got {name!r}")
    return list(tables)


def _check_schema(schema: object) -> str | None:
    if schema is not None and (not isinstance(schema, str) or not schema.strip()):
        raise ConfigError(f"schema is a non-empty string, got {schema!r}")
    return schema


def _require_idle(conn: Any, what: str) -> None:
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise ConfigError(f"{what} commits on its own: call it outside a transaction "
                          f"(the connection is {conn.info.transaction_status.name})")


# --- database helpers ---------------------------------------------------------------------------


@contextmanager
def _transaction(conn: Any, what: str) -> Iterator[None]:
    """One transaction (a savepoint inside the caller's); psycopg errors become ServiceError."""
    try:
        with conn.transaction():
            yield
    except psycopg.Error as e:
        detail = getattr(getattr(e, "diag", None), "message_primary", None) or str(e)
        raise ServiceError(f"PostgreSQL failed to {what}: {detail}", detail=detail) from e


def _installed(conn: Any) -> bool:
    row = conn.execute("SELECT pg_catalog.to_regprocedure('tenure.guard_check()') IS NOT NULL "
                       "AND pg_catalog.to_regclass('tenure.lease_until') IS NOT NULL").fetchone()
    return bool(row[0])


def _resolve_table(conn: Any, name: str) -> tuple[int, str]:
    """(oid, qualified name) of a table named as in SQL (search_path applies), or ConfigError."""
    try:
        with conn.transaction():  # a savepoint: a malformed name must not abort the whole install
            row = conn.execute(
                "SELECT c.oid, c.oid::regclass::text, c.relkind, c.relpersistence, n.nspname "
                "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.oid = pg_catalog.to_regclass(%s)", (name,)).fetchone()
    except psycopg.Error as e:
        raise ConfigError(f"table {name!r} is not a valid table name: {e}") from None
    if row is None:
        raise ConfigError(f"table {name!r} does not exist (search_path applies to unqualified names)")
    oid, qualified, kind, persistence, nsp = row
    if kind not in ("r", "p"):
        raise ConfigError(f"{name!r} is not a table (relkind {kind!r}); the guard attaches to tables only")
    if persistence == "t":
        raise ConfigError(f"table {name!r} is temporary; a guard on one session's table protects nothing")
    if nsp in _SYSTEM_SCHEMAS:
        raise ConfigError(f"table {name!r} is in schema {nsp}, which cannot be guarded")
    return oid, qualified


def _resolve_schema(conn: Any, schema: str) -> tuple[int, str]:
    try:
        with conn.transaction():
            row = conn.execute("SELECT n.oid, n.nspname FROM pg_catalog.pg_namespace n "
                               "WHERE n.oid = pg_catalog.to_regnamespace(%s)", (schema,)).fetchone()
    except psycopg.Error as e:
        raise ConfigError(f"schema {schema!r} is not a valid schema name: {e}") from None
    if row is None:
        raise ConfigError(f"schema {schema!r} does not exist")
    if row[1] in _SYSTEM_SCHEMAS or row[1].startswith("pg_"):
        raise ConfigError(f"schema {row[1]!r} cannot be guarded")
    return row[0], row[1]


def _schema_tables(conn: Any, nsp_oid: int) -> list[int]:
    rows = conn.execute("SELECT c.oid FROM pg_catalog.pg_class c WHERE c.relnamespace = %s "
                        "AND c.relkind IN ('r', 'p') AND c.relpersistence <> 't' ORDER BY c.oid",
                        (nsp_oid,)).fetchall()
    return [r[0] for r in rows]


# --- public API ---------------------------------------------------------------------------------


def install_guard(conn: Any, *, tables: list[str] | None = None, schema: str | None = None,
                  at_commit: bool = False) -> None:
    """Guard ``tables`` and/or every table of ``schema``: refuse their writes once the lease is over.

    Creates the ``tenure`` schema objects if they are missing (or brings them
    up to date) and attaches the ``tenure_guard`` trigger to each table and
    to each partition of a partitioned table. Names are SQL names, so
    ``"public.items"`` works and the session's search_path applies to
    unqualified ones.

    Until the first :func:`renew_guard` (no lease row yet, or ``valid_until``
    NULL) guarded writes are refused: the guard fails safe. Install it, then
    renew, then let clients write.

    ``schema``: every table in it now, and every table created in it later
    (or moved into it with ``ALTER TABLE ... SET SCHEMA``), is guarded; the
    event trigger ``tenure_guard_ddl`` attaches the guard in the same
    transaction as the ``CREATE TABLE``. Event triggers need a superuser, so
    schema mode raises :class:`ConfigError` for other roles. A table filled
    by ``CREATE TABLE AS`` gets its first rows before the guard is attached.
    When the role is a superuser the event trigger is installed in table
    mode too, and it then also guards partitions created or attached later
    under a guarded table; for other roles only the partitions that exist
    now are covered.

    ``at_commit=True`` adds a deferred constraint trigger that checks the
    lease again at COMMIT for every row changed (not TRUNCATE), so a
    transaction that wrote before the lease ended cannot commit after it.
    It costs per row written; see docs/pg_guard.md. Installing without it
    never removes it: the guard only ever gets stronger here (use
    :func:`remove_guard` to weaken it).

    Idempotent, and one transaction: a table or schema that does not exist
    (or is not a table, or is temporary, or a system schema) raises
    :class:`ConfigError` naming it and nothing is changed. Inside a
    transaction of the caller's, it runs in a savepoint and commits with it.
    """
    names = _check_names(tables)
    schema = _check_schema(schema)
    if not isinstance(at_commit, bool):
        raise ConfigError(f"at_commit is a bool, got {at_commit!r}")
    if not names and schema is None:
        raise ConfigError("install_guard needs tables=[...] or schema=...: nothing to guard")
    with _transaction(conn, "install the tenure guard"):
        conn.execute("SELECT pg_catalog.pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        superuser = conn.execute("SELECT pg_catalog.current_setting('is_superuser') = 'on'").fetchone()[0]
        rels = [_resolve_table(conn, n) for n in names]
        nsp = _resolve_schema(conn, schema) if schema is not None else None
        if nsp is not None and not superuser:
            raise ConfigError(f"guarding schema {schema!r} needs a superuser (an event trigger covers the tables "
                              "created in it later); name the tables with tables=[...] instead")
        conn.execute(_OBJECTS)
        # Schemas dropped since they were guarded leave rows behind; forget them.
        conn.execute("DELETE FROM tenure.guarded_schemas g WHERE NOT EXISTS "
                     "(SELECT 1 FROM pg_catalog.pg_namespace n WHERE n.oid = g.nsp)")
        if superuser:
            if conn.execute("SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'tenure_guard_ddl'").fetchone() is None:
                conn.execute(_EVENT_TRIGGER)
        for oid, _ in rels:
            conn.execute("SELECT tenure.guard_attach(%s::oid::regclass, %s)", (oid, at_commit))
        if nsp is not None:
            conn.execute("INSERT INTO tenure.guarded_schemas AS s (nsp, at_commit) VALUES (%s::oid::regnamespace, %s) "
                         "ON CONFLICT (nsp) DO UPDATE SET at_commit = s.at_commit OR EXCLUDED.at_commit",
                         (nsp[0], at_commit))
            for oid in _schema_tables(conn, nsp[0]):
                conn.execute("SELECT tenure.guard_attach(%s::oid::regclass, %s)", (oid, at_commit))
    log.info("tenure guard installed on %s%s%s", ", ".join(q for _, q in rels) or "-",
             f" and schema {nsp[1]}" if nsp else "", " (with commit-time check)" if at_commit else "")


def remove_guard(conn: Any, *, tables: list[str] | None = None, schema: str | None = None,
                 drop_all: bool = False) -> None:
    """Stop guarding ``tables`` and/or ``schema``, or with ``drop_all`` remove every guard object.

    ``tables``: drops the triggers from each table and its partitions. A
    table in a guarded schema raises :class:`ConfigError` (the event trigger
    would put the guard back): remove the schema instead. ``schema``: forgets
    the schema (tables created in it later are no longer guarded) and drops
    the triggers from every table in it. ``drop_all`` (alone): drops the
    triggers from every table in the database, the event trigger, the
    functions, ``tenure.lease`` and its sequence, and schema ``tenure`` if
    nothing else (such as ``tenure.fence``) is left in it.

    Idempotent: removing what is not guarded, or from a database where the
    guard was never installed, does nothing. A name that does not exist
    raises :class:`ConfigError` and nothing is changed.
    """
    names = _check_names(tables)
    schema = _check_schema(schema)
    if not isinstance(drop_all, bool):
        raise ConfigError(f"drop_all is a bool, got {drop_all!r}")
    if drop_all and (names or schema is not None):
        raise ConfigError("drop_all removes the guard everywhere: do not pass tables or schema with it")
    if not drop_all and not names and schema is None:
        raise ConfigError("remove_guard needs tables=[...], schema=... or drop_all=True")
    with _transaction(conn, "remove the tenure guard"):
        conn.execute("SELECT pg_catalog.pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        if drop_all:
            _drop_all(conn)
            log.info("tenure guard removed from the database")
            return
        rels = [_resolve_table(conn, n) for n in names]
        nsp = _resolve_schema(conn, schema) if schema is not None else None
        if not _installed(conn):
            return
        for oid, qualified in rels:
            row = conn.execute("SELECT s.nsp::text FROM tenure.guarded_schemas s JOIN pg_catalog.pg_class c "
                               "ON c.relnamespace = s.nsp WHERE c.oid = %s", (oid,)).fetchone()
            if row is not None and (nsp is None or row[0] != nsp[1]):
                raise ConfigError(f"table {qualified} is guarded through schema {row[0]}: "
                                  f"remove_guard(schema={row[0]!r}) to unguard it")
            conn.execute("SELECT tenure.guard_detach(%s::oid::regclass)", (oid,))
        if nsp is not None:
            conn.execute("DELETE FROM tenure.guarded_schemas WHERE nsp = %s::oid::regnamespace", (nsp[0],))
            for oid in _schema_tables(conn, nsp[0]):
                conn.execute("SELECT tenure.guard_detach(%s::oid::regclass)", (oid,))
    log.info("tenure guard removed from %s%s", ", ".join(q for _, q in rels) or "-",
             f" and schema {nsp[1]}" if nsp else "")


def _drop_all(conn: Any) -> None:
    conn.execute("DROP EVENT TRIGGER IF EXISTS tenure_guard_ddl")
    if conn.execute("SELECT pg_catalog.to_regprocedure('tenure.guard_check()')").fetchone()[0] is not None:
        # Top-level triggers only: a partition's clone goes with its parent's.
        for (rel, name) in conn.execute(
                "SELECT g.tgrelid::regclass::text, g.tgname FROM pg_catalog.pg_trigger g "
                "WHERE g.tgfoid = 'tenure.guard_check()'::regprocedure AND g.tgparentid = 0").fetchall():
            conn.execute(f'DROP TRIGGER "{name.replace(chr(34), chr(34) * 2)}" ON {rel}')
    conn.execute("""
        DROP FUNCTION IF EXISTS tenure.guard_ddl(), tenure.guard_cover(oid), tenure.guard_attach(regclass, boolean),
            tenure.guard_detach(regclass), tenure.guard_check(), tenure.guard_refuse(text, text);
        DROP TABLE IF EXISTS tenure.lease, tenure.guarded_schemas;
        DROP FUNCTION IF EXISTS tenure.lease_mirror();
        DROP SEQUENCE IF EXISTS tenure.lease_until;
    """)
    left = conn.execute(
        "SELECT (SELECT count(*) FROM pg_catalog.pg_class WHERE relnamespace = n.oid)"
        " + (SELECT count(*) FROM pg_catalog.pg_proc WHERE pronamespace = n.oid)"
        " + (SELECT count(*) FROM pg_catalog.pg_type WHERE typnamespace = n.oid)"
        " FROM pg_catalog.pg_namespace n WHERE n.nspname = 'tenure'").fetchone()
    if left is not None and left[0] == 0:
        conn.execute("DROP SCHEMA tenure")


def renew_guard(conn: Any, token: int, remaining: float | None = None, *, deadline: float | None = None) -> bool:
    """Extend the lease to the server's now + ``remaining`` seconds for term ``token``; True if applied.

    Or pass ``deadline``, the caller's absolute ``time.monotonic()`` deadline (as a lease
    keepalive hook gets it): then no pause of the caller, before or during the call, can move
    the end of the lease later. Exactly one of the two is given.

    ``remaining`` is the caller's monotonic deadline minus its monotonic now,
    taken just before the call. The database never sees the caller's
    clocks: this function maps the deadline onto the server's clock itself.
    It reads the server's ``clock_timestamp()`` first and then writes
    ``valid_until = that + (deadline - monotonic time after the read)``, an
    absolute time. So a renewal that is delayed on its way (a slow network, a
    lock, the caller paused between the two statements) can only end the
    lease earlier than the deadline, never later. A pause of the caller
    *before* this call is not seen: compute ``remaining`` last.

    A newer term wins: the row is only written if ``token`` >= the stored
    token, and False is returned (nothing changed) for an older one. The
    same token may renew with a shorter lease.

    Commits on its own (the connection must not be in a transaction), with
    ``SET LOCAL synchronous_commit = local`` so that a renewal never waits
    for a synchronous standby: a missing standby must not let the lease run
    out. ``statement_timeout`` and ``lock_timeout`` are set to the time left
    (at least 0.1 s), so a blocked renewal fails with :class:`ServiceError`
    rather than hang past the lease.

    The server's wall clock defines the end of the lease. If the database
    host's clock steps forward, ``clock_timestamp()`` jumps and the lease ends
    early (safe); if it steps back by X seconds, the lease lasts X seconds
    longer than the sidecar's (unsafe by X). Run the database hosts' time
    sync in slew-only mode (chrony: no ``makestep`` after boot) and alert on
    steps; docs/pg_guard.md says more.
    """
    t0 = time.monotonic()  # the instant `remaining` was measured from, as near as we can tell
    token = _check_token(token)
    if (remaining is None) == (deadline is None):
        raise ConfigError("renew_guard takes either remaining or deadline")
    if deadline is not None:
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not math.isfinite(deadline):
            raise ConfigError(f"deadline is a time.monotonic() value, got {deadline!r}")
        remaining = max(0.0, deadline - t0)
    else:
        deadline = t0 + _check_remaining(remaining)
    assert remaining is not None
    _require_idle(conn, "renew_guard")
    timeout_ms = str(max(100, min(int(remaining * 1000), 600_000)))
    with _transaction(conn, "renew the tenure lease"):
        server_now = conn.execute(
            "SELECT pg_catalog.set_config('synchronous_commit', 'local', true),"
            " pg_catalog.set_config('statement_timeout', %s, true),"
            " pg_catalog.set_config('lock_timeout', %s, true), pg_catalog.clock_timestamp()",
            (timeout_ms, timeout_ms)).fetchone()[3]
        left = deadline - time.monotonic()
        row = conn.execute(_RENEW, {"token": token, "at": server_now, "left": left}).fetchone()
        stored = None
        if row is None:
            stored = conn.execute("SELECT token FROM tenure.lease").fetchone()
    if row is None:
        log.warning("tenure lease renewal with token %d refused: the database holds newer token %s",
                    token, stored[0] if stored else None)
        return False
    log.debug("tenure lease renewed: token %d valid until %s (%.3f s)", token, row[0], left)
    return True


def expire_guard(conn: Any, *, drain: float | None = None) -> int:
    """End the lease at once (``valid_until = -infinity``): every later write statement is refused.

    For demotion and switchover. The new value counts as soon as it is
    written, before the commit, and for transactions already open. Commits
    on its own with ``synchronous_commit = local``, like a renewal. Works
    whatever the stored token.

    A transaction that passed the check before now can still commit the
    writes it made. With ``drain`` (seconds), wait that long for such
    transactions to end, then terminate the sessions still in one
    (``pg_terminate_backend``: needs superuser or ``pg_signal_backend``).
    When it returns, no transaction that wrote under the old lease is still
    open, so nothing more can commit under it. Sessions that tried a write
    after the expiry and have not yet rolled back count too (they hold the
    same lock). Returns how many sessions were terminated; raises
    :class:`ServiceError` if some could not be (the lease is expired anyway).
    """
    if drain is not None:
        drain = _check_remaining(drain)
        if drain < 0:
            raise ConfigError(f"drain is a number of seconds >= 0, got {drain!r}")
    _require_idle(conn, "expire_guard")
    with _transaction(conn, "expire the tenure lease"):
        conn.execute("SELECT pg_catalog.set_config('synchronous_commit', 'local', true)")
        # setval first: it counts at once and needs no row lock, so writes
        # stop even if the UPDATE below waits on a stuck renewal.
        conn.execute("SELECT pg_catalog.setval('tenure.lease_until', 0, true)")
        conn.execute("UPDATE tenure.lease SET valid_until = '-infinity', renewed_at = pg_catalog.clock_timestamp()")
    log.info("tenure lease expired")
    if drain is None:
        return 0
    until = time.monotonic() + drain
    with _transaction(conn, "drain transactions of the expired lease"):
        pids = [r[0] for r in conn.execute(_HOLDERS).fetchall()]
    while pids and time.monotonic() < until:
        time.sleep(min(0.01, max(0.0, until - time.monotonic())))
        with _transaction(conn, "drain transactions of the expired lease"):
            pids = [r[0] for r in conn.execute(_HOLDERS).fetchall()]
    if not pids:
        return 0
    if None in pids:
        raise ServiceError("prepared transactions passed the tenure guard under the expired lease and cannot be "
                           "terminated: COMMIT PREPARED or ROLLBACK PREPARED them (see pg_prepared_xacts)")
    with _transaction(conn, "terminate transactions of the expired lease"):
        rows = conn.execute("SELECT p, pg_catalog.pg_terminate_backend(p, 5000) FROM pg_catalog.unnest(%s::int[]) p",
                            (pids,)).fetchall()
    failed = [p for p, ok in rows if not ok]
    log.warning("tenure lease drain: terminated %d session(s) still in a transaction that wrote under the old lease",
                len(rows) - len(failed))
    if failed:
        raise ServiceError(f"could not terminate sessions {failed} that still hold a transaction which wrote under "
                           "the expired lease")
    return len(rows)


def _ts(expr: str) -> str:
    """SQL for a timestamptz column as (finite value or NULL, -1/0/1 for -infinity/finite/infinity)."""
    return (f"CASE WHEN pg_catalog.isfinite({expr}) THEN {expr} END, "
            f"CASE WHEN {expr} = '-infinity' THEN -1 WHEN {expr} = 'infinity' THEN 1 ELSE 0 END")


def _inf(value: datetime | None, sign: int | None) -> datetime | None:
    # psycopg cannot load infinite timestamps; expire_guard writes -infinity.
    if sign == -1:
        return datetime.min.replace(tzinfo=timezone.utc)
    if sign == 1:
        return datetime.max.replace(tzinfo=timezone.utc)
    return value


def guard_status(conn: Any) -> dict[str, Any]:
    """What the guard enforces now, by the server's clock.

    Keys: ``installed`` (bool); ``token`` and ``valid_until`` from the lease
    row (None before the first renewal); ``renewed_at``; ``enforced_until``,
    the value the check compares with (the row's ``valid_until`` mirrored in
    ``tenure.lease_until``; it can only differ from the row after a
    transaction that wrote the row rolled back); ``seconds_left`` (>= 0, by
    the server's ``clock_timestamp()``). Timestamps are aware datetimes;
    ``-infinity`` (after :func:`expire_guard`) reads as ``datetime.min`` in
    UTC. ``tables``, the guarded tables;
    ``schemas``, the guarded schemas; ``covers_new_tables``, whether the
    event trigger is enabled.
    """
    status: dict[str, Any] = {"installed": False, "token": None, "valid_until": None, "renewed_at": None,
                              "enforced_until": None, "seconds_left": 0.0, "tables": [], "schemas": [],
                              "covers_new_tables": False}
    with _transaction(conn, "read the tenure guard status"):
        if not _installed(conn):
            return status
        status["installed"] = True
        row = conn.execute(f"SELECT token, {_ts('valid_until')}, renewed_at FROM tenure.lease").fetchone()
        if row is not None:
            status["token"], status["valid_until"], status["renewed_at"] = row[0], _inf(row[1], row[2]), row[3]
        row = conn.execute(
            f"SELECT {_ts('e.t')}, CASE WHEN pg_catalog.isfinite(e.t) THEN "
            "GREATEST(0, EXTRACT(epoch FROM e.t - pg_catalog.clock_timestamp()))::float8 ELSE 0 END FROM "
            "(SELECT CASE WHEN NOT s.is_called THEN NULL WHEN s.last_value = 0 THEN '-infinity'::timestamptz "
            "ELSE pg_catalog.to_timestamp(s.last_value / 1000000.0::float8) END AS t FROM tenure.lease_until s) e"
        ).fetchone()
        status["enforced_until"], status["seconds_left"] = _inf(row[0], row[1]), float(row[2] or 0.0)
        status["tables"] = [r[0] for r in conn.execute(
            "SELECT DISTINCT g.tgrelid::regclass::text FROM pg_catalog.pg_trigger g "
            "WHERE g.tgfoid = 'tenure.guard_check()'::regprocedure AND g.tgname = 'tenure_guard' ORDER BY 1")]
        status["schemas"] = [r[0] for r in conn.execute("SELECT nsp::text FROM tenure.guarded_schemas ORDER BY 1")]
        ev = conn.execute("SELECT evtenabled <> 'D' FROM pg_catalog.pg_event_trigger "
                          "WHERE evtname = 'tenure_guard_ddl'").fetchone()
        status["covers_new_tables"] = bool(ev and ev[0])
    return status
