"""Clients of the chaos stack, each recording every try with monotonic times.

A :class:`Writer` writes rows with unique ids through its own web-tier
router (``Router(...).postgres(service).write()``), as a web head would. In
the same transaction the server says who it is (``cluster_name``) and which
term it serves (the token in its own ``tenure.lease`` row): that answer,
taken with the send and acknowledge times, is the witness the checker trusts,
not the router's belief. A :class:`Reader` reads through ``read()``; a
:class:`CacheUser` sets and gets through the memcached ring; a
:class:`Monitor` samples who the router believes is primary, for the timeline.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from ...web.router import Router
from .stack import CACHE, SERVICE, TABLE

log = logging.getLogger("tenure.lab")

# A connection to a cut-off server fails within seconds rather than hanging until the partition heals.
# No statement_timeout: a commit cancelled while it waits for a synchronous standby is reported as
# committed by PostgreSQL, which would make the harness itself acknowledge unreplicated writes.
PG_KWARGS = {"tcp_user_timeout": 4000, "keepalives": 1, "keepalives_idle": 1, "keepalives_interval": 1,
             "keepalives_count": 3}


@dataclass
class WriteRecord:
    client: str
    id: str
    sent: float
    acked: float  # when the outcome was known (the acknowledgement, for "ok")
    target: str | None  # the primary the router believed in
    token: int | None  # its token, as the router believed
    outcome: str  # "ok", "readonly", "unavailable", "error:<class>"
    server: str | None = None  # who acknowledged, in the server's own words
    server_token: int | None = None
    sync_names: str | None = None  # the server's synchronous_standby_names when it committed


@dataclass
class ReadRecord:
    t: float
    ok: bool
    server: str | None
    latency: float


def _outcome(e: BaseException) -> str:
    from ...errors import PrimaryUnavailable, ReadOnly

    if isinstance(e, PrimaryUnavailable):
        return "unavailable"
    if isinstance(e, ReadOnly):
        return "readonly"
    return f"error:{type(e).__name__}"


class _Loop:
    def __init__(self, name: str, interval: float) -> None:
        self.name, self.interval = name, interval
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "_Loop":
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.once()
            except Exception:  # a client never dies of a fault; what it saw is in its records
                log.exception("%s: unexpected error", self.name)
            self._stop.wait(self.interval)

    def once(self) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        self.thread.join(timeout)


class Writer(_Loop):
    """One writer client with its own router; ``records`` grows with every try."""

    def __init__(self, name: str, endpoints: list[str], interval: float = 0.02) -> None:
        super().__init__(name, interval)
        self.router = Router(endpoints)
        self.provider = self.router.postgres(SERVICE, timeout=1.0, cooldown=0.3, kwargs=PG_KWARGS)
        self.view = self.router.service(SERVICE)
        self.records: list[WriteRecord] = []
        self._n = 0

    def once(self) -> None:
        self._n += 1
        wid = f"{self.name}-{self._n}"
        p = self.view.primary
        target, token = (p.member, p.token) if p is not None else (None, None)
        sent = time.monotonic()
        server = server_token = sync_names = None
        try:
            with self.provider.write() as conn:
                row = conn.execute(
                    f"INSERT INTO {TABLE} (id, client, token, server) VALUES "
                    "(%s, %s, (SELECT token FROM tenure.lease), current_setting('cluster_name')) "
                    "RETURNING server, token, current_setting('synchronous_standby_names')",
                    (wid, self.name)).fetchone()
                server, server_token, sync_names = row
            outcome = "ok"
        except Exception as e:
            outcome = _outcome(e)
        self.records.append(WriteRecord(self.name, wid, sent, time.monotonic(), target, token, outcome,
                                        server, server_token, sync_names))

    def stop(self, timeout: float = 15.0) -> None:
        super().stop(timeout)
        self.router.close()


class Reader(_Loop):
    """Reads through the router's replicas every ``interval`` s."""

    def __init__(self, name: str, endpoints: list[str], interval: float = 0.05) -> None:
        super().__init__(name, interval)
        self.router = Router(endpoints)
        self.provider = self.router.postgres(SERVICE, timeout=1.0, cooldown=0.3, kwargs=PG_KWARGS)
        self.records: list[ReadRecord] = []

    def once(self) -> None:
        t = time.monotonic()
        server = None
        try:
            with self.provider.read() as conn:
                server = conn.execute(f"SELECT current_setting('cluster_name'), (SELECT count(*) FROM "
                                      f"(SELECT 1 FROM {TABLE} LIMIT 10) x)").fetchone()[0]
            ok = True
        except Exception:
            ok = False
        self.records.append(ReadRecord(t, ok, server, time.monotonic() - t))

    def stop(self, timeout: float = 15.0) -> None:
        super().stop(timeout)
        self.router.close()


class CacheUser(_Loop):
    """A set and a get through the memcached ring every ``interval`` s; ``records`` are (t, ok)."""

    def __init__(self, name: str, endpoints: list[str], interval: float = 0.1) -> None:
        super().__init__(name, interval)
        self.router = Router(endpoints)
        self.ring: Any = None
        self.records: list[tuple[float, bool]] = []
        self._n = 0

    def once(self) -> None:
        self._n += 1
        t = time.monotonic()
        try:
            if self.ring is None:
                self.ring = self.router.memcache(CACHE, connect_timeout=0.5, timeout=0.5)
            key = f"k{self._n % 50}"
            ok = bool(self.ring.set(key, b"v")) and self.ring.get(key) == b"v"
        except Exception:
            ok = False
        self.records.append((t, ok))

    def stop(self, timeout: float = 15.0) -> None:
        super().stop(timeout)
        self.router.close()


class Monitor(_Loop):
    """Who the router believes is primary, sampled every ``interval`` s: ``samples`` are (t, member, token)."""

    def __init__(self, endpoints: list[str], interval: float = 0.1) -> None:
        super().__init__("monitor", interval)
        self.router = Router(endpoints)
        self.view = self.router.service(SERVICE)
        self.samples: list[tuple[float, str | None, int | None]] = []

    def once(self) -> None:
        p = self.view.primary
        self.samples.append((time.monotonic(), p.member if p else None, p.token if p else None))

    def stop(self, timeout: float = 15.0) -> None:
        super().stop(timeout)
        self.router.close()
