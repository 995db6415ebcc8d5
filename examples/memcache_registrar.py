"""Keep a local memcached registered in etcd while it is healthy (the same registrar as ``tenure sidecar``).

In production run ``tenure sidecar --config cache1.toml`` with a
``[memcache]`` section (see docs/memcache.md); this script is the same
registrar with its settings on the command line::

    python examples/memcache_registrar.py --etcd http://10.0.0.1:2379,http://10.0.0.2:2379 \\
        --service cache --member cache1 --port 11211 --slot 0 [--host 127.0.0.1] \\
        [--advertise 10.0.1.5:11211] [--hashing modulo] [--ttl 2]

It checks the server (version, set, get) every ttl/3 seconds, flushes it
before publishing on a new lease, keeps the lease-bound record
``svc/<service>/members/<member>`` while the checks pass, withdraws it on
the first failed check and on SIGTERM or Ctrl-C, and keeps the pool's ring
records. Web workers reach the pool with ``router.memcache("<service>")``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

import tenure
from tenure.errors import TenureError
from tenure.sidecar.memcache import MemcacheRegistrar


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--etcd", required=True, help="etcd endpoints, comma-separated")
    ap.add_argument("--namespace", default="/tenure")
    ap.add_argument("--service", required=True)
    ap.add_argument("--member", required=True)
    ap.add_argument("--host", default="127.0.0.1", help="where to check memcached")
    ap.add_argument("--port", type=int, default=11211)
    ap.add_argument("--advertise", help="host:port clients use (default: host:port)")
    ap.add_argument("--ttl", type=int, default=2, help="record lease ttl, whole seconds")
    ap.add_argument("--slot", type=int, help="place in the pool's ordered list (python-memcached's server list)")
    ap.add_argument("--hashing", default="modulo", help="modulo (python-memcached's) or rendezvous")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        client = tenure.connect(args.etcd, namespace=args.namespace)
        registrar = MemcacheRegistrar(client, args.service, args.member, args.host, args.port,
                                      ttl=args.ttl, advertise=args.advertise, slot=args.slot,
                                      hashing=args.hashing)
    except TenureError as e:
        print(f"memcache_registrar: {e}", file=sys.stderr)
        return 2
    try:
        registrar.run(stop)
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
