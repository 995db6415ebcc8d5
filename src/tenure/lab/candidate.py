"""A candidate (or observer) in its own process, for the demo, tests and benchmarks.

``python -m tenure.lab.candidate --endpoints URLS --service S --member M``
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
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from .. import connect
from ..election import Election, Leadership
from ..errors import TenureError
from ..fencing import etcd_put, install_pg_fence, pg_fence


class CandidateProcess:
    """The parent side: one ``python -m tenure.lab.candidate`` process and the events it printed."""

    def __init__(self, endpoints: list[str], service: str, member: str, *, ttl: float = 2,
                 pg: str | None = None, observe: bool = False, stderr: Any = None) -> None:
        cmd = [sys.executable, "-m", "tenure.lab.candidate", "--endpoints", ",".join(endpoints),
               "--service", service, "--member", member, "--ttl", str(ttl)]
        if pg:
            cmd += ["--pg", pg]
        if observe:
            cmd.append("--observe")
        self.member = member
        self.killed_at = float("inf")
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                     text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()

    def wait_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str,
                   start: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events[start:]:
                    if pred(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.member}: timed out after {timeout} s waiting for {what}; "
                                         f"last events: {self.events[-5:]}")
                self._cond.wait(min(left, 0.1))

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def request(self, command: str, timeout: float = 10) -> dict[str, Any]:
        start = len(self.events)
        self.send(command)
        return self.wait_event(lambda e: e["ev"] == "reply" and e["cmd"] == command, timeout,
                               f"reply to {command}", start)

    def signal(self, sig: int) -> None:
        if sig == signal.SIGKILL:
            self.killed_at = time.monotonic()  # a killed leader's term ends here at the latest
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            _suppress(lambda: os.killpg(self.proc.pid, signal.SIGCONT))
            self.killed_at = min(self.killed_at, time.monotonic())
            _suppress(lambda: os.killpg(self.proc.pid, signal.SIGKILL))
        self.proc.wait(10)


def _suppress(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except (ProcessLookupError, PermissionError):
        pass


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
    p = argparse.ArgumentParser(prog="python -m tenure.lab.candidate")
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
            try:
                leadership = election.campaign()
            except TenureError as e:
                # campaign() raises what waiting cannot fix; a candidate process keeps standing regardless,
                # and says why it had to start over.
                logging.getLogger("tenure.lab").warning("%s: campaign failed (%s: %s); campaigning again",
                                                        args.member, type(e).__name__, e)
                time.sleep(0.1)
                continue
            held.append(leadership)  # before telling anyone, so a 'resign' right after finds it
            emit(ev="elected", member=args.member, token=leadership.token, t=time.monotonic(),
                 deadline=leadership.deadline)
            commands.put("")  # wake the main loop
            leadership.lost.wait()
            if leadership.reason == "resigned":
                # Stand aside until someone else leads, so a resign really hands over.
                moved = threading.Event()
                stop = election.on_change(lambda info: info is not None and info.token > leadership.token
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
        for leadership in list(held):
            if leadership.lost.is_set() and leadership.token not in reported:
                reported.add(leadership.token)
                emit(ev="lost", member=args.member, token=leadership.token, reason=leadership.reason,
                     t=time.monotonic(), valid_until=leadership.deadline)
        if cmd == "quit":
            return 0
        if cmd == "resign" and last is not None:
            last.resign()
            emit(ev="reply", cmd="resign", t=time.monotonic())
        elif cmd == "write":
            emit(ev="reply", cmd="write", **_write(args, client, last))


if __name__ == "__main__":
    sys.exit(main())
