"""B2BUA call flows driven by raw SIP bytes and a fake clock (no sockets): answer, busy,
cancel, no answer -> fallback, fork race, re-INVITE, RTP timeout, max duration, toll fraud."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from softpbx.config.loader import load_config
from softpbx.config.schema import Transport
from softpbx.core.call import CallState
from softpbx.core.events import Binding, SendWebhook, WriteCdr
from softpbx.core.notify import CrmAnswer
from softpbx.core.switch import Switch
from softpbx.media.ports import PortAllocator
from softpbx.media.relay import RelaySession
from softpbx.sip.events import Flow
from softpbx.sip.message import Request, Response
from softpbx.sip.parser import parse_message
from softpbx.sip.sdp import media_address, parse_sdp

from .sipkit import LOCAL, FakeClock, challenge_params, crlf, digest, run_until
from .test_registrar import authed_register, exchange, register

ROOT = Path(__file__).resolve().parents[2]
ALICE = ("127.0.0.1", 5061)      # extension 101's phone
BOB = ("127.0.0.1", 5062)        # extension 102's phone
BOB2 = ("127.0.0.1", 5063)       # a second phone of 102
CARRIER = ("127.0.0.1", 5070)    # the sample gateway


class FakeRelay:
    """The relay interface without sockets: real RelaySession objects, real port allocation."""

    advertised_ip = "127.0.0.1"

    def __init__(self) -> None:
        self.ports = PortAllocator(start=20000, end=20100)
        self.sessions: list[RelaySession] = []
        self.now = 0.0

    def open_session(self) -> RelaySession:
        a, b = self.ports.allocate(), self.ports.allocate()
        s = RelaySession(a_port=a, b_port=b, now=self.now)
        self.sessions.append(s)
        return s

    def close_session(self, session: RelaySession) -> None:
        self.sessions.remove(session)
        session.detach()  # as aio.rtp_transport.RtpRelay does
        self.ports.release(session.a.rtp_port)
        self.ports.release(session.b.rtp_port)


def flow(remote: tuple[str, int]) -> Flow:
    return Flow(Transport.UDP, remote, LOCAL)


SDP = crlf("""v=0
o=phone 1 1 IN IP4 {ip}
s=-
c=IN IP4 {ip}
t=0 0
m=audio {port} RTP/AVP 0 8 101
a=rtpmap:101 telephone-event/8000
a=sendrecv
""")


def sdp(port: int, ip: str = "127.0.0.1", direction: str = "sendrecv") -> bytes:
    return SDP.replace(b"{ip}", ip.encode()).replace(b"{port}", str(port).encode()) \
        .replace(b"sendrecv", direction.encode())


@dataclass
class Net:
    """The switch plus everything it sent, sorted by who it was sent to."""

    sw: Switch
    clock: FakeClock
    relay: FakeRelay
    inbox: dict[tuple[str, int], list] = field(default_factory=dict)
    cdrs: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    webhooks: list = field(default_factory=list)
    crm_answers: bool = True
    """Answer every NOTIFY_START at once with an empty body ("route normally"), as the
    built-in inspector does; tests of the CRM wait turn it off and answer themselves."""

    def feed(self, data: bytes, src: tuple[str, int]) -> None:
        self.sw.receive(data, flow(src), self.clock.now)
        self.collect()

    def collect(self) -> None:
        answers: list[str] = []
        for o in self.sw.datagrams_to_send():
            self.inbox.setdefault(o.flow.remote, []).append(parse_message(o.data))
        while (a := self.sw.next_action()) is not None:
            self.actions.append(a)
            if isinstance(a, WriteCdr):
                self.cdrs.append(a.record)
            elif isinstance(a, SendWebhook):
                self.webhooks.append(a)
                if a.wants_answer and self.crm_answers:
                    answers.append(a.pbx_call_id)
        for pbx_call_id in answers:
            self.sw.crm_answer(pbx_call_id, CrmAnswer(), self.clock.now)
        if answers:
            self.collect()

    def events(self) -> list[tuple[str, dict[str, str]]]:
        """The CRM events so far: (event, fields without ``event``), in order."""
        return [(w.event, dict(w.fields[1:])) for w in self.webhooks]

    def take(self, who: tuple[str, int]) -> list:
        msgs = self.inbox.pop(who, [])
        return msgs

    def advance(self, seconds: float) -> None:
        self.relay.now = self.clock.now + seconds
        run_until(self.sw, self.clock, self.clock.now + seconds)
        self.collect()

    def drain(self) -> None:
        """Let every transaction timer run out (64*T1 and then some)."""
        self.advance(40.0)

    def assert_no_leaks(self) -> None:
        """Nothing of any call is left: calls, dialogs, transactions, relay ports."""
        self.drain()
        assert self.sw.calls == {} and self.sw.dialog_count == 0
        assert self.sw.stack.transaction_count == 0
        assert self.relay.sessions == [] and self.relay.ports.in_use_count == 0


def make_net(*overrides: str, profiles: Path = ROOT / "sip_profiles") -> Net:
    """A switch on ``profiles`` (``--set`` style ``overrides``) with 101, 102 and 103 registered."""
    cfg = load_config(profiles, ["calls.max_duration=0", *overrides])
    relay = FakeRelay()
    sw = Switch(config=cfg, auth_secret=b"s" * 32, relay=relay)
    for ext, addr, key in (("101", ALICE, "a"), ("102", BOB, "b"), ("103", ("127.0.0.1", 5064), "c")):
        sw.registrar.load([Binding(aor=ext, contact=f"sip:{ext}@{addr[0]}:{addr[1]}", key=key,
                                   expires_at=1e9, call_id=key, cseq=1, flow=flow(addr))])
    return Net(sw, FakeClock(), relay)


def edited_profiles(tmp_path: Path, edits: dict[str, list[tuple[str, str]]]) -> Path:
    """A copy of the sample profiles with text replacements per file ("" old: append)."""
    d = tmp_path / "profiles"
    shutil.copytree(ROOT / "sip_profiles", d)
    for name, changes in edits.items():
        f = d / name
        text = f.read_text()
        for old, new in changes:
            if old:
                assert old in text, (name, old)
                text = text.replace(old, new)
            else:
                text += new
        f.write_text(text)
    return d


@pytest.fixture
def net() -> Net:
    return make_net()


def invite(*, to: str, frm: str = "101", branch: str = "z9hG4bKinv1", call_id: str = "call-1",
           cseq: int = 1, body: bytes | None = None, auth: str = "",
           src: tuple[str, int] = ALICE) -> bytes:
    body = sdp(40000) if body is None else body
    lines = [
        f"INVITE sip:{to}@127.0.0.1 SIP/2.0",
        f"Via: SIP/2.0/UDP {src[0]}:{src[1]};branch={branch};rport",
        f'From: "Caller" <sip:{frm}@127.0.0.1>;tag=caller-tag',
        f"To: <sip:{to}@127.0.0.1>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} INVITE",
        f"Contact: <sip:{frm}@{src[0]}:{src[1]}>",
        "Max-Forwards: 70",
        "Content-Type: application/sdp",
    ]
    if auth:
        lines.append(f"Authorization: {auth}")
    lines.append(f"Content-Length: {len(body)}")
    return crlf("\n".join(lines) + "\n\n") + body


def place_call(net: Net, to: str, *, frm: str = "101", password: str = "secret101",
               body: bytes | None = None) -> Request:
    """101 dials ``to`` through the digest challenge; returns the INVITE as sent."""
    net.feed(invite(to=to, frm=frm, body=body), ALICE)
    r401 = [m for m in net.take(ALICE) if m.status == 401][0]
    net.feed(ack_for(r401, to), ALICE)
    p = challenge_params(r401.get_all("www-authenticate")[0])
    auth = digest(user=frm, password=password, realm=p["realm"], nonce=p["nonce"],
                  method="INVITE", uri=f"sip:{to}@127.0.0.1")
    data = invite(to=to, frm=frm, cseq=2, branch="z9hG4bKinv2", auth=auth, body=body)
    net.feed(data, ALICE)
    return parse_message(data)


def ack_for(resp: Response, to: str, branch: str = "z9hG4bKinv1") -> bytes:
    return crlf(f"""ACK sip:{to}@127.0.0.1 SIP/2.0
Via: SIP/2.0/UDP {ALICE[0]}:{ALICE[1]};branch={branch};rport
From: "Caller" <sip:101@127.0.0.1>;tag=caller-tag
To: {resp.get('to')}
Call-ID: {resp.call_id}
CSeq: {resp.cseq.number} ACK
Max-Forwards: 70
Content-Length: 0

""")


def answer(req: Request, status: int, *, tag: str = "callee-tag", body: bytes = b"",
           contact: str = "<sip:102@127.0.0.1:5062>") -> bytes:
    """The callee's response to ``req`` (an INVITE the switch sent)."""
    hdrs = [(n, v) for n, v in req.headers if n in ("Via", "From", "Call-ID", "CSeq")]
    to = req.get("to") or ""
    if status > 100 and "tag=" not in to:
        to += f";tag={tag}"
    hdrs += [("To", to), ("Contact", contact)]
    if body:
        hdrs.append(("Content-Type", "application/sdp"))
    return Response(status, None, hdrs, body).serialize()


def in_dialog(method: str, resp_or_req, *, frm_tag: str, to_tag: str, cseq: int,
              src: tuple[str, int], frm: str, to: str, body: bytes = b"",
              branch: str = "z9hG4bKdlg") -> bytes:
    call_id = resp_or_req.call_id
    ct = "Content-Type: application/sdp\n" if body else ""
    return crlf(f"""{method} sip:softpbx@127.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP {src[0]}:{src[1]};branch={branch}{cseq};rport
From: <sip:{frm}@127.0.0.1>;tag={frm_tag}
To: <sip:{to}@127.0.0.1>;tag={to_tag}
Call-ID: {call_id}
CSeq: {cseq} {method}
Contact: <sip:{frm}@{src[0]}:{src[1]}>
Max-Forwards: 70
{ct}Content-Length: {len(body)}

""") + body


def only(msgs: list, kind=None) -> list:
    return [m for m in msgs if kind is None or isinstance(m, kind)]


def answered_call(net: Net):
    """101 -> 102 answered; returns (b-leg INVITE, 200 to the caller)."""
    place_call(net, "102")
    assert [m.status for m in net.take(ALICE)] == [100]
    (b_inv,) = net.take(BOB)
    net.feed(answer(b_inv, 180), BOB)
    net.feed(answer(b_inv, 200, body=sdp(50000)), BOB)
    (ack_b,) = net.take(BOB)
    assert ack_b.method == "ACK"
    a_msgs = net.take(ALICE)
    assert [m.status for m in a_msgs] == [180, 200]
    ok = a_msgs[1]
    net.feed(ack_for(ok, "102", branch="z9hG4bKack2"), ALICE)
    return b_inv, ok


def answered_unacked(net: Net) -> Request:
    """101 -> 102, answered at once; the 200 to the caller waits in its inbox, not ACKed.
    Returns the callee leg's INVITE."""
    place_call(net, "102")
    net.take(ALICE)
    (b_inv,) = net.take(BOB)
    net.feed(answer(b_inv, 200, body=sdp(50000)), BOB)
    net.take(BOB)
    return b_inv


def ringing_on_two_phones(net: Net) -> tuple[Request, Request]:
    """102 has a second phone (BOB2); 101 calls 102 and both ring (180, the second with its
    own To tag). Returns the INVITEs to BOB and to BOB2."""
    net.sw.registrar.load([Binding(aor="102", contact="sip:102@127.0.0.1:5063", key="b2",
                                   expires_at=1e9, call_id="x", cseq=1, flow=flow(BOB2))])
    place_call(net, "102")
    net.take(ALICE)
    (inv1,) = net.take(BOB)
    (inv2,) = net.take(BOB2)
    net.feed(answer(inv1, 180), BOB)
    net.feed(answer(inv2, 180, tag="t2"), BOB2)
    return inv1, inv2


def callee_reinvite_answered(net: Net, b_inv: Request) -> None:
    """102 puts 101 on hold (a re-INVITE on the answered call); the switch passes it to 101,
    whose 200 it ACKs. The switch's 200 to 102 is then in 102's inbox."""
    net.feed(in_dialog("INVITE", b_inv, frm_tag="callee-tag", to_tag=b_inv.from_.tag, cseq=1,
                       src=BOB, frm="102", to="101", body=sdp(50000, direction="sendonly")),
             BOB)
    (a_reinv,) = [m for m in net.take(ALICE) if getattr(m, "method", "") == "INVITE"]
    net.feed(Response(200, None, [(n, v) for n, v in a_reinv.headers
                                  if n in ("Via", "From", "To", "Call-ID", "CSeq")]
                      + [("Contact", "<sip:101@127.0.0.1:5061>"),
                         ("Content-Type", "application/sdp")],
                      sdp(40000, direction="recvonly")).serialize(), ALICE)
    assert [m.method for m in net.take(ALICE)] == ["ACK"]


def test_internal_call_answered_and_hung_up(net: Net) -> None:
    b_inv, ok = answered_call(net)
    # the callee saw the caller's extension and display name; SDP points at the relay
    assert b_inv.from_.uri.user == "101" and b_inv.from_.display == "Alice 101"
    (session,) = net.relay.sessions
    assert media_address(parse_sdp(b_inv.body)) == ("127.0.0.1", session.b.rtp_port)
    assert media_address(parse_sdp(ok.body)) == ("127.0.0.1", session.a.rtp_port)
    assert session.a.rtp.sdp == ("127.0.0.1", 40000) and session.b.rtp.sdp == ("127.0.0.1", 50000)
    assert b"telephone-event" in b_inv.body and b"m=audio" in ok.body
    (call,) = net.sw.calls.values()
    assert call.state is CallState.ANSWERED and call.id.startswith("int_")
    net.advance(3.0)
    assert net.take(ALICE) == []  # the ACK stopped the 2xx retransmissions
    net.feed(in_dialog("BYE", ok, frm_tag="caller-tag", to_tag=ok.to.tag, cseq=3, src=ALICE,
                       frm="101", to="102"), ALICE)
    assert [m.status for m in net.take(ALICE)] == [200]
    (bye,) = net.take(BOB)
    assert bye.method == "BYE" and bye.to.tag == "callee-tag"
    net.feed(answer(bye, 200), BOB)
    net.drain()
    assert net.sw.calls == {} and net.sw.dialog_count == 0 and net.relay.sessions == []
    assert net.sw.stack.transaction_count == 0
    (cdr,) = net.cdrs
    assert (cdr.disposition, cdr.duration, cdr.extension, cdr.direction) == ("answered", 3, "102", "internal")


def test_callee_busy(net: Net) -> None:
    place_call(net, "102")
    net.take(ALICE)
    (b_inv,) = net.take(BOB)
    net.feed(answer(b_inv, 486), BOB)
    assert [m.method for m in net.take(BOB)] == ["ACK"]
    assert [m.status for m in net.take(ALICE)] == [486]
    net.drain()
    assert net.cdrs[0].disposition == "busy" and net.cdrs[0].sip_code == 486
    assert net.sw.calls == {} and net.relay.sessions == []


def test_caller_cancels_while_ringing(net: Net) -> None:
    place_call(net, "102")
    net.take(ALICE)
    (b_inv,) = net.take(BOB)
    net.feed(answer(b_inv, 180), BOB)
    net.take(ALICE)
    cancel = crlf("""CANCEL sip:102@127.0.0.1 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKinv2;rport
From: "Caller" <sip:101@127.0.0.1>;tag=caller-tag
To: <sip:102@127.0.0.1>
Call-ID: call-1
CSeq: 2 CANCEL
Max-Forwards: 70
Content-Length: 0

""")
    net.feed(cancel, ALICE)
    assert sorted(m.status for m in net.take(ALICE)) == [200, 487]
    (c,) = net.take(BOB)
    assert c.method == "CANCEL" and c.get("reason") is None  # a missed call, not elsewhere
    net.feed(answer(c, 200), BOB)
    net.feed(answer(b_inv, 487), BOB)
    assert [m.method for m in net.take(BOB)] == ["ACK"]
    net.drain()
    assert net.cdrs[0].disposition == "cancel"
    assert net.sw.calls == {} and net.sw.dialog_count == 0 and net.sw.stack.transaction_count == 0


def test_inbound_did_no_answer_then_fallback(net: Net) -> None:
    net.feed(invite(to="74950000000", frm="79990001122", src=CARRIER), CARRIER)  # IP-authenticated
    assert [m.status for m in net.take(CARRIER)] == [100]
    (to_101,) = net.take(ALICE)
    assert to_101.from_.uri.user == "79990001122"
    net.feed(answer(to_101, 180, contact="<sip:101@127.0.0.1:5061>"), ALICE)
    assert [m.status for m in net.take(CARRIER)] == [180]
    net.advance(30.2)  # the route's no_answer_timeout
    (c,) = [m for m in net.take(ALICE) if m.method == "CANCEL"]
    net.feed(answer(c, 200), ALICE)
    net.feed(answer(to_101, 487), ALICE)
    (to_102,) = net.take(BOB)
    assert to_102.method == "INVITE"
    net.feed(answer(to_102, 200, body=sdp(50000)), BOB)
    statuses = [m.status for m in net.take(CARRIER)]
    assert statuses[-1] == 200
    (call,) = net.sw.calls.values()
    assert call.id.startswith("in_") and call.answered.extension == "102"


def test_fork_first_answer_wins_others_cancelled(net: Net) -> None:
    inv1, inv2 = ringing_on_two_phones(net)
    net.feed(answer(inv2, 200, tag="t2", body=sdp(50002)), BOB2)
    assert [m.method for m in net.take(BOB2)] == ["ACK"]
    (c,) = net.take(BOB)
    assert c.method == "CANCEL"
    # RFC 3326: the losing phone learns it was answered elsewhere (no missed call shown)
    assert c.get("reason") == 'SIP;cause=200;text="Call completed elsewhere"'
    # the loser answers anyway (the CANCEL crossed its 200): ACK, then BYE
    net.feed(answer(inv1, 200, body=sdp(50000)), BOB)
    assert [m.method for m in net.take(BOB)] == ["ACK", "BYE"]
    net.feed(answer(inv1, 200, body=sdp(50000)), BOB)  # retransmitted: re-ACKed, one BYE
    assert [m.method for m in net.take(BOB)] == ["ACK"]
    (call,) = net.sw.calls.values()
    assert call.state is CallState.ANSWERED and call.answered.flow.remote == BOB2


def test_reinvite_hold_passes_through(net: Net) -> None:
    b_inv, ok = answered_call(net)
    hold = sdp(40000, direction="sendonly")
    net.feed(in_dialog("INVITE", ok, frm_tag="caller-tag", to_tag=ok.to.tag, cseq=3, src=ALICE,
                       frm="101", to="102", body=hold), ALICE)
    (reinv,) = [m for m in net.take(BOB) if m.method == "INVITE"]
    assert b"a=sendonly" in reinv.body and reinv.to.tag == "callee-tag"
    net.feed(answer(reinv, 200, body=sdp(50000, direction="recvonly")), BOB)
    assert [m.method for m in net.take(BOB)] == ["ACK"]
    (ok2,) = [m for m in net.take(ALICE) if m.status == 200]
    assert b"a=recvonly" in ok2.body
    (call,) = net.sw.calls.values()
    assert call.on_hold


def _statuses(msgs: list) -> list:
    return [getattr(m, "status", None) for m in msgs]


def test_reinvite_2xx_to_caller_resent_until_ack(net: Net) -> None:
    # RFC 3261 §13.3.1.4 / RFC 6026: the 200 to a re-INVITE is re-sent by the UAS core (the
    # transaction in Accepted absorbs the re-INVITE's retransmissions) until the ACK comes.
    b_inv, ok = answered_call(net)
    net.feed(in_dialog("INVITE", ok, frm_tag="caller-tag", to_tag=ok.to.tag, cseq=3, src=ALICE,
                       frm="101", to="102", body=sdp(40000, direction="sendonly")), ALICE)
    (reinv,) = [m for m in net.take(BOB) if m.method == "INVITE"]
    net.feed(answer(reinv, 200, body=sdp(50000, direction="recvonly")), BOB)
    net.take(BOB)
    assert _statuses(net.take(ALICE)).count(200) == 1
    net.advance(2.0)  # T1 = 0.5 s: re-sent at 0.5 and 1.5 s
    assert _statuses(net.take(ALICE)).count(200) == 2
    ack = in_dialog("ACK", ok, frm_tag="caller-tag", to_tag=ok.to.tag, cseq=3, src=ALICE,
                    frm="101", to="102", branch="z9hG4bKack3")
    net.feed(ack, ALICE)
    net.advance(40.0)
    assert _statuses(net.take(ALICE)).count(200) == 0
    (call,) = net.sw.calls.values()
    assert call.state is CallState.ANSWERED and call.on_hold


def test_reinvite_2xx_to_callee_resent_and_no_ack_ends_call(net: Net) -> None:
    b_inv, ok = answered_call(net)
    callee_reinvite_answered(net, b_inv)
    net.advance(4.0)  # 0.5, 1.5, 3.5: the first 200 and three re-sends, all to the callee
    assert _statuses(net.take(BOB)).count(200) == 4
    # no ACK at all ends the call with BYEs after 64*T1
    net.advance(30.0)
    assert "BYE" in [getattr(m, "method", None) for m in net.take(BOB)]
    assert "BYE" in [getattr(m, "method", None) for m in net.take(ALICE)]
    assert net.sw.calls == {} and "no ACK from callee" in net.cdrs[0].cause


def test_reinvite_2xx_to_callee_stops_on_ack(net: Net) -> None:
    b_inv, ok = answered_call(net)
    callee_reinvite_answered(net, b_inv)
    assert _statuses(net.take(BOB)).count(200) == 1
    net.feed(in_dialog("ACK", b_inv, frm_tag="callee-tag", to_tag=b_inv.from_.tag, cseq=1, src=BOB,
                       frm="102", to="101", branch="z9hG4bKboback"), BOB)
    net.advance(40.0)
    assert _statuses(net.take(BOB)).count(200) == 0
    (call,) = net.sw.calls.values()
    assert call.state is CallState.ANSWERED


def test_rtp_timeout_hangs_up(net: Net) -> None:
    answered_call(net)
    net.advance(net.sw.config.media.rtp_timeout + 6)
    # BYE to both sides (re-sent over UDP while unanswered: Timer E)
    assert {m.method for m in net.take(ALICE)} == {"BYE"}
    assert {m.method for m in net.take(BOB)} == {"BYE"}
    assert "RTP" in net.cdrs[0].cause and net.sw.calls == {}


def test_max_duration(net: Net) -> None:
    cfg = load_config(ROOT / "sip_profiles", ["calls.max_duration=10", "media.rtp_timeout=0"])
    relay = FakeRelay()
    sw = Switch(config=cfg, auth_secret=b"s" * 32, relay=relay)
    sw.registrar.load([Binding(aor="102", contact="sip:102@127.0.0.1:5062", key="b",
                               expires_at=1e9, call_id="b", cseq=1, flow=flow(BOB))])
    n = Net(sw, FakeClock(), relay)
    answered_call(n)
    n.advance(10.2)
    assert [m.method for m in n.take(BOB)] == ["BYE"]
    assert n.cdrs[0].cause == "maximum call duration reached"


def test_caller_never_acks_2xx(net: Net) -> None:
    answered_unacked(net)
    net.advance(8.0)
    sent = net.take(ALICE)
    assert [getattr(m, "status", None) for m in sent].count(200) >= 4  # re-sent: 0.5, 1.5, 3.5 ...
    net.advance(30.0)  # 64*T1 without the ACK: BYE to both
    assert "BYE" in [getattr(m, "method", None) for m in net.take(ALICE)]
    assert "BYE" in [m.method for m in net.take(BOB)]
    assert net.sw.calls == {} and "no ACK from caller" in net.cdrs[0].cause


def test_unregistered_extension_gets_480(net: Net) -> None:
    place_call(net, "103")
    (bin103,) = net.take(("127.0.0.1", 5064))
    net.sw.registrar._bindings.clear()
    net.feed(answer(bin103, 480), ("127.0.0.1", 5064))
    assert [m.status for m in net.take(ALICE)][-1] == 480
    assert net.cdrs[0].disposition == "no answer"


def test_outbound_rewrites_number_and_never_unauthenticated(net: Net) -> None:
    # an unknown address (not a gateway) dialling out: challenged, nothing reaches the trunk
    net.feed(invite(to="89991234567", src=("127.0.0.1", 6000)), ("127.0.0.1", 6000))
    assert [m.status for m in net.take(("127.0.0.1", 6000))] == [100, 401]
    assert net.take(CARRIER) == []
    # authenticated: out through the carrier with the number normalised and the caller ID set
    place_call(net, "89991234567")
    (out,) = net.take(CARRIER)
    assert out.uri.user == "+79991234567" and out.from_.uri.user == "74950000101"
    (call,) = net.sw.calls.values()
    assert call.id.startswith("out_")


def test_unknown_number_404_and_bad_sdp_488(net: Net) -> None:
    place_call(net, "55")
    assert [m.status for m in net.take(ALICE)][-1] == 404
    net.inbox.clear()
    net.feed(invite(to="74950000000", frm="7999", src=CARRIER, body=b"garbage",
                    branch="z9hG4bKbad"), CARRIER)
    assert [m.status for m in net.take(CARRIER)][-1] == 488


def test_trunk_timeout_is_503_and_gateway_call_limit(net: Net) -> None:
    place_call(net, "89991234567")
    net.take(ALICE)
    net.advance(33.0)  # the carrier never answers: Timer B
    assert [getattr(m, "status", None) for m in net.take(ALICE)][-1] == 503
    assert net.cdrs[0].disposition == "failed"
    cfg = load_config(ROOT / "sip_profiles")
    limited = type(cfg.gateways[0])(**{**{f: getattr(cfg.gateways[0], f) for f in
                                          cfg.gateways[0].__dataclass_fields__}, "max_calls": 1})
    net.sw._gateways_by_name["carrier"] = limited
    net.drain()  # let the first call's transactions finish (place_call reuses its branches)
    net.inbox.clear()
    place_call(net, "89991234567")
    assert net.take(CARRIER)  # the first call reaches the trunk
    net.feed(invite(to="89991234568", branch="z9hG4bKsecond", call_id="call-2",
                    auth=""), ALICE)
    r401 = [m for m in net.take(ALICE) if getattr(m, "status", 0) == 401][0]
    p = challenge_params(r401.get_all("www-authenticate")[0])
    auth = digest(user="101", password="secret101", realm=p["realm"], nonce=p["nonce"],
                  method="INVITE", uri="sip:89991234568@127.0.0.1")
    net.feed(invite(to="89991234568", branch="z9hG4bKsecond2", call_id="call-2", cseq=2,
                    auth=auth), ALICE)
    assert [m.status for m in net.take(ALICE)][-1] == 503
    assert net.take(CARRIER) == []  # the second is refused at the limit


def test_callee_on_tcp_answers_and_hangs_up(net: Net) -> None:
    # Over TCP a final response terminates the client transaction at once: the answer must
    # still reach the leg that sent the INVITE.
    tcp_phone = ("127.0.0.1", 5066)
    tflow = Flow(Transport.TCP, tcp_phone, LOCAL)
    net.sw.registrar._bindings.pop("103", None)
    net.sw.registrar.load([Binding(aor="103", contact="sip:103@127.0.0.1:5066;transport=tcp",
                                   key="t", expires_at=1e9, call_id="t", cseq=1, flow=tflow)])
    place_call(net, "103")
    net.take(ALICE)
    (inv,) = net.take(tcp_phone)
    assert inv.top_via.transport == "TCP" and ";transport=tcp" in inv.get("contact")
    net.sw.receive(answer(inv, 200, body=sdp(50000), contact="<sip:103@127.0.0.1:5066;transport=tcp>"),
                   tflow, net.clock.now)
    net.collect()
    assert [m.method for m in net.take(tcp_phone)] == ["ACK"]
    assert [m.status for m in net.take(ALICE)] == [200]
    (call,) = net.sw.calls.values()
    assert call.state is CallState.ANSWERED


def test_register_refresh_with_to_tag_still_registers(net: Net) -> None:
    assert authed_register(net.sw, net.clock, call_id="tagged").status == 200
    tagged = register(cseq=5, call_id="tagged").replace(b"To: <sip:101@127.0.0.1>",
                                                         b"To: <sip:101@127.0.0.1>;tag=abc")
    assert exchange(net.sw, tagged, net.clock).status == 401  # the registrar, not 481


def test_invite_without_contact_400_and_callee_2xx_without_tag_fails_leg(net: Net) -> None:
    net.feed(invite(to="74950000000", src=CARRIER).replace(b"Contact: <sip:101@127.0.0.1:5070>\r\n", b""),
             CARRIER)
    statuses = [m.status for m in net.take(CARRIER)]
    assert statuses[-1] == 400
    place_call(net, "102")
    net.take(ALICE)
    (b_inv,) = net.take(BOB)
    bad = answer(b_inv, 200, body=sdp(50000)).replace(b";tag=callee-tag", b"")
    net.feed(bad, BOB)
    assert [m.status for m in net.take(ALICE)][-1] == 502


def test_trunk_without_caller_id_in_from_gets_it_in_p_asserted_identity() -> None:
    # gateways.<name>.caller_id_in_from = false: From names the trunk account, the caller ID
    # travels in P-Asserted-Identity (RFC 3325), as carriers that identify by account want.
    net = make_net("gateways.carrier.caller_id_in_from=false", "gateways.carrier.username=acct",
                   "gateways.carrier.password=pw")
    place_call(net, "89991234567")
    (out,) = net.take(CARRIER)
    assert out.from_.uri.user == "acct"
    assert "<sip:74950000101@127.0.0.1:5070>" in (out.get("p-asserted-identity") or "")
    default = make_net()
    place_call(default, "89991234567")
    (out,) = default.take(CARRIER)
    assert out.from_.uri.user == "74950000101" and out.get("p-asserted-identity") is None


def test_a_trunk_callers_odd_number_is_escaped_when_forwarded() -> None:
    # A number a trunk sent escaped (%40 is "@") must not break the URIs we build from it.
    net = make_net("dialplan.inbound[0].destination=gateway:carrier/+79990000000")
    net.feed(invite(to="74950000000", frm="a%40b", src=CARRIER), CARRIER)
    (out,) = [m for m in net.take(CARRIER) if getattr(m, "method", "") == "INVITE"]
    assert out.from_.uri.user == "a%40b" and out.from_.uri.unescaped_user == "a@b"
    assert out.uri.user == "+79990000000"
