"""In-dialog life of a B2BUA call, raw SIP through the Switch with a fake clock: hang-ups that
cross a re-INVITE or the caller's ACK, CANCEL of a re-INVITE, session refreshes without SDP,
re-offers that fail, target refresh, forks upstream, and trunks that challenge in-dialog
requests. Every test ends with nothing left: calls, dialogs, transactions, relay ports."""

from __future__ import annotations

from pathlib import Path

import pytest

from softpbx.core.call import CallState
from softpbx.sip.auth import AuthOutcome, DigestAuthenticator
from softpbx.sip.message import make_response

from .test_calls import (
    ALICE,
    BOB,
    CARRIER,
    Net,
    ack_for,
    answer,
    answered_call,
    answered_unacked,
    edited_profiles,
    in_dialog,
    invite,
    make_net,
    place_call,
    sdp,
)

ALICE_CONTACT = "<sip:101@127.0.0.1:5061>"


@pytest.fixture
def net() -> Net:
    return make_net()


def kinds(msgs: list) -> list:
    """Each message as its status (responses) or method (requests)."""
    return [getattr(m, "status", None) or m.method for m in msgs]


def from_alice(method: str, ok, cseq: int, body: bytes = b"", branch: str = "z9hG4bKdlg") -> bytes:
    """An in-dialog request of the caller (101) in the dialog its 200 ``ok`` made."""
    return in_dialog(method, ok, frm_tag="caller-tag", to_tag=ok.to.tag, cseq=cseq, src=ALICE,
                     frm="101", to="102", body=body, branch=branch)


def from_bob(method: str, b_inv, cseq: int, body: bytes = b"", branch: str = "z9hG4bKdlg") -> bytes:
    """An in-dialog request of the callee (102) in the dialog of our INVITE ``b_inv``."""
    return in_dialog(method, b_inv, frm_tag="callee-tag", to_tag=b_inv.from_.tag, cseq=cseq,
                     src=BOB, frm="102", to="101", body=body, branch=branch)


def hang_up_from_alice(net: Net, ok, cseq: int) -> None:
    net.feed(from_alice("BYE", ok, cseq), ALICE)
    assert 200 in kinds(net.take(ALICE))
    (bye,) = [m for m in net.take(BOB) if getattr(m, "method", None) == "BYE"]
    net.feed(answer(bye, 200), BOB)


# -- 1. a call that ends while a re-INVITE is pending, or before the caller's ACK ------------
def test_bye_while_reinvite_pending_answers_it_487_before_the_bye(net: Net) -> None:
    b_inv, ok = answered_call(net)
    net.feed(from_alice("INVITE", ok, 3, sdp(40000, direction="sendonly")), ALICE)
    assert kinds(net.take(ALICE)) == [100]
    (reinv,) = net.take(BOB)
    net.feed(from_bob("BYE", b_inv, 1), BOB)  # the callee hangs up instead of answering
    assert kinds(net.take(BOB)) == [200]
    to_alice = net.take(ALICE)
    assert kinds(to_alice) == [487, "BYE"]  # RFC 3261 §15.1.2: the pending request first
    net.feed(from_alice("ACK", ok, 3), ALICE)  # ACK of the 487 (same branch)
    net.feed(answer(to_alice[1], 200, contact=ALICE_CONTACT), ALICE)
    net.feed(answer(reinv, 481), BOB)
    assert net.cdrs[0].disposition == "answered"
    net.assert_no_leaks()


@pytest.mark.parametrize("overrides", [["media.rtp_timeout=10"],
                                       ["calls.max_duration=10", "media.rtp_timeout=0"]])
def test_timeout_while_reinvite_pending_answers_it_487_before_the_bye(overrides) -> None:
    net = make_net(*overrides)
    b_inv, ok = answered_call(net)
    net.feed(from_bob("INVITE", b_inv, 1, sdp(50000, direction="sendonly")), BOB)
    assert kinds(net.take(BOB)) == [100]
    (a_reinv,) = net.take(ALICE)  # the caller's phone never answers it
    net.advance(16.0)
    to_bob = kinds(net.take(BOB))
    assert 487 in to_bob and "BYE" in to_bob and to_bob.index(487) < to_bob.index("BYE")
    assert "BYE" in kinds(net.take(ALICE)) and net.sw.calls == {}
    net.feed(from_bob("ACK", b_inv, 1), BOB)
    assert a_reinv.method == "INVITE"
    net.assert_no_leaks()


def test_bye_to_caller_waits_for_its_ack(net: Net) -> None:
    # RFC 3261 §15: no BYE on a confirmed dialog before the ACK of our 2xx arrived.
    b_inv = answered_unacked(net)
    (ok,) = [m for m in net.take(ALICE) if m.status == 200]
    net.feed(from_bob("BYE", b_inv, 1), BOB)
    assert kinds(net.take(BOB)) == [200]
    assert net.sw.calls == {} and len(net.cdrs) == 1  # the call is over, CDR written
    net.advance(1.0)
    assert "BYE" not in kinds(net.take(ALICE))  # only 200 retransmissions so far
    net.feed(ack_for(ok, "102", branch="z9hG4bKack2"), ALICE)
    (bye,) = net.take(ALICE)
    assert bye.method == "BYE" and bye.to.tag == "caller-tag"
    net.feed(answer(bye, 200, contact=ALICE_CONTACT), ALICE)
    net.assert_no_leaks()


def test_bye_to_caller_without_ack_goes_after_64_t1(net: Net) -> None:
    b_inv = answered_unacked(net)
    net.feed(from_bob("BYE", b_inv, 1), BOB)
    net.advance(31.0)
    assert "BYE" not in kinds(net.take(ALICE))
    net.advance(2.0)
    bye = next(m for m in net.take(ALICE) if getattr(m, "method", None) == "BYE")
    net.feed(answer(bye, 200, contact=ALICE_CONTACT), ALICE)
    net.assert_no_leaks()


# -- 2. CANCEL of a re-INVITE -------------------------------------------------------------
def test_cancelled_reinvite_is_withdrawn_and_rolled_back(net: Net) -> None:
    b_inv, ok = answered_call(net)
    (session,) = net.relay.sessions
    net.feed(from_alice("INVITE", ok, 3, sdp(40002, direction="sendonly")), ALICE)
    net.take(ALICE)
    (reinv,) = net.take(BOB)
    net.feed(answer(reinv, 100), BOB)
    net.feed(from_alice("CANCEL", ok, 3), ALICE)
    assert sorted(kinds(net.take(ALICE))) == [200, 487]
    (cancel,) = net.take(BOB)  # withdrawn on the other leg too
    assert cancel.method == "CANCEL" and cancel.cseq.number == reinv.cseq.number
    net.feed(answer(cancel, 200), BOB)
    net.feed(answer(reinv, 487), BOB)
    assert kinds(net.take(BOB)) == ["ACK"]
    assert net.take(ALICE) == []  # nothing more for the caller
    net.feed(from_alice("ACK", ok, 3), ALICE)
    (call,) = net.sw.calls.values()
    assert session.a.rtp.sdp == ("127.0.0.1", 40000) and not call.on_hold
    # the next re-INVITE is not refused as if one were still pending
    net.feed(from_alice("INVITE", ok, 4, sdp(40000, direction="sendonly")), ALICE)
    (reinv2,) = net.take(BOB)
    net.feed(answer(reinv2, 200, body=sdp(50000, direction="recvonly")), BOB)
    assert 200 in kinds(net.take(ALICE)) and call.on_hold
    net.feed(from_alice("ACK", ok, 4, branch="z9hG4bKack"), ALICE)
    hang_up_from_alice(net, ok, 5)
    net.assert_no_leaks()


def test_cancelled_reinvite_whose_2xx_crossed_is_restored(net: Net) -> None:
    b_inv, ok = answered_call(net)
    (session,) = net.relay.sessions
    net.feed(from_alice("INVITE", ok, 3, sdp(40000, direction="sendonly")), ALICE)
    net.take(ALICE)
    (reinv,) = net.take(BOB)
    net.feed(answer(reinv, 100), BOB)
    net.feed(from_alice("CANCEL", ok, 3), ALICE)
    assert sorted(kinds(net.take(ALICE))) == [200, 487]
    (cancel,) = net.take(BOB)
    # the callee had already accepted the hold: its 200 crosses our CANCEL
    net.feed(answer(reinv, 200, body=sdp(50004, direction="recvonly")), BOB)
    net.feed(answer(cancel, 200), BOB)
    ack, restore = net.take(BOB)
    assert ack.method == "ACK" and restore.method == "INVITE"
    # offered back the session the caller kept: not on hold, through the relay
    assert b"a=sendrecv" in restore.body and b"sendonly" not in restore.body
    assert f"m=audio {session.b.rtp_port} ".encode() in restore.body
    assert session.b.rtp.sdp == ("127.0.0.1", 50004)  # where the callee now listens
    net.feed(answer(restore, 200, body=sdp(50004)), BOB)
    assert kinds(net.take(BOB)) == ["ACK"]
    assert net.take(ALICE) == []
    net.feed(from_alice("ACK", ok, 3), ALICE)
    (call,) = net.sw.calls.values()
    assert call.state is CallState.ANSWERED and not call.on_hold
    hang_up_from_alice(net, ok, 4)
    net.assert_no_leaks()


# -- 3. session refreshes without SDP ------------------------------------------------------
def test_update_without_sdp_answered_locally(net: Net) -> None:
    b_inv, ok = answered_call(net)
    net.feed(from_alice("UPDATE", ok, 3), ALICE)
    (resp,) = net.take(ALICE)
    assert resp.status == 200 and resp.body == b"" and resp.cseq.method == "UPDATE"
    net.feed(from_bob("UPDATE", b_inv, 1), BOB)
    assert kinds(net.take(BOB)) == [200]
    assert net.take(ALICE) == [] and net.take(BOB) == []  # nobody else heard of it
    hang_up_from_alice(net, ok, 4)
    net.assert_no_leaks()


def test_reinvite_without_sdp_gets_our_current_sdp_and_ack_answer(net: Net) -> None:
    b_inv, ok = answered_call(net)
    (session,) = net.relay.sessions
    net.feed(from_alice("INVITE", ok, 3), ALICE)
    resp = net.take(ALICE)
    assert kinds(resp) == [100, 200]
    assert resp[1].body == ok.body  # the same offer, the same o= version (RFC 3264 §8)
    assert net.take(BOB) == []  # not forwarded
    net.advance(1.0)
    assert kinds(net.take(ALICE)).count(200) == 1  # re-sent until the ACK
    net.feed(from_alice("ACK", ok, 3, sdp(40000), branch="z9hG4bKack"), ALICE)
    net.advance(3.0)
    assert net.take(ALICE) == [] and session.a.rtp.sdp == ("127.0.0.1", 40000)
    # a refresh whose answer moves the caller's media: the relay follows
    net.feed(from_alice("INVITE", ok, 4), ALICE)
    assert kinds(net.take(ALICE)) == [100, 200]
    net.feed(from_alice("ACK", ok, 4, sdp(40010), branch="z9hG4bKack"), ALICE)
    assert session.a.rtp.sdp == ("127.0.0.1", 40010)
    # and from the callee's side too
    net.feed(from_bob("INVITE", b_inv, 1), BOB)
    resp = net.take(BOB)
    assert kinds(resp) == [100, 200] and resp[1].body == b_inv.body
    net.feed(from_bob("ACK", b_inv, 1, sdp(50000), branch="z9hG4bKack"), BOB)
    assert net.take(ALICE) == [] and net.take(BOB) == []
    hang_up_from_alice(net, ok, 5)
    net.assert_no_leaks()


# -- 8. a failed re-offer changes nothing ---------------------------------------------------
@pytest.mark.parametrize("status", [488, 491])
def test_failed_reoffer_keeps_the_previous_relay_address(net: Net, status: int) -> None:
    b_inv, ok = answered_call(net)
    (session,) = net.relay.sessions
    net.feed(from_alice("INVITE", ok, 3, sdp(40002, direction="sendonly")), ALICE)
    net.take(ALICE)
    (reinv,) = net.take(BOB)
    assert session.a.rtp.sdp == ("127.0.0.1", 40000)  # not before the answer
    net.feed(answer(reinv, status), BOB)
    assert kinds(net.take(ALICE)) == [status]
    net.feed(from_alice("ACK", ok, 3), ALICE)
    (call,) = net.sw.calls.values()
    assert session.a.rtp.sdp == ("127.0.0.1", 40000) and not call.on_hold
    # a successful one applies it
    net.feed(from_alice("INVITE", ok, 4, sdp(40002, direction="sendonly")), ALICE)
    (reinv2,) = [m for m in net.take(BOB) if getattr(m, "method", None) == "INVITE"]
    net.feed(answer(reinv2, 200, body=sdp(50000, direction="recvonly")), BOB)
    assert session.a.rtp.sdp == ("127.0.0.1", 40002) and call.on_hold
    net.feed(from_alice("ACK", ok, 4, branch="z9hG4bKack"), ALICE)
    hang_up_from_alice(net, ok, 5)
    net.assert_no_leaks()


# -- 9. target refresh ---------------------------------------------------------------------
def test_2xx_to_our_reinvite_refreshes_the_remote_target(net: Net) -> None:
    b_inv, ok = answered_call(net)
    net.feed(from_alice("INVITE", ok, 3, sdp(40000, direction="sendonly")), ALICE)
    (reinv,) = net.take(BOB)
    net.feed(answer(reinv, 200, body=sdp(50000, direction="recvonly"),
                    contact="<sip:102@127.0.0.1:5099>"), BOB)
    (ack,) = net.take(BOB)
    assert ack.uri_text == "sip:102@127.0.0.1:5099"
    net.feed(from_alice("ACK", ok, 3, branch="z9hG4bKack"), ALICE)
    net.feed(from_alice("BYE", ok, 4), ALICE)
    (bye,) = net.take(BOB)
    assert bye.method == "BYE" and bye.uri_text == "sip:102@127.0.0.1:5099"
    net.feed(answer(bye, 200), BOB)
    net.assert_no_leaks()


# -- 7. a second 2xx from another fork upstream ---------------------------------------------
def test_second_2xx_with_another_tag_gets_its_own_ack_and_a_bye(net: Net) -> None:
    place_call(net, "89991234567")
    net.take(ALICE)
    (out,) = net.take(CARRIER)
    gw = "<sip:gw@127.0.0.1:5070>"
    net.feed(answer(out, 200, tag="t1", body=sdp(60000), contact=gw), CARRIER)
    assert kinds(net.take(CARRIER)) == ["ACK"]
    net.feed(answer(out, 200, tag="t2", body=sdp(60002), contact="<sip:gw2@127.0.0.1:5070>"),
             CARRIER)
    ack, bye = net.take(CARRIER)
    assert (ack.method, ack.to.tag, bye.method, bye.to.tag) == ("ACK", "t2", "BYE", "t2")
    assert bye.uri_text == "sip:gw2@127.0.0.1:5070" and bye.cseq.number == out.cseq.number + 1
    net.feed(answer(out, 200, tag="t2", body=sdp(60002)), CARRIER)  # retransmitted
    (ack2,) = net.take(CARRIER)
    assert ack2.method == "ACK" and ack2.to.tag == "t2"
    net.feed(answer(bye, 200), CARRIER)
    (call,) = net.sw.calls.values()
    assert call.state is CallState.ANSWERED and call.answered.dialog.id.remote_tag == "t1"
    (ok,) = [m for m in net.take(ALICE) if m.status == 200]
    net.feed(ack_for(ok, "89991234567", branch="z9hG4bKack2"), ALICE)
    net.feed(in_dialog("BYE", ok, frm_tag="caller-tag", to_tag=ok.to.tag, cseq=3, src=ALICE,
                       frm="101", to="89991234567"), ALICE)
    (bye1,) = net.take(CARRIER)
    assert bye1.to.tag == "t1"
    net.feed(answer(bye1, 200), CARRIER)
    net.assert_no_leaks()


# -- 5, 10. trunks that challenge: in-dialog requests and ACKs carry credentials ------------
@pytest.fixture
def trunk_net(tmp_path: Path) -> Net:
    profiles = edited_profiles(tmp_path, {"gateways/carrier.toml": [
        ("# username = \"\"", 'username = "acct"'), ("# password = \"\"", 'password = "trunkpw"')]})
    net = make_net(profiles=profiles)
    assert net.sw.gateway("carrier").username == "acct"
    return net


def provider() -> DigestAuthenticator:
    a = DigestAuthenticator(realm="voip.example", secret=b"p" * 32, algorithms=("MD5",))
    a.set_users({"acct": "trunkpw"})
    return a


def challenge(req, status: int, prov: DigestAuthenticator, now: float) -> bytes:
    header = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
    to_tag = None if req.to.tag else "t1"
    return make_response(req, status, to_tag=to_tag,
                         headers=[(header, v) for v in prov.challenge(now)]).serialize()


def test_trunk_challenges_answered_on_invite_ack_reinvite_and_bye(trunk_net: Net) -> None:
    net = trunk_net
    prov = provider()
    now = net.clock.now
    place_call(net, "89991234567")
    net.take(ALICE)
    (inv,) = net.take(CARRIER)
    net.feed(challenge(inv, 407, prov, now), CARRIER)
    ack407, inv2 = net.take(CARRIER)
    net.feed(answer(inv2, 200, tag="t1", body=sdp(60000), contact="<sip:gw@127.0.0.1:5070>"),
             CARRIER)
    (ack,) = net.take(CARRIER)
    # RFC 3261 §13.2.2.4: the ACK of the 2xx carries the INVITE's credentials
    assert ack.method == "ACK" and ack.get_all("proxy-authorization") == \
        inv2.get_all("proxy-authorization") != []
    (ok,) = [m for m in net.take(ALICE) if m.status == 200]
    net.feed(ack_for(ok, "89991234567", branch="z9hG4bKack2"), ALICE)

    def from_caller(method: str, cseq: int, body: bytes = b"", branch: str = "z9hG4bKdlg"):
        return in_dialog(method, ok, frm_tag="caller-tag", to_tag=ok.to.tag, cseq=cseq,
                         src=ALICE, frm="101", to="89991234567", body=body, branch=branch)

    # a re-INVITE challenged with 401: sent again once, with Authorization and a new CSeq
    net.feed(from_caller("INVITE", 3, sdp(40000, direction="sendonly")), ALICE)
    (reinv,) = net.take(CARRIER)
    net.feed(challenge(reinv, 401, prov, now), CARRIER)
    ack401, reinv2 = net.take(CARRIER)
    assert ack401.method == "ACK" and reinv2.method == "INVITE"
    assert reinv2.cseq.number == reinv.cseq.number + 1 and reinv2.body == reinv.body
    assert prov.check("INVITE", reinv2.get_all("authorization"), now).outcome is AuthOutcome.OK
    net.feed(answer(reinv2, 200, body=sdp(60000, direction="recvonly"),
                    contact="<sip:gw@127.0.0.1:5070>"), CARRIER)
    (ack2,) = net.take(CARRIER)
    assert ack2.cseq.number == reinv2.cseq.number
    assert ack2.get_all("authorization") == reinv2.get_all("authorization")
    assert 200 in kinds(net.take(ALICE))
    net.feed(from_caller("ACK", 3, branch="z9hG4bKack"), ALICE)
    # the caller hangs up; the trunk challenges our BYE, then accepts it
    net.feed(from_caller("BYE", 4), ALICE)
    assert kinds(net.take(ALICE)) == [200]
    (bye,) = net.take(CARRIER)
    net.feed(challenge(bye, 407, prov, now), CARRIER)
    (bye2,) = net.take(CARRIER)
    assert bye2.method == "BYE" and bye2.cseq.number == bye.cseq.number + 1
    assert prov.check("BYE", bye2.get_all("proxy-authorization"), now).outcome is AuthOutcome.OK
    # challenged again: not answered a second time
    net.feed(challenge(bye2, 407, prov, now), CARRIER)
    assert net.take(CARRIER) == []
    net.assert_no_leaks()



def test_bye_to_a_calling_trunk_answered_with_its_credentials(trunk_net: Net) -> None:
    # The caller's leg of an inbound call is a trunk too: our BYE to it may be challenged.
    net = trunk_net
    prov = provider()
    net.feed(invite(to="74950000000", frm="79990001122", src=CARRIER), CARRIER)
    (to_101,) = net.take(ALICE)
    net.feed(answer(to_101, 200, body=sdp(50000), contact=ALICE_CONTACT), ALICE)
    (ok,) = [m for m in net.take(CARRIER) if m.status == 200]
    net.feed(ack_for(ok, "74950000000", branch="z9hG4bKack2").replace(
        b"127.0.0.1:5061", b"127.0.0.1:5070"), CARRIER)
    net.take(ALICE)
    net.feed(in_dialog("BYE", to_101, frm_tag="callee-tag", to_tag=to_101.from_.tag, cseq=1,
                       src=ALICE, frm="101", to="79990001122"), ALICE)
    (bye,) = net.take(CARRIER)
    assert bye.method == "BYE" and bye.to.tag == "caller-tag"
    net.feed(challenge(bye, 407, prov, net.clock.now), CARRIER)
    (bye2,) = net.take(CARRIER)
    assert bye2.cseq.number == bye.cseq.number + 1
    assert prov.check("BYE", bye2.get_all("proxy-authorization"), net.clock.now).outcome \
        is AuthOutcome.OK
    net.feed(answer(bye2, 200), CARRIER)
    net.assert_no_leaks()
