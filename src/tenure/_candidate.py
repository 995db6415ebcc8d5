"""A candidate (or observer) in its own process, for the demo, tests and benchmarks.

``python -m tenure._candidate --endpoints URLS --service S --member M``
campaigns for ever and prints one JSON object per line on stdout:
``ready``, ``elected`` (token, t, deadline), ``lost`` (token, reason, t,
valid_until), ``leader`` (observer mode) and ``reply`` to commands. Times
are ``time.monotonic()``, which on Linux is one clock for every process.

Commands, one per line on stdin: ``resign``; ``write`` (try a fenced etcd
write, and a PostgreSQL one with ``--pg``, using the last token held, and
report whether the leadership was valid first); ``quit``.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import sys
import threading
import time
from typing import Any

from . import connect
from .election import Election, Leadership
from .errors import TenureError
from .fencing import etcd_put, install_pg_fence, pg_fence


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _write(args: argparse.Namespace, client: Any, leadership: Leadership | None) -> dict[str, Any]:
    # Check validity first, as a real leader would before writing.
    out: dict[str, Any] = {"valid": leadership is not None and leadership.is_valid(), "t": time.monotonic()}
    if leadership is None:
        return out
    out["token"] = leadership.token
    try:
        etcd_put(client, args.service, leadership.token, f"data/{args.service}", f"{args.member}:{leadership.token}")
        out["etcd"] = "ok"
    except TenureError as e:
        out["etcd"] = f"{type(e).__name__}: {e}"
    if args.pg:
        import psycopg

        try:
            with psycopg.connect(args.pg, autocommit=True, connect_timeout=5) as conn:
                install_pg_fence(conn)
                with conn.transaction():
                    pg_fence(conn, f"{args.service}-data", leadership.token)
                    conn.execute("CREATE TABLE IF NOT EXISTS tenure_demo_writes (member text, token bigint)")
                    conn.execute("INSERT INTO tenure_demo_writes VALUES (%s, %s)", (args.member, leadership.token))
            out["pg"] = "ok"
        except TenureError as e:
            out["pg"] = f"{type(e).__name__}: {e}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tenure._candidate")
    p.add_argument("--endpoints", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--member", required=True)
    p.add_argument("--namespace", default="/tenure")
    p.add_argument("--ttl", type=float, default=2.0)
    p.add_argument("--pg", default=None, help="DSN of a PostgreSQL for fenced writes")
    p.add_argument("--observe", action="store_true", help="only report leader changes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s {args.member} %(name)s %(levelname)s %(message)s")

    client = connect(args.endpoints, namespace=args.namespace)
    election = Election(client, args.service, member=args.member, ttl=args.ttl)
    commands: queue.Queue[str] = queue.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            commands.put(line.strip())
        commands.put("quit")

    threading.Thread(target=read_stdin, daemon=True).start()

    if args.observe:
        election.on_change(lambda info: emit(ev="leader", member=info and info.member,
                                             token=info and info.token, t=time.monotonic()))
        emit(ev="ready", member=args.member)
        while commands.get() != "quit":
            pass
        return 0

    emit(ev="ready", member=args.member)
    last: Leadership | None = None
    held: list[Leadership] = []

    def campaign() -> None:
        while True:
            leadership = election.campaign()
            emit(ev="elected", member=args.member, token=leadership.token, t=time.monotonic(),
                 deadline=leadership.deadline)
            held.append(leadership)
            commands.put("")  # wake the main loop
            leadership.lost.wait()
            if leadership.reason == "resigned":
                # Stand aside until someone else leads, so a resign really hands over.
                moved = threading.Event()
                stop = election.on_change(lambda info: info is not None and info.token != leadership.token
                                          and moved.set())
                moved.wait(timeout=5 * args.ttl)
                stop()

    threading.Thread(target=campaign, daemon=True).start()
    reported: set[int] = set()
    while True:
        try:
            cmd = commands.get(timeout=0.02)
        except queue.Empty:
            cmd = ""
        if held:
            last = held[-1]
        if last is not None and last.lost.is_set() and last.token not in reported:
            reported.add(last.token)
            emit(ev="lost", member=args.member, token=last.token, reason=last.reason, t=time.monotonic(),
                 valid_until=last.deadline)
        if cmd == "quit":
            return 0
        if cmd == "resign" and last is not None:
            last.resign()
            emit(ev="reply", cmd="resign", t=time.monotonic())
        elif cmd == "write":
            emit(ev="reply", cmd="write", **_write(args, client, last))


if __name__ == "__main__":
    sys.exit(main())
