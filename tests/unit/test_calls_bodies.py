"""Late offer and odd bodies on a fake clock: an INVITE without SDP from a phone and from the
carrier (our offer to the callee, the callee's answer as our offer in the 2xx, the answer in
the ACK), a ``multipart/mixed`` INVITE (SDP + ISUP), DTMF ``INFO`` passed between the legs,
and ``m=`` lines that are not relayed (video, T.38) refused with port 0 in both directions."""

from __future__ import annotations

import contextlib
import random

from softpbx.core.call import CallState
from softpbx.sip.body import multipart_parts, sdp_of
from softpbx.sip.errors import ParseError
from softpbx.sip.message import Response
from softpbx.sip.parser import parse_message
from softpbx.sip.sdp import media_address, parse_sdp

from .sipkit import crlf
from .test_calls import (
    ALICE,
    BOB,
    CARRIER,
    Net,
    ack_for,
    answer,
    answered_call,
    in_dialog,
    invite,
    make_net,
    place_call,
    sdp,
)


def with_body(msg: bytes, body: bytes, ctype: str = "application/sdp") -> bytes:
    """``msg`` (bytes without a body) with ``body`` of type ``ctype``."""
    head, _, _ = msg.partition(b"\r\n\r\n")
    lines = [ln for ln in head.split(b"\r\n")
             if not ln.lower().startswith((b"content-length:", b"content-type:"))]
    lines += [f"Content-Type: {ctype}".encode(), f"Content-Length: {len(body)}".encode()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def ack_with(resp: Response, to: str, body: bytes, src=ALICE) -> bytes:
    """The ACK for the 2xx ``resp``, carrying ``body`` as its SDP (sent from ``src``)."""
    ack = ack_for(resp, to, branch="z9hG4bKack9")
    ack = ack.replace(f"{ALICE[0]}:{ALICE[1]};".encode(), f"{src[0]}:{src[1]};".encode())
    return with_body(ack, body) if body else ack


def late_call_answered(net: Net, *, early: bool = False):
    """101 dials 102 with an INVITE without SDP; 102 answers our offer. Returns (the
    INVITE to 102, the 200 to 101: not ACKed yet)."""
    place_call(net, "102", body=b"")
    assert [m.status for m in net.take(ALICE)] == [100]
    (b_inv,) = net.take(BOB)
    if early:
        net.feed(answer(b_inv, 183, body=sdp(50000)), BOB)
        # RFC 3261 §13.2.1: no offer in an unreliable provisional: a plain 180
        (ringing,) = net.take(ALICE)
        assert ringing.status == 180 and ringing.body == b""
    net.feed(answer(b_inv, 200, body=sdp(50000)), BOB)
    assert [m.method for m in net.take(BOB)] == ["ACK"]
    (ok,) = net.take(ALICE)
    assert ok.status == 200
    return b_inv, ok


def test_late_offer_from_a_phone_offer_in_200_answer_in_ack() -> None:
    net = make_net()
    b_inv, ok = late_call_answered(net, early=True)
    (session,) = net.relay.sessions
    offer = parse_sdp(b_inv.body)  # our own offer of [media] codecs, at relay side B
    assert media_address(offer) == ("127.0.0.1", session.b.rtp_port)
    assert [c.encoding for c in offer.media[0].codecs()] == ["PCMU", "PCMA", "telephone-event"]
    assert session.b.rtp.sdp == ("127.0.0.1", 50000)
    # the 200 to the caller is an offer (the callee's answer through side A)
    assert ok.content_type == "application/sdp"
    assert media_address(parse_sdp(ok.body)) == ("127.0.0.1", session.a.rtp_port)
    assert session.a.rtp.sdp is None  # nothing known of the caller until its ACK
    (call,) = net.sw.calls.values()
    assert call.state is CallState.ANSWERED
    net.feed(ack_with(ok, "102", sdp(40000)), ALICE)
    assert session.a.rtp.sdp == ("127.0.0.1", 40000)
    assert call.neg.sending() == {"a": True, "b": True}
    net.advance(3.0)
    assert net.take(ALICE) == []  # the ACK stopped the 2xx retransmissions
    # a later hold from the callee goes to the caller as any re-INVITE
    net.feed(in_dialog("INVITE", b_inv, frm_tag="callee-tag", to_tag=b_inv.from_.tag, cseq=2,
                       src=BOB, frm="102", to="101", body=sdp(50000, direction="sendonly")), BOB)
    (reinv,) = [m for m in net.take(ALICE) if getattr(m, "method", "") == "INVITE"]
    assert b"a=sendonly" in reinv.body


def test_late_offer_ack_without_answer_ends_the_call() -> None:
    net = make_net()
    b_inv, ok = late_call_answered(net)
    net.feed(ack_with(ok, "102", b""), ALICE)
    (bye_a,) = net.take(ALICE)
    (bye_b,) = net.take(BOB)
    assert bye_a.method == bye_b.method == "BYE"
    net.feed(answer(bye_b, 200), BOB)
    net.drain()
    (cdr,) = net.cdrs
    assert cdr.disposition == "answered" and "no usable SDP answer" in cdr.cause
    assert net.sw.calls == {} and net.relay.sessions == []


def test_late_offer_from_the_carrier() -> None:
    net = make_net()
    net.feed(invite(to="74950000000", frm="79990001122", src=CARRIER, body=b""), CARRIER)
    assert [m.status for m in net.take(CARRIER)] == [100]
    (to_101,) = net.take(ALICE)
    (session,) = net.relay.sessions
    assert media_address(parse_sdp(to_101.body)) == ("127.0.0.1", session.b.rtp_port)
    net.feed(answer(to_101, 200, body=sdp(41000), contact="<sip:101@127.0.0.1:5061>"), ALICE)
    (ok,) = [m for m in net.take(CARRIER) if m.status == 200]
    assert media_address(parse_sdp(ok.body)) == ("127.0.0.1", session.a.rtp_port)
    net.feed(ack_with(ok, "74950000000", sdp(60000, ip="127.0.0.2"), src=CARRIER), CARRIER)
    assert session.a.rtp.sdp == ("127.0.0.2", 60000) and session.b.rtp.sdp == ("127.0.0.1", 41000)
    (call,) = net.sw.calls.values()
    assert call.state is CallState.ANSWERED and call.id.startswith("in_")


BOUNDARY = "unique-boundary-1"


def multipart(sdp_body: bytes) -> bytes:
    return crlf(f"""--{BOUNDARY}
Content-Type: application/sdp

""") + sdp_body + crlf(f"""
--{BOUNDARY}
Content-Type: application/isup;version=itu-t92+
Content-Disposition: signal;handling=optional

""") + b"\x01\x10\x49\x00" + crlf(f"""
--{BOUNDARY}--
""")


def test_multipart_invite_from_the_carrier_reads_its_sdp_part() -> None:
    net = make_net()
    data = with_body(invite(to="74950000000", frm="79990001122", src=CARRIER, body=b""),
                     multipart(sdp(40000)), f'multipart/mixed; boundary="{BOUNDARY}"')
    net.feed(data, CARRIER)
    assert [m.status for m in net.take(CARRIER)] == [100]
    (to_101,) = net.take(ALICE)
    (session,) = net.relay.sessions
    assert session.a.rtp.sdp == ("127.0.0.1", 40000)  # the caller's offer was read
    assert to_101.content_type == "application/sdp" and b"isup" not in to_101.body
    net.feed(answer(to_101, 200, body=sdp(41000), contact="<sip:101@127.0.0.1:5061>"), ALICE)
    (ok,) = [m for m in net.take(CARRIER) if m.status == 200]
    assert len(parse_sdp(ok.body).media) == 1


def test_multipart_without_sdp_is_a_late_offer_and_broken_ones_400_other_types_415() -> None:
    net = make_net()
    isup_only = crlf(f"--{BOUNDARY}\nContent-Type: application/isup\n\n") + b"\x01" + crlf(
        f"\n--{BOUNDARY}--\n")
    base = invite(to="74950000000", frm="79990001122", src=CARRIER, body=b"", branch="z9hG4bKm1")
    net.feed(with_body(base, isup_only, f"multipart/mixed;boundary={BOUNDARY}"), CARRIER)
    (to_101,) = net.take(ALICE)
    assert b"m=audio" in to_101.body  # our own offer
    net.inbox.clear()
    for n, (ctype, body, status) in enumerate([
            ("multipart/mixed", b"--x\r\n\r\nv=0\r\n", 400),                  # no boundary
            (f"multipart/mixed;boundary={BOUNDARY}", b"--other\r\n\r\nv=0", 400),  # no part
            ("text/plain", b"hello", 415)]):
        data = invite(to="74950000000", frm="79990001122", src=CARRIER, body=b"",
                      branch=f"z9hG4bKbad{n}", call_id=f"bad-{n}")
        net.feed(with_body(data, body, ctype), CARRIER)
        resp = net.take(CARRIER)[-1]  # after the stack's 100 Trying
        assert resp.status == status, ctype
        if status == 415:
            assert "multipart/mixed" in (resp.get("accept") or "")
    assert len(net.sw.calls) == 1


def info(resp_or_req, *, frm_tag: str, to_tag: str, src, frm: str, to: str, body: bytes,
         ctype: str, cseq: int = 10) -> bytes:
    msg = in_dialog("INFO", resp_or_req, frm_tag=frm_tag, to_tag=to_tag, cseq=cseq, src=src,
                    frm=frm, to=to, branch="z9hG4bKinfo")
    return with_body(msg, body, ctype) if body else msg


def test_dtmf_info_passed_to_the_other_leg_both_ways() -> None:
    net = make_net()
    b_inv, ok = answered_call(net)
    relay = b"Signal=5\r\nDuration=160\r\n"
    net.feed(info(ok, frm_tag="caller-tag", to_tag=ok.to.tag, src=ALICE, frm="101", to="102",
                  body=relay, ctype="application/dtmf-relay"), ALICE)
    assert [m.status for m in net.take(ALICE)] == [200]
    (to_bob,) = net.take(BOB)
    assert to_bob.method == "INFO" and to_bob.body == relay
    assert to_bob.content_type == "application/dtmf-relay" and to_bob.to.tag == "callee-tag"
    net.feed(answer(to_bob, 200), BOB)
    # and back: 102's phone sends application/dtmf
    net.feed(info(b_inv, frm_tag="callee-tag", to_tag=b_inv.from_.tag, src=BOB, frm="102",
                  to="101", body=b"7", ctype="application/dtmf"), BOB)
    assert [m.status for m in net.take(BOB)] == [200]
    (to_alice,) = net.take(ALICE)
    assert to_alice.method == "INFO" and to_alice.body == b"7"
    assert to_alice.content_type == "application/dtmf" and to_alice.to.tag == "caller-tag"
    net.feed(answer(to_alice, 200), ALICE)
    # a keep-alive INFO: 200, nothing passed on; another body: 415 (RFC 6086), the call lives
    net.feed(info(ok, frm_tag="caller-tag", to_tag=ok.to.tag, src=ALICE, frm="101", to="102",
                  body=b"", ctype="", cseq=11), ALICE)
    net.feed(info(ok, frm_tag="caller-tag", to_tag=ok.to.tag, src=ALICE, frm="101", to="102",
                  body=b"<xml/>", ctype="application/media_control+xml", cseq=12), ALICE)
    assert [m.status for m in net.take(ALICE)] == [200, 415]
    assert net.take(BOB) == []
    (call,) = net.sw.calls.values()
    assert call.state is CallState.ANSWERED


AV = crlf("""v=0
o=phone 1 1 IN IP4 127.0.0.1
s=-
c=IN IP4 127.0.0.1
t=0 0
m=video 40002 RTP/AVP 96
a=rtpmap:96 H264/90000
m=audio 40000 RTP/AVP 0 8
a=sendrecv
m=image 40004 udptl t38
""")


def test_video_and_t38_refused_with_port_0_and_the_answer_keeps_the_m_lines() -> None:
    net = make_net()
    place_call(net, "102", body=AV)
    net.take(ALICE)
    (b_inv,) = net.take(BOB)
    (session,) = net.relay.sessions
    offer = parse_sdp(b_inv.body)
    assert [(m.media, m.port) for m in offer.media] == [
        ("video", 0), ("audio", session.b.rtp_port), ("image", 0)]
    assert offer.media[0].formats == ["96"]  # same format list (RFC 3264 §6)
    assert session.a.rtp.sdp == ("127.0.0.1", 40000)  # the first audio stream is relayed
    # a callee that drops what it refuses instead of zeroing it: audio only (2 lines)
    answer_sdp = crlf("""v=0
o=bob 1 1 IN IP4 127.0.0.1
s=-
c=IN IP4 127.0.0.1
t=0 0
m=video 0 RTP/AVP 96
m=audio 50000 RTP/AVP 0
""")
    net.feed(answer(b_inv, 200, body=answer_sdp), BOB)
    (ok,) = [m for m in net.take(ALICE) if m.status == 200]
    got = parse_sdp(ok.body)
    assert [(m.media, m.port) for m in got.media] == [
        ("video", 0), ("audio", session.a.rtp_port), ("image", 0)]
    assert session.b.rtp.sdp == ("127.0.0.1", 50000)
    net.feed(ack_for(ok, "102", branch="z9hG4bKack2"), ALICE)
    (call,) = net.sw.calls.values()
    assert call.state is CallState.ANSWERED


def test_renegotiation_answer_keeps_the_offers_m_lines() -> None:
    net = make_net()
    b_inv, ok = answered_call(net)
    net.feed(in_dialog("INVITE", ok, frm_tag="caller-tag", to_tag=ok.to.tag, cseq=5, src=ALICE,
                       frm="101", to="102", body=AV), ALICE)
    (reinv,) = [m for m in net.take(BOB) if getattr(m, "method", "") == "INVITE"]
    assert [m.port == 0 for m in parse_sdp(reinv.body).media] == [True, False, True]
    hdrs = [(n, v) for n, v in reinv.headers if n in ("Via", "From", "To", "Call-ID", "CSeq")]
    net.feed(Response(200, None, hdrs + [("Contact", "<sip:102@127.0.0.1:5062>"),
                                         ("Content-Type", "application/sdp")],
                      sdp(50000)).serialize(), BOB)  # one m= line only
    (ok2,) = [m for m in net.take(ALICE) if getattr(m, "status", 0) == 200]
    (session,) = net.relay.sessions
    assert [(m.media, m.port) for m in parse_sdp(ok2.body).media] == [
        ("video", 0), ("audio", session.a.rtp_port), ("image", 0)]


def test_body_module_reads_multipart_strictly() -> None:
    ct = f"multipart/mixed;boundary={BOUNDARY}"
    parts = multipart_parts(ct, multipart(sdp(1234)))
    assert [p[0] for p in parts] == ["application/sdp", "application/isup"]
    assert parts[1][1] == b"\x01\x10\x49\x00"
    assert sdp_of(ct, multipart(sdp(1234))) == sdp(1234)
    lf = multipart(sdp(1234)).replace(b"\r\n", b"\n")
    assert sdp_of(ct, lf) == sdp(1234)
    assert sdp_of("application/isup", b"\x01") is None and sdp_of(None, b"v=0") == b"v=0"
    assert parse_message(with_body(invite(to="1", body=b""), multipart(sdp(9)), ct)).sdp_body \
        == sdp(9)


def test_late_offer_ack_with_unusable_sdp_ends_the_call_and_bad_bodies_never_crash() -> None:
    net = make_net()
    _, ok = late_call_answered(net)
    video_only = sdp(40000).replace(b"m=audio", b"m=video")  # nothing we can relay
    net.feed(ack_with(ok, "102", video_only), ALICE)
    assert [m.method for m in net.take(ALICE)] == ["BYE"]
    assert [m.method for m in net.take(BOB)] == ["BYE"]
    # whatever a multipart body holds, the split works or says 400, and the switch answers
    rnd = random.Random(12)
    good = multipart(sdp(1))
    ct = f"multipart/mixed;boundary={BOUNDARY}"
    for n in range(300):
        data = bytearray(good)
        for _ in range(rnd.randint(1, 8)):
            data[rnd.randrange(len(data))] = rnd.choice(b"-\r\n:x\x00")
        with contextlib.suppress(ParseError):
            multipart_parts(ct, bytes(data))
        if n % 10 == 0:
            msg = invite(to="74950000000", frm="7999", src=CARRIER, body=b"",
                         branch=f"z9hG4bKfz{n}", call_id=f"fz-{n}")
            net.feed(with_body(msg, bytes(data), ct), CARRIER)
            assert net.take(CARRIER), "no answer to a fuzzed multipart INVITE"
