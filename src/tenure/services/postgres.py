"""An adapter for one local PostgreSQL server: status, start/stop, promote, demote, rejoin.

:class:`PostgresNode` drives a single server through its own binaries
(``pg_ctl``, ``pg_rewind``, ``pg_basebackup``, ``initdb``) and through SQL
(psycopg 3). It knows nothing of etcd or elections: the caller decides *when*
to promote, demote or rejoin; the node only does it, within a bounded time,
and raises :class:`~tenure.errors.ServiceError` carrying the server's own
message when it cannot.

Node-specific settings (port, ``cluster_name``, the Unix socket directory) are
passed on the ``pg_ctl`` command line and never kept in the data directory:
``pg_basebackup`` and ``pg_rewind`` copy ``postgresql.conf`` and
``postgresql.auto.conf`` from the source node, so anything kept there would
follow the copy to the wrong node. ``cluster_name`` is also the name the
walreceiver reports as its ``application_name``, which is how
``synchronous_standby_names`` and :meth:`PostgresNode.replicas` identify
standbys.

PostgreSQL refuses to run as root, so when tenure runs as root the server
binaries run as ``run_as`` (default ``postgres``) through ``runuser``. SQL
goes over TCP and works as any user.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..errors import ConfigError, ServiceError

log = logging.getLogger("tenure.postgres")

DEFAULT_BIN_DIR = "/usr/lib/postgresql/15/bin"

# Node and standby names end up in `-c cluster_name=...` (parsed by a shell
# inside pg_ctl), in primary_conninfo and in synchronous_standby_names: keep
# them plain identifiers so none of those needs quoting.
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# Settings that belong to a node's role rather than to the cluster. A node that
# becomes a standby drops them from postgresql.auto.conf (see _write_standby_config).
_ROLE_SETTINGS = ("primary_conninfo", "primary_slot_name", "default_transaction_read_only",
                  "synchronous_standby_names")

# Configuration files pg_rewind copies from the source; rejoin() puts the node's own back.
_CONFIG_FILES = ("postgresql.conf", "postgresql.auto.conf", "pg_hba.conf", "pg_ident.conf")

REWIND_TIMEOUT = 3600.0  # seconds; only a hung pg_rewind is killed

_AUTO = object()  # "run_as" default: postgres when root, else the current user


def parse_lsn(text: str) -> int:
    """A WAL position 'X/Y' (hex) as a byte position: (X << 32) + Y."""
    try:
        hi, lo = text.split("/")
        return (int(hi, 16) << 32) + int(lo, 16)
    except (AttributeError, ValueError):
        raise ConfigError(f"not a WAL position (X/Y in hex): {text!r}") from None


def format_lsn(pos: int) -> str:
    """A byte position as PostgreSQL writes an LSN: 'X/Y' in upper-case hex."""
    return f"{pos >> 32:X}/{pos & 0xFFFFFFFF:X}"


_SECRET_KEYS = ("password", "sslpassword", "passfile")


def public_dsn(dsn: str) -> str:
    """``dsn`` without its secrets (password, sslpassword) or the local passfile path: safe to publish or log."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<malformed connection string>"
    return make_conninfo(**{k: str(v) for k, v in parts.items() if k not in _SECRET_KEYS})


def _lsn(text: str | None) -> int | None:
    return None if text is None else parse_lsn(text)


@dataclass(frozen=True)
class NodeStatus:
    """What one server said about itself (or that it said nothing: role ``"down"``).

    * ``healthy``: it answered a query.
    * ``role``: ``"primary"``, ``"standby"`` (in recovery) or ``"down"`` (no answer).
    * ``timeline``: primary: the timeline it writes; standby: the timeline of
      the WAL it last received, or of its last restartpoint if no walreceiver runs.
    * ``wal_current``: primary only, ``pg_current_wal_lsn()`` as a byte position.
    * ``wal_received`` / ``wal_replayed``: standby only,
      ``pg_last_wal_receive_lsn()`` / ``pg_last_wal_replay_lsn()``. ``wal_received``
      is None until the walreceiver has connected since the server started, and
      starts at the beginning of the segment it asked for (so it can be behind
      ``wal_replayed`` until new WAL arrives).
    * ``streaming``: a standby whose walreceiver is in state ``streaming``.
    * ``upstream``: ``"host:port"`` the walreceiver is connected to.
    * ``read_only``: ``default_transaction_read_only`` is on (as :meth:`PostgresNode.demote`
      leaves it). It is off on an ordinary standby, which is read-only anyway.
    * ``error``: why the node is ``"down"``: the connection error's message.
    """

    healthy: bool
    role: str
    timeline: int | None = None
    wal_current: int | None = None
    wal_received: int | None = None
    wal_replayed: int | None = None
    streaming: bool = False
    upstream: str | None = None
    read_only: bool = False
    error: str | None = None


class Replica(NamedTuple):
    """One row of the primary's ``pg_stat_replication``."""

    application_name: str
    state: str
    sync_state: str
    replay_lsn: int | None


_STATUS_SQL = """
SELECT r.rec,
       current_setting('default_transaction_read_only') = 'on',
       CASE WHEN r.rec THEN NULL ELSE pg_current_wal_lsn()::text END,
       CASE WHEN r.rec THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END,
       pg_last_wal_receive_lsn()::text,
       pg_last_wal_replay_lsn()::text,
       w.status, w.sender_host, w.sender_port, w.received_tli,
       (SELECT timeline_id FROM pg_control_checkpoint()),
       CASE WHEN r.rec THEN (SELECT max(('x' || substr(name, 1, 8))::bit(32)::int) FROM pg_ls_waldir()
                             WHERE name ~ '^[0-9A-F]{24}$') END
FROM (SELECT pg_is_in_recovery() AS rec OFFSET 0) r
LEFT JOIN pg_stat_wal_receiver w ON true
"""
# The CASEs keep pg_current_wal_lsn() (an error during recovery) off a standby. A standby
# without a walreceiver reports the newest timeline it holds WAL of (its segment files), not
# the older one of its last restartpoint.
# pg_is_in_recovery() is evaluated once (OFFSET 0 keeps the subquery from being
# inlined), so a promotion between two evaluations cannot split the answer.


def _message(exc: BaseException) -> str:
    """The server's (or libpq's) own message, on one line per original line."""
    text = str(exc).strip()
    return text or type(exc).__name__


def _quote_conf(value: str) -> str:
    """A string value as postgresql.conf wants it: quoted, with ' and \\ escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class PostgresNode:
    """One local PostgreSQL server, driven through its binaries and SQL.

    ``name`` is the node's ``cluster_name`` (so its walreceiver's
    ``application_name``); ``data_dir`` its cluster directory; ``port`` the
    port it listens on and is reached at on ``host``. ``user``/``dbname`` are
    used to connect (the user needs superuser rights for promote, demote and
    ALTER SYSTEM). ``run_as`` is the OS user that runs the server binaries:
    by default ``postgres`` when running as root (PostgreSQL refuses root),
    else the current user; ``None`` means the current user. ``socket_dir``,
    when given, becomes ``unix_socket_directories``; ``log_file`` (default
    ``<data_dir>.log``) receives the server's output from ``pg_ctl``.

    Nothing is checked against the server at construction; a data directory
    is checked (it must hold ``PG_VERSION``) by each operation that needs one.
    """

    def __init__(
        self,
        name: str,
        data_dir: str,
        port: int,
        *,
        host: str = "127.0.0.1",
        user: str = "postgres",
        dbname: str = "postgres",
        bin_dir: str = DEFAULT_BIN_DIR,
        run_as: Any = _AUTO,
        socket_dir: str | None = None,
        log_file: str | None = None,
        connect_timeout: float = 2.0,
        passfile: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(f"a node name is a plain identifier (letters, digits, _; at most 63), got {name!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ConfigError(f"port must be an int in 1..65535, got {port!r}")
        for what, value in (("host", host), ("user", user), ("dbname", dbname)):
            if not isinstance(value, str) or not value or any(c.isspace() for c in value):
                raise ConfigError(f"{what} must be a non-empty string without spaces, got {value!r}")
        if not isinstance(data_dir, str) or not data_dir:
            raise ConfigError(f"data_dir must be a path, got {data_dir!r}")
        if not isinstance(connect_timeout, (int, float)) or isinstance(connect_timeout, bool) or connect_timeout <= 0:
            raise ConfigError(f"connect_timeout must be a positive number of seconds, got {connect_timeout!r}")
        if not os.path.isfile(os.path.join(bin_dir, "pg_ctl")):
            raise ConfigError(f"no pg_ctl in bin_dir {bin_dir!r}: install PostgreSQL or pass its bin directory")
        if run_as is _AUTO:
            run_as = "postgres" if os.geteuid() == 0 else None
        if run_as is not None:
            if not isinstance(run_as, str) or not _NAME_RE.match(run_as.replace("-", "_")):
                raise ConfigError(f"run_as must be a user name or None, got {run_as!r}")
            try:
                import pwd

                me = pwd.getpwuid(os.geteuid()).pw_name
                pwd.getpwnam(run_as)
            except KeyError:
                raise ConfigError(f"run_as user {run_as!r} does not exist") from None
            if run_as == me:
                run_as = None
            elif os.geteuid() != 0:
                raise ConfigError(f"running binaries as {run_as!r} needs root; pass run_as=None")
        self.name = name
        self.data_dir = os.path.abspath(data_dir)
        self.port = port
        self.host = host
        self.user = user
        self.dbname = dbname
        self.bin_dir = bin_dir
        self.run_as: str | None = run_as
        self.socket_dir = os.path.abspath(socket_dir) if socket_dir else None
        self.log_file = os.path.abspath(log_file) if log_file else self.data_dir.rstrip("/") + ".log"
        self.connect_timeout = float(connect_timeout)
        self.passfile = os.path.abspath(passfile) if passfile else None
        self._probe_conn: psycopg.Connection[Any] | None = None  # status()'s own connection, kept

    def __repr__(self) -> str:
        return f"PostgresNode({self.name!r}, {self.data_dir!r}, port={self.port})"

    @property
    def dsn(self) -> str:
        """libpq key=value connection string for this node (with the passfile's path, never a password)."""
        extra = {"passfile": self.passfile} if self.passfile else {}
        return make_conninfo(host=self.host, port=str(self.port), user=self.user, dbname=self.dbname, **extra)

    def with_credentials(self, dsn: str) -> str:
        """Another server's public ``dsn`` with this node's own way to authenticate (its passfile) added."""
        return make_conninfo(dsn, passfile=self.passfile) if self.passfile else dsn

    # -- plumbing -----------------------------------------------------------

    def _where(self) -> str:
        return f"{self.name} ({self.host}:{self.port})"

    def _fail(self, what: str, detail: str) -> ServiceError:
        return ServiceError(f"{self._where()}: {what}: {detail}", detail=detail)

    def _open(self, statement_timeout: float = 5.0, dsn: str | None = None) -> psycopg.Connection[Any]:
        """A new autocommit connection whose statements are bounded by ``statement_timeout``."""
        return psycopg.connect(
            dsn or self.dsn,
            autocommit=True,
            # libpq counts whole seconds and treats anything under 2 as 2.
            connect_timeout=max(2, math.ceil(self.connect_timeout)),
            # synchronous_commit=local: what the sidecar commits for itself (the write guard, its
            # settings) must not wait for a synchronous standby that may be gone.
            options=f"-c statement_timeout={int(statement_timeout * 1000)} -c synchronous_commit=local",
        )

    def dsn_for(self, dbname: str) -> str:
        """This node's connection string for database ``dbname``."""
        return make_conninfo(self.dsn, dbname=dbname)

    def open(self, *, statement_timeout: float = 5.0, dbname: str | None = None) -> psycopg.Connection[Any]:
        """A new autocommit connection that the caller keeps and closes (ServiceError if it cannot connect)."""
        try:
            return self._open(statement_timeout, dsn=self.dsn_for(dbname) if dbname else None)
        except psycopg.Error as e:
            raise self._fail("cannot connect", _message(e)) from e

    @contextmanager
    def connect(self, *, statement_timeout: float = 5.0,
                dbname: str | None = None) -> Iterator[psycopg.Connection[Any]]:
        """An autocommit psycopg connection to this node, closed on exit.

        Each statement is bounded by ``statement_timeout`` seconds. Failing to
        connect, and any psycopg error raised inside the block, become a
        :class:`ServiceError` with the server's message.
        """
        try:
            conn = self._open(statement_timeout, dsn=self.dsn_for(dbname) if dbname else None)
        except psycopg.Error as e:
            raise self._fail("cannot connect", _message(e)) from e
        try:
            with conn:
                yield conn
        except psycopg.Error as e:
            raise self._fail("statement failed", _message(e)) from e

    def _sql(self, what: str, query: Any, params: Any = None, *,
             statement_timeout: float = 5.0) -> list[tuple[Any, ...]]:
        """Run one statement on this node; any failure becomes a ServiceError naming ``what``."""
        try:
            with self._open(statement_timeout) as conn:
                cur = conn.execute(query, params)
                return cur.fetchall() if cur.description else []
        except psycopg.Error as e:
            raise self._fail(f"{what} failed", _message(e)) from e

    def _run(self, tool: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run one PostgreSQL binary as ``run_as``; kill it (and its children) after ``timeout``."""
        cmd = [os.path.join(self.bin_dir, tool), *args]
        if self.run_as:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        log.debug("%s: running %s", self.name, shlex.join(cmd))
        # cwd "/": the binaries complain when they cannot read the current directory (e.g. /root).
        # A new session so that a timeout can kill the whole group; pg_ctl puts the
        # postmaster in a session of its own, so that one survives.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd="/", start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            detail = (err or out).strip() or "no output"
            raise self._fail(f"{tool} did not finish within {timeout:.1f} s", detail) from None
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def _require_cluster(self) -> None:
        if not os.path.isdir(self.data_dir):
            raise ConfigError(f"{self.name}: data_dir {self.data_dir} does not exist")
        try:
            ok = os.path.isfile(os.path.join(self.data_dir, "PG_VERSION"))
            os.listdir(self.data_dir)
        except PermissionError:
            raise ConfigError(f"{self.name}: cannot read data_dir {self.data_dir} (permission denied)") from None
        if not ok:
            raise ConfigError(f"{self.name}: {self.data_dir} is not a PostgreSQL cluster (no PG_VERSION)")

    def _log_tail(self, since: int = 0, lines: int = 8) -> str:
        """The last lines the server wrote to its log after byte offset ``since``."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def _log_size(self) -> int:
        try:
            return os.path.getsize(self.log_file)
        except OSError:
            return 0

    def _write_owned(self, path: str, data: bytes) -> None:
        """Write a file in the data dir so that the server's user owns it (it refuses others')."""
        st = os.stat(self.data_dir)
        tmp = path + ".tenure.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o600)
        if os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)

    def _pg_ctl_options(self, *, isolated_socket_dir: str | None = None) -> str:
        opts = ["-p", str(self.port), "-c", f"cluster_name={self.name}"]
        if isolated_socket_dir:
            # No TCP, and a socket only in a private directory: nobody connects to
            # a diverged old primary while it runs through recovery.
            opts += ["-c", "listen_addresses=", "-k", isolated_socket_dir]
        elif self.socket_dir:
            opts += ["-k", self.socket_dir]
        # pg_ctl hands this string to /bin/sh.
        return " ".join(shlex.quote(o) for o in opts)

    # -- status -------------------------------------------------------------

    def status(self) -> NodeStatus:
        """Ask the server what it is. Never raises for a server that does not answer: role ``"down"``.

        The probe keeps its connection between calls (and makes a new one once if it broke), so a
        full connection table cannot blind it once it has connected.
        """
        row = None
        for fresh in (False, True):
            conn = self._probe_conn
            try:
                if conn is None or conn.closed or fresh:
                    if conn is not None:
                        conn.close()
                    self._probe_conn = conn = None
                    conn = self._open(statement_timeout=max(2.0, self.connect_timeout))
                    self._probe_conn = conn
                row = conn.execute(_STATUS_SQL).fetchone()
                break
            except psycopg.Error as e:
                if conn is not None:
                    conn.close()
                self._probe_conn = None
                if fresh:
                    return NodeStatus(healthy=False, role="down", error=_message(e))
        assert row is not None
        (rec, read_only, cur_lsn, walfile, recv_lsn, replay_lsn,
         w_status, w_host, w_port, w_tli, ckpt_tli, wal_tli) = row
        if not rec:
            return NodeStatus(healthy=True, role="primary", timeline=int(walfile[:8], 16),
                              wal_current=_lsn(cur_lsn), read_only=bool(read_only))
        return NodeStatus(
            healthy=True, role="standby",
            timeline=int(w_tli) if w_tli else (max(int(ckpt_tli or 0), int(wal_tli or 0)) or None),
            wal_received=_lsn(recv_lsn), wal_replayed=_lsn(replay_lsn),
            streaming=w_status == "streaming",
            upstream=f"{w_host}:{w_port}" if w_host is not None else None,
            read_only=bool(read_only),
        )

    def lag_bytes(self, primary_wal: int) -> int | None:
        """Bytes of WAL this standby has not *received* yet, behind ``primary_wal``.

        Received, not replayed: a promoted standby replays everything it has
        received before it accepts writes, so this is what a failover to it
        would lose. The position used is the larger of the received and the
        replayed one: after a restart the walreceiver reports the segment
        start it asked for (behind what was replayed from local WAL), or
        nothing before it has connected. Never negative (a standby may have
        moved past a ``primary_wal`` sampled earlier). None when the node is
        down or not a standby.
        """
        if isinstance(primary_wal, bool) or not isinstance(primary_wal, int) or primary_wal < 0:
            raise ConfigError(f"primary_wal is a byte position (int >= 0), got {primary_wal!r}")
        st = self.status()
        if st.role != "standby":
            return None
        known = [p for p in (st.wal_received, st.wal_replayed) if p is not None]
        return max(0, primary_wal - max(known)) if known else None

    def is_running(self) -> bool:
        """Whether a postmaster runs on this data directory (``pg_ctl status``)."""
        self._require_cluster()
        res = self._run("pg_ctl", "status", "-D", self.data_dir, timeout=10)
        if res.returncode == 0:
            return True
        if res.returncode == 3:
            return False
        raise self._fail("pg_ctl status failed", (res.stderr or res.stdout).strip())

    # -- start / stop -------------------------------------------------------

    def start(self, standby_of: str | None = None, *, timeout: float = 30.0) -> None:
        """Start the server and wait until it answers queries.

        With ``standby_of`` (the primary's DSN) it starts as a standby of that
        primary (standby.signal and primary_conninfo are written first); without
        it, it starts as its data directory says. Starting a running server
        without ``standby_of`` does nothing; with it, is an error (stop it first).
        """
        self._require_cluster()
        if self.is_running():
            if standby_of is None:
                return
            raise self._fail("cannot reconfigure as a standby", "the server is running; stop it first")
        if standby_of is not None:
            self._write_standby_config(standby_of)
        self._pg_ctl_start(timeout)

    def _pg_ctl_start(self, timeout: float, *, isolated_socket_dir: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        if not os.path.exists(self.log_file):
            # pg_ctl opens the log as the server's user, who may not be able to create it here.
            self._write_log_file()
        since = self._log_size()
        res = self._run("pg_ctl", "start", "-D", self.data_dir, "-l", self.log_file, "-w",
                        "-t", str(max(1, math.ceil(timeout))),
                        "-o", self._pg_ctl_options(isolated_socket_dir=isolated_socket_dir),
                        timeout=timeout + 5)
        if res.returncode != 0:
            detail = "\n".join(x for x in ((res.stderr or res.stdout).strip(), self._log_tail(since)) if x)
            raise self._fail("pg_ctl start failed", detail)
        if isolated_socket_dir:
            return
        # pg_ctl -w waits for the postmaster to say "ready"; make sure it answers us too.
        last = ""
        while True:
            try:
                with self._open(2.0) as conn:
                    conn.execute("SELECT 1")
                log.info("%s: started on port %d", self.name, self.port)
                return
            except psycopg.Error as e:
                last = _message(e)
            if time.monotonic() > deadline:
                raise self._fail(f"started but not answering after {timeout:.0f} s", last)
            time.sleep(0.05)

    def _write_log_file(self) -> None:
        with open(self.log_file, "ab"):
            pass
        os.chmod(self.log_file, 0o640)
        if os.geteuid() == 0:
            st = os.stat(self.data_dir)
            os.chown(self.log_file, st.st_uid, st.st_gid)

    def stop(self, mode: str = "fast", *, timeout: float = 30.0) -> None:
        """Stop the server (``pg_ctl stop -m mode``) and wait until it is gone; no-op if it is down.

        ``fast`` rolls back open transactions and writes a shutdown checkpoint
        (which standbys receive before the primary exits); ``immediate`` just
        kills it, leaving crash recovery for the next start.
        """
        if mode not in ("fast", "immediate", "smart"):
            raise ConfigError(f"stop mode is 'fast', 'immediate' or 'smart', got {mode!r}")
        if not self.is_running():
            return
        res = self._run("pg_ctl", "stop", "-D", self.data_dir, "-m", mode, "-w",
                        "-t", str(max(1, math.ceil(timeout))), timeout=timeout + 5)
        if res.returncode != 0 and self.is_running():
            raise self._fail(f"pg_ctl stop -m {mode} failed", (res.stderr or res.stdout).strip())
        log.info("%s: stopped (%s)", self.name, mode)

    def _stop_bounded(self, timeout: float) -> None:
        """Stop fast; if that takes longer than ``timeout``, stop immediately."""
        try:
            self.stop("fast", timeout=timeout)
        except ServiceError as e:
            log.warning("%s: fast stop failed (%s); stopping immediately", self.name, e.detail)
            self.stop("immediate", timeout=10)

    def checkpoint_location(self) -> int:
        """Just past the start of the latest checkpoint record in the control file (``pg_controldata``).

        After a clean stop that record (the shutdown checkpoint) is the last WAL the server wrote: a
        standby that has received up to this position has everything the server acknowledged.
        """
        self._require_cluster()
        res = self._run("pg_controldata", "-D", self.data_dir, timeout=10)
        m = re.search(r"^Latest checkpoint location:\s*(\S+)", res.stdout, re.MULTILINE)
        if res.returncode != 0 or not m:
            raise self._fail("pg_controldata failed", (res.stderr or res.stdout).strip())
        return parse_lsn(m.group(1)) + 1  # a standby holding the record has received past its start

    # -- role changes -------------------------------------------------------

    def promote(self, timeout: float = 10) -> None:
        """Promote this standby to primary, then CHECKPOINT it.

        The checkpoint matters: until one, the new primary's control file still
        says the old timeline, and pg_rewind of another node against it would
        wrongly find "no rewind required". Raises ServiceError if the node is
        not a standby (including down) or does not finish promoting in time.
        Any ``default_transaction_read_only`` a demote left in
        postgresql.auto.conf is reset first; ``synchronous_standby_names`` is
        left as the node's configuration has it (set it after promoting).
        """
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"promote timeout must be positive, got {timeout!r}")
        st = self.status()
        if st.role == "down":
            raise self._fail("cannot promote: the server does not answer", st.error or "down")
        if st.role != "standby":
            raise self._fail("cannot promote", f"it is not a standby (role {st.role})")
        wait_s = max(1, math.ceil(timeout))
        try:
            with self._open(statement_timeout=wait_s + 5) as conn:
                _reset_read_only(conn)
                started = time.monotonic()
                row = conn.execute("SELECT pg_promote(true, %s)", (wait_s,)).fetchone()
                if not row or not row[0]:
                    raise self._fail("promote failed", f"not promoted within {wait_s} s")
        except psycopg.Error as e:
            raise self._fail("promote failed", _message(e)) from e
        log.info("%s: promoted in %.2f s", self.name, time.monotonic() - started)
        # Promoted: from here nothing may undo it. The checkpoint runs without a statement
        # timeout (on a large database it can take long); a failure is logged, and rejoin()
        # checkpoints the source again before it rewinds against it.
        try:
            with self._open(statement_timeout=0) as conn:
                conn.execute("CHECKPOINT")
        except psycopg.Error as e:
            log.warning("%s: CHECKPOINT after the promotion failed: %s", self.name, _message(e))

    def allow_writes(self) -> None:
        """Undo the ``default_transaction_read_only`` a :meth:`demote` left, on a running primary."""
        try:
            with self._open(statement_timeout=5.0) as conn:
                _reset_read_only(conn)
        except psycopg.Error as e:
            raise self._fail("allow_writes failed", _message(e)) from e

    def demote(self, timeout: float = 10.0) -> None:
        """Stop accepting writes at once, then stop the server; no-op if it is down.

        First (when it answers) ``default_transaction_read_only`` is turned on
        with ALTER SYSTEM (so it stays read-only should anything start it
        again) and every client backend is terminated, so open transactions
        fail now rather than when the shutdown gets to them. Then it stops
        with ``-m fast`` (standbys receive the shutdown checkpoint), or
        ``-m immediate`` if that takes longer than ``timeout``.
        """
        self._require_cluster()
        if not self.is_running():
            log.info("%s: demote: already down", self.name)
            return
        try:
            with self._open(statement_timeout=2.0) as conn:
                conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
                conn.execute("SELECT pg_reload_conf()")
                # All client backends, not only writers: a read-only transaction may
                # be about to write, and stopping follows anyway. Walsenders stay so
                # that standbys get the last WAL.
                n = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                ).fetchone()
                log.info("%s: demote: read-only, %s client backends terminated", self.name, n[0] if n else 0)
        except psycopg.Error as e:
            # Stopping is what really ends the writes; go on with it.
            log.warning("%s: demote: could not make it read-only first: %s", self.name, _message(e))
        self._stop_bounded(timeout)

    def rejoin(self, primary_dsn: str, timeout: float = 30.0) -> None:
        """Make this node a streaming standby of the primary at ``primary_dsn``.

        Stops the node if it runs, rewinds it with ``pg_rewind`` against the
        primary (WAL it wrote after the fork, e.g. on an old primary, is
        discarded), writes standby.signal and primary_conninfo, starts it and
        waits until it streams from that primary on the primary's timeline.

        pg_rewind copies the source's configuration files; the node's own are
        put back, without the role settings (primary_conninfo,
        primary_slot_name, default_transaction_read_only from :meth:`demote`,
        synchronous_standby_names). If pg_rewind fails because the data
        directory was not shut down cleanly and its own crash recovery did not
        help, the node is started once with no network access, stopped
        cleanly, and pg_rewind is tried once more.
        """
        if not isinstance(primary_dsn, str) or not primary_dsn.strip():
            raise ConfigError(f"primary_dsn must be a libpq connection string, got {primary_dsn!r}")
        try:
            params = conninfo_to_dict(primary_dsn)
        except psycopg.ProgrammingError as e:
            raise ConfigError(f"bad primary_dsn: {_message(e)}") from None
        src_host, src_port = str(params.get("host", "")), str(params.get("port", "5432"))
        if src_host in (self.host, "localhost") and src_port == str(self.port):
            raise ConfigError(f"{self.name}: cannot rejoin to itself ({public_dsn(primary_dsn)})")
        self._require_cluster()
        deadline = time.monotonic() + timeout
        timeline = self._prepare_source(primary_dsn)
        try:
            self._rewind_and_start(primary_dsn, timeline, src_port, deadline)
        except ServiceError as e:
            # A rewind that failed (or was interrupted before, leaving a directory that cannot
            # start) is not retried for ever: clone afresh from the primary.
            log.error("%s: rejoin by pg_rewind failed (%s); re-cloning from the primary with pg_basebackup",
                      self.name, e.detail)
            self.reclone(primary_dsn, timeout=max(60.0, timeout))

    def _rewind_and_start(self, primary_dsn: str, timeline: int, src_port: str, deadline: float) -> None:
        left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
        if self.is_running():
            self._stop_bounded(min(10.0, left()))
        # Never killed mid-run: an interrupted pg_rewind leaves a directory that cannot start.
        res = self._rewind(primary_dsn, REWIND_TIMEOUT)
        if res.returncode != 0 and re.search(r"shut down cleanly|single-user|crash recovery", res.stderr):
            log.warning("%s: pg_rewind needs a clean shutdown; running the node once, isolated", self.name)
            self._run_once_isolated(min(30.0, left()))
            res = self._rewind(primary_dsn, REWIND_TIMEOUT)
        if res.returncode != 0:
            raise self._fail("pg_rewind failed", (res.stderr or res.stdout).strip())
        rewound = "no rewind required" not in (res.stdout + res.stderr)
        log.info("%s: pg_rewind: %s", self.name, "rewound" if rewound else "no rewind required")
        self._write_standby_config(primary_dsn)
        since = self._log_size()
        self._pg_ctl_start(left())
        self._wait_streaming(timeline, src_port, deadline, since)

    def _wait_streaming(self, timeline: int, src_port: str, deadline: float, since: int) -> None:
        while True:
            last = self.status()
            if (last.role == "standby" and last.streaming and last.timeline == timeline
                    and last.upstream is not None and last.upstream.rsplit(":", 1)[-1] == src_port):
                log.info("%s: streaming from %s", self.name, last.upstream)
                return
            if time.monotonic() > deadline:
                tail = self._log_tail(since, lines=4)
                raise self._fail(f"not streaming from the primary (timeline {timeline}) in time",
                                 f"status {last}; log: {tail}")
            time.sleep(0.05)

    def reclone(self, primary_dsn: str, *, timeout: float = 120.0) -> None:
        """Replace the data directory with a fresh pg_basebackup of the primary, then start it as its standby.

        The clone is made beside the old directory, which is kept until the clone has
        succeeded; the node's own configuration files are carried over.
        """
        self._require_cluster()
        deadline = time.monotonic() + timeout
        base = self.data_dir.rstrip("/")
        new, old = base + ".tenure-clone", base + ".tenure-old"
        shutil.rmtree(new, ignore_errors=True)
        if self.is_running():
            self._stop_bounded(10.0)
        res = self._run("pg_basebackup", "-d", primary_dsn, "-D", new, "-X", "stream", "-c", "fast", "--no-sync",
                        timeout=max(1.0, deadline - time.monotonic()))
        if res.returncode != 0:
            shutil.rmtree(new, ignore_errors=True)
            raise self._fail("re-clone with pg_basebackup failed", (res.stderr or res.stdout).strip())
        saved = {}
        for fn in _CONFIG_FILES:
            try:
                with open(os.path.join(self.data_dir, fn), "rb") as f:
                    saved[fn] = f.read()
            except FileNotFoundError:
                pass
        shutil.rmtree(old, ignore_errors=True)
        os.rename(self.data_dir, old)
        os.rename(new, self.data_dir)
        for fn, data in saved.items():
            self._write_owned(os.path.join(self.data_dir, fn), data)
        self._write_standby_config(primary_dsn)
        since = self._log_size()
        self._pg_ctl_start(max(1.0, deadline - time.monotonic()))
        timeline = self._prepare_source(primary_dsn)
        port = str(conninfo_to_dict(primary_dsn).get("port", "5432"))
        self._wait_streaming(timeline, port, deadline, since)
        shutil.rmtree(old, ignore_errors=True)
        log.warning("%s: re-cloned from the primary and streaming; the old data directory is removed", self.name)

    def repoint(self, primary_dsn: str) -> None:
        """Make this running standby stream from ``primary_dsn`` by a reload, without a restart (PostgreSQL 13+)."""
        params = conninfo_to_dict(primary_dsn)
        params["application_name"] = self.name
        conninfo = make_conninfo(**{k: str(v) for k, v in params.items()})
        self._sql("ALTER SYSTEM SET primary_conninfo",
                  sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(sql.Literal(conninfo)))
        self._sql("pg_reload_conf", "SELECT pg_reload_conf()")
        log.info("%s: re-pointed to %s by reload", self.name, public_dsn(primary_dsn))

    def _run_once_isolated(self, timeout: float) -> None:
        """Start the server where no client can reach it and stop it cleanly (a clean shutdown for pg_rewind)."""
        sock = tempfile.mkdtemp(prefix="tenure-pg-isolated-")
        try:
            if os.geteuid() == 0:
                st = os.stat(self.data_dir)
                os.chown(sock, st.st_uid, st.st_gid)
            self._pg_ctl_start(timeout, isolated_socket_dir=sock)
            self.stop("fast", timeout=timeout)
        finally:
            shutil.rmtree(sock, ignore_errors=True)

    def _prepare_source(self, primary_dsn: str) -> int:
        """Check that ``primary_dsn`` is a primary, make its control file current; return its timeline."""
        try:
            with self._open(statement_timeout=10.0, dsn=primary_dsn) as conn:
                rec = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if rec and rec[0]:
                    raise ServiceError(f"{self.name}: cannot rejoin: the source ({public_dsn(primary_dsn)}) is not a primary",
                                       detail="source is in recovery")
                row = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn()),"
                                   " (SELECT timeline_id FROM pg_control_checkpoint())").fetchone()
                assert row is not None
                timeline = int(row[0][:8], 16)
                if row[1] != timeline:
                    # Promoted without a checkpoint since: pg_rewind would read the old
                    # timeline from its control file and wrongly skip the rewind.
                    log.info("%s: checkpointing the source (timeline %s, control file says %s)",
                             self.name, timeline, row[1])
                    conn.execute("CHECKPOINT")
                return timeline
        except psycopg.Error as e:
            raise ServiceError(f"{self.name}: cannot rejoin: source {public_dsn(primary_dsn)}: {_message(e)}",
                               detail=_message(e)) from e

    def _rewind(self, primary_dsn: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """pg_rewind against ``primary_dsn``, keeping this node's own configuration files."""
        saved = {}
        for fn in _CONFIG_FILES:
            try:
                with open(os.path.join(self.data_dir, fn), "rb") as f:
                    saved[fn] = f.read()
            except FileNotFoundError:
                pass
        try:
            return self._run("pg_rewind", "-D", self.data_dir, f"--source-server={primary_dsn}", timeout=timeout)
        finally:
            for fn, data in saved.items():
                self._write_owned(os.path.join(self.data_dir, fn), data)

    def _write_standby_config(self, primary_dsn: str) -> None:
        """standby.signal, and primary_conninfo in postgresql.auto.conf instead of every role setting there."""
        try:
            params = conninfo_to_dict(primary_dsn)
        except psycopg.ProgrammingError as e:
            raise ConfigError(f"bad primary DSN: {_message(e)}") from None
        # Our own name, whatever the DSN said: synchronous_standby_names and
        # replicas() know the standby by it.
        params["application_name"] = self.name
        conninfo = make_conninfo(**{k: str(v) for k, v in params.items()})
        path = os.path.join(self.data_dir, "postgresql.auto.conf")
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            lines = ["# Do not edit this file manually!", "# It will be overwritten by the ALTER SYSTEM command."]
        key = re.compile(r"^\s*([A-Za-z_.]+)\s*(=|\s)")
        kept = [ln for ln in lines if not ((m := key.match(ln)) and m.group(1).lower() in _ROLE_SETTINGS)]
        kept.append(f"primary_conninfo = {_quote_conf(conninfo)}")
        self._write_owned(path, ("\n".join(kept) + "\n").encode())
        # recovery.signal would make it promote itself at the end of the WAL.
        try:
            os.unlink(os.path.join(self.data_dir, "recovery.signal"))
        except FileNotFoundError:
            pass
        self._write_owned(os.path.join(self.data_dir, "standby.signal"), b"")

    # -- creating a data directory (bootstrap) -------------------------------

    def initdb(self, settings: dict[str, str] | None = None, *, timeout: float = 60.0) -> None:
        """Create a new cluster in ``data_dir`` (trust auth; for tests and bootstrap) and append ``settings``.

        ``data_dir`` must not exist or be empty, and its parent must be writable by ``run_as``.
        """
        self._require_empty()
        res = self._run("initdb", "-D", self.data_dir, "-U", self.user, "--auth=trust", "-E", "UTF8",
                        "--locale=C.UTF-8", "--no-sync", timeout=timeout)
        if res.returncode != 0:
            raise self._fail("initdb failed", (res.stderr or res.stdout).strip())
        if settings:
            conf = os.path.join(self.data_dir, "postgresql.conf")
            with open(conf, encoding="utf-8") as f:
                text = f.read()
            text += "\n# added by tenure\n" + "".join(f"{k} = {_quote_conf(str(v))}\n" for k, v in settings.items())
            self._write_owned(conf, text.encode())

    def clone_from(self, primary_dsn: str, *, timeout: float = 120.0) -> None:
        """Create ``data_dir`` as a standby of ``primary_dsn`` with pg_basebackup (does not start it)."""
        self._require_empty()
        res = self._run("pg_basebackup", "-d", primary_dsn, "-D", self.data_dir, "-X", "stream", "-c", "fast",
                        "--no-sync", timeout=timeout)
        if res.returncode != 0:
            raise self._fail("pg_basebackup failed", (res.stderr or res.stdout).strip())
        self._write_standby_config(primary_dsn)

    def _require_empty(self) -> None:
        if os.path.exists(self.data_dir) and (not os.path.isdir(self.data_dir) or os.listdir(self.data_dir)):
            raise ConfigError(f"{self.name}: {self.data_dir} exists and is not empty")

    # -- replication --------------------------------------------------------

    def set_synchronous_standbys(self, names: list[str], num: int = 1, *, timeout: float = 5.0) -> None:
        """Make commits wait for ``num`` of ``names`` (``FIRST num (a, b)``); ``[]`` for none.

        Written with ALTER SYSTEM and reloaded; returns once new sessions see
        the value (ServiceError if they do not within ``timeout``, e.g. because
        the command line overrides it).
        """
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            raise ConfigError(f"names must be a list of standby names, got {names!r}")
        for n in names:
            if n == "*" and len(names) == 1:
                continue  # any standby
            if not isinstance(n, str) or not _NAME_RE.match(n):
                raise ConfigError(f"a standby name is a plain identifier, got {n!r}")
        if len(set(names)) != len(names):
            raise ConfigError(f"standby names repeat: {names!r}")
        if names and (isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= len(names)):
            raise ConfigError(f"num must be an int in 1..{len(names)}, got {num!r}")
        value = f"FIRST {num} ({', '.join(names)})" if names else ""
        # ALTER SYSTEM takes no bind parameters: quote the literal client-side.
        self._sql("ALTER SYSTEM SET synchronous_standby_names",
                  sql.SQL("ALTER SYSTEM SET synchronous_standby_names = {}").format(sql.Literal(value)))
        self._sql("pg_reload_conf", "SELECT pg_reload_conf()")
        deadline = time.monotonic() + timeout
        while True:
            # A new session forks from the postmaster, which has the reloaded value once it shows here.
            rows = self._sql("reading synchronous_standby_names", "SHOW synchronous_standby_names")
            if rows and rows[0][0] == value:
                log.info("%s: synchronous_standby_names = %r", self.name, value)
                return
            if time.monotonic() > deadline:
                raise self._fail("synchronous_standby_names not in effect",
                                 f"wanted {value!r}, server has {rows[0][0] if rows else None!r}")
            time.sleep(0.02)

    def configured_synchronous_standbys(self) -> list[str]:
        """The standby names ``synchronous_standby_names`` lists now on this server (``[]`` when empty)."""
        rows = self._sql("reading synchronous_standby_names", "SHOW synchronous_standby_names")
        return parse_standby_names(str(rows[0][0]) if rows else "")

    def synchronous_standbys(self) -> list[str]:
        """Names of the standbys this primary now waits for (sync_state ``sync`` or ``quorum``), sorted."""
        rows = self._sql("reading pg_stat_replication",
                         "SELECT application_name FROM pg_stat_replication"
                         " WHERE sync_state IN ('sync', 'quorum') ORDER BY application_name")
        return [r[0] for r in rows]

    def replicas(self) -> list[Replica]:
        """The standbys connected to this server, from ``pg_stat_replication``, by name."""
        rows = self._sql("reading pg_stat_replication",
                         "SELECT application_name, state, sync_state, replay_lsn::text"
                         " FROM pg_stat_replication ORDER BY application_name")
        return [Replica(r[0], r[1], r[2], _lsn(r[3])) for r in rows]


def parse_standby_names(value: str) -> list[str]:
    """The names in a ``synchronous_standby_names`` value (``FIRST 1 (a, b)``, ``ANY 1 (a)``, ``a, b``)."""
    text = value.strip()
    m = re.match(r"^(?:(?:FIRST|ANY)\s+)?\d*\s*\((.*)\)\s*$", text, re.IGNORECASE)
    if m:
        text = m.group(1)
    return [n.strip().strip('"') for n in text.split(",") if n.strip()]


def _reset_read_only(conn: psycopg.Connection[Any]) -> None:
    """Reset a default_transaction_read_only set with ALTER SYSTEM (by a demote), and reload."""
    src = conn.execute("SELECT sourcefile FROM pg_settings WHERE name = 'default_transaction_read_only'").fetchone()
    if src and src[0] and src[0].endswith("postgresql.auto.conf"):
        conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
        conn.execute("SELECT pg_reload_conf()")
