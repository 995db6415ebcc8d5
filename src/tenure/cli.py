"""The ``tenure`` command: status, history, sidecar, agent, pg (write guard) and demo.

Endpoints come from ``--endpoints`` or ``TENURE_ENDPOINTS`` (comma-separated
``http://host:port``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from typing import Any

from . import connect, records
from .election import Election
from .errors import TenureError

DEFAULT_ENDPOINTS = "http://127.0.0.1:2379"


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _services(client: Any) -> list[str]:
    kvs, _ = client.get_prefix(records.SERVICES_PREFIX)
    return sorted({parts[0] for kv in kvs if (parts := records.split_service_key(kv.key)) is not None})


def cmd_status(args: argparse.Namespace) -> int:
    client = connect(args.endpoints, namespace=args.namespace)
    services = [args.service] if args.service else _services(client)
    report = []
    for name in services:
        e = Election(client, name, member="tenure-cli")
        leader = e.leader()
        report.append({
            "service": name,
            "leader": None if leader is None else {
                "member": leader.member, "token": leader.token, "since": leader.since, "value": leader.value},
            "candidates": e.candidates(),
        })
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not report:
        print(f"no services under {args.namespace}")
    for r in report:
        lead = r["leader"]
        head = (f"leader {lead['member']} (token {lead['token']}, since {_when(lead['since'])})"
                if lead else "NO LEADER")
        print(f"{r['service']}: {head}")
        for c in r["candidates"]:
            mark = "*" if lead and c["member"] == lead["member"] else " "
            print(f"  {mark} {c['member']:<20} ttl {c.get('ttl', '?')} s  {json.dumps(c.get('value'))}")
    return 0 if all(r["leader"] for r in report) else 3


def cmd_history(args: argparse.Namespace) -> int:
    client = connect(args.endpoints, namespace=args.namespace)
    terms = Election(client, args.service, member="tenure-cli").history(args.limit)
    if args.json:
        print(json.dumps([t.__dict__ for t in terms], indent=2))
        return 0
    print(f"{'token':>8}  {'member':<16} {'start':<24} {'end':<24} reason")
    for t in terms:
        print(f"{t.token:>8}  {t.member:<16} {_when(t.start):<24} {_when(t.end) if t.end else 'current':<24} "
              f"{t.reason or ''}")
    return 0


def cmd_sidecar(args: argparse.Namespace) -> int:
    from .sidecar.config import load_config

    config = load_config(args.config)  # a bad config fails here, before anything is imported or started
    if not hasattr(config, "postgres"):  # a [memcache] section: the memcached registrar
        from .sidecar.memcache import main as registrar_main

        return registrar_main(config)
    from .sidecar.loop import main as sidecar_main

    return sidecar_main(config)


def cmd_agent(args: argparse.Namespace) -> int:
    import tomllib

    from .errors import ConfigError
    from .web.agent import main as agent_main, parse_agent_config

    try:
        with open(args.config, "rb") as f:
            config = parse_agent_config(tomllib.load(f))
    except OSError as e:
        raise ConfigError(f"cannot read config {args.config}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {args.config} is not valid TOML: {e}") from None
    return agent_main(config)


def cmd_pg_guard(args: argparse.Namespace) -> int:
    import psycopg

    from .errors import ConfigError, ServiceError
    from .services import pg_guard

    if args.action != "guard-status" and not (args.table or args.schema or getattr(args, "all", False)):
        raise ConfigError("name what to guard: --table T (repeatable) and/or --schema S")
    try:
        with psycopg.connect(args.dsn, autocommit=True, connect_timeout=5) as conn:
            if args.action == "install-guard":
                pg_guard.install_guard(conn, tables=args.table or None, schema=args.schema)
            elif args.action == "remove-guard":
                pg_guard.remove_guard(conn, tables=args.table or None, schema=args.schema, drop_all=args.all)
            print(json.dumps(pg_guard.guard_status(conn), indent=2, default=str))
    except psycopg.Error as e:
        raise ServiceError(f"PostgreSQL at {args.dsn!r}: {e}", detail=str(e)) from None
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .lab.demo import run

    return run(ttl=args.ttl)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tenure", description="Leader election with fencing tokens over etcd.")
    p.add_argument("--endpoints", default=os.environ.get("TENURE_ENDPOINTS", DEFAULT_ENDPOINTS),
                   help="etcd client URLs, comma-separated (default: $TENURE_ENDPOINTS or %(default)s)")
    p.add_argument("--namespace", default="/tenure")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("status", help="leader and candidates of each service")
    s.add_argument("service", nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)

    h = sub.add_parser("history", help="past terms of a service")
    h.add_argument("service")
    h.add_argument("--limit", type=int, default=20)
    h.add_argument("--json", action="store_true")
    h.set_defaults(fn=cmd_history)

    sc = sub.add_parser("sidecar", help="run beside a PostgreSQL server: elect, promote, fence, rejoin")
    sc.add_argument("--config", required=True, help="TOML file (see examples/sidecar-postgres.toml)")
    sc.set_defaults(fn=cmd_sidecar)

    ag = sub.add_parser("agent", help="per-host agent: watch etcd once for all web workers of this host")
    ag.add_argument("--config", required=True, help="TOML file with [etcd] and [agent] (see docs/agent.md)")
    ag.set_defaults(fn=cmd_agent)

    pg = sub.add_parser("pg", help="PostgreSQL helpers: the in-database write guard")
    pgsub = pg.add_subparsers(dest="action", required=True)
    for action, text in (("install-guard", "guard tables so a deposed primary refuses their writes (idempotent)"),
                         ("remove-guard", "stop guarding tables (idempotent)"),
                         ("guard-status", "show the guard's lease")):
        a = pgsub.add_parser(action, help=text)
        a.add_argument("--dsn", required=True, help="libpq connection string of the primary")
        if action != "guard-status":
            a.add_argument("--table", action="append", default=[], help="schema.table; repeatable")
            a.add_argument("--schema", help="every table of this schema")
        if action == "remove-guard":
            a.add_argument("--all", action="store_true", help="remove every guard object")
        a.set_defaults(fn=cmd_pg_guard, table=[], schema=None, all=False)

    d = sub.add_parser("demo", help="start a local etcd and three candidates, kill the leader, print the timeline")
    d.add_argument("--ttl", type=int, default=2)
    d.set_defaults(fn=cmd_demo)

    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.fn(args))
    except TenureError as e:
        print(f"tenure: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
