"""Media decisions of a call, raw SIP through the Switch with a fake clock: the RTP timeout per
side (and who is expected to send, RFC 3264 §5.1/§6.1), the codecs each side of a recording
sends with, and which calls are recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from softpbx.core.call import CallState
from softpbx.core.events import RecordingCodecs, StartRecording, StopRecording

from .sipkit import challenge_params, crlf, digest
from .test_calls import (
    ALICE,
    BOB,
    CARRIER,
    Net,
    ack_for,
    answer,
    answered_call,
    edited_profiles,
    invite,
    make_net,
    place_call,
    sdp,
)
from .test_calls_dialogs import from_alice, from_bob, hang_up_from_alice, kinds

PACKET = b"\x80\x00" + bytes(10) + bytes(160)


def relay_for(net: Net, seconds: int, *, a: bool, b: bool) -> None:
    """Let ``seconds`` pass, a packet a second from the caller (``a``) and/or the callee."""
    (session,) = net.relay.sessions
    for _ in range(seconds):
        if a:
            session.a.rtp.receive(PACKET, ("127.0.0.1", 40000))
        if b:
            session.b.rtp.receive(PACKET, ("127.0.0.1", 50000))
        session.tick(net.clock.now)
        net.advance(1.0)


def reoffer_from_alice(net: Net, ok, cseq: int, direction: str, answer_direction: str) -> None:
    net.feed(from_alice("INVITE", ok, cseq, sdp(40000, direction=direction)), ALICE)
    (reinv,) = [m for m in net.take(BOB) if getattr(m, "method", None) == "INVITE"]
    net.feed(answer(reinv, 200, body=sdp(50000, direction=answer_direction)), BOB)
    assert 200 in kinds(net.take(ALICE))
    net.feed(from_alice("ACK", ok, cseq, branch="z9hG4bKack"), ALICE)
    net.take(BOB)


# -- 6. RTP timeout per side ------------------------------------------------------------------
def test_rtp_timeout_when_one_side_is_silent() -> None:
    # The caller's phone dropped off Wi-Fi; the callee (a trunk) keeps sending.
    net = make_net("media.rtp_timeout=10")
    answered_call(net)
    relay_for(net, 9, a=True, b=True)
    relay_for(net, 12, a=False, b=True)
    assert net.sw.calls == {}
    assert net.cdrs[0].cause == "no RTP from the caller for 10 s"
    assert "BYE" in kinds(net.take(ALICE)) and "BYE" in kinds(net.take(BOB))


def test_rtp_timeout_spares_the_side_that_is_not_expected_to_send() -> None:
    net = make_net("media.rtp_timeout=10")
    b_inv, ok = answered_call(net)
    (call,) = net.sw.calls.values()
    # the caller holds (sendonly, music on hold); the held callee only receives
    reoffer_from_alice(net, ok, 3, "sendonly", "recvonly")
    relay_for(net, 30, a=True, b=False)
    assert call.state is CallState.ANSWERED
    # ... and a holding phone that sends no music on hold at all is not dropped either
    relay_for(net, 30, a=False, b=False)
    assert call.state is CallState.ANSWERED
    # both inactive: nobody is expected to send
    reoffer_from_alice(net, ok, 4, "inactive", "inactive")
    relay_for(net, 30, a=False, b=False)
    assert call.state is CallState.ANSWERED
    # a callee answering recvonly to a sendrecv offer does not send either
    reoffer_from_alice(net, ok, 5, "sendrecv", "recvonly")
    relay_for(net, 30, a=True, b=False)
    assert call.state is CallState.ANSWERED
    # resumed: the callee has rtp_timeout from the resume on, not from its last packet
    reoffer_from_alice(net, ok, 6, "sendrecv", "sendrecv")
    relay_for(net, 8, a=True, b=False)
    assert call.state is CallState.ANSWERED
    relay_for(net, 8, a=True, b=False)  # checked every 5 s: by 15 s after the resume
    assert net.sw.calls == {} and net.cdrs[0].cause == "no RTP from the callee for 10 s"


def test_rtp_timeout_counts_from_the_answer() -> None:
    # Early media long before the answer does not count against the answered call.
    net = make_net("media.rtp_timeout=10")
    place_call(net, "102")
    net.take(ALICE)
    (b_inv,) = net.take(BOB)
    net.feed(answer(b_inv, 183, body=sdp(50000)), BOB)
    relay_for(net, 2, a=False, b=True)
    net.advance(20.0)
    net.feed(answer(b_inv, 200, body=sdp(50000)), BOB)
    (ok,) = [m for m in net.take(ALICE) if m.status == 200]
    net.feed(ack_for(ok, "102", branch="z9hG4bKack2"), ALICE)
    relay_for(net, 8, a=True, b=True)
    (call,) = net.sw.calls.values()
    assert call.state is CallState.ANSWERED
    hang_up_from_alice(net, ok, 3)
    net.assert_no_leaks()


# -- 14. codecs per side of a recording -------------------------------------------------------
CALLEE_SDP = crlf("""v=0
o=phone 1 1 IN IP4 127.0.0.1
s=-
c=IN IP4 127.0.0.1
t=0 0
m=audio 50000 RTP/AVP 8 96
a=rtpmap:96 telephone-event/8000
a=sendrecv
""")


def test_recording_codecs_per_side_at_answer_and_after_renegotiation() -> None:
    net = make_net()
    place_call(net, "102")
    net.take(ALICE)
    (b_inv,) = net.take(BOB)
    net.feed(answer(b_inv, 200, body=CALLEE_SDP), BOB)
    (call,) = net.sw.calls.values()
    kinds_ = [type(a) for a in net.actions]
    i = kinds_.index(StartRecording)
    assert kinds_[i + 1] is RecordingCodecs
    assert net.actions[i].codecs == {0: "PCMU", 8: "PCMA", 101: "telephone-event",
                                     96: "telephone-event"}  # merged, as before
    # the caller (offerer) sends with the answer's types, the callee with the offer's
    assert net.actions[i + 1] == RecordingCodecs(
        call.id, caller={8: "PCMA", 96: "telephone-event"},
        callee={0: "PCMU", 8: "PCMA", 101: "telephone-event"})
    (ok,) = [m for m in net.take(ALICE) if m.status == 200]
    net.feed(ack_for(ok, "102", branch="z9hG4bKack2"), ALICE)
    net.take(BOB)
    net.actions.clear()
    # the callee re-offers PCMU only, DTMF as 97; the caller answers with its own 101
    offer = CALLEE_SDP.replace(b"RTP/AVP 8 96", b"RTP/AVP 0 97").replace(b"rtpmap:96", b"rtpmap:97")
    net.feed(from_bob("INVITE", b_inv, 1, offer), BOB)
    (a_reinv,) = [m for m in net.take(ALICE) if getattr(m, "method", None) == "INVITE"]
    caller_answer = sdp(40000).replace(b"RTP/AVP 0 8 101", b"RTP/AVP 0 101")
    net.feed(answer(a_reinv, 200, body=caller_answer, contact="<sip:101@127.0.0.1:5061>"), ALICE)
    assert net.actions == [RecordingCodecs(call.id, caller={0: "PCMU", 97: "telephone-event"},
                                           callee={0: "PCMU", 101: "telephone-event"})]
    net.feed(from_bob("ACK", b_inv, 1, branch="z9hG4bKack"), BOB)
    hang_up_from_alice(net, ok, 3)
    assert any(isinstance(a, StopRecording) for a in net.actions)
    net.assert_no_leaks()


# -- 14. which calls are recorded: any party with record = true (OR), at the answer ----------
@pytest.fixture
def selective(tmp_path: Path) -> Path:
    """Only extension 102 records: 101, 103, the carrier and every route do not."""
    return edited_profiles(tmp_path, {
        "directory/101.toml": [("record = true", "record = false")],
        "directory/103.toml": [("record = true", "record = false")],
        "gateways/carrier.toml": [("record = true", "record = false")],
        # routes and rules record nothing by default
        "dialplan.toml": [("", '\n[[inbound]]\ndid = "74950000002"\ndestination = "102"\n')],
    })


def recorded(net: Net) -> bool:
    return any(isinstance(a, StartRecording) for a in net.actions)


def test_internal_call_recorded_when_the_callee_records(selective: Path) -> None:
    net = make_net(profiles=selective)
    answered_call(net)  # 101 (no) -> 102 (yes): recorded
    assert recorded(net)


def test_call_between_non_recording_parties_is_not_recorded(selective: Path) -> None:
    net = make_net(profiles=selective)
    place_call(net, "103")
    net.take(ALICE)
    (inv,) = net.take(("127.0.0.1", 5064))
    net.feed(answer(inv, 200, body=sdp(50000)), ("127.0.0.1", 5064))
    (call,) = net.sw.calls.values()
    assert call.state is CallState.ANSWERED and not call.recorded and not recorded(net)


def test_inbound_call_recorded_by_the_answering_extension(selective: Path) -> None:
    net = make_net(profiles=selective)
    net.feed(invite(to="74950000002", frm="79990001122", src=CARRIER), CARRIER)
    (inv,) = net.take(BOB)
    assert not recorded(net)
    net.feed(answer(inv, 200, body=sdp(50000)), BOB)
    assert recorded(net)


def test_master_switch_off_records_nothing() -> None:
    net = make_net("recording.enabled=false")
    answered_call(net)
    assert not recorded(net)


def test_outbound_recorded_by_the_calling_extension(selective: Path) -> None:
    # 102 dials out: the rule and the trunk do not record, the extension does
    net = make_net(profiles=selective)
    data = invite(to="89991234567", frm="102", src=BOB, call_id="c-out")
    net.feed(data, BOB)
    (r401,) = [m for m in net.take(BOB) if m.status == 401]
    p = challenge_params(r401.get_all("www-authenticate")[0])
    auth = digest(user="102", password="secret102", realm=p["realm"], nonce=p["nonce"],
                  method="INVITE", uri="sip:89991234567@127.0.0.1")
    net.feed(invite(to="89991234567", frm="102", src=BOB, call_id="c-out", cseq=2,
                    branch="z9hG4bKo2", auth=auth), BOB)
    (out,) = net.take(CARRIER)
    net.feed(answer(out, 200, body=sdp(60000), contact="<sip:gw@127.0.0.1:5070>"), CARRIER)
    assert recorded(net)


def test_private_sdp_address_of_a_nated_phone_is_replaced_by_its_source() -> None:
    """A phone behind NAT writes 192.168.1.50 into its SDP while its packets come from
    127.0.0.1: until latching, the relay sends to the signalling source, never to the
    private address (Kamailio's fix_nated_sdp)."""
    from softpbx.core.negotiation import _behind_nat

    net = make_net()
    place_call(net, "102", body=sdp(40000, ip="192.168.1.50"))
    (b_inv,) = [m for m in net.take(BOB) if getattr(m, "method", "") == "INVITE"]
    net.feed(answer(b_inv, 200, body=sdp(50000, ip="10.1.2.3")), BOB)
    (call,) = net.sw.calls.values()
    assert call.media.a.rtp.dest == ("127.0.0.1", 40000)
    assert call.media.b.rtp.dest == ("127.0.0.1", 50000)
    # A LAN phone (private source) and a public one keep their SDP addresses.
    assert not _behind_nat("192.168.1.50", "10.0.0.5")
    assert not _behind_nat("198.51.100.7", "127.0.0.1")
    assert _behind_nat("100.64.1.1", "203.0.113.9") and _behind_nat("fd00::1", "2001:db8::1")
    assert not _behind_nat("10.0.0.5", "10.0.0.5")
