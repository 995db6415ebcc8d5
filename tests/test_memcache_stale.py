"""No stale reads from a no-expiry cache through real faults: 3 memcached, their registrars, several client processes.

Each memcached has its registrar running as ``tenure sidecar --config`` with
a ``[memcache]`` section. One client process writes versioned values without
expiry, as Open Library's write-through cache does, and records each version
once ``set`` acknowledged it; every client process (the writer's too) reads
keys at random and checks each value it gets against the newest version
acknowledged *before the read began*. Meanwhile the test, round after round
on the same servers: freezes a whole server host (memcached and registrar)
past the lease, freezes one briefly (under the lease), freezes a memcached
alone briefly (its registrar withdraws it), and kills one with SIGKILL and
restarts it empty.

Run as a script, this file is one client process (``client ...``).
"""

from __future__ import annotations

import json
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

HERE = Path(__file__).resolve().parent
KEYS = 64
HOT = 32
TTL = 2


# -- the client processes ---------------------------------------------------------------------------


def client_main(endpoints: str, service: str, role: str, shared: str, stop_file: str, seed: int) -> None:
    from prometheus_client import REGISTRY

    from tenure.web import Router

    router = Router(endpoints.split(","))
    mc = router.memcache(service)
    fd = os.open(shared, os.O_RDWR)
    acked = mmap.mmap(fd, KEYS * 8)
    rnd = random.Random(seed)
    versions = [0] * KEYS
    checked = stale = hits = misses = acks = fails = multi = 0
    examples: list[dict[str, Any]] = []
    writer = role == "writer"

    def check(i: int, floor: int, value: Any) -> None:
        nonlocal checked, stale, hits, misses
        if value is None:
            misses += 1
            return
        hits += 1
        checked += 1
        version = int(str(value).split(":", 1)[0])
        if version < floor:
            stale += 1
            if len(examples) < 20:
                examples.append({"key": i, "got": version, "acked": floor, "t": time.time(),
                                 "server": mc.server_for(f"k{i}")})

    deadline = time.monotonic() + 60
    while mc.ring() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    Path(f"{stop_file}.ready.{seed}").touch()
    n = 0
    while not os.path.exists(stop_file):
        n += 1
        if writer:
            # Half the keys are hot (rewritten within milliseconds), half cold (every few seconds): copies of
            # cold keys left on a fallback server outlive the settle window, so old copies are there to refuse.
            i = n % HOT if n % 100 else HOT + (n // 100) % (KEYS - HOT)
            versions[i] += 1
            if mc.set(f"k{i}", f"{versions[i]}:{'x' * 100}"):
                struct.pack_into("<q", acked, i * 8, versions[i])
                acks += 1
            else:
                fails += 1
        if n % 10 == 0:
            idx = rnd.sample(range(KEYS), 5)
            floors = [struct.unpack_from("<q", acked, i * 8)[0] for i in idx]
            got = mc.get_multi([f"k{i}" for i in idx])
            multi += 1
            for i, floor in zip(idx, floors):
                check(i, floor, got.get(f"k{i}"))
        else:
            i = rnd.randrange(KEYS)
            floor = struct.unpack_from("<q", acked, i * 8)[0]
            check(i, floor, mc.get(f"k{i}"))
        if not writer:
            time.sleep(0.0005)
    counts = {}
    for op in ("get", "set"):
        for result in ("hit", "miss", "stale", "down", "unsure", "stored", "not_stored"):
            v = REGISTRY.get_sample_value("tenure_memcache_requests_total",
                                          {"service": service, "op": op, "result": result})
            if v:
                counts[f"{op}.{result}"] = int(v)
    print(json.dumps({"role": role, "checked": checked, "stale": stale, "hits": hits, "misses": misses,
                      "acks": acks, "fails": fails, "multi": multi, "counts": counts, "examples": examples,
                      "epoch": mc.ring().epoch if mc.ring() else None}), flush=True)
    router.close()


# -- the test -----------------------------------------------------------------------------------------


class Host:
    """One memcached server and its registrar (``tenure sidecar --config``), frozen or killed together or apart."""

    def __init__(self, etcd: Any, service: str, member: str, slot: int, workdir: Path) -> None:
        from tenure.lab.memcached import LocalMemcached

        self.member = member
        self.server = LocalMemcached().start()
        self.config = workdir / f"{member}.toml"
        self.config.write_text(
            f'service = "{service}"\nmember = "{member}"\nttl = {TTL}\n\n'
            f'[etcd]\nendpoints = {json.dumps(etcd.endpoints)}\n\n'
            f'[memcache]\nport = {self.server.port}\nslot = {slot}\n')
        self.log = open(workdir / f"{member}.log", "wb")
        self.registrar = subprocess.Popen(
            [sys.executable, "-m", "tenure", "-v", "sidecar", "--config", str(self.config)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def freeze(self, registrar: bool = True) -> None:
        self.server.freeze()
        if registrar:
            self.registrar.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.registrar.send_signal(signal.SIGCONT)
        self.server.thaw()

    def stop(self) -> None:
        self.thaw()
        self.registrar.terminate()
        try:
            self.registrar.wait(10)
        except subprocess.TimeoutExpired:
            self.registrar.kill()
            self.registrar.wait(10)
        self.server.kill()
        self.log.close()


@pytest.fixture
def hosts(etcd: Any, service: str, tmp_path: Path) -> Iterator[list[Host]]:
    hs = [Host(etcd, service, f"m{i}", i, tmp_path) for i in range(3)]
    yield hs
    for h in hs:
        h.stop()


def ring_state(client: Any, service: str) -> tuple[int, list[str]]:
    from tenure import records

    kvs, _ = client.get_prefix(records.ring_prefix(service))
    if not kvs:
        return 0, []
    latest = records.RingRecord.decode(kvs[-1].value)
    return latest.epoch, [s.member for s in latest.live]


def test_no_stale_reads_through_freezes_kills_and_restarts(etcd: Any, client: Any, service: str,
                                                          hosts: list[Host], tmp_path: Path) -> None:
    from support import wait_for

    all_live = ["m0", "m1", "m2"]
    wait_for(lambda: ring_state(client, service)[1] == all_live, 15, "all three members in the ring")
    epoch0 = ring_state(client, service)[0]
    shared = tmp_path / "acked"
    shared.write_bytes(b"\0" * (KEYS * 8))
    stop_file = tmp_path / "stop"
    procs = [subprocess.Popen([sys.executable, __file__, "client", ",".join(etcd.endpoints), service, role,
                               str(shared), str(stop_file), str(seed)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed, role in enumerate(["writer", "reader", "reader"])]
    timeline: list[tuple[str, float]] = []

    def note(what: str) -> None:
        timeline.append((what, time.monotonic()))

    def ring_back() -> None:
        wait_for(lambda: ring_state(client, service)[1] == all_live, 20, "the ring whole again")

    try:
        wait_for(lambda: all(os.path.exists(f"{stop_file}.ready.{i}") for i in range(len(procs))), 90,
                 "the client processes to start")
        time.sleep(1.5)  # the writer fills the cache; readers start hitting
        for rnd in range(2):
            for victim in (hosts[1], hosts[2]):
                # A whole host frozen past the lease: its record expires, its keys move; then it comes back.
                note(f"round {rnd}: freeze {victim.member} past the lease")
                victim.freeze()
                wait_for(lambda: victim.member not in ring_state(client, service)[1], TTL + 3,
                         f"{victim.member} out of the ring")
                time.sleep(0.5)  # writes land on the other servers meanwhile
                victim.thaw()
                ring_back()
                time.sleep(0.7)
            # Briefly frozen, under the lease: no ring change, its keys miss (and their writes fail) meanwhile.
            note(f"round {rnd}: freeze m1 for 0.7 s")
            hosts[1].freeze()
            time.sleep(0.7)
            hosts[1].thaw()
            time.sleep(0.7)
            # memcached alone frozen briefly: its registrar's check fails and withdraws it, then it rejoins.
            note(f"round {rnd}: freeze memcached m2 alone for 1.2 s")
            hosts[2].freeze(registrar=False)
            time.sleep(1.2)
            hosts[2].thaw()
            ring_back()
            time.sleep(0.7)
            # kill -9 and an empty restart on the same port.
            note(f"round {rnd}: kill -9 m1, restart empty")
            hosts[1].server.kill()
            wait_for(lambda: "m1" not in ring_state(client, service)[1], TTL + 3, "m1 out of the ring")
            time.sleep(0.3)
            hosts[1].server.start()
            ring_back()
            time.sleep(0.7)
    finally:
        stop_file.write_text("stop")
        outs = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            outs.append((p.returncode, out, err))
    results = []
    for rc, out, err in outs:
        assert rc == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    epoch1 = ring_state(client, service)[0]
    checked = sum(r["checked"] for r in results)
    stale = sum(r["stale"] for r in results)
    refused = sum(r["counts"].get("get.stale", 0) for r in results)
    writer = results[0]
    print(f"memcached stale-read test: {len(results)} client processes, {epoch1 - epoch0} ring changes, "
          f"{writer['acks']} acknowledged writes ({writer['fails']} not acknowledged), {checked} reads checked "
          f"({sum(r['misses'] for r in results)} misses), {stale} stale; {refused} old copies refused by the "
          f"epoch check; per client: " + "; ".join(f"{r['role']} {r['checked']} checked {r['counts']}"
                                                   for r in results))
    assert stale == 0, [r["examples"] for r in results]
    assert epoch1 - epoch0 >= 12, "every fault that should change the ring did"
    assert writer["acks"] > 100 and all(r["checked"] > 100 for r in results), "the test saw real traffic"


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "client":
    client_main(*sys.argv[2:7], int(sys.argv[7]))
