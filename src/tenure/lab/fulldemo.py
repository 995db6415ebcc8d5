"""``tenure demo``: PostgreSQL failover and a planned switchover under live web traffic, in one terminal.

It starts, on loopback and in a temporary directory: a 3-member etcd, three
PostgreSQL 15 nodes (a primary and two streaming standbys) each with its
``tenure sidecar`` process, and a small web app on the router with a few
clients reading and writing through it. Then:

1. it kills the primary's "host" (kill -9 of its sidecar and PostgreSQL
   together): the sidecars elect the best standby, which is promoted and
   published with a new fencing token; the web app holds writes meanwhile
   (and refuses them only after its 2 s bound);
2. it brings the dead host back: the old primary rejoins as a standby;
3. it runs a planned switchover (``tenure switchover``): the web app's users
   see no failed request.

A table redrawn in place shows who is primary, the token, and what the web
app's users saw. Everything it started is stopped at the end, on error and
on Ctrl-C, and a summary says what happened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, TextIO

from .. import operations
from ..members import read_members
from .cluster import FailoverCluster
from .etcd import LocalEtcd
from .load import streaming_standbys
from .webapp import HttpLoad, Seen, WebApp

SERVICE = "demo-db"
log = logging.getLogger("tenure.demo")


class Screen:
    """A block of lines redrawn in place on a terminal; elsewhere printed only when asked."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.drawn = 0
        self.lock = threading.Lock()

    def draw(self, lines: list[str], *, force: bool = False) -> None:
        with self.lock:
            if self.tty:
                if self.drawn:
                    self.out.write(f"\x1b[{self.drawn}F")
                self.out.write("".join(f"{line}\x1b[K\n" for line in lines))
                if len(lines) < self.drawn:
                    self.out.write("\x1b[J")
                self.drawn = len(lines)
            elif force:
                self.out.write("\n".join(lines) + "\n\n")
            self.out.flush()

    def write(self, text: str) -> None:
        with self.lock:
            self.out.write(text)
            self.out.flush()
            self.drawn = 0


class Demo:
    """The demo's state, shared by the steps and the redraw thread."""

    def __init__(self, out: TextIO, ttl: int) -> None:
        self.screen = Screen(out)
        self.ttl = ttl
        self.t0 = time.monotonic()
        self.phase = "starting"
        self.story: list[str] = []
        self.etcd: LocalEtcd | None = None
        self.cluster: FailoverCluster | None = None
        self.web: WebApp | None = None
        self.load: HttpLoad | None = None
        self.stop_drawing = threading.Event()
        self.facts: dict[str, Any] = {}

    def at(self) -> str:
        return f"{time.monotonic() - self.t0:5.1f}s"

    def tell(self, text: str) -> None:
        self.story.append(f"{self.at()}  {text}")
        log.info("%s", text)
        self.redraw(force=True)

    def lines(self) -> list[str]:
        out = [f"tenure demo: service {SERVICE!r} on 3 PostgreSQL nodes, etcd x3, a web app   [{self.at()}]",
               f"phase: {self.phase}", ""]
        c = self.cluster
        if c is not None:
            try:
                members = read_members(c.client, SERVICE)
                primary = c.primary()
            except Exception:  # noqa: BLE001 -- etcd busy: show what we can
                members, primary = {}, None
            top = max((m.position or 0 for m in members.values() if m.leader), default=0)
            out.append("  member  role      healthy  streaming  lag bytes")
            for s in c.sidecars:
                name = s.node.name
                m = members.get(name)
                if m is None:
                    out.append(f"  {name:<6}  {'gone':<8}  -        -          -")
                    continue
                lag = "-" if m.leader or m.position is None else str(max(0, top - m.position))
                out.append(f"  {name:<6}  {m.role:<8}  {'yes' if m.healthy else 'no':<7}  "
                           f"{'yes' if m.streaming else '-':<9}  {lag}")
            out.append("")
            out.append(f"  primary: {primary['member']} (fencing token {primary['token']})" if primary
                       else "  primary: NONE (the service is read-only; writes wait)")
        if self.load is not None:
            s = self.load.snapshot()
            first = ""
            if s.last_token is not None and s.last_token in s.by_token:
                first = f"   last write on {s.by_token[s.last_token][1]} (token {s.last_token})"
            out.append(f"  web app: reads served {s.reads}   writes served {s.writes}   writes held {s.held}   "
                       f"writes refused {s.refused}   failed {s.failed}{first}")
        out.append("")
        out.extend(self.story[-8:])
        return out

    def redraw(self, force: bool = False) -> None:
        self.screen.draw(self.lines(), force=force)

    def draw_loop(self) -> None:
        while not self.stop_drawing.wait(0.25):
            with contextlib.suppress(Exception):
                self.redraw()


def wait(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def _settled(cluster: FailoverCluster) -> dict | None:
    p = cluster.primary()
    ms = read_members(cluster.client, SERVICE)
    if (p and len(ms) == 3 and all(m.eligible and (m.leader or (m.streaming and m.healthy)) for m in ms.values())
            and len(streaming_standbys(p["dsn"])) == 2):
        return p
    return None


def _first_write_on(load: HttpLoad, token: int) -> tuple[float, str] | None:
    return load.snapshot().by_token.get(token)


def _delta(a: Seen, b: Seen) -> dict[str, int]:
    return {"reads": b.reads - a.reads, "writes": b.writes - a.writes, "held": b.held - a.held,
            "refused": b.refused - a.refused, "failed": b.failed - a.failed}


def run(ttl: int = 2, out: TextIO | None = None) -> int:
    """Run the full demo; 0 if every step behaved as designed (the switchover failed no request)."""
    out = out or sys.stdout
    d = Demo(out, ttl)
    logfile = tempfile.NamedTemporaryFile(prefix="tenure-demo-", suffix=".log", delete=False)
    logfile.close()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    handler = logging.FileHandler(logfile.name)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root.handlers[:] = [handler]  # psycopg's reconnect warnings would tear the table
    root.setLevel(logging.INFO)
    previous_term = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() else None
    drawer = threading.Thread(target=d.draw_loop, daemon=True, name="demo-draw")
    ok = False
    interrupted = False
    try:
        d.screen.write("tenure demo: starting a 3-member etcd, 3 PostgreSQL nodes with sidecars and a web app "
                       f"on loopback (a few seconds; log: {logfile.name})\n\n")
        d.etcd = LocalEtcd(size=3).start()
        d.cluster = FailoverCluster(d.etcd, SERVICE, ttl=ttl)
        drawer.start()
        d.tell(f"etcd up; PostgreSQL n1 (primary), n2, n3 (standbys) and their sidecars started")
        first = d.cluster.wait_primary(60)
        wait(lambda: _settled(d.cluster), 60, "two streaming standbys")
        d.web = WebApp(d.etcd.endpoints, SERVICE)
        d.load = HttpLoad(d.web.port)
        d.phase = "steady: the web app reads from the standbys and writes to the primary"
        d.tell(f"{first['member']} is primary (token {first['token']}); web app on 127.0.0.1:{d.web.port}, "
               "2 readers + 2 writers")
        time.sleep(2.5)

        # 1. the primary's host dies
        victim = d.cluster.primary()["member"]
        before = d.load.snapshot()
        d.phase = f"failover: {victim}'s host killed (kill -9 of its sidecar and PostgreSQL)"
        t_kill = time.monotonic()
        d.cluster.sidecar(victim).kill_with_postgres()
        d.tell(f"kill -9 {victim}'s sidecar and PostgreSQL")
        new = d.cluster.wait_primary(4 * ttl + 20, not_member=victim)
        t_new = time.monotonic()
        d.tell(f"{new['member']} promoted and published, token {new['token']}, {t_new - t_kill:.1f} s after the kill")
        fw = wait(lambda: _first_write_on(d.load, new["token"]), 15, "a write on the new primary")
        d.tell(f"first write on {fw[1]} (token {new['token']}) {fw[0] - t_kill:.1f} s after the kill")
        time.sleep(1.0)
        failover = _delta(before, d.load.snapshot())
        d.facts["failover"] = {"from": victim, "to": new["member"], "token": new["token"],
                               "promoted_after": t_new - t_kill, "first_write_after": fw[0] - t_kill, **failover}

        # 2. the host comes back
        d.phase = f"recovery: {victim}'s host is back; its sidecar rejoins it as a standby"
        d.cluster.sidecar(victim).start()
        d.tell(f"{victim}'s sidecar restarted")
        wait(lambda: _settled(d.cluster), 90, f"{victim} streaming again")
        d.tell(f"{victim} is a streaming standby of {new['member']} again")

        # 3. planned switchover
        before = d.load.snapshot()
        d.phase = "planned switchover: `tenure switchover demo-db` (writes wait, none fail)"
        d.redraw(force=True)
        r = operations.switchover(d.cluster.client, SERVICE, timeout=10)
        d.tell(f"switchover {r['from']} -> {r['to']} (token {r['token']}) in {r['seconds']:.2f} s, "
               f"no primary for {r['gap']:.2f} s")
        fw = wait(lambda: _first_write_on(d.load, r["token"]), 10, "a write on the new primary")
        time.sleep(1.5)
        after = d.load.snapshot()
        sw = _delta(before, after)
        d.facts["switchover"] = {**{k: r[k] for k in ("from", "to", "token", "seconds", "gap")}, **sw,
                                 "longest_write": after.longest_write}
        ok = sw["failed"] == 0 and sw["refused"] == 0
        d.phase = "done: stopping everything"
        d.redraw(force=True)
    except KeyboardInterrupt:
        interrupted = True
    except Exception as e:  # noqa: BLE001 -- say what went wrong, then clean up
        d.story.append(f"{d.at()}  ERROR: {type(e).__name__}: {e}")
        log.exception("demo failed")
    finally:
        d.stop_drawing.set()
        if drawer.is_alive():
            drawer.join(2)
        seen = d.load.stop() if d.load is not None else None
        for step in (lambda: d.web and d.web.stop(), lambda: d.cluster and d.cluster.stop(),
                     lambda: d.etcd and d.etcd.stop()):
            with contextlib.suppress(Exception):
                step()
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        _summary(d, out, seen, ok, interrupted, logfile.name)
    return 130 if interrupted else (0 if ok else 1)


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def _summary(d: Demo, out: TextIO, seen: Seen | None, ok: bool, interrupted: bool, logname: str) -> None:
    w = out.write
    w("\n" + ("interrupted: " if interrupted else "") + "summary\n")
    for line in d.story:
        w(f"  {line}\n")
    f = d.facts.get("failover")
    if f:
        w(f"\n  crash of {f['from']}: {f['to']} took over with token {f['token']} after {f['promoted_after']:.1f} s "
          f"(the old lease had to expire: ttl {d.ttl} s); first write after {f['first_write_after']:.1f} s.\n"
          f"    the web app meanwhile: {f['reads']} reads served, {f['writes']} writes served, {f['held']} held, "
          f"{f['refused']} refused with 503 + Retry-After (held longer than 2 s), {f['failed']} failed.\n")
    s = d.facts.get("switchover")
    if s:
        w(f"  planned switchover {s['from']} -> {s['to']}: {s['seconds']:.2f} s, no primary for {s['gap']:.2f} s; "
          f"{s['writes']} writes served, {s['held']} held (longest {s['longest_write']:.2f} s), "
          f"{s['refused']} refused, {s['failed']} failed.\n")
    if seen is not None:
        w(f"  in all: {seen.reads} reads and {seen.writes} writes served, {seen.refused} writes refused, "
          f"{seen.failed} failed.\n")
    w(f"  stopped the web app, the sidecars, PostgreSQL and etcd; total {time.monotonic() - d.t0:.1f} s; "
      f"log: {logname}\n")
    if not interrupted:
        w("  result: " + ("OK: the switchover failed no request\n" if ok else "NOT OK: see the log\n"))
    out.flush()


def missing() -> str | None:
    """What the full demo lacks on this machine (None if nothing)."""
    from .postgres import DEFAULT_BIN_DIR

    bin_dir = os.environ.get("TENURE_PG_BIN", DEFAULT_BIN_DIR)
    for tool in ("initdb", "pg_ctl", "postgres", "pg_basebackup", "pg_rewind"):
        if not os.access(os.path.join(bin_dir, tool), os.X_OK):
            return f"PostgreSQL 15's {tool} is not in {bin_dir} (apt-get install postgresql-15, or set TENURE_PG_BIN)"
    try:
        import psycopg_pool  # noqa: F401
    except ImportError:
        return "psycopg_pool is not installed (pip install 'tenure[postgres]')"
    return None
