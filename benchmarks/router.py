"""Router benchmark: lookup cost, etcd requests per web request, memory per router, propagation to N processes.

    .venv/bin/python benchmarks/router.py [--routers 100] [--rounds 10]

Starts its own 3-member etcd on loopback (tenure.lab.etcd) and prints:

1. the cost of ``router.service("db").primary`` (and of the middleware's
   check) per call, against ``client.get("svc/db/primary")``, i.e. asking
   etcd on every request;
2. etcd RPCs made while requests go through ``ReadOnlyMiddleware`` for 3 s
   (counted by etcd itself, from its /metrics);
3. resident memory added by a router and its watch, in a fresh process;
4. the delay from a new primary record being written to each of N routers,
   each in its own process (forked like gunicorn workers), having it: p50,
   p99, max over ``--rounds`` leader changes (each: resign, a new election,
   ``--settle`` s for the "promotion", then the primary record).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import select
import statistics
import subprocess
import sys
import time
import timeit
import urllib.request
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

SERVICE = "db"


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def publish(client: Any, member: str, ttl: int = 60) -> Any:
    import tenure

    leadership = tenure.Election(client, SERVICE, member=member, ttl=ttl, value={"dsn": f"host={member}"}).campaign(10)
    leadership.put(f"svc/{SERVICE}/primary",
                   json.dumps({"member": member, "dsn": f"host={member}", "token": leadership.token}), ephemeral=True)
    return leadership


def etcd_rpcs(endpoints: list[str]) -> dict[str, float]:
    """RPCs started, summed over the members, by method; plus messages received on Watch streams."""
    out: dict[str, float] = {}
    for ep in endpoints:
        text = urllib.request.urlopen(ep + "/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith("grpc_server_started_total{") or (
                    line.startswith("grpc_server_msg_received_total{") and 'grpc_method="Watch"' in line):
                labels, value = line.rsplit(" ", 1)
                method = labels.split('grpc_method="', 1)[1].split('"', 1)[0]
                key = "Watch messages" if labels.startswith("grpc_server_msg_received") else method
                out[key] = out.get(key, 0.0) + float(value)
    return out


# -- 1 and 2: in this process -----------------------------------------------------------------

def bench_lookup_and_requests(endpoints: list[str]) -> None:
    import tenure
    from tenure.web import Router
    from tenure.web.wsgi import ReadOnlyMiddleware

    client = tenure.connect(endpoints)
    term = publish(client, "a")
    router = Router(endpoints)
    router.service(SERVICE).wait_for_primary(10)

    def best(stmt: str, number: int, glb: dict[str, Any]) -> float:
        return min(timeit.repeat(stmt, globals=glb, number=number, repeat=5)) / number

    g = {"router": router, "view": router.service(SERVICE), "client": client}
    lookup = best("router.service('db').primary", 200_000, g)
    read_only = best("view.read_only", 200_000, g)
    ask_etcd = best("client.get('svc/db/primary')", 500, g)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    mw = ReadOnlyMiddleware(app, router, SERVICE)
    environs = [{"REQUEST_METHOD": m, "PATH_INFO": "/"} for m in ("GET", "POST")]

    def sr(status: str, headers: list[Any], exc_info: Any = None) -> None:
        pass

    g2 = {"mw": mw, "e": environs, "sr": sr}
    per_request = best("mw(e[0], sr); mw(e[1], sr)", 50_000, g2) / 2

    print("1. lookup cost (best of 5 timeit runs)")
    print(f"   router.service('db').primary      {lookup * 1e9:8.0f} ns per call")
    print(f"   view.read_only                    {read_only * 1e9:8.0f} ns per call")
    print(f"   ReadOnlyMiddleware around a no-op {per_request * 1e9:8.0f} ns per request (GET/POST mix)")
    print(f"   client.get('svc/db/primary')      {ask_etcd * 1e9:8.0f} ns per call "
          f"(asking etcd each time: {ask_etcd / lookup:,.0f}x slower)")

    before = etcd_rpcs(endpoints)
    n, t = 0, time.monotonic()
    while time.monotonic() - t < 3.0:  # long enough to see the watch's own once-a-second traffic
        for _ in range(1000):
            mw(environs[n % 2], sr)
            n += 1
    took = time.monotonic() - t
    after = etcd_rpcs(endpoints)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
    rpcs = sum(v for k, v in delta.items() if k not in ("Watch messages", "LeaseKeepAlive"))
    print(f"2. etcd requests per web request: {n:,} requests (GET and POST) through the middleware in {took:.2f} s")
    print(f"   etcd's own count of what reached it meanwhile, all clients: {delta or 'nothing'}")
    print(f"   => {rpcs / n:g} etcd requests per web request. 'Watch messages' are the router watch's progress "
          "requests (1/s per watch, whatever the traffic); LeaseKeepAlive is this benchmark's own election.")
    term.resign()
    router.close()
    client.close()


# -- 3: memory, in a fresh process ------------------------------------------------------------

def memory_child(endpoints: list[str]) -> None:
    import tenure  # noqa: F401 -- grpc, protobuf and the etcd stubs are loaded here
    from tenure.web import Router

    base = rss_kib()
    router = Router(endpoints)
    router.service(SERVICE).wait_for_primary(10)
    one = rss_kib()
    for i in range(10):
        router.service(f"other{i}").ready(10)
    eleven = rss_kib()
    print(json.dumps({"base": base, "one": one, "eleven": eleven}))


def bench_memory(endpoints: list[str]) -> None:
    import tenure

    client = tenure.connect(endpoints)
    term = publish(client, "a")
    out = subprocess.run([sys.executable, __file__, "--memory-child", ",".join(endpoints)],
                         capture_output=True, text=True, timeout=60)
    term.resign()
    client.close()
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print("3. memory (RSS of a fresh process)")
    print(f"   after importing tenure (grpc, protobuf):         {m['base'] / 1024:6.1f} MiB")
    print(f"   + Router, client and one service's watch, ready: {(m['one'] - m['base']) / 1024:+6.1f} MiB")
    print(f"   + 10 more services' watches:                     {(m['eleven'] - m['one']) / 1024:+6.1f} MiB "
          f"({(m['eleven'] - m['one']) / 10:.0f} KiB each)")


# -- 4: propagation to N processes --------------------------------------------------------------

def propagation_coordinator(endpoints: list[str], n: int, rounds: int, settle: float, nice: int,
                            freeze: bool) -> None:
    """Fork ``n`` routers first (no gRPC in this process before that), then change the primary ``rounds`` times."""
    from tenure.web import Router

    router = Router(endpoints)  # made before the fork, read only in the children, as in a gunicorn master
    if freeze:
        gc.freeze()  # as a pre-fork master should: the children's GC then leaves the shared pages alone
    children = []
    for _ in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                if nice:
                    os.nice(nice)  # below etcd and the writer, as if etcd ran on its own machines
                view = router.service(SERVICE)
                seen: set[int] = set()

                def changed(v: Any) -> None:
                    p = v.primary
                    if p is not None and p.token not in seen:
                        seen.add(p.token)
                        os.write(w, f"{p.token} {time.monotonic()!r}\n".encode())

                view.on_change(changed)
                view.ready(30)
                os.write(w, b"ready\n")
                while True:  # until the coordinator closes our stdin side: it kills us
                    time.sleep(3600)
            finally:
                os._exit(0)
        os.close(w)
        children.append((pid, r))

    import tenure

    buffers = {r: b"" for _, r in children}
    lines: dict[int, list[str]] = {r: [] for _, r in children}

    def pump(until: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("routers did not report in time")
            ready, _, _ = select.select([r for _, r in children], [], [], min(left, 0.5))
            for r in ready:
                buffers[r] += os.read(r, 65536)
                *done, buffers[r] = buffers[r].split(b"\n")
                lines[r].extend(x.decode() for x in done)

    try:
        pump(lambda: all("ready" in ls for ls in lines.values()), 120)
        client = tenure.connect(endpoints)
        delays: list[float] = []
        put_times: list[float] = []
        fanout: list[float] = []  # after the first router had it: etcd's commit is out of the picture
        term = None
        for i in range(rounds):
            if term is not None:
                term.resign()
            member = "a" if i % 2 == 0 else "b"
            term = tenure.Election(client, SERVICE, member=member, ttl=60,
                                   value={"dsn": f"host={member}"}).campaign(10)
            record = json.dumps({"member": member, "dsn": f"host={member}", "token": term.token})
            # A sidecar publishes the primary only after promoting its server (hundreds of ms after winning):
            # meanwhile the routers take in the election's own key changes (old term gone, new leader key).
            time.sleep(settle)
            t0 = time.monotonic()
            term.put(f"svc/{SERVICE}/primary", record, ephemeral=True)
            put_times.append(time.monotonic() - t0)
            token = str(term.token)
            pump(lambda: all(any(x.split()[0] == token for x in ls if x != "ready") for ls in lines.values()), 30)
            had_it = [next(float(x.split()[1]) for x in ls if x.split()[0] == token) for ls in lines.values()]
            delays.extend(t - t0 for t in had_it)
            fanout.extend(t - min(had_it) for t in had_it)
        if term is not None:
            term.resign()
        client.close()
        print(json.dumps({"delays": delays, "puts": put_times, "fanout": fanout}))
    finally:
        for pid, r in children:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            os.close(r)


def bench_propagation(endpoints: list[str], n: int, rounds: int, settle: float, nice: int, freeze: bool) -> None:
    t = time.monotonic()
    out = subprocess.run([sys.executable, __file__, "--propagation", ",".join(endpoints), str(n), str(rounds),
                          str(settle), str(nice), str(int(freeze))],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        print(out.stderr[-4000:])
        raise SystemExit("propagation benchmark failed")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    delays, puts, fanout = sorted(result["delays"]), sorted(result["puts"]), sorted(result["fanout"])
    q = statistics.quantiles(delays, n=100)
    f = statistics.quantiles(fanout, n=100)
    where = (f", routers at nice {nice}" if nice else "") + ("" if freeze else ", no gc.freeze() before fork")
    print(f"4. propagation of a new primary record to {n} routers, one per process ({rounds} leader changes{where}, "
          f"{len(delays)} samples; from just before the put of the primary record, {settle:g} s after the election, "
          "to each router's on_change callback)")
    print(f"   p50 {q[49] * 1000:.1f} ms   p90 {q[89] * 1000:.1f} ms   p99 {q[98] * 1000:.1f} ms   "
          f"max {delays[-1] * 1000:.1f} ms   (whole run {time.monotonic() - t:.0f} s)")
    print(f"   the put itself (etcd's commit, as the writer saw it): median {statistics.median(puts) * 1000:.1f} ms, "
          f"max {puts[-1] * 1000:.1f} ms")
    print(f"   after the first router of the round had it: p50 {f[49] * 1000:.1f} ms   p99 {f[98] * 1000:.1f} ms   "
          f"max {fanout[-1] * 1000:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--routers", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--memory-child")
    ap.add_argument("--settle", type=float, default=0.3,
                    help="seconds between winning the election and publishing the primary (the promotion)")
    ap.add_argument("--nice", type=int, default=0,
                    help="run the router processes at this nice level (etcd shares this machine's CPUs with them "
                         "here; in production it has its own)")
    ap.add_argument("--no-freeze", action="store_true",
                    help="fork the routers without gc.freeze() first (see docs/router.md: copy-on-write storms)")
    ap.add_argument("--propagation", nargs=6)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.memory_child:
        return memory_child(args.memory_child.split(","))
    if args.propagation:
        eps, n, rounds, settle, nice, freeze = args.propagation
        return propagation_coordinator(eps.split(","), int(n), int(rounds), float(settle), int(nice), freeze == "1")

    from tenure.lab.etcd import LocalEtcd
    from tenure.web import DEFAULT_STALE_AFTER

    with LocalEtcd(size=3) as etcd:
        print(f"settings: {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.2f} at start), "
              f"Python {sys.version.split()[0]}, local 3-member etcd "
              f"(heartbeat {etcd.heartbeat_ms} ms, election timeout {etcd.election_timeout_ms} ms), "
              f"stale_after {DEFAULT_STALE_AFTER:g} s")
        bench_lookup_and_requests(etcd.endpoints)
        bench_memory(etcd.endpoints)
        bench_propagation(etcd.endpoints, args.routers, args.rounds, args.settle, args.nice, not args.no_freeze)
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
