"""Jobs that must run on exactly one node (solr-updater, importers, cron), with fenced checkpoints.

::

    with singleton(client, "solr-updater", member="ol-home1") as job:
        offset = job.checkpoint().get(default=0)
        while not job.stopped:
            batch, end = read_log(offset)
            with job.checkpoint().covering(end):  # saved only if the block succeeds
                post_to_solr(batch)
            offset = end

:func:`singleton` campaigns (blocking until this member leads), runs the body
while the term lasts and resigns on exit. When the term ends -- lease lost,
etcd out of reach past the local deadline, a pause longer than the ttl --
:attr:`Job.stopped` turns True and :attr:`Job.stop_event` is set; the body is
expected to notice. A body that cannot be trusted to notice is run as a
subprocess by ``tenure run-singleton -- CMD ...`` (:func:`run_command`),
which kills it after a bound.

Checkpoints live in etcd (``svc/<service>/checkpoints/<name>``) and are
written through the term's fence: etcd accepts the write only while the
writer's term is the current one, so a deposed job -- even one that was
frozen mid-write -- cannot move them, and the next holder resumes from the
last checkpoint a valid term wrote. At least once is the easy path:
:meth:`Checkpoint.covering` saves the new value only after the work it
covers returned without an exception; a failed post leaves the checkpoint
where it was, and the work is done again by whoever holds the job next.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, Sequence, TypeVar

from . import records
from .election import Election, Leadership
from .errors import ConfigError, EtcdError, Fenced, MalformedRecord, NotLeader
from .etcd import Client
from .fencing import etcd_put
from .records import CheckpointRecord

log = logging.getLogger("tenure.singleton")

T = TypeVar("T")

ENV_SERVICE = "TENURE_SINGLETON_SERVICE"
ENV_MEMBER = "TENURE_SINGLETON_MEMBER"
ENV_TOKEN = "TENURE_SINGLETON_TOKEN"


class Checkpoint:
    """One named checkpoint of a job; obtain with :meth:`Job.checkpoint`."""

    def __init__(self, job: "Job", name: str) -> None:
        self.job = job
        self.name = name
        self.key = records.checkpoint_key(job.service, name)

    def record(self) -> CheckpointRecord | None:
        """The stored record, or None if there is none (raises MalformedRecord for a corrupt one)."""
        kv = self.job.client.get(self.key)
        return None if kv is None else CheckpointRecord.decode(kv.value)

    def get(self, default: Any = None) -> Any:
        """The last saved value, or ``default`` if none was ever saved."""
        rec = self.record()
        return default if rec is None else rec.value

    def save(self, value: Any) -> None:
        """Store ``value`` through the fence; raises NotLeader or Fenced (and stops the job) if the term is over."""
        try:
            raw = json.dumps(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"a checkpoint value must be JSON-serialisable: {e}") from None
        rec = CheckpointRecord(json.loads(raw), self.job.token, self.job.member, time.time())
        try:
            self.job.put(self.key, rec.encode())
        except (NotLeader, Fenced) as e:
            log.warning("%s/%s: checkpoint %s refused: %s", self.job.service, self.job.member, self.name, e)
            self.job.stop_event.set()
            raise

    @contextlib.contextmanager
    def covering(self, value: Any) -> Iterator[None]:
        """``with cp.covering(new_offset): do_the_work()`` saves ``new_offset`` only if the work succeeded."""
        if self.job.stopped:
            raise NotLeader(f"{self.job.member} no longer runs {self.job.service}")
        yield
        self.save(value)


class Job:
    """A running singleton: its term (``token``), its stop signal and its checkpoints."""

    def __init__(self, client: Client, service: str, member: str, token: int,
                 put: Callable[[str, bytes], Any], valid: Callable[[], bool]) -> None:
        self.client = client
        self.service = service
        self.member = member
        self.token = token
        self.put = put
        self._valid = valid
        self.stop_event = threading.Event()

    @classmethod
    def of(cls, client: Client, leadership: Leadership) -> "Job":
        """The job of a term won in this process."""
        job = cls(client, leadership.service, leadership.member, leadership.token,
                  lambda key, value: leadership.put(key, value), leadership.is_valid)
        leadership.on_lost(lambda _l: job.stop_event.set())
        return job

    @classmethod
    def from_env(cls, client: Client) -> "Job":
        """The job of a command started by ``tenure run-singleton`` (its term comes in the environment).

        The parent watches the term and stops the command when it ends; the
        fence stops every checkpoint the command writes after that.
        """
        try:
            service, member, token = os.environ[ENV_SERVICE], os.environ[ENV_MEMBER], int(os.environ[ENV_TOKEN])
        except (KeyError, ValueError):
            raise ConfigError(f"not started by tenure run-singleton: {ENV_SERVICE}, {ENV_MEMBER} and "
                              f"{ENV_TOKEN} must be set") from None
        job = cls(client, service, member, records.check_token(token),
                  lambda key, value: etcd_put(client, service, token, key, value), lambda: True)
        signal.signal(signal.SIGTERM, lambda *_: job.stop_event.set())
        return job

    @property
    def stopped(self) -> bool:
        """True once the job must stop: its term ended, a checkpoint was refused, or :meth:`stop` was called."""
        return self.stop_event.is_set() or not self._valid()

    def stop(self) -> None:
        self.stop_event.set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking early when the job must stop; True if it must."""
        self.stop_event.wait(seconds)
        return self.stopped

    def checkpoint(self, name: str = "default") -> Checkpoint:
        return Checkpoint(self, name)


@contextlib.contextmanager
def singleton(client: Client, service: str, *, member: str, ttl: int = 2, timeout: float | None = None,
              value: dict[str, Any] | None = None) -> Iterator[Job]:
    """Campaign for ``service``, yield the :class:`Job` once this member leads, resign on exit."""
    election = Election(client, service, member=member, ttl=ttl, value=value)
    try:
        leadership = election.campaign(timeout)
        log.info("%s/%s: running (term %d)", service, member, leadership.token)
        try:
            yield Job.of(client, leadership)
        finally:
            leadership.resign()
    finally:
        election.close()


def singleton_job(client: Client, service: str, *, member: str, ttl: int = 2,
                  timeout: float | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: ``@singleton_job(client, "importbot", member=host)`` makes ``f(job, ...)`` run as the singleton."""

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> T:
            with singleton(client, service, member=member, ttl=ttl, timeout=timeout) as job:
                return fn(job, *args, **kwargs)

        return run

    return decorate


# -- tenure run-singleton -------------------------------------------------------------


def resolve_command(argv: Sequence[str]) -> str:
    """The executable ``argv[0]`` names, or ConfigError (before anything is started)."""
    if not argv:
        raise ConfigError("run-singleton needs a command after '--'")
    found = shutil.which(argv[0])
    if found is None:
        raise ConfigError(f"command not found: {argv[0]!r}")
    return found


class Runner:
    """``tenure run-singleton``: campaign, run the command while leading, kill it after ``kill_after`` once the term ends."""

    def __init__(self, client: Client, service: str, member: str, argv: Sequence[str], *, ttl: int = 2,
                 kill_after: float = 10.0, once: bool = False, endpoints: str = "", namespace: str = "/tenure") -> None:
        self.executable = resolve_command(argv)
        if kill_after < 0:
            raise ConfigError(f"kill_after must be >= 0, got {kill_after}")
        self.client = client
        self.argv = list(argv)
        self.kill_after = kill_after
        self.once = once
        self.env = {"TENURE_ENDPOINTS": endpoints, "TENURE_NAMESPACE": namespace}
        self.election = Election(client, service, member=member, ttl=ttl)
        self.leadership: Leadership | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self._stop = threading.Event()

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.poll() is None

    def stop(self) -> None:
        self._stop.set()

    def snapshot(self) -> dict[str, Any]:
        lead = self.leadership
        return {"service": self.election.service, "member": self.election.member,
                "leading": lead is not None and lead.is_valid(), "token": lead.token if lead else None,
                "running": self.running, "pid": self.child.pid if self.running and self.child else None,
                "runs": self.runs}

    def run(self) -> int:
        """Until stopped (or, with ``once``, until the command exits): the command's last exit status."""
        code = 0
        try:
            while not self._stop.is_set():
                try:
                    leadership = self.election.campaign(timeout=0.5)
                except (EtcdError, TimeoutError):
                    continue
                self.leadership = leadership
                code, finished = self._run_term(leadership)
                self.leadership = None
                if finished and self.once:
                    break
        finally:
            self.election.close()
        return code

    def _run_term(self, leadership: Leadership) -> tuple[int, bool]:
        env = {**os.environ, **self.env, ENV_SERVICE: leadership.service, ENV_MEMBER: leadership.member,
               ENV_TOKEN: str(leadership.token)}
        self.child = subprocess.Popen([self.executable, *self.argv[1:]], env=env, start_new_session=True,
                                      preexec_fn=_die_with_parent)
        self.runs += 1
        log.info("%s/%s: term %d: started %s (pid %d)", leadership.service, leadership.member,
                 leadership.token, self.argv[0], self.child.pid)
        while self.child.poll() is None and leadership.is_valid() and not self._stop.is_set():
            leadership.lost.wait(0.05)
        if self.child.poll() is not None:
            code = self.child.returncode
            log.info("%s: command exited with %s; resigning", leadership.service, code)
            leadership.resign()
            return code, True
        why = "stopping" if self._stop.is_set() else f"term ended ({leadership.reason or 'deadline passed'})"
        self._kill_child(why)
        leadership.resign()
        return self.child.returncode, False

    def _kill_child(self, why: str) -> None:
        child = self.child
        assert child is not None
        log.warning("%s: %s: stopping the command (SIGTERM, SIGKILL after %g s)", self.election.service, why,
                    self.kill_after)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)
        try:
            child.wait(self.kill_after)
        except subprocess.TimeoutExpired:
            log.warning("%s: the command ignored SIGTERM for %g s: SIGKILL", self.election.service, self.kill_after)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the runner dies (kill -9 of the runner must not leave it running)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def serve_health(runner: Runner, address: tuple[str, int]) -> ThreadingHTTPServer:
    """``/health`` (200 while the runner lives), ``/primary`` (200 while it leads and the command runs), ``/status``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            snap = runner.snapshot()
            path = self.path.split("?")[0].rstrip("/")
            if path == "/health":
                code = 200
            elif path in ("/primary", "/leader"):
                code = 200 if snap["leading"] and snap["running"] else 503
            elif path == "/status":
                code = 200
            else:
                code, snap = 404, {"error": "not found"}
            body = (json.dumps(snap) + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(address, Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="tenure-singleton-http", daemon=True).start()
    return server


def read_checkpoint(client: Client, service: str, name: str = "default") -> CheckpointRecord | None:
    """The stored checkpoint of ``service`` (for tools and tests), None if none; None too for a corrupt one."""
    kv = client.get(records.checkpoint_key(service, name))
    if kv is None:
        return None
    try:
        return CheckpointRecord.decode(kv.value)
    except MalformedRecord as e:
        log.warning("%s: %s", service, e)
        return None
