"""RFC 3261 §12 dialogs from real INVITE/200 bytes."""

from __future__ import annotations

import pytest

from softpbx.sip.dialog import Dialog, DialogState
from softpbx.sip.errors import SipError
from softpbx.sip.parser import parse_message

from .sipkit import crlf


def wire(req):
    """What the stack would send: the dialog's request plus a top Via."""
    req.add_first("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKtest")
    return parse_message(req.serialize())

INVITE = crlf("""INVITE sip:102@pbx.example.com SIP/2.0
Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK74bf9
Record-Route: <sip:p2.example.com;lr>, <sip:p1.example.com;lr>
Max-Forwards: 70
From: "Alice" <sip:101@pbx.example.com>;tag=9fxced76sl
To: <sip:102@pbx.example.com>
Call-ID: 3848276298220188511@10.0.0.1
CSeq: 314159 INVITE
Contact: <sip:101@10.0.0.1:5060;transport=udp>
Content-Length: 0

""")

OK = crlf("""SIP/2.0 200 OK
Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK74bf9
Record-Route: <sip:p2.example.com;lr>, <sip:p1.example.com;lr>
From: "Alice" <sip:101@pbx.example.com>;tag=9fxced76sl
To: <sip:102@pbx.example.com>;tag=8321234356
Call-ID: 3848276298220188511@10.0.0.1
CSeq: 314159 INVITE
Contact: <sip:102@10.0.0.2:5062>
Content-Length: 0

""")


def test_uas_dialog_and_bye() -> None:
    inv = parse_message(INVITE)
    d = Dialog.as_uas(inv, "ourtag")
    assert d.id.remote_tag == "9fxced76sl" and d.id.local_tag == "ourtag"
    assert d.remote_target == "sip:101@10.0.0.1:5060;transport=udp"
    assert d.state is DialogState.CONFIRMED and d.remote_cseq == 314159
    bye = wire(d.request("BYE"))
    assert bye.method == "BYE" and bye.uri_text == "sip:101@10.0.0.1:5060;transport=udp"
    assert bye.get_all("route") == ["<sip:p2.example.com;lr>", "<sip:p1.example.com;lr>"]
    assert bye.from_.tag == "ourtag" and bye.to.tag == "9fxced76sl"
    assert bye.to.display == "Alice" and bye.cseq.number == 1


def test_uac_dialog_reverses_route_set_and_acks_with_invite_cseq() -> None:
    d = Dialog.as_uac(parse_message(INVITE), parse_message(OK))
    assert d.route_set == ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
    assert d.remote_target == "sip:102@10.0.0.2:5062" and d.id.remote_tag == "8321234356"
    ack = wire(d.ack(314159))
    assert ack.cseq.number == 314159 and ack.cseq.method == "ACK"
    reinv = wire(d.request("INVITE", body=b"v=0\r\n"))
    assert reinv.cseq.number == 314160 and reinv.content_type == "application/sdp"
    assert reinv.body == b"v=0\r\n"


def test_strict_router_takes_request_uri() -> None:
    resp = OK.replace(b"Record-Route: <sip:p2.example.com;lr>, <sip:p1.example.com;lr>",
                      b"Record-Route: <sip:p1.example.com>")
    d = Dialog.as_uac(parse_message(INVITE), parse_message(resp))
    req = wire(d.request("BYE"))
    assert req.uri_text == "sip:p1.example.com"
    assert req.get_all("route") == ["<sip:102@10.0.0.2:5062>"]


def test_in_dialog_cseq_order_and_target_refresh() -> None:
    d = Dialog.as_uas(parse_message(INVITE), "t")
    reinv = parse_message(INVITE.replace(b"314159 INVITE", b"314160 INVITE")
                          .replace(b"10.0.0.1:5060;transport", b"10.0.0.9:5090;transport"))
    d.accept_request(reinv)
    assert d.remote_target.startswith("sip:101@10.0.0.9:5090")
    with pytest.raises(SipError) as ei:
        d.accept_request(parse_message(INVITE))
    assert ei.value.status_hint == 500


def test_dialog_needs_one_contact_and_a_tag() -> None:
    with pytest.raises(SipError):
        Dialog.as_uas(parse_message(INVITE.replace(b"Contact: <sip:101@10.0.0.1:5060;transport=udp>\r\n", b"")), "t")
    with pytest.raises(SipError):
        Dialog.as_uac(parse_message(INVITE), parse_message(OK.replace(b";tag=8321234356", b"")))


def test_2xx_to_reinvite_refreshes_target_and_ack_repeats_credentials() -> None:
    # RFC 3261 §12.2.1.2: a 2xx to a target refresh request (re-INVITE) carries the new
    # remote target; §13.2.2.4: the ACK has the INVITE's credentials.
    d = Dialog.as_uac(parse_message(INVITE), parse_message(OK))
    reinv_ok = parse_message(OK.replace(b"Contact: <sip:102@10.0.0.2:5062>",
                                        b"Contact: <sip:102@10.0.0.7:5070>"))
    d.confirm(reinv_ok)
    assert d.remote_target == "sip:102@10.0.0.7:5070" and d.state is DialogState.CONFIRMED
    ack = wire(d.ack(314160, extra=[("Proxy-Authorization", 'Digest username="u"')]))
    assert ack.uri_text == "sip:102@10.0.0.7:5070" and ack.cseq.number == 314160
    assert ack.get_all("proxy-authorization") == ['Digest username="u"']
