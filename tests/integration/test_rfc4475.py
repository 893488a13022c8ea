"""The RFC 4475 torture messages against a running softpbx, over UDP and over TCP.

Every message of ``../shared/testdata/rfc4475/`` (read in place, never copied) is sent as is,
bytes exact, from a fresh socket (TCP: a fresh connection, write side shut after sending so
the server sees EOF), and graded against ``manifest.tsv``'s ``must_udp``/``must_tcp`` column:

* a status code (``400``) or a class (``4xx``) must be the final answer;
* ``process``: any answer but 400/500 (the message was parsed and handled);
* ``none``: no answer at all within :data:`NONE_WAIT`;
* ``a|b``: either.

After each message a fresh OPTIONS must still get 200.

Several torture messages share a transaction key (``branch=z9hG4bKkdjuw`` with the same
sent-by and method, e.g. ``cparam01``/``cparam02``). To the server the second one *is* a
retransmission of the first (RFC 3261 §17.2.3), answered by re-sending the first answer to
the first sender. So messages are spread over a few servers, one per transport and collision
slot, so that each is judged on its own.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.server import PbxProcess
from tests.support.sip_client import SipClient

pytestmark = pytest.mark.integration

TESTDATA = Path(__file__).resolve().parents[2].parent / "shared" / "testdata" / "rfc4475"
"""``../shared/testdata/rfc4475`` beside the project root (the checkout's parent folder)."""
NONE_WAIT = 0.7
"""Seconds of silence that count as "no response"."""
ANSWER_WAIT = 3.0
"""Longest wait for an answer that must come."""


@dataclass(frozen=True)
class Torture:
    """One row of manifest.tsv."""

    name: str
    section: str
    kind: str
    klass: str
    must_udp: str
    must_tcp: str
    ideal: str
    title: str

    @property
    def path(self) -> Path:
        """The message file."""
        return TESTDATA / f"{self.name}.dat"

    def must(self, transport: str) -> tuple[str, ...]:
        """The acceptable outcomes over ``transport``."""
        return tuple((self.must_udp if transport == "udp" else self.must_tcp).split("|"))


def _load_manifest() -> list[Torture]:
    manifest = TESTDATA / "manifest.tsv"
    if not manifest.is_file():
        # Collection-time: a parametrized test with no data would silently test nothing.
        raise FileNotFoundError(
            f"RFC 4475 test data not found at {TESTDATA} (expected ../shared/testdata/rfc4475 "
            "next to the project checkout); the torture tests cannot run without it")
    lines = [ln for ln in manifest.read_text("utf-8").splitlines() if ln and not ln.startswith("#")]
    rows = list(csv.reader(lines, delimiter="\t"))
    header, body = rows[0], rows[1:]
    assert header[:6] == ["name", "section", "kind", "class", "must_udp", "must_tcp"], header
    out = [Torture(*r[:8]) for r in body]
    assert len(out) >= 49, f"manifest lists only {len(out)} messages"
    return out


MANIFEST = _load_manifest()

_VIA_RE = re.compile(rb"^(?:via|v)[ \t]*:[ \t]*SIP[ \t]*/[ \t]*2\.0[ \t]*/[ \t]*\w+[ \t]+([^;, \t\r\n]+)"
                     rb"[^\r\n]*?branch=([^;, \t\r\n]+)", re.I | re.M)
_CSEQ_RE = re.compile(rb"^cseq[ \t]*:[ \t]*\d+[ \t]+(\S+)", re.I | re.M)


def _tx_key(data: bytes) -> tuple[bytes, ...] | None:
    """A rough RFC 3261 §17.2.3 key (sent-by host, branch, method) of a message, for spreading
    colliding messages over servers; ``None`` when it has no branch."""
    via, cseq = _VIA_RE.search(data), _CSEQ_RE.search(data)
    if via is None or cseq is None:
        return None
    method = cseq.group(1).upper()
    return (via.group(1).lower(), via.group(2), b"INVITE" if method == b"ACK" else method)


def _slots() -> dict[str, int]:
    """message name -> server slot: the n-th message with a given transaction key gets slot n."""
    seen: dict[tuple[bytes, ...], int] = {}
    out: dict[str, int] = {}
    for t in MANIFEST:
        key = _tx_key(t.path.read_bytes()) if t.path.is_file() else None
        if key is None:
            out[t.name] = 0
            continue
        out[t.name] = seen.get(key, 0)
        seen[key] = out[t.name] + 1
    return out


SLOTS = _slots()


class Servers:
    """softpbx processes for this module, one per (transport, slot), started on first use."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: dict[tuple[str, int], PbxProcess] = {}

    def get(self, transport: str, slot: int) -> PbxProcess:
        """The running server for ``transport`` and ``slot``."""
        proc = self.procs.get((transport, slot))
        if proc is None:
            proc = PbxProcess.create(self.base / f"{transport}{slot}")
            self.procs[(transport, slot)] = proc
            proc.start()
        return proc

    def close(self) -> None:
        """Stop every server (SIGTERM, must exit cleanly)."""
        errors = []
        for proc in self.procs.values():
            try:
                proc.stop()
            except AssertionError as exc:
                errors.append(str(exc))
            finally:
                proc.kill()
        assert not errors, "\n".join(errors)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    s = Servers(tmp_path_factory.mktemp("rfc4475"))
    yield s
    s.close()


@dataclass(frozen=True)
class Answer:
    """One message the server sent back."""

    status: int
    method: str
    """The CSeq method it answers."""
    raw: bytes


def _answer(data: bytes) -> Answer:
    """Status and CSeq method of a response, read without the parser under test."""
    first = data.split(b"\r\n", 1)[0].split(b" ")
    assert first[0] == b"SIP/2.0" and len(first) >= 2 and first[1].isdigit(), \
        f"the server sent something that is not a response: {data[:300]!r}"
    m = _CSEQ_RE.search(data)
    return Answer(int(first[1]), m.group(1).decode() if m else "", data)


def _collect(c: SipClient, *, finals_wanted: int, wait: float) -> list[Answer]:
    """Read answers until ``finals_wanted`` final responses arrived or ``wait`` passed."""
    answers: list[Answer] = []
    for _ in range(50):
        data = c.recv_message(wait)
        if data is None:
            break
        answers.append(_answer(data))
        if sum(a.status >= 200 for a in answers) >= finals_wanted:
            break
    return answers


def _grade(token: str, status: int | None) -> bool:
    """Whether a final answer ``status`` (``None``: no answer) satisfies one manifest token."""
    if token == "none":
        return status is None
    if status is None:
        return False
    if token == "process":
        return status not in (400, 500)
    if re.fullmatch(r"[1-6]xx", token):
        return status // 100 == int(token[0])
    assert token.isdigit(), f"unknown manifest token {token!r}"
    return status == int(token)


def _alive(pbx: PbxProcess, transport: str) -> None:
    with SipClient(transport, pbx.sip_addr) as c:
        resp = c.options(timeout=ANSWER_WAIT)
        assert resp is not None, "the server stopped answering OPTIONS"
        assert resp.status == 200, resp


CASES = [pytest.param(t, tp, id=f"{t.name}-{tp}") for t in MANIFEST for tp in ("udp", "tcp")]


def test_manifest_covers_every_message() -> None:
    """Every .dat file is graded, and every graded file exists."""
    files = {p.stem for p in TESTDATA.glob("*.dat")}
    names = {t.name for t in MANIFEST}
    assert files == names, (sorted(files - names), sorted(names - files))


@pytest.mark.parametrize(("torture", "transport"), CASES)
def test_torture_message(servers: Servers, torture: Torture, transport: str) -> None:
    data = torture.path.read_bytes()
    must = torture.must(transport)
    pbx = servers.get(transport, SLOTS[torture.name])
    dblreq = torture.name == "dblreq"
    with SipClient(transport, pbx.sip_addr) as c:
        c.send(data)
        if transport == "tcp":
            c.half_close()
        if dblreq:
            # UDP: the trailing INVITE is not part of the datagram; TCP: a second message.
            answers = _collect(c, finals_wanted=99 if transport == "udp" else 2,
                               wait=NONE_WAIT if transport == "udp" else ANSWER_WAIT)
        elif "none" in must:
            answers = _collect(c, finals_wanted=1 if must != ("none",) else 99, wait=NONE_WAIT)
        else:
            answers = _collect(c, finals_wanted=1, wait=ANSWER_WAIT)
    finals = [a for a in answers if a.status >= 200]
    seen = [(a.status, a.method) for a in answers]
    context = f"{torture.name} ({torture.title}) over {transport}: must {must}, got {seen}"
    if dblreq:
        if transport == "udp":
            assert [(a.status, a.method) for a in finals] == [(401, "REGISTER")], context
            assert all(a.method == "REGISTER" for a in answers), context
        else:
            assert sorted(a.method for a in finals) == ["INVITE", "REGISTER"], context
            assert all(_grade("process", a.status) for a in finals), context
    else:
        assert len(finals) <= 1, f"more than one final answer: {context}"
        status = finals[0].status if finals else (answers[0].status if answers else None)
        assert any(_grade(tok, status) for tok in must), context
        if torture.name == "badvers" and status is not None:
            assert status == 505, context
    _alive(pbx, transport)
