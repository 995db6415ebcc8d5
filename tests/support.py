"""Helpers for tests: waiting with deadlines, candidate processes, a throwaway PostgreSQL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from tenure.localetcd import free_ports

PG_BIN = os.environ.get("TENURE_PG_BIN", "/usr/lib/postgresql/15/bin")


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``cond`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class CandidateProc:
    """A ``python -m tenure._candidate`` process and the events it printed."""

    def __init__(self, endpoints: list[str], service: str, member: str, *, ttl: float = 2,
                 pg: str | None = None, observe: bool = False) -> None:
        cmd = [sys.executable, "-m", "tenure._candidate", "--endpoints", ",".join(endpoints),
               "--service", service, "--member", member, "--ttl", str(ttl)]
        if pg:
            cmd += ["--pg", pg]
        if observe:
            cmd.append("--observe")
        self.member = member
        self.killed_at = float("inf")
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
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
            with_suppress(lambda: os.killpg(self.proc.pid, signal.SIGCONT))
            self.killed_at = min(self.killed_at, time.monotonic())
            with_suppress(lambda: os.killpg(self.proc.pid, signal.SIGKILL))
        self.proc.wait(10)


def with_suppress(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except (ProcessLookupError, PermissionError):
        pass


def current_leaders(cands: list[CandidateProc]) -> list[CandidateProc]:
    """Candidates whose last elected/lost event says they lead."""
    out = []
    for c in cands:
        evs = [e for e in list(c.events) if e["ev"] in ("elected", "lost")]
        if evs and evs[-1]["ev"] == "elected" and c.proc.poll() is None:
            out.append(c)
    return out


def terms(cands: list[CandidateProc]) -> list[tuple[int, str, float, float]]:
    """Every term seen: (token, member, start, end of validity; inf while it lasts)."""
    out = []
    for c in cands:
        open_: dict[int, dict[str, Any]] = {}
        for e in list(c.events):
            if e["ev"] == "elected":
                open_[e["token"]] = e
            elif e["ev"] == "lost" and e["token"] in open_:
                s = open_.pop(e["token"])
                out.append((e["token"], c.member, s["t"], min(e["t"], e["valid_until"])))
        for tok, s in open_.items():
            out.append((tok, c.member, s["t"], c.killed_at))
    return sorted(out)


def assert_one_writer(cands: list[CandidateProc]) -> list[tuple[int, str, float, float]]:
    """Terms never overlap in time, and tokens grow with time."""
    ts = terms(cands)
    by_start = sorted(ts, key=lambda t: t[2])
    for a, b in zip(by_start, by_start[1:]):
        assert a[3] <= b[2], f"terms overlap: {a} and {b}"
        assert a[0] < b[0], f"token did not grow: {a} then {b}"
    assert len({t[0] for t in ts}) == len(ts), f"a token repeated: {ts}"
    return ts


class LocalPostgres:
    """One PostgreSQL 15 server on loopback, run as the ``postgres`` user (it refuses root)."""

    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="tenure-pg-")
        os.chmod(self.base, 0o755)
        self.data = os.path.join(self.base, "data")
        self.port = free_ports(1)[0]
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def start(self) -> "LocalPostgres":
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        run = lambda *a: subprocess.run(self._as + list(a), check=True, capture_output=True, text=True)  # noqa: E731
        run(f"{PG_BIN}/initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--locale=C.UTF-8", "--no-sync")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(f"listen_addresses = '127.0.0.1'\nunix_socket_directories = '{self.base}'\nfsync = off\n")
        run(f"{PG_BIN}/pg_ctl", "-D", self.data, "-l", os.path.join(self.base, "log"),
            "-o", f"-p {self.port}", "-w", "start")
        return self

    def stop(self) -> None:
        subprocess.run(self._as + [f"{PG_BIN}/pg_ctl", "-D", self.data, "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
