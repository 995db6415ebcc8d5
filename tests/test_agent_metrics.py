"""Prometheus metrics of web workers under gunicorn (several sync workers): every scrape shows the sum over workers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

from tenure.lab.etcd import LocalEtcd, free_ports

from support import wait_for


def scrape(port: int) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Connection": "close"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def count(text: str, service: str) -> float:
    m = re.search(r'tenure_memcache_requests_total\{op="get",result="unsure",service="%s"\} ([0-9.e+]+)'
                  % re.escape(service), text)
    return float(m.group(1)) if m else 0.0


def test_cache_counters_add_up_over_gunicorn_workers(etcd: LocalEtcd, service: str, tmp_path: Path) -> None:
    prom = tmp_path / "prom"
    prom.mkdir()
    (tmp_path / "app.py").write_text(textwrap.dedent(f"""\
        import os
        from tenure.web import Router
        from tenure.web.metrics import metrics_app

        router = Router({list(etcd.endpoints)!r})
        cache = router.memcache({service!r}, first_wait=0)   # this service has no ring: every get is 'unsure'

        def app(environ, start_response):
            if environ["PATH_INFO"] == "/metrics":
                return metrics_app(environ, start_response)
            cache.get("key")
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [str(os.getpid()).encode()]
        """))
    (tmp_path / "gunicorn.conf.py").write_text("from tenure.web.metrics import child_exit  # noqa: F401\n")
    port = free_ports(1)[0]
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom)}
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "3", "-b", f"127.0.0.1:{port}", "--chdir",
                             str(tmp_path), "-c", str(tmp_path / "gunicorn.conf.py"), "app:app"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        def up() -> bool:
            try:
                scrape(port)
                return True
            except OSError:
                return False

        wait_for(up, 60, "gunicorn to answer")
        pids: set[str] = set()
        n = 90
        for _ in range(n):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/op", headers={"Connection": "close"})
            with urllib.request.urlopen(req, timeout=10) as r:
                pids.add(r.read().decode())
        assert len(pids) >= 2, "requests reached several workers"
        seen = {count(scrape(port), service) for _ in range(6)}
        assert seen == {float(n)}, f"every scrape shows all {n} requests, whichever worker answers: {seen}"
        # A worker that dies keeps its counts (counters do not go backwards).
        os.kill(int(next(iter(pids))), signal.SIGKILL)
        time.sleep(1.0)
        wait_for(up, 30, "gunicorn to answer after a worker died")
        assert count(scrape(port), service) == float(n)
        print(f"gunicorn multiprocess metrics: {n} requests over {len(pids)} workers; every scrape showed {n}")
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
