"""Watches survive member deaths, frozen members and compaction, and never stop silently."""

from __future__ import annotations

import signal
import subprocess
import threading

import tenure
from tenure.etcd import Event, KeyValue, Watch
from tenure.lab.etcd import LocalEtcd, etcd_binary

from support import wait_for


class Recorder:
    def __init__(self) -> None:
        self.snapshots: list[tuple[list[str], int]] = []
        self.events: list[Event] = []
        self.lock = threading.Lock()

    def on_snapshot(self, kvs: list[KeyValue], revision: int) -> None:
        with self.lock:
            self.snapshots.append(([kv.key for kv in kvs], revision))

    def on_events(self, events: list[Event]) -> None:
        with self.lock:
            self.events.extend(events)

    def put_keys(self) -> list[str]:
        with self.lock:
            return [e.kv.key for e in self.events if e.type == "put"]


def test_watch_resumes_without_loss_or_duplicates_after_member_kill(healthy_etcd: LocalEtcd, service: str) -> None:
    watcher = tenure.connect(healthy_etcd.endpoints)
    writer = tenure.connect(healthy_etcd.endpoints)
    rec = Recorder()
    w = watcher.watch(f"{service}/", prefix=True, on_snapshot=rec.on_snapshot, on_events=rec.on_events)
    try:
        wait_for(w.connected.is_set, 10, "watch connected")
        writer.put(f"{service}/a", "1")
        wait_for(lambda: rec.put_keys() == [f"{service}/a"], 5, "first event")
        healthy_etcd.kill(watcher._current)  # the member this watch streams from
        expected = [f"{service}/a"] + [f"{service}/k{i}" for i in range(20)]
        for key in expected[1:]:
            writer.put(key, "x")
        wait_for(lambda: rec.put_keys() == expected, 15, "every event exactly once, in order")
        assert len(rec.snapshots) == 1
    finally:
        w.cancel()
        w.join(5)
        watcher.close()
        writer.close()
    assert not w._thread.is_alive()


def test_watch_notices_a_frozen_member(healthy_etcd: LocalEtcd, service: str) -> None:
    watcher = tenure.connect(healthy_etcd.endpoints)
    writer = tenure.connect(healthy_etcd.endpoints)
    rec = Recorder()
    w = watcher.watch(f"{service}/", prefix=True, on_snapshot=rec.on_snapshot, on_events=rec.on_events)
    frozen = None
    try:
        wait_for(w.connected.is_set, 10, "watch connected")
        frozen = healthy_etcd.members[watcher._current]
        assert frozen.proc is not None
        frozen.proc.send_signal(signal.SIGSTOP)  # alive but silent: only the progress check can tell
        writer_index = (watcher._current + 1) % 3
        writer.close()
        writer = tenure.connect(healthy_etcd.members[writer_index].url)
        writer.put(f"{service}/x", "1")
        wait_for(lambda: rec.put_keys() == [f"{service}/x"], Watch.STALL_AFTER + 10, "event via another member")
    finally:
        if frozen is not None and frozen.proc is not None:
            frozen.proc.send_signal(signal.SIGCONT)
        w.cancel()
        watcher.close()
        writer.close()


def test_watch_rereads_state_when_its_revision_was_compacted(etcd: LocalEtcd, service: str) -> None:
    client = tenure.connect(etcd.endpoints)
    first = client.put(f"{service}/a", "1")
    assert first is not None
    for i in range(5):
        client.put(f"{service}/b", str(i))
    current = client.status()["revision"]
    subprocess.run([etcd_binary("etcdctl"), "--endpoints", ",".join(etcd.endpoints), "compact", str(current)],
                   check=True, capture_output=True)
    rec = Recorder()
    w = Watch(client, f"{service}/", True, rec.on_snapshot, rec.on_events)
    w._next_rev = first  # as if it had stopped long ago, before the compaction
    w.start()
    try:
        wait_for(lambda: rec.snapshots, 10, "a fresh snapshot after compaction")
        keys, rev = rec.snapshots[0]
        assert keys == [f"{service}/a", f"{service}/b"]
        assert rev >= current
        client.put(f"{service}/c", "1")
        wait_for(lambda: rec.put_keys() == [f"{service}/c"], 5, "events after the re-read")
    finally:
        w.cancel()
        client.close()


def test_watch_survives_a_key_that_is_not_utf8(etcd: LocalEtcd, service: str) -> None:
    client = tenure.connect(etcd.endpoints)
    rec = Recorder()
    w = client.watch(f"{service}/", prefix=True, on_snapshot=rec.on_snapshot, on_events=rec.on_events)
    try:
        wait_for(w.connected.is_set, 10, "watch connected")
        subprocess.run([etcd_binary("etcdctl").encode(), b"--endpoints", ",".join(etcd.endpoints).encode(),
                        b"put", f"/tenure/{service}/".encode() + b"\xff\xfe", b"x"], check=True, capture_output=True)
        client.put(f"{service}/after", "1")
        wait_for(lambda: f"{service}/after" in rec.put_keys(), 5, "the next event")
        assert w._thread.is_alive() and w.connected.is_set()
    finally:
        w.cancel()
        client.close()
