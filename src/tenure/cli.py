"""The ``tenure`` command: status, history, pause/resume, switchover, restart, sidecar, agent, pg (write guard), demo.

Every command reaches etcd the same way as the sidecar: ``--endpoints``,
``--ca-cert``, ``--cert``, ``--key``, ``--user`` and ``--password-file``, or
the environment variables ``TENURE_ENDPOINTS``, ``TENURE_CA_CERT``,
``TENURE_CERT``, ``TENURE_KEY``, ``TENURE_USER``, ``TENURE_PASSWORD_FILE``, or
the ``[etcd]`` table of a sidecar config file (``--etcd-config`` /
``TENURE_CONFIG``). Flags win over the environment, which wins over the file.
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
from .errors import ConfigError, TenureError, UnknownService

DEFAULT_ENDPOINTS = "http://127.0.0.1:2379"


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _services(client: Any) -> list[str]:
    kvs, _ = client.get_prefix(records.SERVICES_PREFIX)
    return sorted({parts[0] for kv in kvs if (parts := records.split_service_key(kv.key)) is not None})


def add_connection_args(p: argparse.ArgumentParser) -> None:
    """The etcd connection flags every subcommand shares (see the module docstring)."""
    p.add_argument("--endpoints", default=None,
                   help=f"etcd client URLs, comma-separated (default: $TENURE_ENDPOINTS or {DEFAULT_ENDPOINTS})")
    p.add_argument("--ca-cert", default=None, help="CA bundle for https:// endpoints ($TENURE_CA_CERT)")
    p.add_argument("--cert", default=None, help="TLS client certificate ($TENURE_CERT)")
    p.add_argument("--key", default=None, help="TLS client key ($TENURE_KEY)")
    p.add_argument("--user", default=None, help="etcd user ($TENURE_USER)")
    p.add_argument("--password-file", default=None, help="file holding the etcd password ($TENURE_PASSWORD_FILE)")
    p.add_argument("--etcd-config", default=None,
                   help="a sidecar config file whose [etcd] table to use ($TENURE_CONFIG)")


def connection_settings(args: argparse.Namespace, env: Any = None) -> dict[str, Any]:
    """Keyword arguments of :func:`tenure.connect` from flags, then ``TENURE_*`` variables, then a config file."""
    from .config import parse_etcd_section
    from .errors import ConfigError

    env = os.environ if env is None else env
    out: dict[str, Any] = {}
    path = getattr(args, "etcd_config", None) or env.get("TENURE_CONFIG")
    if path:
        import tomllib

        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
        if "etcd" not in raw:
            raise ConfigError(f"{path} has no [etcd] table")
        etcd = parse_etcd_section(raw["etcd"])
        out.update(endpoints=etcd.endpoints, namespace=etcd.namespace, timeout=etcd.timeout, ca_cert=etcd.ca_cert,
                   cert=etcd.cert, key=etcd.key, user=etcd.user, password=etcd.password)
    for name in ("endpoints", "ca_cert", "cert", "key", "user", "password_file"):
        value = getattr(args, name, None) or env.get(f"TENURE_{name.upper()}")
        if value:
            out[name] = value
    if "password_file" in out:
        pf = out.pop("password_file")
        try:
            with open(pf) as f:
                out["password"] = f.read().strip("\r\n")
        except OSError as e:
            raise ConfigError(f"cannot read the password file {pf}: {e.strerror}") from None
    out.setdefault("endpoints", DEFAULT_ENDPOINTS)
    if getattr(args, "namespace", None):
        out["namespace"] = args.namespace
    return {k: v for k, v in out.items() if v is not None}


def cmd_status(args: argparse.Namespace) -> int:
    """``tenure status [SERVICE]``: a table per service, a verdict each, placement warnings."""
    from .operations import etcd_placement, service_status

    client = connect(**connection_settings(args))
    if args.service:
        records.check_name("service", args.service)
    services = [args.service] if args.service else _services(client)
    report = [service_status(client, name) for name in services]
    if args.service and not report[0]["exists"]:
        raise UnknownService(f"service {args.service!r} has no keys under {client.namespace}")
    zones = [z for z in (args.etcd_zones or "").split(",") if z]
    etcd_warnings = etcd_placement(connection_settings(args)["endpoints"], zones)
    if args.json:
        print(json.dumps({"services": report, "etcd": {"warnings": etcd_warnings}}, indent=2, default=str))
    else:
        if not report:
            print(f"no services under {client.namespace}")
        for r in report:
            _print_service(r)
        for w in etcd_warnings:
            print(f"warning: {w}")
    return 0 if all(r["primary"] for r in report) else 3


_COLUMNS = (("member", "member"), ("role", "role"), ("healthy", "healthy"), ("lag_bytes", "lag B"),
            ("lag_seconds", "lag s"), ("timeline", "tl"), ("zone", "zone"), ("token", "token"),
            ("lease_left", "lease"), ("sync", "sync"), ("paused", "paused"))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _print_service(r: dict[str, Any]) -> None:
    print(f"{r['service']}")
    rows = [[_cell(m.get(k)) for k, _ in _COLUMNS] for m in r["members"]]
    head = [h for _, h in _COLUMNS]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    for row in [head, *rows]:
        print("  " + "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip())
    print(f"  verdict: {r['verdict']}")
    for w in r["warnings"]:
        print(f"  warning: {w}")


def cmd_history(args: argparse.Namespace) -> int:
    """``tenure history SERVICE``: the terms, oldest first."""
    client = connect(**connection_settings(args))
    records.check_name("service", args.service)
    terms = Election(client, args.service, member="tenure-cli").history(args.limit)
    if not terms and not _services_has(client, args.service):
        raise UnknownService(f"service {args.service!r} has no keys under {client.namespace}")
    if args.json:
        print(json.dumps([t.__dict__ for t in terms], indent=2))
        return 0
    print(f"{'token':>8}  {'member':<16} {'start':<24} {'end':<24} why")
    for t in terms:
        print(f"{t.token:>8}  {t.member:<16} {_when(t.start):<24} {_when(t.end) if t.end else 'current':<24} "
              f"{t.reason or ''}")
    return 0


def _services_has(client: Any, service: str) -> bool:
    kvs, _ = client.get_prefix(records.service_prefix(service))
    return bool(kvs)


def cmd_pause(args: argparse.Namespace) -> int:
    """``tenure pause|resume SERVICE``: maintenance mode on or off."""
    from . import maintenance

    client = connect(**connection_settings(args))
    records.check_name("service", args.service)
    if not _services_has(client, args.service):
        raise UnknownService(f"service {args.service!r} has no keys under {client.namespace}")
    if args.command == "pause":
        rec = maintenance.pause(client, args.service, args.reason or "")
        out = {"service": args.service, "paused": True, "since": rec.since}
        text = f"{args.service}: paused (no automatic failover until `tenure resume {args.service}`)"
    else:
        was = maintenance.resume(client, args.service)
        out = {"service": args.service, "paused": False, "was_paused": was}
        text = f"{args.service}: resumed" if was else f"{args.service}: was not paused"
    print(json.dumps(out) if args.json else text)
    return 0


def _parse_at(text: str | None) -> float | None:
    """``--at``: ISO 8601 (UTC unless it says otherwise) or HH:MM[:SS] UTC, today or else tomorrow."""
    if not text:
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        if len(text) <= 8 and ":" in text:
            t = datetime.time.fromisoformat(text)
            when = now.replace(hour=t.hour, minute=t.minute, second=t.second, microsecond=0)
            if when < now:
                when += datetime.timedelta(days=1)
        else:
            when = datetime.datetime.fromisoformat(text)
            if when.tzinfo is None:
                when = when.replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        raise ConfigError(f"--at {text!r}: use ISO 8601 (2026-12-01T23:00:00Z) or HH:MM (UTC)") from None
    return when.timestamp()


def cmd_switchover(args: argparse.Namespace) -> int:
    """``tenure switchover SERVICE [--to MEMBER] [--at TIME]``: a planned handover with no lost write."""
    from .operations import switchover

    client = connect(**connection_settings(args))
    records.check_name("service", args.service)
    if args.to:
        records.check_name("member", args.to)
    result = switchover(client, args.service, target=args.to, at=_parse_at(args.at), timeout=args.timeout)
    if args.json:
        print(json.dumps(result, indent=2))
    elif result["state"] == "scheduled":
        print(f"{args.service}: switchover from {result['from']} to {result['to']} scheduled at {_when(result['at'])}")
    else:
        print(f"{args.service}: {result['to']} is primary (token {result['token']}); {result['from']} handed over "
              f"in {result['seconds']:.2f} s (no primary for {result['gap']:.2f} s)")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    """``tenure restart MEMBER``: restart a node's server, switching over first if it is the primary."""
    from .operations import restart

    client = connect(**connection_settings(args))
    records.check_name("member", args.member)
    result = restart(client, args.member, service=args.service, services=_services(client), timeout=args.timeout)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        first = (f"switched over to {result['switchover']['to']} first, then " if result.get("switchover") else "")
        print(f"{result['service']}/{args.member}: {first}restarted; streaming again after {result['seconds']:.1f} s")
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


def cmd_run_singleton(args: argparse.Namespace) -> int:
    import signal

    from .singleton import Runner, resolve_command, serve_health

    from .errors import ConfigError

    argv = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    resolve_command(argv)  # a command that does not exist fails here, before etcd is touched
    address = None
    if args.listen:
        host, sep, port = args.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"--listen must be host:port, got {args.listen!r}")
        address = (host or "0.0.0.0", int(port))
    settings = connection_settings(args)
    client = connect(**settings)
    endpoints = settings["endpoints"]
    runner = Runner(client, args.service, args.member, argv, ttl=args.ttl, kill_after=args.kill_after,
                    once=args.once, endpoints=endpoints if isinstance(endpoints, str) else ",".join(endpoints),
                    namespace=client.namespace)
    server = serve_health(runner, address) if address else None
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: runner.stop())
    try:
        return runner.run()
    finally:
        if server is not None:
            server.shutdown()
        client.close()


def cmd_demo(args: argparse.Namespace) -> int:
    from .lab.demo import run

    return run(ttl=args.ttl, election=args.election)


def _add_operator_commands(sub: Any) -> None:
    s = sub.add_parser("status", help="each service's members, primary, lag, lease and placement; a verdict")
    s.add_argument("service", nargs="?")
    s.add_argument("--etcd-zones", default=os.environ.get("TENURE_ETCD_ZONES", ""),
                   help="zones of the etcd members, comma-separated (default: $TENURE_ETCD_ZONES)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_status)

    h = sub.add_parser("history", help="the terms of a service: token, member, start, end, why it ended")
    h.add_argument("service")
    h.add_argument("--limit", type=int, default=20)
    h.add_argument("--json", action="store_true")
    h.set_defaults(fn=cmd_history)

    for name, text in (("pause", "maintenance mode: no automatic failover (the primary keeps serving)"),
                       ("resume", "leave maintenance mode")):
        pz = sub.add_parser(name, help=text)
        pz.add_argument("service")
        if name == "pause":
            pz.add_argument("--reason", default="")
        pz.add_argument("--json", action="store_true")
        pz.set_defaults(fn=cmd_pause, reason="")

    sw = sub.add_parser("switchover", help="planned handover of the primary to a caught-up standby, no lost write")
    sw.add_argument("service")
    sw.add_argument("--to", metavar="MEMBER", help="the new primary (default: the best caught-up standby)")
    sw.add_argument("--at", metavar="TIME", help="when: ISO 8601 or HH:MM, UTC (default: now)")
    sw.add_argument("--timeout", type=float, default=10.0,
                    help="give up after this many seconds, leaving everything as it was (default %(default)s)")
    sw.add_argument("--json", action="store_true")
    sw.set_defaults(fn=cmd_switchover)

    rs = sub.add_parser("restart", help="restart a member's server; a primary is switched over first")
    rs.add_argument("member")
    rs.add_argument("--service", help="the member's service (default: the one service that has it)")
    rs.add_argument("--timeout", type=float, default=60.0)
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(fn=cmd_restart)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tenure", description="Leader election with fencing tokens over etcd.")
    add_connection_args(p)
    p.add_argument("--namespace", default=None, help="key prefix (default: the config file's, or /tenure)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    _add_operator_commands(sub)

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

    rs = sub.add_parser("run-singleton", help="run a command on exactly one node: campaign, run, kill it when the term ends")
    rs.add_argument("--service", required=True, help="the job's name (one election per job)")
    rs.add_argument("--member", default=os.uname().nodename)
    rs.add_argument("--ttl", type=int, default=2)
    rs.add_argument("--kill-after", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    rs.add_argument("--listen", default="", help="host:port for /health, /primary and /status")
    rs.add_argument("--once", action="store_true", help="exit when the command exits (cron jobs)")
    rs.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    rs.set_defaults(fn=cmd_run_singleton)

    d = sub.add_parser("demo", help="local etcd + 3 PostgreSQL nodes + a web app: a crash, then a planned switchover")
    d.add_argument("--ttl", type=int, default=2)
    d.add_argument("--election", action="store_true", help="the election-only demo (no PostgreSQL)")
    d.set_defaults(fn=cmd_demo)

    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.fn(args))
    except TenureError as e:
        print(f"tenure: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tenure: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
