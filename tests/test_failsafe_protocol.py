"""Failsafe confirmations between sidecars: signed, nonce-bound, all-or-nothing, promises kept."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from tenure.errors import ConfigError
from tenure.sidecar import failsafe
from tenure.sidecar.failsafe import ConfirmRequest, Witness, run_round

SECRET = b"0123456789abcdef-secret"


class Peer:
    """A member's witness behind a real HTTP server, as a sidecar serves it."""

    def __init__(self, name: str, secret: bytes = SECRET, ttl: float = 2.0) -> None:
        self.witness = Witness("db", name, ttl)
        self.primary = False
        self.promoting = False
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                code, data, sig = failsafe.handle(peer.witness, secret, body,
                                                  self.headers.get(failsafe.SIGNATURE_HEADER),
                                                  primary=peer.primary, promoting=peer.promoting)
                self.send_response(code)
                if sig:
                    self.send_header(failsafe.SIGNATURE_HEADER, sig)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def peers() -> Iterator[dict[str, Peer]]:
    ps = {"b": Peer("b"), "c": Peer("c")}
    yield ps
    for p in ps.values():
        p.close()


def round_(peers: dict[str, Peer], token: int = 7, **kw: Any) -> failsafe.RoundResult:
    return run_round("db", "a", token, {n: p.url for n, p in peers.items()}, kw.pop("secret", SECRET),
                     ttl=2.0, margin=0.2, timeout=0.5, **kw)


def test_every_member_confirms_and_promises(peers: dict[str, Peer]) -> None:
    before = time.monotonic()
    r = round_(peers)
    assert r.refused == {} and sorted(r.confirmed) == ["b", "c"]
    assert r.deadline is not None and before <= r.t_sent and r.deadline == pytest.approx(r.t_sent + 1.8)
    for p in peers.values():
        assert p.witness.promised()
        # The promise outlasts the primary's extension: it began after t_sent and lasts the full ttl.
        assert time.monotonic() + p.witness.promise_left() >= r.deadline + 0.2 - 0.01


def test_one_member_refusing_or_silent_ends_the_extension(peers: dict[str, Peer]) -> None:
    peers["c"].promoting = True
    r = round_(peers)
    assert r.deadline is None and r.refused == {"c": "I am promoting"}
    peers["c"].promoting = False
    peers["c"].primary = True
    assert round_(peers).refused == {"c": "I am primary"}
    peers["c"].primary = False
    peers["c"].close()
    r = round_(peers)
    assert r.deadline is None and "c" in r.refused and r.confirmed == ["b"]


def test_a_newer_term_is_never_confirmed(peers: dict[str, Peer]) -> None:
    peers["b"].witness.saw_term(9)
    r = round_(peers, token=7)
    assert r.deadline is None and "newer term" in r.refused["b"]
    assert not peers["b"].witness.promised()


def test_wrong_secret_is_refused_and_changes_nothing(peers: dict[str, Peer]) -> None:
    r = round_(peers, secret=b"another-secret-of-16+")
    assert r.deadline is None and set(r.refused) == {"b", "c"}
    assert not any(p.witness.promised() for p in peers.values())


def test_an_answer_from_another_round_is_not_accepted() -> None:
    w = Witness("db", "b", 2.0)
    req = ConfirmRequest("db", "a", 3, "n1")
    code, body, sig = failsafe.handle(w, SECRET, req.encode(), failsafe.sign(SECRET, req.encode()),
                                      primary=False, promoting=False)
    assert code == 200 and failsafe.verify(SECRET, body, sig)
    assert failsafe.ConfirmAnswer.decode(body).nonce == "n1"
    assert failsafe.handle(w, SECRET, b"{}", failsafe.sign(SECRET, b"{}"), primary=False, promoting=False)[0] == 400


def test_no_peers_is_no_extension() -> None:
    r = run_round("db", "a", 3, {}, SECRET, ttl=2, margin=0.2, timeout=0.5)
    assert r.deadline is None


def test_secret_file_checks(tmp_path: Any) -> None:
    short = tmp_path / "s"
    short.write_bytes(b"short")
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        failsafe.read_secret(str(short))
    with pytest.raises(ConfigError, match="cannot read"):
        failsafe.read_secret(str(tmp_path / "missing"))
    good = tmp_path / "g"
    good.write_bytes(SECRET + b"\n")
    assert failsafe.read_secret(str(good)) == SECRET
