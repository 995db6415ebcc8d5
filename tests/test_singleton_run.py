"""tenure run-singleton: one command runs; a command that ignores SIGTERM is killed after the bound; bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from tenure.lab.etcd import free_ports

from support import wait_for


def _runner(etcd, service: str, member: str, port: int, *cmd: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tenure.cli", "--endpoints", ",".join(etcd.endpoints),
                             "run-singleton", "--service", service, "--member", member, "--kill-after", "1",
                             "--listen", f"127.0.0.1:{port}", "--", *cmd],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _status(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=1) as r:
            return json.loads(r.read())
    except OSError:
        return {}


def test_one_command_runs_and_a_stubborn_one_is_killed_after_the_bound(etcd, service, tmp_path):
    stubborn = "trap '' TERM; while true; do sleep 0.05; done"
    ports = free_ports(2)
    a = _runner(etcd, service, "a", ports[0], "sh", "-c", stubborn)
    b = None
    try:
        wait_for(lambda: _status(ports[0]).get("running"), 20, "a's command to run")
        b = _runner(etcd, service, "b", ports[1], "sh", "-c", stubborn)
        wait_for(lambda: _status(ports[1]).get("member") == "b", 20, "b to serve /status")
        assert not _status(ports[1])["running"]
        pid = _status(ports[0])["pid"]
        os.killpg(a.pid, signal.SIGTERM)  # the runner stops; its command ignores SIGTERM
        t0 = time.monotonic()
        a.wait(20)
        assert time.monotonic() - t0 < 10
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        wait_for(lambda: _status(ports[1]).get("running"), 20, "b's command to take over")
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


def test_a_command_that_does_not_exist(etcd, client, service):
    r = subprocess.run([sys.executable, "-m", "tenure.cli", "--endpoints", ",".join(etcd.endpoints),
                        "run-singleton", "--service", service, "--", "no-such-command-xyz"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "command not found: 'no-such-command-xyz'" in r.stderr
    assert client.get_prefix(f"svc/{service}/")[0] == []
