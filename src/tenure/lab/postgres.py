"""A throwaway PostgreSQL cluster on loopback (one primary, streaming standbys), for the demo and tests.

Nodes n1..nN are :class:`~tenure.services.postgres.PostgresNode` objects on
free ports picked at start. n1 is made with initdb (trust authentication,
fsync off); the others are cloned from it with pg_basebackup and stream from
it. Everything lives in one temporary directory, deleted by :meth:`stop`.
PostgreSQL refuses root, so when run as root the directory is handed to the
``postgres`` user, which runs the binaries.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import ConfigError, TenureError
from .etcd import free_ports
from ..services.postgres import DEFAULT_BIN_DIR, PostgresNode

# Replication needs wal_level replica and WAL senders; pg_rewind needs
# wal_log_hints; wal_keep_size lets a rewound node catch up without slots
# (a slot copied by pg_basebackup/pg_rewind would name one the new primary lacks).
SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "hot_standby": "on",
    "wal_log_hints": "on",
    "wal_keep_size": "128MB",
    "fsync": "off",
}


@dataclass
class LocalPostgresCluster:
    """A local PostgreSQL cluster of ``size`` nodes: n1 primary, the rest its streaming standbys."""

    size: int = 3
    bin_dir: str = DEFAULT_BIN_DIR
    nodes: list[PostgresNode] = field(default_factory=list)
    workdir: str = ""

    def start(self, timeout: float = 60.0) -> "LocalPostgresCluster":
        """Create and start every node; return once every standby streams from n1."""
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"cluster size must be an int >= 1, got {self.size!r}")
        if not os.path.isfile(os.path.join(self.bin_dir, "initdb")):
            raise ConfigError(f"no initdb in {self.bin_dir}: install PostgreSQL (apt-get install postgresql-15)")
        deadline = time.monotonic() + timeout
        self.workdir = tempfile.mkdtemp(prefix="tenure-pg-")
        try:
            self._start(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, deadline: float) -> None:
        # mkdtemp makes it 0700 root; the server's user must be able to work in it.
        os.chmod(self.workdir, 0o755)
        sock = os.path.join(self.workdir, "sock")
        os.mkdir(sock)
        if os.geteuid() == 0:
            for d in (self.workdir, sock):
                shutil.chown(d, "postgres", "postgres")
        ports = free_ports(self.size)
        self.nodes = [
            PostgresNode(f"n{i + 1}", os.path.join(self.workdir, f"n{i + 1}"), ports[i], bin_dir=self.bin_dir,
                         socket_dir=sock, log_file=os.path.join(self.workdir, f"n{i + 1}.log"))
            for i in range(self.size)
        ]
        left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
        primary, standbys = self.nodes[0], self.nodes[1:]
        primary.initdb(SETTINGS, timeout=left())
        primary.start(timeout=left())
        if not standbys:
            return
        with ThreadPoolExecutor(len(standbys)) as pool:
            # Cloning and starting in parallel: each clone waits on the primary's checkpoint.
            def clone_and_start(node: PostgresNode) -> None:
                node.clone_from(primary.dsn, timeout=left())
                node.start(timeout=left())

            for f in [pool.submit(clone_and_start, n) for n in standbys]:
                f.result()
        while True:
            pending = [n.name for n in standbys if not n.status().streaming]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TenureError(f"standbys {pending} not streaming; see logs in {self.workdir}")
            time.sleep(0.02)

    @property
    def primary(self) -> PostgresNode:
        """The one node that says it is a primary (raises if none or several do)."""
        found = [n for n in self.nodes if n.status().role == "primary"]
        if len(found) != 1:
            raise TenureError(f"expected one primary, found {[n.name for n in found]}")
        return found[0]

    def stop(self) -> None:
        """Stop every node (immediately: the data is thrown away) and delete the directory."""
        for n in self.nodes:
            try:
                if os.path.exists(os.path.join(n.data_dir, "PG_VERSION")):
                    n.stop("immediate", timeout=10)
            except TenureError:
                pass  # best effort; rmtree follows
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalPostgresCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalPostgres(LocalPostgresCluster):
    """A single local PostgreSQL server (a cluster of one); ``dsn``/``port``/``node`` are n1's."""

    def __init__(self, bin_dir: str = DEFAULT_BIN_DIR) -> None:
        super().__init__(size=1, bin_dir=bin_dir)

    def start(self, timeout: float = 60.0) -> "LocalPostgres":
        super().start(timeout)
        return self

    @property
    def node(self) -> PostgresNode:
        return self.nodes[0]

    @property
    def dsn(self) -> str:
        return self.node.dsn

    @property
    def port(self) -> int:
        return self.node.port
