"""Blind transfer (RFC 3515 REFER) and call pickup (*8, **<ext>) on a fake clock: the SIP
each party sees, the CRM events and the CDR of every path (answered, busy, no answer,
transferor gone, refusals; group and directed pickup)."""

from __future__ import annotations

import json

from softpbx.sip.message import Request, Response
from softpbx.sip.sdp import media_address, parse_sdp

from .sipkit import challenge_params, crlf, digest
from .test_calls import ALICE, BOB, CARRIER, Net, ack_for, answer, invite, make_net, place_call, sdp
from .test_crm_events import CLIENT, DID, bye_from_carrier, from_carrier, names

CAROL = ("127.0.0.1", 5064)  # extension 103's phone
PASSWORDS = {"101": "secret101", "102": "secret102", "103": "secret103"}
CONTACT_101 = "<sip:101@127.0.0.1:5061>"


def requests(msgs: list, method: str) -> list[Request]:
    return [m for m in msgs if getattr(m, "method", "") == method]


def statuses(msgs: list) -> list[int]:
    return [m.status for m in msgs if isinstance(m, Response)]


def inbound_answered_by_101(net: Net) -> tuple[Request, Response]:
    """The carrier calls the DID, 101 answers; returns (our INVITE to 101, our 200 to the
    carrier)."""
    from_carrier(net)
    (to_101,) = requests(net.take(ALICE), "INVITE")
    net.feed(answer(to_101, 180, contact=CONTACT_101), ALICE)
    net.feed(answer(to_101, 200, body=sdp(50000), contact=CONTACT_101), ALICE)
    assert requests(net.take(ALICE), "ACK")
    ok = [m for m in net.take(CARRIER) if isinstance(m, Response) and m.status == 200][0]
    net.feed(crlf(f"""ACK sip:softpbx@127.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKcack;rport
From: "Caller" <sip:{CLIENT}@127.0.0.1>;tag=caller-tag
To: {ok.get('to')}
Call-ID: {ok.call_id}
CSeq: 1 ACK
Max-Forwards: 70
Content-Length: 0

"""), CARRIER)
    return to_101, ok


def refer(dialog_inv: Request, target: str, *, cseq: int, auth: str = "",
          frm: str = "101", src: tuple[str, int] = ALICE, extra: str = "") -> bytes:
    """A REFER from the phone we sent ``dialog_inv`` to (it is the UAS of that dialog);
    ``target`` may carry URI headers (``102?Replaces=...``)."""
    user, _, hdrs = target.partition("?")
    lines = [
        "REFER sip:softpbx@127.0.0.1:5060 SIP/2.0",
        f"Via: SIP/2.0/UDP {src[0]}:{src[1]};branch=z9hG4bKref{cseq};rport",
        f"From: <sip:{frm}@127.0.0.1>;tag=callee-tag",
        f"To: {dialog_inv.get('from')}",
        f"Call-ID: {dialog_inv.call_id}",
        f"CSeq: {cseq} REFER",
        f"Contact: <sip:{frm}@{src[0]}:{src[1]}>",
        f"Refer-To: <sip:{user}@127.0.0.1{'?' if hdrs else ''}{hdrs}>",
        "Max-Forwards: 70",
    ]
    if auth:
        lines.append(f"Authorization: {auth}")
    if extra:
        lines.append(extra)
    lines.append("Content-Length: 0")
    return crlf("\n".join(lines) + "\n\n")


def send_refer(net: Net, dialog_inv: Request, target: str, *, frm: str = "101",
               src: tuple[str, int] = ALICE, password: str | None = None) -> Response:
    """REFER through the digest challenge; returns the final answer to it."""
    net.feed(refer(dialog_inv, target, cseq=1, frm=frm, src=src), src)
    (r401,) = [m for m in net.take(src) if isinstance(m, Response)]
    assert r401.status == 401
    p = challenge_params(r401.get_all("www-authenticate")[0])
    auth = digest(user=frm, password=password or PASSWORDS[frm], realm=p["realm"],
                  nonce=p["nonce"], method="REFER", uri="sip:softpbx@127.0.0.1:5060")
    net.feed(refer(dialog_inv, target, cseq=2, auth=auth, frm=frm, src=src), src)
    msgs = net.inbox.get(src, [])
    (resp,) = [m for m in msgs if isinstance(m, Response)]
    msgs.remove(resp)
    return resp


def sipfrags(msgs: list, net: Net | None = None) -> list[tuple[str, str]]:
    """(status line, Subscription-State) of the NOTIFYs in ``msgs``; 101's phone answers
    them 200 (through ``net``)."""
    out = []
    for n in requests(msgs, "NOTIFY"):
        if net is not None:
            net.feed(ok_to(n), ALICE)
        assert n.get("event") == "refer;id=2"
        assert n.get("content-type") == "message/sipfrag;version=2.0"
        out.append((n.body.decode().strip(), (n.get("subscription-state") or "").split(";")[0]))
    return out


def ok_to(req: Request) -> bytes:
    """A phone's 200 to an in-dialog request the switch sent it (NOTIFY, BYE)."""
    return Response(200, None, [(n, v) for n, v in req.headers
                                if n in ("Via", "From", "To", "Call-ID", "CSeq")]).serialize()


def test_blind_transfer_answered_follows_the_call_in_events_and_cdr() -> None:
    net = make_net()
    to_101, ok = inbound_answered_by_101(net)
    net.advance(5.0)
    resp = send_refer(net, to_101, "102")
    assert resp.status == 202
    assert sipfrags(net.take(ALICE), net) == [("SIP/2.0 100 Trying", "active")]
    (to_102,) = requests(net.take(BOB), "INVITE")
    # the target sees the remaining party (the client) and who referred it
    assert to_102.from_.uri.user == CLIENT
    assert to_102.get("referred-by") == "<sip:101@127.0.0.1>"
    (session,) = net.relay.sessions
    assert media_address(parse_sdp(to_102.body)) == ("127.0.0.1", session.b.rtp_port)
    net.feed(answer(to_102, 180), BOB)
    assert sipfrags(net.take(ALICE), net) == [("SIP/2.0 180 Ringing", "active")]
    net.advance(2.0)
    net.feed(answer(to_102, 200, body=sdp(50002)), BOB)
    assert requests(net.take(BOB), "ACK")
    to_alice = net.take(ALICE)
    assert sipfrags(to_alice, net) == [("SIP/2.0 200 OK", "terminated")]
    (bye,) = requests(to_alice, "BYE")
    net.feed(ok_to(bye), ALICE)
    # media re-pointed: side B now sends to 102; same codecs, so the carrier is not
    # re-INVITEd (its SDP from us already names side A)
    assert session.b.rtp.sdp == ("127.0.0.1", 50002)
    assert requests(net.take(CARRIER), "INVITE") == []
    net.advance(10.0)
    bye_from_carrier(net, ok)
    (bye_102,) = requests(net.take(BOB), "BYE")
    net.feed(answer(bye_102, 200), BOB)
    assert names(net) == ["NOTIFY_START", "NOTIFY_INTERNAL", "NOTIFY_INTERNAL", "NOTIFY_END"]
    events = net.events()
    pbx = {f["pbx_call_id"] for _, f in events}
    assert len(pbx) == 1
    assert events[1][1]["internal"] == "101" and events[2][1]["internal"] == "102"
    end = events[3][1]
    assert (end["internal"], end["duration"], end["disposition"]) == ("102", "17", "answered")
    (cdr,) = net.cdrs
    assert (cdr.extension, cdr.duration, cdr.disposition) == ("102", 17, "answered")
    chain = json.loads(cdr.transfers)
    assert [e["event"] for e in chain] == ["answered", "blind", "answered"]
    assert chain[0]["by"] == "101" and chain[1] == {"at": 5, "event": "blind", "by": "101",
                                                    "to": "102"}
    assert chain[2]["by"] == "102" and chain[2]["at"] == 7
    net.assert_no_leaks()


def test_blind_transfer_target_busy_stays_with_the_transferor() -> None:
    net = make_net()
    to_101, ok = inbound_answered_by_101(net)
    assert send_refer(net, to_101, "102").status == 202
    sipfrags(net.take(ALICE), net)
    (to_102,) = requests(net.take(BOB), "INVITE")
    net.feed(answer(to_102, 486), BOB)
    assert sipfrags(net.take(ALICE), net) == [("SIP/2.0 486 Busy Here", "terminated")]
    (call,) = net.sw.calls.values()
    assert call.answered.extension == "101" and call.transfer is None
    net.advance(3.0)
    bye_from_carrier(net, ok)
    (bye,) = requests(net.take(ALICE), "BYE")
    net.feed(answer(bye, 200, contact=CONTACT_101), ALICE)
    (cdr,) = net.cdrs
    assert (cdr.extension, cdr.disposition) == ("101", "answered")
    chain = json.loads(cdr.transfers)
    assert chain[-1] == {"at": 0, "event": "failed", "to": "102", "code": 486,
                         "disposition": "busy"}
    assert names(net)[-1] == "NOTIFY_END" and net.events()[-1][1]["internal"] == "101"
    net.assert_no_leaks()


def test_blind_transfer_no_answer_comes_back() -> None:
    net = make_net()
    to_101, _ok = inbound_answered_by_101(net)
    assert send_refer(net, to_101, "102").status == 202
    sipfrags(net.take(ALICE), net)
    (to_102,) = requests(net.take(BOB), "INVITE")
    net.feed(answer(to_102, 180), BOB)
    sipfrags(net.take(ALICE), net)
    net.advance(net.sw.config.calls.no_answer_timeout + 0.2)
    (cancel,) = requests(net.take(BOB), "CANCEL")
    net.feed(answer(cancel, 200), BOB)
    net.feed(answer(to_102, 487), BOB)
    frags = sipfrags(net.take(ALICE), net)
    assert frags == [("SIP/2.0 480 Temporarily Unavailable", "terminated")]
    (call,) = net.sw.calls.values()
    assert call.answered.extension == "101"
    call.hang_up(net.clock.now)
    net.collect()
    assert json.loads(net.cdrs[0].transfers)[-1]["disposition"] == "no answer"


def test_blind_transfer_transferor_gone_then_target_busy_ends_the_call() -> None:
    net = make_net()
    to_101, _ok = inbound_answered_by_101(net)
    assert send_refer(net, to_101, "102").status == 202
    sipfrags(net.take(ALICE), net)
    (to_102,) = requests(net.take(BOB), "INVITE")
    # RFC 5589: 101 hangs up once its REFER is accepted
    net.feed(crlf(f"""BYE sip:softpbx@127.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKbye101;rport
From: <sip:101@127.0.0.1>;tag=callee-tag
To: {to_101.get('from')}
Call-ID: {to_101.call_id}
CSeq: 3 BYE
Max-Forwards: 70
Content-Length: 0

"""), ALICE)
    assert statuses(net.take(ALICE)) == [200]
    assert requests(net.take(CARRIER), "BYE") == []  # the client waits for 102
    net.feed(answer(to_102, 486), BOB)
    (bye,) = requests(net.take(CARRIER), "BYE")
    net.feed(answer(bye, 200), CARRIER)
    assert net.take(ALICE) == []  # no NOTIFY to a transferor that is gone
    (cdr,) = net.cdrs
    assert cdr.disposition == "answered" and cdr.cause == "transfer to 102 failed: busy"
    assert names(net)[-1] == "NOTIFY_END"
    net.assert_no_leaks()


def test_blind_transfer_transferor_gone_then_target_answers() -> None:
    net = make_net()
    to_101, ok = inbound_answered_by_101(net)
    assert send_refer(net, to_101, "102").status == 202
    sipfrags(net.take(ALICE), net)
    (to_102,) = requests(net.take(BOB), "INVITE")
    net.feed(crlf(f"""BYE sip:softpbx@127.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKbye101;rport
From: <sip:101@127.0.0.1>;tag=callee-tag
To: {to_101.get('from')}
Call-ID: {to_101.call_id}
CSeq: 3 BYE
Max-Forwards: 70
Content-Length: 0

"""), ALICE)
    net.take(ALICE)
    net.feed(answer(to_102, 200, body=sdp(50002)), BOB)
    assert net.take(ALICE) == []
    (call,) = net.sw.calls.values()
    assert call.answered.extension == "102"
    bye_from_carrier(net, ok)
    assert requests(net.take(BOB), "BYE")
    assert net.cdrs[0].extension == "102"


def test_transfer_of_a_held_party_re_invites_it_off_hold() -> None:
    """The transferor put the client on hold before the REFER: once 102 answers, the client
    is offered 102's session (sendrecv) through the same relay side."""
    net = make_net()
    to_101, ok = inbound_answered_by_101(net)
    hold = crlf(f"""INVITE sip:softpbx@127.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKhold;rport
From: <sip:101@127.0.0.1>;tag=callee-tag
To: {to_101.get('from')}
Call-ID: {to_101.call_id}
CSeq: 1 INVITE
Contact: {CONTACT_101}
Max-Forwards: 70
Content-Type: application/sdp
Content-Length: {len(sdp(50000, direction='sendonly'))}

""") + sdp(50000, direction="sendonly")
    net.feed(hold, ALICE)
    (reinv,) = requests(net.take(CARRIER), "INVITE")
    net.feed(Response(200, None, [(n, v) for n, v in reinv.headers
                                  if n in ("Via", "From", "To", "Call-ID", "CSeq")]
                      + [("Contact", "<sip:c@127.0.0.1:5070>"),
                         ("Content-Type", "application/sdp")],
                      sdp(40000, direction="recvonly")).serialize(), CARRIER)
    net.take(CARRIER)
    (ok_hold,) = [m for m in net.take(ALICE) if isinstance(m, Response) and m.status >= 200]
    net.feed(crlf(f"""ACK sip:softpbx@127.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKholdack;rport
From: <sip:101@127.0.0.1>;tag=callee-tag
To: {to_101.get('from')}
Call-ID: {to_101.call_id}
CSeq: 1 ACK
Max-Forwards: 70
Content-Length: 0

"""), ALICE)
    assert ok_hold.status == 200
    net.feed(refer(to_101, "102", cseq=2), ALICE)
    (r401,) = [m for m in net.take(ALICE) if isinstance(m, Response)]
    p = challenge_params(r401.get_all("www-authenticate")[0])
    auth = digest(user="101", password="secret101", realm=p["realm"], nonce=p["nonce"],
                  method="REFER", uri="sip:softpbx@127.0.0.1:5060")
    net.feed(refer(to_101, "102", cseq=3, auth=auth), ALICE)
    assert statuses(net.take(ALICE)) == [202]
    (to_102,) = requests(net.take(BOB), "INVITE")
    assert b"a=sendrecv" in to_102.body  # not the client's recvonly
    net.feed(answer(to_102, 200, body=sdp(50002)), BOB)
    (reinv2,) = requests(net.take(CARRIER), "INVITE")
    (session,) = net.relay.sessions
    assert b"a=sendrecv" in reinv2.body
    assert media_address(parse_sdp(reinv2.body)) == ("127.0.0.1", session.a.rtp_port)
    net.feed(Response(200, None, [(n, v) for n, v in reinv2.headers
                                  if n in ("Via", "From", "To", "Call-ID", "CSeq")]
                      + [("Contact", "<sip:c@127.0.0.1:5070>"),
                         ("Content-Type", "application/sdp")],
                      sdp(40000)).serialize(), CARRIER)
    assert requests(net.take(CARRIER), "ACK")
    (call,) = net.sw.calls.values()
    assert not call.on_hold and call.answered.extension == "102"
    bye_from_carrier(net, ok)
    assert net.cdrs[0].extension == "102"


def test_transfer_to_an_outside_number_goes_through_the_outbound_rules() -> None:
    net = make_net()
    to_101, _ok = inbound_answered_by_101(net)
    net.take(CARRIER)
    assert send_refer(net, to_101, "89991234567").status == 202
    (out,) = requests(net.take(CARRIER), "INVITE")
    # the dial rule's rewrite and the extension's outbound caller ID, as a dialled call
    assert out.uri.user != "" and out.get("referred-by") == "<sip:101@127.0.0.1>"


def test_refer_refused() -> None:
    net = make_net()
    to_101, ok = inbound_answered_by_101(net)
    # a number no dial rule allows: refused before any 202, nothing dialled
    resp = send_refer(net, to_101, "555")
    assert resp.status == 404
    assert requests(net.take(CARRIER), "INVITE") == []
    # a wrong password: 403, no transfer
    net.feed(refer(to_101, "102", cseq=5), ALICE)
    (r401,) = [m for m in net.take(ALICE) if isinstance(m, Response)]
    p = challenge_params(r401.get_all("www-authenticate")[0])
    bad = digest(user="101", password="wrong", realm=p["realm"], nonce=p["nonce"],
                 method="REFER", uri="sip:softpbx@127.0.0.1:5060")
    net.feed(refer(to_101, "102", cseq=6, auth=bad), ALICE)
    assert statuses(net.take(ALICE)) == [403]
    # another extension's credentials on 101's dialog: 403
    p = challenge_params(r401.get_all("www-authenticate")[0])
    other = digest(user="102", password="secret102", realm=p["realm"], nonce=p["nonce"],
                   method="REFER", uri="sip:softpbx@127.0.0.1:5060")
    net.feed(refer(to_101, "102", cseq=7, auth=other), ALICE)
    assert statuses(net.take(ALICE)) == [403]
    # the trunk side never transfers (no challenge: refused at once)
    data = crlf(f"""REFER sip:softpbx@127.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKtref;rport
From: <sip:{CLIENT}@127.0.0.1>;tag=caller-tag
To: {ok.get('to')}
Call-ID: {ok.call_id}
CSeq: 5 REFER
Contact: <sip:c@127.0.0.1:5070>
Refer-To: <sip:89991234567@127.0.0.1>
Max-Forwards: 70
Content-Length: 0

""")
    net.feed(data, CARRIER)
    assert statuses(net.take(CARRIER)) == [403]
    assert requests(net.take(BOB), "INVITE") == []
    (call,) = net.sw.calls.values()
    assert call.transfer is None and call.answered.extension == "101"


def test_refer_sub_false_sends_no_notify() -> None:
    net = make_net()
    to_101, _ok = inbound_answered_by_101(net)
    net.feed(refer(to_101, "102", cseq=1), ALICE)
    (r401,) = [m for m in net.take(ALICE) if isinstance(m, Response)]
    p = challenge_params(r401.get_all("www-authenticate")[0])
    auth = digest(user="101", password="secret101", realm=p["realm"], nonce=p["nonce"],
                  method="REFER", uri="sip:softpbx@127.0.0.1:5060")
    net.feed(refer(to_101, "102", cseq=2, auth=auth, extra="Refer-Sub: false"), ALICE)
    msgs = net.take(ALICE)
    assert statuses(msgs) == [202] and msgs[0].get("refer-sub") == "false"
    assert requests(msgs, "NOTIFY") == []


# -- call pickup ------------------------------------------------------------------------------
def dial(net: Net, to: str, *, frm: str, src: tuple[str, int], n: int = 0) -> None:
    """Extension ``frm`` on ``src`` dials ``to`` through the digest challenge."""
    call_id = f"pick-{frm}" + (f"-{n}" if n else "")
    net.feed(invite(to=to, frm=frm, src=src, call_id=call_id, body=sdp(60000),
                    branch=f"z9hG4bKp1{n}"), src)
    (r401,) = [m for m in net.take(src) if isinstance(m, Response) and m.status == 401]
    p = challenge_params(r401.get_all("www-authenticate")[0])
    auth = digest(user=frm, password=PASSWORDS[frm], realm=p["realm"], nonce=p["nonce"],
                  method="INVITE", uri=f"sip:{to}@127.0.0.1")
    net.feed(invite(to=to, frm=frm, src=src, call_id=call_id, cseq=2, branch=f"z9hG4bKp2{n}",
                    auth=auth, body=sdp(60000)), src)


def test_group_pickup_answers_the_ringing_call_and_names_the_picker() -> None:
    net = make_net()
    from_carrier(net)
    (to_101,) = requests(net.take(ALICE), "INVITE")
    net.feed(answer(to_101, 180, contact=CONTACT_101), ALICE)
    net.take(CARRIER)
    dial(net, "*8", frm="102", src=BOB)
    to_bob = net.take(BOB)
    ok_bob = [m for m in to_bob if isinstance(m, Response) and m.status == 200][0]
    (cancel,) = requests(net.take(ALICE), "CANCEL")
    assert cancel.get("reason") == 'SIP;cause=200;text="Call completed elsewhere"'
    ok_carrier = [m for m in net.take(CARRIER) if isinstance(m, Response) and m.status == 200][0]
    (session,) = net.relay.sessions
    assert media_address(parse_sdp(ok_bob.body)) == ("127.0.0.1", session.b.rtp_port)
    assert media_address(parse_sdp(ok_carrier.body)) == ("127.0.0.1", session.a.rtp_port)
    assert session.b.rtp.sdp == ("127.0.0.1", 60000)
    net.feed(crlf(f"""ACK sip:softpbx@127.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKpack;rport
From: "Caller" <sip:102@127.0.0.1>;tag=caller-tag
To: {ok_bob.get('to')}
Call-ID: pick-102
CSeq: 2 ACK
Max-Forwards: 70
Content-Length: 0

"""), BOB)
    net.feed(answer(cancel, 200), ALICE)
    net.feed(answer(to_101, 487), ALICE)
    net.advance(4.0)
    bye_from_carrier(net, ok_carrier)
    (bye,) = requests(net.take(BOB), "BYE")
    net.feed(ok_to(bye), BOB)
    assert names(net) == ["NOTIFY_START", "NOTIFY_INTERNAL", "NOTIFY_INTERNAL", "NOTIFY_END"]
    ev = net.events()
    assert [ev[1][1]["internal"], ev[2][1]["internal"], ev[3][1]["internal"]] == \
        ["101", "102", "102"]
    assert ev[3][1]["disposition"] == "answered" and ev[3][1]["duration"] == "4"
    (cdr,) = net.cdrs
    assert cdr.extension == "102" and cdr.disposition == "answered"
    assert json.loads(cdr.transfers) == [{"at": 0, "event": "pickup", "by": "102",
                                          "ringing": "101"}]
    assert net.sw.calls == {}
    net.assert_no_leaks()


def test_directed_pickup_and_nothing_to_pick_up() -> None:
    net = make_net()
    dial(net, "**101", frm="103", src=CAROL)  # nothing rings 101 yet
    assert statuses(net.take(CAROL)) == [100, 404]
    from_carrier(net, call_id="trunk-2", branch="z9hG4bKc2")
    (to_101,) = requests(net.take(ALICE), "INVITE")
    net.feed(answer(to_101, 180, contact=CONTACT_101), ALICE)
    dial(net, "**101", frm="103", src=CAROL, n=2)
    assert 200 in statuses(net.take(CAROL))
    (call,) = net.sw.calls.values()
    assert call.answered.extension == "103"
    assert [e for e, _ in net.events()][-1] == "NOTIFY_INTERNAL"
    assert net.events()[-1][1]["internal"] == "103"
    assert net.events()[-1][1]["called_did"] == DID


def test_outbound_call_transferred_by_the_caller_names_the_last_employee() -> None:
    """101 dialled a client out through the carrier and transfers the client to 102 (the
    transferor is the caller's leg): 102 is offered the client's SDP at side A, and the
    NOTIFY_OUT_END names 102 with the whole talk time."""
    net = make_net()
    place_call(net, "89991234567")
    ok_101 = [m for m in net.take(ALICE) if isinstance(m, Response) and m.status >= 200]
    assert ok_101 == []
    (out,) = requests(net.take(CARRIER), "INVITE")
    net.feed(answer(out, 200, body=sdp(50000), contact="<sip:x@127.0.0.1:5070>"), CARRIER)
    net.take(CARRIER)
    (ok_a,) = [m for m in net.take(ALICE) if isinstance(m, Response) and m.status == 200]
    net.feed(ack_for(ok_a, "89991234567", branch="z9hG4bKack2"), ALICE)
    net.advance(2.0)

    def refer_from_caller(cseq: int, auth: str = "") -> bytes:
        auth_line = f"Authorization: {auth}\n" if auth else ""
        return crlf(f"""REFER sip:softpbx@127.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bKcref{cseq};rport
From: "Caller" <sip:101@127.0.0.1>;tag=caller-tag
To: {ok_a.get('to')}
Call-ID: {ok_a.call_id}
CSeq: {cseq} REFER
Contact: <sip:101@127.0.0.1:5061>
Refer-To: <sip:102@127.0.0.1>
Max-Forwards: 70
{auth_line}Content-Length: 0

""")

    net.feed(refer_from_caller(3), ALICE)
    (r401,) = [m for m in net.take(ALICE) if isinstance(m, Response)]
    p = challenge_params(r401.get_all("www-authenticate")[0])
    auth = digest(user="101", password="secret101", realm=p["realm"], nonce=p["nonce"],
                  method="REFER", uri="sip:softpbx@127.0.0.1:5060")
    net.feed(refer_from_caller(4, auth), ALICE)
    msgs = net.take(ALICE)
    assert statuses(msgs) == [202]
    (to_102,) = requests(net.take(BOB), "INVITE")
    assert to_102.from_.uri.user == "89991234567"  # the client, as 102 sees it
    (session,) = net.relay.sessions
    assert media_address(parse_sdp(to_102.body)) == ("127.0.0.1", session.a.rtp_port)
    net.feed(answer(to_102, 200, body=sdp(50002)), BOB)
    assert session.a.rtp.sdp == ("127.0.0.1", 50002)
    (bye,) = requests(net.take(ALICE), "BYE")
    assert requests(net.take(CARRIER), "INVITE") == []  # same codecs: no re-INVITE
    net.advance(3.0)
    (call,) = net.sw.calls.values()
    assert call.caller_extension == "102"
    call.hang_up(net.clock.now)
    net.collect()
    assert names(net) == ["NOTIFY_OUT_START", "NOTIFY_OUT_END"]
    end = net.events()[1][1]
    assert (end["internal"], end["duration"], end["disposition"]) == ("102", "5", "answered")
    (cdr,) = net.cdrs
    assert cdr.caller_extension == "102" and cdr.pbx_call_id == end["pbx_call_id"]
    assert cdr.sip_call_id == "call-1"  # the caller's first leg, not the target's
    assert json.loads(cdr.transfers)[1] == {"at": 2, "event": "blind", "by": "101", "to": "102"}


# -- attended transfer ------------------------------------------------------------------------
def test_attended_transfer_joins_the_client_and_102_and_ends_both_of_101s_legs() -> None:
    """101 talks to the client (call 1), calls 102 (call 2), then REFERs call 1 with
    Replaces naming call 2: the client and 102 are joined in call 1 (its relay, its
    pbx_call_id), 102 is re-INVITEd to call 1's relay side, 101 gets BYE on both dialogs."""
    net = make_net()
    to_101, ok = inbound_answered_by_101(net)
    net.advance(3.0)
    place_call(net, "102")
    net.take(ALICE)
    (b_inv,) = requests(net.take(BOB), "INVITE")
    net.feed(answer(b_inv, 200, body=sdp(50002)), BOB)
    net.take(BOB)
    (ok2,) = [m for m in net.take(ALICE) if isinstance(m, Response) and m.status == 200]
    net.feed(ack_for(ok2, "102", branch="z9hG4bKack2"), ALICE)
    assert len(net.relay.sessions) == 2
    call1 = next(c for c in net.sw.calls.values() if c.id.startswith("in_"))
    net.advance(2.0)
    replaces = f"call-1%3Bto-tag%3D{ok2.to.tag}%3Bfrom-tag%3Dcaller-tag"
    net.feed(refer(to_101, f"102?Replaces={replaces}", cseq=1), ALICE)
    (r401,) = [m for m in net.take(ALICE) if isinstance(m, Response)]
    p = challenge_params(r401.get_all("www-authenticate")[0])
    auth = digest(user="101", password="secret101", realm=p["realm"], nonce=p["nonce"],
                  method="REFER", uri="sip:softpbx@127.0.0.1:5060")
    net.feed(refer(to_101, f"102?Replaces={replaces}", cseq=2, auth=auth), ALICE)
    to_alice = net.take(ALICE)
    assert statuses(to_alice) == [202]
    assert sipfrags(to_alice, net) == [("SIP/2.0 100 Trying", "active"),
                                       ("SIP/2.0 200 OK", "terminated")]
    byes = requests(to_alice, "BYE")
    assert sorted(b.call_id for b in byes) == sorted([to_101.call_id, "call-1"])
    for b in byes:
        net.feed(ok_to(b), ALICE)
    # 102 is moved to call 1's relay side B (same codecs as 101: the client is left alone)
    (reinv,) = requests(net.take(BOB), "INVITE")
    assert reinv.call_id == b_inv.call_id
    (session,) = net.relay.sessions
    assert session is call1.media
    assert media_address(parse_sdp(reinv.body)) == ("127.0.0.1", session.b.rtp_port)
    assert session.b.rtp.sdp == ("127.0.0.1", 50002)
    assert requests(net.take(CARRIER), "INVITE") == []
    net.feed(Response(200, None, [(n, v) for n, v in reinv.headers
                                  if n in ("Via", "From", "To", "Call-ID", "CSeq")]
                      + [("Contact", "<sip:102@127.0.0.1:5062>"),
                         ("Content-Type", "application/sdp")], sdp(50002)).serialize(), BOB)
    assert requests(net.take(BOB), "ACK")
    assert call1.answered.extension == "102" and call1.transfer is None
    # the consultation call ended with its own CDR
    (cdr2,) = net.cdrs
    assert cdr2.direction == "internal" and cdr2.cause.startswith("joined to in_")
    net.advance(4.0)
    bye_from_carrier(net, ok)
    (bye,) = requests(net.take(BOB), "BYE")
    net.feed(answer(bye, 200), BOB)
    cdr1 = net.cdrs[1]
    assert (cdr1.extension, cdr1.duration, cdr1.disposition) == ("102", 9, "answered")
    chain = json.loads(cdr1.transfers)
    assert [e["event"] for e in chain] == ["answered", "attended"]
    assert chain[0]["by"] == "101" and chain[1] == {"at": 5, "event": "attended", "by": "101",
                                                    "to": "102"}
    assert names(net) == ["NOTIFY_START", "NOTIFY_INTERNAL", "NOTIFY_INTERNAL", "NOTIFY_END"]
    assert [f.get("internal") for _, f in net.events()] == [None, "101", "102", "102"]
    net.assert_no_leaks()


def test_attended_transfer_naming_an_unknown_dialog_is_481() -> None:
    net = make_net()
    to_101, _ok = inbound_answered_by_101(net)
    resp = send_refer(net, to_101, "102?Replaces=nope%3Bto-tag%3Da%3Bfrom-tag%3Db")
    assert resp.status == 481
    (call,) = net.sw.calls.values()
    assert call.answered.extension == "101"


# -- INVITE with Replaces (RFC 3891) ----------------------------------------------------------
def replacing_invite(net: Net, replaces: str, *, frm: str = "101",
                     src: tuple[str, int] = ("127.0.0.1", 5063)) -> None:
    """Extension ``frm`` on ``src`` sends an INVITE with ``Replaces`` (through the challenge)."""
    def data(cseq: int, auth: str = "") -> bytes:
        body = sdp(60000)
        a = f"Authorization: {auth}\n" if auth else ""
        return crlf(f"""INVITE sip:101@127.0.0.1 SIP/2.0
Via: SIP/2.0/UDP {src[0]}:{src[1]};branch=z9hG4bKrep{cseq};rport
From: <sip:{frm}@127.0.0.1>;tag=rep-tag
To: <sip:101@127.0.0.1>
Call-ID: replacing-1
CSeq: {cseq} INVITE
Contact: <sip:{frm}@{src[0]}:{src[1]}>
Replaces: {replaces}
Require: replaces
Max-Forwards: 70
Content-Type: application/sdp
{a}Content-Length: {len(body)}

""") + body
    net.feed(data(1), src)
    (r401,) = [m for m in net.take(src) if isinstance(m, Response) and m.status == 401]
    p = challenge_params(r401.get_all("www-authenticate")[0])
    auth = digest(user=frm, password=PASSWORDS[frm], realm=p["realm"], nonce=p["nonce"],
                  method="INVITE", uri="sip:101@127.0.0.1")
    net.feed(data(2, auth), src)


def test_invite_with_replaces_moves_the_call_to_another_phone() -> None:
    """101's second phone takes over 101's answered call: it gets the client's session at
    the relay side that faced the first phone, which gets a BYE; the client is left alone
    (same codecs); one CDR, the chain says replaced."""
    net = make_net()
    to_101, ok = inbound_answered_by_101(net)
    phone2 = ("127.0.0.1", 5063)
    replacing_invite(net, f"{to_101.call_id};to-tag={to_101.from_.tag};from-tag=callee-tag")
    (ok2,) = [m for m in net.take(phone2) if isinstance(m, Response) and m.status == 200]
    (session,) = net.relay.sessions
    assert media_address(parse_sdp(ok2.body)) == ("127.0.0.1", session.b.rtp_port)
    assert session.b.rtp.sdp == ("127.0.0.1", 60000)
    (bye,) = requests(net.take(ALICE), "BYE")
    net.feed(ok_to(bye), ALICE)
    assert requests(net.take(CARRIER), "INVITE") == []
    net.feed(crlf(f"""ACK sip:softpbx@127.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5063;branch=z9hG4bKrepack;rport
From: <sip:101@127.0.0.1>;tag=rep-tag
To: {ok2.get('to')}
Call-ID: replacing-1
CSeq: 2 ACK
Max-Forwards: 70
Content-Length: 0

"""), phone2)
    net.advance(2.0)
    bye_from_carrier(net, ok)
    (bye2,) = requests(net.take(phone2), "BYE")
    net.feed(ok_to(bye2), phone2)
    (cdr,) = net.cdrs
    assert cdr.extension == "101" and cdr.disposition == "answered"
    assert json.loads(cdr.transfers)[-1] == {"at": 0, "event": "replaced", "by": "101",
                                             "replaced": "101"}
    net.assert_no_leaks()


def test_invite_with_replaces_of_an_unknown_dialog_is_481() -> None:
    net = make_net()
    inbound_answered_by_101(net)
    replacing_invite(net, "nope;to-tag=a;from-tag=b")
    assert 481 in statuses(net.take(("127.0.0.1", 5063)))
    (call,) = net.sw.calls.values()
    assert call.answered.extension == "101"
