"""Network-namespace hosts: addresses reach each other, cuts drop traffic (both ways or one), heal and cleanup."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tenure.lab import netns
from tenure.lab.netns import Network

SERVER = ("import socket\ns = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind(('0.0.0.0', 7000)); s.listen()\nwhile True:\n    c, _ = s.accept(); c.sendall(b'hi'); c.close()\n")
PROBE = ("import socket, sys\ntry:\n    s = socket.create_connection((sys.argv[1], 7000), timeout=0.5)\n"
         "    print(s.recv(2).decode())\nexcept OSError:\n    print('cut')\n")


def probe(net: Network, src: str, dst: str) -> str:
    return net.run(src, [sys.executable, "-c", PROBE, net.address(dst)], timeout=10).stdout.strip()


@pytest.fixture
def net():
    n = Network().create(["a", "b", "c"])
    servers = [n.popen(h, [sys.executable, "-c", SERVER]) for h in ("a", "b")]
    try:
        for h in ("a", "b"):
            for _ in range(50):
                if probe(n, "c", h) == "hi":
                    break
        yield n
    finally:
        n.close()
        for s in servers:
            s.wait(10)


def test_cut_both_ways_one_way_and_heal(net):
    assert probe(net, "c", "a") == "hi" and probe(net, "a", "b") == "hi"
    net.cut(["a"], ["c"])
    assert probe(net, "c", "a") == "cut" and probe(net, "c", "b") == "hi"
    net.heal()
    assert probe(net, "c", "a") == "hi"
    assert net.rules("a").count("DROP") == 0
    net.cut(["a"], ["c"], direction="in")  # a hears nothing from c: c's SYN is dropped
    assert probe(net, "c", "a") == "cut"
    net.heal()
    net.isolate(["b"])
    assert probe(net, "c", "b") == "cut" and probe(net, "a", "b") == "cut" and probe(net, "c", "a") == "hi"
    net.heal()
    assert probe(net, "a", "b") == "hi"


def test_close_kills_processes_and_removes_namespaces():
    n = Network().create(["x"])
    proc = n.popen("x", [sys.executable, "-c", "import time; time.sleep(60)"])
    names = [h.ns for h in n.hosts.values()] + [n.hub]
    n.close()
    assert proc.wait(10) == -9
    assert not any(os.path.exists(f"{netns.NETNS_DIR}/{ns}") for ns in names)


def test_leftovers_of_a_crashed_run_are_removed():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    n = Network(run_id=f"{netns.PREFIX}{dead}xdead").create(["y"])
    sleeper = n.popen("y", ["sleep", "60"])
    names = [h.ns for h in n.hosts.values()] + [n.hub]
    gone = netns.remove_leftovers()
    assert set(names) <= set(gone)
    assert sleeper.wait(10) == -9
