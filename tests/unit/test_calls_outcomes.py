"""How calls end and what they leave behind, raw SIP through the Switch with a fake clock: the
code a caller hears for a callee's failure, a 6xx ending the stage, CDR fields, the caller ID
of a forwarded DID, and the switch shutting down with calls in progress."""

from __future__ import annotations

from pathlib import Path

import pytest

from softpbx.core.outcome import caller_status

from .test_calls import (
    ALICE,
    BOB,
    BOB2,
    CARRIER,
    Net,
    answer,
    answered_call,
    edited_profiles,
    invite,
    make_net,
    place_call,
    ringing_on_two_phones,
)
from .test_calls_dialogs import kinds


@pytest.fixture
def net() -> Net:
    return make_net()


# -- 4. failure codes passed to the caller ----------------------------------------------------
@pytest.mark.parametrize(("status", "caller_gets"), [
    (302, 480), (401, 503), (407, 503), (402, 503), (420, 502), (422, 502), (423, 502),
    (481, 502), (491, 502), (400, 502), (500, 502), (504, 502), (580, 502), (503, 503),
    (486, 486), (404, 404), (484, 484), (488, 488), (480, 480), (603, 603), (604, 604)])
def test_trunk_failure_mapped_for_the_caller(net: Net, status: int, caller_gets: int) -> None:
    place_call(net, "89991234567")
    net.take(ALICE)
    (out,) = net.take(CARRIER)
    net.feed(answer(out, status, tag="t"), CARRIER)  # 401/407 without a challenge, 3xx ...
    assert kinds(net.take(CARRIER)) == ["ACK"]
    assert kinds(net.take(ALICE))[-1] == caller_gets
    (cdr,) = net.cdrs
    # 12: the CDR has the code the caller got, the trunk tried and the calling extension
    assert (cdr.sip_code, cdr.gateway, cdr.caller_extension) == (caller_gets, "carrier", "101")
    net.assert_no_leaks()


def test_caller_status_table() -> None:
    assert caller_status(408, trunk=True) == 503 and caller_status(408, trunk=False) == 408
    assert caller_status(301, trunk=False) == 480 and caller_status(606, trunk=False) == 606
    assert caller_status(487, trunk=False) == 487 and caller_status(403, trunk=True) == 403


# -- 11. a 6xx from one fork ends the stage --------------------------------------------------
def test_decline_on_one_phone_stops_the_others(net: Net) -> None:
    inv1, inv2 = ringing_on_two_phones(net)
    net.feed(answer(inv1, 603), BOB)  # declined on one phone
    assert kinds(net.take(BOB)) == ["ACK"]
    (cancel,) = net.take(BOB2)
    assert cancel.method == "CANCEL"
    assert kinds(net.take(ALICE))[-1] == 603
    net.feed(answer(cancel, 200, tag="t2"), BOB2)
    net.feed(answer(inv2, 487, tag="t2"), BOB2)
    assert net.cdrs[0].disposition == "busy" and net.cdrs[0].sip_code == 603
    net.assert_no_leaks()


# -- 12. CDR fields and caller ID --------------------------------------------------------------
def test_max_duration_while_ringing_records_what_the_caller_got() -> None:
    net = make_net("calls.max_duration=10")
    place_call(net, "102")
    net.take(ALICE)
    (inv,) = net.take(BOB)
    net.feed(answer(inv, 180), BOB)
    net.take(ALICE)
    net.advance(10.2)
    assert kinds(net.take(ALICE)) == [408]
    (cancel,) = net.take(BOB)
    net.feed(answer(cancel, 200), BOB)
    net.feed(answer(inv, 487), BOB)
    (cdr,) = net.cdrs
    assert (cdr.sip_code, cdr.disposition, cdr.extension) == (408, "no answer", "102")
    net.assert_no_leaks()


def test_internal_cdr_has_the_calling_extension(net: Net) -> None:
    b_inv, ok = answered_call(net)
    net.sw.shutdown(net.clock.now)
    net.collect()
    (cdr,) = net.cdrs
    assert (cdr.caller_extension, cdr.extension, cdr.did) == ("101", "102", "")


def test_forwarded_did_shows_the_original_caller(tmp_path: Path) -> None:
    profiles = edited_profiles(tmp_path, {"dialplan.toml": [
        ("", '\n[[inbound]]\ndid = "74950000001"\ndestination = "gateway:carrier/+79990000000"\n')]})
    net = make_net(profiles=profiles)
    net.feed(invite(to="74950000001", frm="79990001122", src=CARRIER), CARRIER)
    out = [m for m in net.take(CARRIER) if getattr(m, "method", None) == "INVITE"]
    (fwd,) = out
    assert fwd.uri.user == "+79990000000"
    assert fwd.from_.uri.user == "79990001122" and fwd.from_.display == "Caller"
    net.feed(answer(fwd, 486, tag="t"), CARRIER)
    (cdr,) = net.cdrs
    assert (cdr.did, cdr.gateway, cdr.caller, cdr.caller_extension) == \
        ("74950000001", "carrier", "79990001122", "")


# -- 13. shutdown ---------------------------------------------------------------------------
def test_shutdown_hangs_up_every_call_and_writes_their_cdrs(net: Net) -> None:
    b_inv, ok = answered_call(net)  # 101 -> 102, answered
    net.feed(invite(to="74950000000", frm="79990001122", src=CARRIER, call_id="in-1",
                    branch="z9hG4bKin1"), CARRIER)  # carrier -> DID -> 101, ringing
    assert kinds(net.take(CARRIER)) == [100]
    (to_101,) = net.take(ALICE)
    net.feed(answer(to_101, 180, contact="<sip:101@127.0.0.1:5061>"), ALICE)
    assert kinds(net.take(CARRIER)) == [180]
    net.sw.shutdown(net.clock.now)
    net.collect()
    assert net.sw.calls == {} and len(net.cdrs) == 2
    to_alice = net.take(ALICE)
    bye_a = next(m for m in to_alice if m.method == "BYE")
    cancel = next(m for m in to_alice if m.method == "CANCEL")
    assert bye_a.call_id == ok.call_id and cancel.call_id == to_101.call_id
    (bye_b,) = net.take(BOB)
    assert bye_b.method == "BYE"
    assert kinds(net.take(CARRIER)) == [487]
    by_call = {c.sip_call_id: c for c in net.cdrs}
    assert by_call[ok.call_id].disposition == "answered"
    assert (by_call["in-1"].disposition, by_call["in-1"].sip_code) == ("failed", 487)
    net.feed(answer(bye_a, 200, contact="<sip:101@127.0.0.1:5061>"), ALICE)
    net.feed(answer(bye_b, 200), BOB)
    net.feed(answer(cancel, 200, contact="<sip:101@127.0.0.1:5061>"), ALICE)
    net.feed(answer(to_101, 487, contact="<sip:101@127.0.0.1:5061>"), ALICE)
    net.assert_no_leaks()


def test_shutdown_without_calls_is_harmless(net: Net) -> None:
    net.sw.shutdown(net.clock.now)
    net.collect()
    assert net.cdrs == [] and net.take(BOB) == []
