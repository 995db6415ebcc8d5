"""What the self-fencing guard (tenure.services.pg_guard) costs on a write-heavy pgbench.

Starts its own throwaway PostgreSQL 15 on loopback (run as the ``postgres``
user when we are root: PostgreSQL refuses root), runs ``pgbench -i`` at scale
10, then for each variant alternates plain and guarded runs of the default
TPC-B-like script (3 UPDATEs, 1 SELECT, 1 INSERT per transaction: 4 guarded
write statements) on the same server. The order flips every round (plain
first, then guarded first) so that a drift of the machine does not favour
either side. Before every run the four tables are vacuumed and a checkpoint
is taken and pgbench_history emptied, so each run starts from the same
state.

For guarded runs the guard is installed on the four pgbench tables and the
lease renewed for the whole run plus a minute; it is removed again after the
run. Variants:

``guard``            the shipped design: install_guard(), statement triggers
                     whose check reads the lease from a sequence (no table read)
``guard-at-commit``  install_guard(at_commit=True): also a deferred constraint
                     trigger per row, checked again at COMMIT
``naive``            the section 7 baseline: a statement trigger that reads the
                     lease table (``EXISTS (... valid_until > clock_timestamp())``)
``guc-cache``        a statement trigger that reads the table once per
                     transaction and caches valid_until in a transaction-local
                     GUC keyed by the transaction id
``empty-trigger``    not a guard: a PL/pgSQL statement trigger that only
                     returns, the floor of any trigger written in PL/pgSQL

Printed: settings, TPS per run and the server's CPU time per transaction
(CPU time of every PostgreSQL process / transactions), the guarded/plain
ratio per round, and per variant the geometric mean of the round ratios
(with an even number of rounds the order, or database, bias cancels), the
ratio of total TPS and the mean CPU ratio.

Side by side (``--no-side-by-side`` to skip): a twin database gets the same
pgbench data; each round runs a guarded and a plain pgbench at the same time,
one per database, with half the clients each, and the roles swap every round.
Outside load hits both halves alike, so this ratio is much less noisy than
the alternating one on a shared machine.

A third, low-noise measurement (``--micro-txns``, 0 to skip): one backend
runs the same four writes in a PL/pgSQL loop that commits after each set, with
no client round trips, for each variant in turn, several times; the median
time per transaction gives the guard's absolute cost in microseconds. It
overstates the relative cost (there is no parsing or network in the loop),
but says what the guard adds in absolute terms.

Run (from the project root; a few minutes per variant):

    .venv/bin/python benchmarks/guard_overhead.py                     # the shipped guard
    .venv/bin/python benchmarks/guard_overhead.py --variants all      # and the alternatives
    .venv/bin/python benchmarks/guard_overhead.py --duration 5 --rounds 3 --variants guard  # quick
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import psycopg

from tenure.services.pg_guard import install_guard, remove_guard, renew_guard

PG_BIN = os.environ.get("TENURE_PG_BIN", "/usr/lib/postgresql/15/bin")
TABLES = ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history"]
VARIANTS = ["guard", "guard-at-commit", "naive", "guc-cache", "empty-trigger"]

# The alternatives measured against the shipped design. They read
# tenure.lease, which install_guard() created and renew_guard() keeps current.
_ALT_FUNCTIONS = {
    "empty-trigger": """
BEGIN
    RETURN NULL;
END""",
    "naive": """
BEGIN
    IF EXISTS (SELECT 1 FROM tenure.lease WHERE valid_until > pg_catalog.clock_timestamp()) THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION USING ERRCODE = '25006', MESSAGE = 'lease expired';
END""",
    "guc-cache": """
DECLARE
    x text := pg_catalog.pg_current_xact_id()::text;
    c text := pg_catalog.current_setting('tenure.guard_cache', true);
    u timestamptz;
BEGIN
    IF pg_catalog.split_part(c, ' ', 1) = x
       AND pg_catalog.split_part(c, ' ', 2)::float8 > pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()) THEN
        RETURN NULL;
    END IF;
    SELECT l.valid_until INTO u FROM tenure.lease l;
    IF u > pg_catalog.clock_timestamp() THEN
        PERFORM pg_catalog.set_config('tenure.guard_cache', x || ' ' || pg_catalog.date_part('epoch', u)::text, true);
        RETURN NULL;
    END IF;
    RAISE EXCEPTION USING ERRCODE = '25006', MESSAGE = 'lease expired';
END""",
}

_MICRO_PROC = """
CREATE OR REPLACE PROCEDURE bench_variant.loop(n int) LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..n LOOP
        UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 1 + (i * 7919) % 1000000;
        PERFORM abalance FROM pgbench_accounts WHERE aid = 1 + (i * 7919) % 1000000;
        UPDATE pgbench_tellers SET tbalance = tbalance + 1 WHERE tid = 1 + i % 100;
        UPDATE pgbench_branches SET bbalance = bbalance + 1 WHERE bid = 1 + i % 10;
        INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1 + i % 100, 1 + i % 10, i, 1, now());
        COMMIT;
    END LOOP;
END $$;
"""


class Server:
    """A throwaway PostgreSQL server on a free loopback port (the few lines tests/support.py also has)."""

    def __init__(self, settings: dict[str, str]) -> None:
        self.base = tempfile.mkdtemp(prefix="tenure-guard-bench-")
        os.chmod(self.base, 0o755)
        self.data = os.path.join(self.base, "data")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.settings = settings
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def start(self) -> "Server":
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        self._run(f"{PG_BIN}/initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--locale=C.UTF-8", "--no-sync")
        conf = {"listen_addresses": "'127.0.0.1'", "unix_socket_directories": f"'{self.base}'", **self.settings}
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write("".join(f"{k} = {v}\n" for k, v in conf.items()))
        self._run(f"{PG_BIN}/pg_ctl", "-D", self.data, "-l", os.path.join(self.base, "log"),
                  "-o", f"-p {self.port}", "-w", "start")
        return self

    def stop(self) -> None:
        subprocess.run(self._as + [f"{PG_BIN}/pg_ctl", "-D", self.data, "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def _run(self, *args: str) -> None:
        subprocess.run(self._as + list(args), check=True, capture_output=True, text=True)

    def postmaster_pid(self) -> int:
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            return int(f.readline())

    def _children(self) -> list[list[str]]:
        pm, out = self.postmaster_pid(), []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(pid) == pm or int(fields[1]) == pm:
                out.append([pid] + fields)
        return out

    def wait_backends_gone(self, count: int, timeout: float = 10.0) -> None:
        """Wait until the postmaster has at most ``count`` children again (pgbench's backends reaped)."""
        deadline = time.monotonic() + timeout
        while len(self._children()) - 1 > count and time.monotonic() < deadline:
            time.sleep(0.01)

    def cpu_seconds(self) -> float:
        """CPU time of the postmaster and all its children (backends, autovacuum, walwriter...).

        A backend that has exited and been reaped has its time added to the
        postmaster's cutime/cstime, so those count too.
        """
        pm, total = self.postmaster_pid(), 0
        for pid, *fields in self._children():
            if int(pid) == pm:
                total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
            else:
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")


def pgbench_args(srv: Server) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(srv.port), "-U", "postgres"]


def install_variant(conn: Any, variant: str, lease: float) -> None:
    if variant in ("guard", "guard-at-commit"):
        install_guard(conn, tables=TABLES, at_commit=variant == "guard-at-commit")
    else:
        conn.execute(f"CREATE OR REPLACE FUNCTION bench_variant.check() RETURNS trigger LANGUAGE plpgsql "
                     f"AS $fn${_ALT_FUNCTIONS[variant]}$fn$")
        for t in TABLES:
            conn.execute(f"CREATE TRIGGER bench_guard BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {t} "
                         "FOR EACH STATEMENT EXECUTE FUNCTION bench_variant.check()")
    assert renew_guard(conn, 1, lease)


def remove_variant(conn: Any, variant: str) -> None:
    if variant in ("guard", "guard-at-commit"):
        remove_guard(conn, tables=TABLES)
    else:
        for t in TABLES:
            conn.execute(f"DROP TRIGGER IF EXISTS bench_guard ON {t}")


def prepare(conn: Any) -> None:
    """The same starting state for every run: empty history, vacuumed tables, a fresh checkpoint."""
    conn.execute("TRUNCATE pgbench_history")
    conn.execute("VACUUM ANALYZE " + ", ".join(TABLES))
    conn.execute("CHECKPOINT")


def run_pgbench(srv: Server, args: argparse.Namespace) -> tuple[float, int, float]:
    """(tps, transactions, server CPU µs per transaction) of one pgbench run."""
    children = len(srv._children()) - 1
    cpu0 = srv.cpu_seconds()
    p = subprocess.run([f"{PG_BIN}/pgbench", "-n", "-c", str(args.clients), "-j", str(args.threads),
                        "-T", str(args.duration)] + pgbench_args(srv) + ["postgres"],
                       capture_output=True, text=True)
    # A backend's CPU time moves to the postmaster's cutime when it is
    # reaped; reading while pgbench's backends exit would miss some.
    srv.wait_backends_gone(children)
    cpu1 = srv.cpu_seconds()
    tps = _parse(p)
    n = re.search(r"number of transactions actually processed: (\d+)", p.stdout)
    txns = int(n.group(1)) if n else 0
    return tps, txns, 1e6 * (cpu1 - cpu0) / max(txns, 1)


def measure_variant(srv: Server, conn: Any, variant: str, args: argparse.Namespace,
                    out: Callable[[str], None]) -> dict[str, float]:
    ratios, cpu_ratios, tps_sum = [], [], {"plain": 0.0, "guarded": 0.0}
    for r in range(1, args.rounds + 1):
        order = ["plain", "guarded"] if r % 2 else ["guarded", "plain"]
        res: dict[str, tuple[float, int, float]] = {}
        for kind in order:
            prepare(conn)
            if kind == "guarded":
                install_variant(conn, variant, args.duration + 60)
            try:
                res[kind] = run_pgbench(srv, args)
            finally:
                if kind == "guarded":
                    remove_variant(conn, variant)
            tps, txns, cpu = res[kind]
            tps_sum[kind] += tps
            out(f"  {variant:15s} round {r} {kind:7s}  tps {tps:8.1f}  ({txns} txns)  server cpu {cpu:6.1f} µs/txn")
        ratio = res["guarded"][0] / res["plain"][0]
        cpu_ratio = res["guarded"][2] / res["plain"][2]
        ratios.append(ratio)
        cpu_ratios.append(cpu_ratio)
        out(f"  {variant:15s} round {r} guarded/plain  tps {ratio:.3f}  cpu/txn {cpu_ratio:.3f}")
    return {"overall": tps_sum["guarded"] / tps_sum["plain"], "geomean": statistics.geometric_mean(ratios),
            "min": min(ratios), "max": max(ratios), "cpu": statistics.geometric_mean(cpu_ratios)}


def _parse(p: subprocess.CompletedProcess[str] | tuple[int, str, str]) -> float:
    rc, stdout, stderr = p if isinstance(p, tuple) else (p.returncode, p.stdout, p.stderr)
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", stdout)
    if rc != 0 or tps is None or "aborted" in stderr:
        raise RuntimeError(f"pgbench failed (rc {rc}):\n{stdout}\n{stderr}")
    return float(tps.group(1))


def measure_side_by_side(srv: Server, conns: dict[str, Any], variant: str, args: argparse.Namespace,
                         out: Callable[[str], None]) -> dict[str, float]:
    """Guarded and plain at the same time, on twin databases, half the clients each.

    Both runs share whatever else the machine is doing at that moment, so
    bursts of outside load cancel out; the guarded database gets fewer
    transactions through in proportion to what the guard costs. The roles
    of the two databases swap every round.
    """
    dbs = list(conns)
    half_c, half_j = max(1, args.clients // 2), max(1, args.threads // 2)
    ratios, sums = [], {"plain": 0.0, "guarded": 0.0}
    for r in range(1, args.rounds + 1):
        guarded_db = dbs[(r - 1) % 2]
        for c in conns.values():
            prepare(c)
        install_variant(conns[guarded_db], variant, args.duration + 60)
        try:
            procs = {db: subprocess.Popen([f"{PG_BIN}/pgbench", "-n", "-c", str(half_c), "-j", str(half_j),
                                           "-T", str(args.duration)] + pgbench_args(srv) + [db],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for db in dbs}
            done = {}
            for db, p in procs.items():
                stdout, stderr = p.communicate()
                done[db] = (p.returncode, stdout, stderr)
        finally:
            remove_variant(conns[guarded_db], variant)
        tps = {("guarded" if db == guarded_db else "plain"): _parse(res) for db, res in done.items()}
        ratio = tps["guarded"] / tps["plain"]
        ratios.append(ratio)
        for k in sums:
            sums[k] += tps[k]
        out(f"  {variant:15s} round {r} guarded ({guarded_db}) tps {tps['guarded']:7.1f}  plain tps "
            f"{tps['plain']:7.1f}  guarded/plain {ratio:.3f}")
    return {"overall": sums["guarded"] / sums["plain"], "geomean": statistics.geometric_mean(ratios),
            "min": min(ratios), "max": max(ratios)}


def micro(conn: Any, variants: list[str], txns: int, reps: int, out: Callable[[str], None]) -> dict[str, float]:
    """Median µs per transaction of the in-server loop, for plain and each variant."""
    conn.execute(_MICRO_PROC)
    times: dict[str, list[float]] = {v: [] for v in ["plain"] + variants}
    for _ in range(reps):
        for v in times:
            prepare(conn)
            if v != "plain":
                install_variant(conn, v, 3600)
            try:
                t0 = time.perf_counter()
                conn.execute("CALL bench_variant.loop(%s)", (txns,))
                times[v].append(1e6 * (time.perf_counter() - t0) / txns)
            finally:
                if v != "plain":
                    remove_variant(conn, v)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    for v, m in med.items():
        extra = "" if v == "plain" else f"  guard adds {m - med['plain']:+5.1f} µs/txn ({m / med['plain'] - 1:+6.1%} of this loop)"
        out(f"  {v:15s} {m:6.1f} µs/txn  (runs: {', '.join(f'{t:.1f}' for t in times[v])}){extra}")
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="guard", help=f"comma-separated, or 'all': {', '.join(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=4, help="plain/guarded pairs per variant (default 4; keep it even)")
    ap.add_argument("--duration", type=int, default=15, help="seconds per pgbench run (default 15)")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fsync", choices=["on", "off"], default="off")
    ap.add_argument("--synchronous-commit", default="on")
    ap.add_argument("--no-alternating", dest="alternating", action="store_false",
                    help="skip the alternating runs")
    ap.add_argument("--no-side-by-side", dest="side_by_side", action="store_false",
                    help="skip the side-by-side measurement")
    ap.add_argument("--micro-txns", type=int, default=20000, help="transactions per in-server loop (0: skip)")
    ap.add_argument("--micro-reps", type=int, default=5)
    args = ap.parse_args()
    variants = VARIANTS if args.variants == "all" else args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    if args.rounds < 1 or args.duration < 1:
        ap.error("--rounds and --duration must be >= 1")

    def out(line: str) -> None:
        print(line, flush=True)

    # Stop the server on SIGTERM too (the finally below), not only on ^C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    srv = Server({"fsync": args.fsync, "synchronous_commit": args.synchronous_commit}).start()
    try:
        with psycopg.connect(srv.dsn, autocommit=True) as conn:
            subprocess.run([f"{PG_BIN}/pgbench", "-i", "-q", "-s", str(args.scale)] + pgbench_args(srv) + ["postgres"],
                           check=True, capture_output=True)
            conn.execute("CREATE DATABASE bench_twin")
            subprocess.run([f"{PG_BIN}/pgbench", "-i", "-q", "-s", str(args.scale)] + pgbench_args(srv)
                           + ["bench_twin"], check=True, capture_output=True)
            twin = psycopg.connect(srv.dsn.replace("dbname=postgres", "dbname=bench_twin"), autocommit=True)
            for c in (conn, twin):
                c.execute("CREATE SCHEMA bench_variant")
                # Creates the tenure objects once; each guarded run installs and removes the triggers.
                install_guard(c, tables=TABLES)
                remove_guard(c, tables=TABLES)
            show = lambda name: conn.execute(f"SHOW {name}").fetchone()[0]  # noqa: E731
            out("guard_overhead: pgbench TPC-B-like, plain vs guarded, alternating on one server")
            out(f"  PostgreSQL {show('server_version')}; fsync={show('fsync')}, "
                f"synchronous_commit={show('synchronous_commit')}, shared_buffers={show('shared_buffers')}")
            out(f"  scale {args.scale}, {args.clients} clients, {args.threads} threads, {args.duration} s per run, "
                f"{args.rounds} rounds per variant (order flips each round)")
            out(f"  machine: {platform.platform()}, {os.cpu_count()} CPUs, load average "
                f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; Python {platform.python_version()}, "
                f"psycopg {psycopg.__version__}")
            results = {}
            for v in variants if args.alternating else []:
                out(f"\nvariant {v}")
                results[v] = measure_variant(srv, conn, v, args, out)
            side: dict[str, dict[str, float]] = {}
            if args.side_by_side:
                out(f"\nside by side: guarded and plain at the same time on twin databases "
                    f"(postgres, bench_twin), {max(1, args.clients // 2)} clients each, roles swap each round")
                for v in variants:
                    side[v] = measure_side_by_side(srv, {"postgres": conn, "bench_twin": twin}, v, args, out)
            twin.close()
            out("\nsummary (guarded/plain; 1.000 = no cost, 0.950 = 5 % fewer TPS)")
            for v in variants:
                if v in results:
                    r = results[v]
                    out(f"  {v:15s} alternating:  geomean of rounds {r['geomean']:.3f} (min {r['min']:.3f}, "
                        f"max {r['max']:.3f}), total TPS {r['overall']:.3f}, server cpu/txn {r['cpu']:.3f}")
                if v in side:
                    r = side[v]
                    name = "" if v in results else v
                    out(f"  {name:15s} side by side: geomean of rounds {r['geomean']:.3f} (min {r['min']:.3f}, "
                        f"max {r['max']:.3f}), total TPS {r['overall']:.3f}")
            if args.micro_txns > 0:
                out(f"\nin-server loop: {args.micro_txns} transactions of 4 writes + 1 read, one backend, "
                    f"median of {args.micro_reps}")
                micro(conn, variants, args.micro_txns, args.micro_reps, out)
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
