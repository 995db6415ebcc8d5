"""Failsafe mode: a primary keeps writing through an etcd outage while every other member vouches for it.

While etcd cannot be reached, a primary whose lease has run out may go on
accepting writes only for rounds in which **every** other member of the
service (the list last read from etcd, fixed for the outage) answers, over the
sidecars' own authenticated channel, that it is not primary, is not
promoting, has seen no newer term, and promises not to campaign or promote
for one ttl after its answer, on its own monotonic clock, even if it reaches
etcd meanwhile.

The round's deadline follows the lease's rule: ``t_sent`` is taken before the
round's requests are sent, and the round extends the primary's writes to
``t_sent + ttl - margin``. Every member's promise starts when it *answers*,
which is after ``t_sent``, and lasts ``ttl``; so the primary's extension ends
at least ``margin`` before the first promise that backs it does (the same
clock-rate argument as the lease). A member that does not answer, or answers
otherwise, ends the extension: the primary fences itself at the deadline it
already has, exactly as without failsafe.

Why a partition cannot leave two writers: a member can become primary only
through etcd, by campaigning and promoting, which it refuses to do while a
promise runs. A member that never promised (unreachable in the current round)
means the round failed and the primary's writes end at the previous deadline,
which was covered by that member's previous promise. So at any instant at
which the old primary may write, every other member is bound by a promise
that has not yet run out.

Messages are JSON, signed with HMAC-SHA256 under a secret that every member's
config names (``failsafe_secret_file``); the secret itself never leaves the
node. A request carries a nonce that the answer must echo, so an answer
cannot be replayed into a later round.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Mapping

from ..errors import ConfigError

log = logging.getLogger("tenure.sidecar")

PATH = "/failsafe/confirm"
SIGNATURE_HEADER = "X-Tenure-Signature"
MAX_BODY = 4096


def read_secret(path: str) -> bytes:
    """The shared failsafe secret from ``path`` (at least 16 bytes), or ConfigError naming the file only."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ConfigError(f"cannot read failsafe_secret_file {path}: {e.strerror}") from None
    if len(secret) < 16:
        raise ConfigError(f"failsafe_secret_file {path} must hold at least 16 bytes")
    return secret


def sign(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, signature: str | None) -> bool:
    return signature is not None and hmac.compare_digest(sign(secret, body), signature)


@dataclass(frozen=True)
class ConfirmRequest:
    """A primary asks one member to vouch for its term ``token``."""

    service: str
    primary: str
    token: int
    nonce: str

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, body: bytes) -> "ConfirmRequest":
        d = json.loads(body)
        if not isinstance(d, dict):
            raise ValueError("not an object")
        req = cls(str(d["service"]), str(d["primary"]), int(d["token"]), str(d["nonce"]))
        if req.token <= 0 or not req.nonce:
            raise ValueError("bad token or nonce")
        return req


@dataclass(frozen=True)
class ConfirmAnswer:
    """One member's answer: ``ok`` means it promised not to campaign or promote for ``promise`` seconds."""

    member: str
    nonce: str
    ok: bool
    reason: str
    newest_token: int
    promise: float

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, body: bytes) -> "ConfirmAnswer":
        d = json.loads(body)
        if not isinstance(d, dict):
            raise ValueError("not an object")
        return cls(str(d["member"]), str(d["nonce"]), bool(d["ok"]), str(d["reason"]), int(d["newest_token"]),
                   float(d["promise"]))


class Witness:
    """A member's side: answers confirmation requests and keeps its promises.

    :meth:`promised` is True while a promise runs; the sidecar neither
    campaigns nor promotes then.
    """

    def __init__(self, service: str, member: str, ttl: float) -> None:
        self.service = service
        self.member = member
        self.ttl = float(ttl)
        self._lock = threading.Lock()
        self._until = 0.0  # monotonic end of the newest promise
        self.newest_token = 0  # the newest term this member has seen (from etcd or from requests)

    def saw_term(self, token: int) -> None:
        with self._lock:
            self.newest_token = max(self.newest_token, token)

    def promised(self) -> bool:
        return time.monotonic() < self._until

    def promise_left(self) -> float:
        return max(0.0, self._until - time.monotonic())

    def answer(self, req: ConfirmRequest, *, primary: bool, promoting: bool) -> ConfirmAnswer:
        """Judge ``req``; on ok, the promise starts now and lasts one ttl."""
        with self._lock:
            if req.service != self.service:
                why = f"wrong service {req.service!r}"
            elif req.primary == self.member:
                why = "a request from myself"
            elif primary:
                why = "I am primary"
            elif promoting:
                why = "I am promoting"
            elif self.newest_token > req.token:
                why = f"I have seen a newer term ({self.newest_token} > {req.token})"
            else:
                why = ""
            ok = not why
            if ok:
                self.newest_token = max(self.newest_token, req.token)
                # Taken after the decision, so the promise covers everything the primary does on it.
                self._until = max(self._until, time.monotonic() + self.ttl)
            return ConfirmAnswer(self.member, req.nonce, ok, why or "confirmed", self.newest_token,
                                 self.ttl if ok else 0.0)


@dataclass
class RoundResult:
    """One failsafe round: ``deadline`` (monotonic) if every member confirmed, else None."""

    t_sent: float
    deadline: float | None
    confirmed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def ask(url: str, secret: bytes, req: ConfirmRequest, timeout: float) -> ConfirmAnswer:
    """Send ``req`` to the sidecar at ``url``; the answer, verified, or raise OSError/ValueError."""
    body = req.encode()
    http = urllib.request.Request(url.rstrip("/") + PATH, data=body, method="POST",
                                  headers={"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body)})
    with urllib.request.urlopen(http, timeout=timeout) as resp:  # noqa: S310 (a member's own URL)
        data = resp.read(MAX_BODY + 1)
        signature = resp.headers.get(SIGNATURE_HEADER)
    if len(data) > MAX_BODY or not verify(secret, data, signature):
        raise ValueError("answer not signed with the failsafe secret")
    answer = ConfirmAnswer.decode(data)
    if answer.nonce != req.nonce:
        raise ValueError("answer to another round")
    return answer


def run_round(service: str, member: str, token: int, peers: Mapping[str, str], secret: bytes, *, ttl: float,
              margin: float, timeout: float) -> RoundResult:
    """Ask every peer (member -> sidecar URL) at once; the round's deadline if all of them confirmed."""
    nonce = secrets.token_hex(16)
    req = ConfirmRequest(service, member, token, nonce)
    t_sent = time.monotonic()  # before any request leaves: see the module doc
    result = RoundResult(t_sent, None)
    if not peers:
        result.refused["-"] = "no other member known: failsafe needs every other member's word"
        return result

    def one(item: tuple[str, str]) -> tuple[str, ConfirmAnswer | str]:
        name, url = item
        try:
            return name, ask(url, secret, req, timeout)
        except (OSError, ValueError, KeyError, urllib.error.URLError) as e:
            return name, f"no valid answer: {e}"

    with ThreadPoolExecutor(max_workers=min(8, len(peers))) as pool:
        answers = list(pool.map(one, sorted(peers.items())))
    for name, a in answers:
        if isinstance(a, str):
            result.refused[name] = a
        elif a.member != name:
            result.refused[name] = f"answered as {a.member!r}"
        elif not a.ok:
            result.refused[name] = a.reason
        elif a.promise < ttl:
            result.refused[name] = f"promised only {a.promise:g} s"
        else:
            result.confirmed.append(name)
    if not result.refused:
        result.deadline = t_sent + ttl - margin
    return result


@dataclass
class FailsafeStatus:
    """What ``/status`` and ``tenure status`` show of failsafe."""

    active: bool = False
    since: float | None = None  # wall clock
    deadline_in: float = 0.0
    confirmed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def handle(witness: Witness, secret: bytes, body: bytes, signature: str | None, *, primary: bool,
           promoting: bool) -> tuple[int, bytes, str | None]:
    """The witness's side of ``POST /failsafe/confirm``: (HTTP status, body, signature of the body).

    An unsigned or malformed request gets 403/400 and changes nothing.
    """
    if len(body) > MAX_BODY or not verify(secret, body, signature):
        return 403, b'{"error": "not signed with the failsafe secret"}\n', None
    try:
        req = ConfirmRequest.decode(body)
    except (ValueError, KeyError, TypeError):
        return 400, b'{"error": "malformed confirmation request"}\n', None
    answer = witness.answer(req, primary=primary, promoting=promoting)
    if answer.ok:
        log.info("%s/%s: failsafe: confirmed %s (term %d); no campaign for %.1f s", witness.service,
                 witness.member, req.primary, req.token, answer.promise)
    else:
        log.warning("%s/%s: failsafe: refused %s (term %d): %s", witness.service, witness.member, req.primary,
                    req.token, answer.reason)
    data = answer.encode()
    return 200, data, sign(secret, data)
