"""Light web workers: memory per worker (in-process router vs the agent), lookup time, propagation to 100 workers.

    nice .venv/bin/python benchmarks/agent.py [--workers 100] [--rounds 10] [--memory-workers 5] [--poll 0.005]
        [--worker-nice 0]

One run, on its own local 3-member etcd (tenure.lab.etcd) and one
``tenure agent`` process (its view file on /dev/shm), prints:

1. memory of a web worker, forked from a master that has imported nothing
   of tenure (as gunicorn without ``--preload``, which is how Open Library
   runs it), after the worker set itself up and read the primary once:
   RSS, USS (private pages: what each extra worker really costs) and PSS,
   averaged over ``--memory-workers`` workers of each kind -- a bare worker,
   one with its own ``tenure.web.Router`` (gRPC, protobuf, a watch), one with
   ``tenure.web.agent_view.AgentRouter``;
2. the cost of ``view.primary`` in each kind of worker (best of 5 timeit runs);
3. propagation of a new primary to ``--workers`` agent-reading worker
   processes: each looks the primary up every ``--poll`` seconds (as if it
   served a request that often) and notes when it first sees the new token;
   the delay is from just before the primary record's put to that moment
   (both on this host's monotonic clock), over ``--rounds`` leader changes.
   The figure includes up to ``--poll`` of sampling.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import timeit
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
sys.path.insert(0, SRC)

SERVICE = "db"


def memory(pid: int) -> dict[str, int]:
    """RSS, USS (private clean + dirty) and PSS of ``pid``, in KiB."""
    out = {"rss": 0, "uss": 0, "pss": 0}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            value = rest.split()
            if not value or not value[0].isdigit():
                continue
            kib = int(value[0])
            if name == "Rss":
                out["rss"] = kib
            elif name == "Pss":
                out["pss"] = kib
            elif name in ("Private_Clean", "Private_Dirty"):
                out["uss"] += kib
    return out


# -- worker processes, forked from a bare master ------------------------------------------------------------------

def master(kind: str, n: int, endpoints: str, path: str, poll: float, lookups: int) -> None:
    """Fork ``n`` workers of ``kind``; each sets up, reports ready (and its lookup cost), then polls or sleeps."""
    children = []
    for i in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                worker(kind, w, endpoints, path, poll, lookups if i == 0 else 0)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(0)
        os.close(w)
        children.append((pid, r))
    print(json.dumps({"pids": [p for p, _ in children]}), flush=True)
    # Relay the workers' lines to our stdout, tagged with their pid, until our stdin closes.
    fds = {r: pid for pid, r in children}
    bufs = {r: b"" for r in fds}
    open_fds = set(fds)
    while open_fds:
        ready, _, _ = select.select(list(open_fds) + [0], [], [], 1.0)
        if 0 in ready and not os.read(0, 1):
            break
        for r in ready:
            if r == 0:
                continue
            data = os.read(r, 65536)
            if not data:
                open_fds.discard(r)
                continue
            bufs[r] += data
            *lines, bufs[r] = bufs[r].split(b"\n")
            for line in lines:
                sys.stdout.write(f"{fds[r]} {line.decode()}\n")
        sys.stdout.flush()
    for pid, _ in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


def worker(kind: str, w: int, endpoints: str, path: str, poll: float, lookups: int) -> None:
    nice = int(os.environ.get("TENURE_BENCH_WORKER_NICE", "0"))
    if nice:
        os.nice(nice)  # below the agent, as its deployment recommends (Nice=-5 for the agent)
    if kind == "bare":
        view = None
    elif kind == "router":
        from tenure.web import Router

        view = Router(endpoints.split(",")).service(SERVICE)
        view.wait_for_primary(30)
    else:
        from tenure.web.agent_view import AgentRouter

        view = AgentRouter(path).service(SERVICE)
        view.wait_for_primary(30)
    grpc = any(m == "grpc" or m.startswith(("grpc.", "google.protobuf")) for m in sys.modules)
    cost = None
    if lookups and view is not None:
        cost = min(timeit.repeat("v.primary", globals={"v": view}, number=lookups, repeat=5)) / lookups
    os.write(w, (json.dumps({"ready": True, "grpc": grpc, "lookup": cost}) + "\n").encode())
    if view is None or poll <= 0:
        while True:
            time.sleep(3600)
    seen = view.primary.token if view.primary is not None else None
    while True:
        p = view.primary
        if p is not None and p.token != seen:
            seen = p.token
            os.write(w, f"token {p.token} {time.monotonic()!r}\n".encode())
        time.sleep(poll)


class Workers:
    """A master process with ``n`` forked workers of one kind."""

    def __init__(self, kind: str, n: int, endpoints: list[str], path: str, poll: float = 0.0,
                 lookups: int = 0, nice: int = 0) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--master", kind, str(n), ",".join(endpoints), path,
                                      str(poll), str(lookups)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0, env={**os.environ, "PYTHONPATH": SRC,
                                                     "TENURE_BENCH_WORKER_NICE": str(nice)})
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.pids: list[int] = []
        self.ready: dict[int, dict[str, Any]] = {}
        self.tokens: dict[int, dict[int, float]] = {}
        self.read_until(lambda: bool(self.pids), 120)

    def read_until(self, cond: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("workers did not report in time")
            r, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if not r:
                continue
            data = os.read(self.fd, 65536)  # raw reads: select() cannot see lines a buffered reader holds
            if not data:
                raise RuntimeError("the master exited")
            *lines, self.buf = (self.buf + data).split(b"\n")
            for raw in lines:
                line = raw.decode().strip()
                if line.startswith("{"):
                    self.pids = json.loads(line)["pids"]
                    self.tokens = {p: {} for p in self.pids}
                    continue
                pid_s, _, msg = line.partition(" ")
                pid = int(pid_s)
                if msg.startswith("{"):
                    self.ready[pid] = json.loads(msg)
                elif msg.startswith("token "):
                    _, tok, t = msg.split()
                    self.tokens[pid].setdefault(int(tok), float(t))

    def wait_ready(self, timeout: float = 300) -> None:
        self.read_until(lambda: len(self.ready) == len(self.pids), timeout)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# -- the run --------------------------------------------------------------------------------------------------------

def new_primary(client: Any, member: str, prev: Any, settle: float) -> tuple[Any, float]:
    import tenure

    if prev is not None:
        prev.resign()
    term = tenure.Election(client, SERVICE, member=member, ttl=60, value={"dsn": f"host={member}"}).campaign(10)
    time.sleep(settle)  # a sidecar publishes the primary only after promoting its server
    t0 = time.monotonic()
    term.put(f"svc/{SERVICE}/primary", json.dumps({"member": member, "dsn": f"host={member}", "token": term.token}),
             ephemeral=True)
    return term, t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--memory-workers", type=int, default=5)
    ap.add_argument("--poll", type=float, default=0.005)
    ap.add_argument("--settle", type=float, default=0.3)
    ap.add_argument("--lookups", type=int, default=1_000_000)
    ap.add_argument("--worker-nice", type=int, default=0,
                    help="run the propagation workers at this nice level, below the agent and etcd (in production "
                         "etcd has its own machines and the agent runs at Nice=-5)")
    ap.add_argument("--master", nargs=6)
    args = ap.parse_args()
    if args.master:
        kind, n, eps, path, poll, lookups = args.master
        return master(kind, int(n), eps, path, float(poll), int(lookups))

    import tenure
    from tenure.lab.etcd import LocalEtcd

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    work = tempfile.mkdtemp(prefix="tenure-agent-bench-", dir=shm)
    path = os.path.join(work, "agent.view")
    with LocalEtcd(size=3) as etcd:
        print(f"settings: {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.2f} at start), Python "
              f"{sys.version.split()[0]}, local 3-member etcd, agent view at {path}, workers forked from a bare "
              f"master (no --preload), {args.memory_workers} workers per kind for memory")
        client = tenure.connect(etcd.endpoints)
        term, _ = new_primary(client, "a", None, 0)
        cfg = os.path.join(work, "agent.toml")
        with open(cfg, "w") as f:
            f.write(textwrap.dedent(f"""\
                [etcd]
                endpoints = {json.dumps(etcd.endpoints)}
                [agent]
                services = ["{SERVICE}"]
                path = "{path}"
                listen = ""
                """))
        agent = subprocess.Popen([sys.executable, "-m", "tenure", "agent", "--config", cfg],
                                 env={**os.environ, "PYTHONPATH": SRC}, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)

            # 1 and 2: memory and lookup cost.
            figures = {}
            for kind in ("bare", "router", "agent"):
                ws = Workers(kind, args.memory_workers, etcd.endpoints, path, lookups=args.lookups)
                ws.wait_ready()
                time.sleep(1.0)  # let the router's watch settle (threads, first progress answers)
                mems = [memory(p) for p in ws.pids]
                figures[kind] = {
                    "rss": statistics.mean(m["rss"] for m in mems) / 1024,
                    "uss": statistics.mean(m["uss"] for m in mems) / 1024,
                    "pss": statistics.mean(m["pss"] for m in mems) / 1024,
                    "grpc": any(r["grpc"] for r in ws.ready.values()),
                    "lookup": next((r["lookup"] for r in ws.ready.values() if r["lookup"]), None),
                }
                ws.close()
            print("1. memory per web worker (mean over the workers of each kind, MiB)")
            print(f"   {'worker':<44} {'RSS':>7} {'USS':>7} {'PSS':>7}  gRPC/protobuf loaded")
            for kind, label in (("bare", "bare (python, no tenure)"), ("router", "in-process Router + watch"),
                                ("agent", "AgentRouter (reads the agent's file)")):
                m = figures[kind]
                print(f"   {label:<44} {m['rss']:7.1f} {m['uss']:7.1f} {m['pss']:7.1f}  {m['grpc']}")
            saved = figures["router"]["uss"] - figures["agent"]["uss"]
            print(f"   => the agent saves {saved:.1f} MiB of private memory per worker "
                  f"({figures['router']['rss'] - figures['agent']['rss']:.1f} MiB RSS); "
                  f"25 workers x 4 hosts: {saved * 100 / 1024:.2f} GiB, and 100 watches become 4")
            agent_mem = memory(agent.pid)
            print(f"   the agent process itself: RSS {agent_mem['rss'] / 1024:.1f} MiB, "
                  f"USS {agent_mem['uss'] / 1024:.1f} MiB (one per host)")
            print("2. lookup cost: view.primary (best of 5 timeit runs of "
                  f"{args.lookups:,})")
            for kind in ("router", "agent"):
                print(f"   {kind:<8} {figures[kind]['lookup'] * 1e9:6.0f} ns")

            # 3: propagation to N workers.
            t = time.monotonic()
            ws = Workers("agent", args.workers, etcd.endpoints, path, poll=args.poll, nice=args.worker_nice)
            ws.wait_ready()
            delays: list[float] = []
            for i in range(args.rounds):
                term, t0 = new_primary(client, "b" if i % 2 == 0 else "a", term, args.settle)
                tok = term.token
                ws.read_until(lambda: all(tok in ts for ts in ws.tokens.values()), 60)
                delays.extend(ts[tok] - t0 for ts in ws.tokens.values())
            ws.close()
            delays.sort()
            q = statistics.quantiles(delays, n=100)
            print(f"3. propagation of a new primary to {args.workers} worker processes through the agent "
                  f"({args.rounds} leader changes, {len(delays)} samples; workers look up every "
                  f"{args.poll * 1000:g} ms{f', at nice {args.worker_nice}' if args.worker_nice else ''})")
            print(f"   p50 {q[49] * 1000:.1f} ms   p90 {q[89] * 1000:.1f} ms   p99 {q[98] * 1000:.1f} ms   "
                  f"max {delays[-1] * 1000:.1f} ms   (whole part {time.monotonic() - t:.0f} s)")
            term.resign()
        finally:
            agent.terminate()
            agent.wait(10)
            client.close()
            for name in os.listdir(work):
                os.unlink(os.path.join(work, name))
            os.rmdir(work)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
