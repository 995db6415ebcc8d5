"""``python -m tenure.lab.chaos.registrar``: a memcached registrar in its own process, for the chaos stack."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from ... import connect
from ...sidecar.memcache import run_registrar


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tenure.lab.chaos.registrar")
    p.add_argument("--endpoints", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--member", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ttl", type=int, default=2)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client = connect(a.endpoints.split(","), check=False)
    try:
        run_registrar(client, a.service, a.member, a.host, a.port, a.ttl, stop)
    finally:
        client.close()


if __name__ == "__main__":
    main()
