"""examples/openlibrary/: every config through the real parsers, and both migration phases end to end.

The end-to-end test starts etcd from the example member files, a 3-node
PostgreSQL cluster whose sidecars run with the example sidecar settings, the
example haproxy.cfg pointed at it, and the example web.py app
(``examples/openlibrary/olapp.py``, database objects built once at import as
Open Library builds them, psycopg2) under real gunicorn sync workers, once per
phase: phase 1 through haproxy with the 503 processor, phase 2 through
``tenure.web.webpy``. Under load it kills the primary (kill -9 of sidecar and
postmaster), waits for the new primary, then has the new primary's sidecar
hand over cleanly (SIGTERM), and checks what every client saw.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import tomllib
from typing import Any, Iterator

import pytest
import yaml

from tenure.errors import ConfigError
from tenure.lab.etcd import etcd_binary
from tenure.lab.wait import wait_for
from tenure.lab.openlibrary import (Haproxy, Load, OpenLibraryLab, Target, first_write, post_gap, render_haproxy,
                                    run_faults, served_by, streams)
from tenure.sidecar.config import parse_config
from tenure.web import Router
from tenure.web.webpy import web_settings

from support import PG_BIN, LocalPostgres

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples", "openlibrary")
HOSTS = ["ol-db0", "ol-db1", "ol-db3"]


def read(*parts: str) -> str:
    with open(os.path.join(EXAMPLES, *parts)) as f:
        return f.read()


def test_every_example_config_loads_through_the_real_parsers(postgres: LocalPostgres, tmp_path: Any) -> None:
    # Sidecars: tenure's own parser (the data directory must be a real one: point it at a local server's).
    for host in HOSTS:
        data = tomllib.loads(read(f"sidecar-{host}.toml"))
        data["postgres"].update(data_dir=postgres.node.data_dir, bin_dir=PG_BIN)
        cfg = parse_config(data)
        assert cfg.member == host and cfg.service == "db" and cfg.ttl == 2
        assert cfg.postgres.guard_schema == "public" and "host=" in (cfg.postgres.advertise_dsn or "")
    zones = {tomllib.loads(read(f"sidecar-{h}.toml"))["zone"] for h in HOSTS}
    assert len(zones) == 2, "the database hosts span two sites"

    # haproxy: its own checker, on the file as shipped (only the stats socket moved) and as pointed at a lab.
    text = read("haproxy.cfg")
    shipped = tmp_path / "shipped.cfg"
    shipped.write_text(text.replace("/run/haproxy/admin.sock", str(tmp_path / "s.sock")))
    check = subprocess.run([shutil.which("haproxy") or "/usr/sbin/haproxy", "-c", "-f", str(shipped)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for needed in ("fall 1", "option redispatch 1", "timeout connect 300ms", "backup track ol_db_readable/"):
        assert needed in text
    with pytest.raises(KeyError):  # a server the lab did not map is not silently kept
        render_haproxy(text, {"ol-db0": Target("127.0.0.1", 1, 2)}, {"ol_db_primary": 1, "ol_db_replicas": 2}, "s")

    # etcd: every key is a flag of the etcd binary; three members, one per site, one initial cluster.
    flags = subprocess.run([etcd_binary(), "--help"], capture_output=True, text=True).stdout
    clusters = set()
    for name in sorted(os.listdir(os.path.join(EXAMPLES, "etcd"))):
        conf = yaml.safe_load(read("etcd", name))
        unknown = [k for k in conf if f"--{k} " not in flags and f"--{k}\n" not in flags and f"--{k}=" not in flags]
        assert not unknown, f"{name}: not etcd flags: {unknown}"
        clusters.add(conf["initial-cluster"])
    assert len(clusters) == 1 and len(next(iter(clusters)).split(",")) == 3

    # openlibrary.yml, phase 1: db_parameters point at the haproxy listeners.
    p1 = yaml.safe_load(read("openlibrary.phase1.yml"))
    assert f"bind 127.0.0.1:{p1['db_parameters']['port']}" in text.split("listen ol_db_replicas")[0]
    assert f"bind 127.0.0.1:{p1['read_db_parameters']['port']}" in text.split("listen ol_db_replicas")[1]
    # Phase 2: the tenure section through Router.from_config (file and mapping) and web_settings.
    path = os.path.join(EXAMPLES, "openlibrary.phase2.yml")
    router = Router.from_config(path, section="tenure")
    try:
        assert router.namespace == "/tenure" and router.stale_after == 4.0
    finally:
        router.close()
    s = web_settings(path, section="tenure")
    assert s.service == "db" and "POST /account/login" in s.allow
    assert {n: d.role for n, d in s.databases.items()} == {"db": "primary", "read_db": "reader"}
    Router.from_config(yaml.safe_load(read("openlibrary.phase2.yml"))["tenure"]).close()


def test_yaml_config_bad_input_is_a_clear_error(tmp_path: Any) -> None:
    good = yaml.safe_load(read("openlibrary.phase2.yml"))
    bad_yaml = tmp_path / "bad.yml"
    bad_yaml.write_text("tenure: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Router.from_config(str(bad_yaml), section="tenure")
    with pytest.raises(ConfigError, match="no 'tenure' table"):
        Router.from_config({"db_parameters": {}}, section="tenure")
    with pytest.raises(ConfigError, match="unknown section"):
        Router.from_config({**good["tenure"], "memcached": {}})
    with pytest.raises(ConfigError, match="endpoint"):
        Router.from_config({"etcd": {"endpoints": ["ftp://nowhere"]}})
    web = good["tenure"]["web"]
    for change, match in [({"databases": {"x": {"role": "writer"}}}, "role"),
                          ({"databases": {"x": {"driver": "mysql"}}}, "driver"),
                          ({"allow": ["POST /account/(login"]}, "bad regex"),
                          ({"allow": ["/account/login"]}, "method"),
                          ({"retry_after": "soon"}, "retry_after"),
                          ({"colour": "blue"}, "unknown key")]:
        with pytest.raises(ConfigError, match=match):
            web_settings({"web": {**web, **change}})


# -- end to end -------------------------------------------------------------------------------

@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[OpenLibraryLab]:
    lab = OpenLibraryLab(EXAMPLES, env={"OL_LOG_LEVEL": "INFO"})
    yield lab
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(lab.logs())
    lab.stop()


class PrimaryWatch:
    """Samples haproxy's write listener every 20 ms: the most servers it ever had UP at once."""

    def __init__(self, haproxy: Haproxy) -> None:
        self.haproxy, self.most, self.samples = haproxy, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                up = sum(1 for (px, _), st in self.haproxy.states().items() if px == "ol_db_primary" and st == "UP")
            except OSError:
                continue
            self.most, self.samples = max(self.most, up), self.samples + 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_both_phases_through_a_primary_crash_and_a_switchover(lab: OpenLibraryLab) -> None:
    assert lab.haproxy is not None
    lab.warm()
    workers = {phase: g.worker_pids() for phase, g in lab.apps.items()}
    assert all(len(p) == 3 for p in workers.values()), workers
    watch = PrimaryWatch(lab.haproxy)
    load = Load(streams(lab))
    try:
        wait_for(lambda: sum(r.status == 200 and r.method == "POST" for r in load.snapshot()) > 20, 30,
                   "writes flowing")
        events = run_faults(lab, load)
    finally:
        results = load.finish()
        watch.stop()

    for phase, g in lab.apps.items():
        assert g.worker_pids() == workers[phase], f"{phase}: a worker was restarted"
        rs = [r for r in results if r.app == phase]
        gets = [r for r in rs if r.method == "GET"]
        failed = [(r.path, r.status, round(r.start - events[0].at, 2), r.body[:120]) for r in gets if r.status != 200]
        assert not failed, f"{phase}: GETs not answered: {failed[:10]}"
        other = [(r.method, r.path, r.status, r.error) for r in rs if r.status not in (200, 503)]
        assert not other, f"{phase}: answers other than 200 and 503: {other[:10]}"
        assert all(r.retry_after for r in rs if r.status == 503), f"{phase}: a 503 without Retry-After"
        logins = [r for r in rs if r.path == "/account/login"]
        if phase == "phase2":  # allowlisted: answered through the gaps
            assert all(r.status == 200 for r in logins), f"{phase}: a login refused"
        writes = [r for r in rs if r.path.startswith("/items")]
        crash = events[0]
        assert any(r.status == 503 and crash.at < r.start < crash.published for r in writes), \
            f"{phase}: no write refused with 503 during the crash's gap"
        late = [r for r in writes if served_by(lab, r) == crash.old and r.end > crash.at + 0.5]
        assert not late, f"{phase}: writes acknowledged by the killed primary after the kill"
        for ev in events:
            # One writer, as the clients saw it: once the new primary acknowledged a write, no write
            # started later went to the old one.
            t = first_write(lab, results, phase, ev)
            stale = [r for r in writes if r.start > t and served_by(lab, r) == ev.old]
            assert not stale, f"{phase}: writes on {ev.old} after {ev.new} took over ({ev.kind})"
        n_ok = sum(r.status == 200 for r in gets)
        print(f"{phase}: GETs {n_ok}/{len(gets)} answered 200 "
              f"(max {max(r.end - r.start for r in gets):.3f} s); logins "
              f"{sum(r.status == 200 for r in logins)}/{len(logins)} 200; writes "
              f"{sum(r.status == 200 for r in writes)} ok, {sum(r.status == 503 for r in writes)} x 503")
        for ev in events:
            t = first_write(lab, results, phase, ev)
            print(f"  {ev.kind} {ev.old} -> {ev.new}: POST gap {post_gap(lab, results, phase, ev):.3f} s "
                  f"(new primary published {ev.published - ev.at:.3f} s after the fault; first write there "
                  f"{t - ev.published:+.3f} s after that)")
    print(f"haproxy write listener: at most {watch.most} server(s) UP at once over {watch.samples} samples")
    assert watch.most <= 1, "haproxy had two servers up in the write listener"
