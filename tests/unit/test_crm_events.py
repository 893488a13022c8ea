"""CRM events (crm-telephony-api.md §1-§4) from the call state machine, on a fake clock: the
exact ordered NOTIFY_* of every way a call goes, and the NOTIFY_START answer applied to the
live call (caller_name, redirect, hangup, return_timeout, timeout, late answers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from softpbx.core.events import Binding, SendWebhook
from softpbx.core.notify import CrmAnswer, clean_caller_name, parse_answer
from softpbx.core.registrar import Registrar
from softpbx.sip.parser import parse_message
from softpbx.sip.sdp import Direction, direction, media_address, parse_sdp

from .sipkit import crlf
from .test_calls import (
    ALICE,
    BOB,
    BOB2,
    CARRIER,
    Net,
    answer,
    edited_profiles,
    flow,
    invite,
    make_net,
    place_call,
    sdp,
)

DID = "74950000000"
CLIENT = "79990001122"
CALL_START_RE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\Z")


def crm_net(*overrides: str, profiles: Path | None = None) -> Net:
    """A switch whose CRM the test answers by hand (``net.crm_answers`` off)."""
    net = make_net(*overrides) if profiles is None else make_net(*overrides, profiles=profiles)
    net.crm_answers = False
    return net


def from_carrier(net: Net, did: str = DID, *, frm: str = CLIENT, branch: str = "z9hG4bKc1",
                 call_id: str = "trunk-1") -> None:
    net.feed(invite(to=did, frm=frm, src=CARRIER, branch=branch, call_id=call_id), CARRIER)


def start_event(net: Net) -> SendWebhook:
    (w,) = [w for w in net.webhooks if w.event == "NOTIFY_START"]
    return w


def answer_crm(net: Net, answer_: CrmAnswer) -> None:
    net.sw.crm_answer(start_event(net).pbx_call_id, answer_, net.clock.now)
    net.collect()


def invites(net: Net, who: tuple[str, int]) -> list:
    return [m for m in net.take(who) if getattr(m, "method", "") == "INVITE"]


def bye_from_carrier(net: Net, ok) -> None:
    """The carrier hangs up the answered call (``ok``: our 200 to its INVITE)."""
    data = crlf(f"""BYE sip:softpbx@127.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP {CARRIER[0]}:{CARRIER[1]};branch=z9hG4bKbye1;rport
From: <sip:{CLIENT}@127.0.0.1>;tag=caller-tag
To: {ok.get('to')}
Call-ID: {ok.call_id}
CSeq: 2 BYE
Max-Forwards: 70
Content-Length: 0

""")
    net.feed(data, CARRIER)


def cancel_from_carrier(net: Net, branch: str = "z9hG4bKc1", call_id: str = "trunk-1") -> None:
    net.feed(crlf(f"""CANCEL sip:{DID}@127.0.0.1 SIP/2.0
Via: SIP/2.0/UDP {CARRIER[0]}:{CARRIER[1]};branch={branch};rport
From: "Caller" <sip:{CLIENT}@127.0.0.1>;tag=caller-tag
To: <sip:{DID}@127.0.0.1>
Call-ID: {call_id}
CSeq: 1 CANCEL
Max-Forwards: 70
Content-Length: 0

"""), CARRIER)


def names(net: Net) -> list[str]:
    return [e for e, _ in net.events()]


def test_inbound_answered_waits_for_the_crm_and_reports_every_step() -> None:
    net = crm_net()
    from_carrier(net)
    assert [m.status for m in net.take(CARRIER)] == [100]  # at once; no 180 before a phone rings
    assert net.take(ALICE) == []  # no phone is offered the call before the CRM answered
    (start,) = net.webhooks
    assert start.wants_answer and start.seq == 1 and start.event_id == f"{start.pbx_call_id}.1"
    ev, f = net.events()[0]
    assert ev == "NOTIFY_START" and list(f) == ["call_start", "pbx_call_id", "caller_id",
                                                "called_did"]
    assert re.fullmatch(r"in_[0-9a-f]{40}", f["pbx_call_id"])
    assert CALL_START_RE.match(f["call_start"])
    assert f["caller_id"] == CLIENT and f["called_did"] == DID
    answer_crm(net, CrmAnswer())
    (to_101,) = invites(net, ALICE)
    net.feed(answer(to_101, 180, contact="<sip:101@127.0.0.1:5061>"), ALICE)
    assert [m.status for m in net.take(CARRIER)] == [180]
    net.feed(answer(to_101, 200, body=sdp(50000), contact="<sip:101@127.0.0.1:5061>"), ALICE)
    ok = [m for m in net.take(CARRIER) if m.status == 200][0]
    net.advance(7.4)
    bye_from_carrier(net, ok)
    assert names(net) == ["NOTIFY_START", "NOTIFY_INTERNAL", "NOTIFY_END"]
    internal, end = net.events()[1][1], net.events()[2][1]
    assert internal == {"call_start": f["call_start"], "pbx_call_id": f["pbx_call_id"],
                        "caller_id": CLIENT, "called_did": DID, "internal": "101"}
    assert end == {"call_start": f["call_start"], "pbx_call_id": f["pbx_call_id"],
                   "caller_id": CLIENT, "called_did": DID, "internal": "101", "duration": "7",
                   "disposition": "answered"}
    assert [w.seq for w in net.webhooks] == [1, 2, 3]
    (cdr,) = net.cdrs
    assert cdr.pbx_call_id == f["pbx_call_id"] and cdr.call_id == f["pbx_call_id"]
    assert net.sw.notifier.tracked == 1  # recorded (the sample records 101): RECORD to come
    net.sw.recording_finished(cdr.call_id, "http://pbx/rec/x.mp3", net.clock.now)
    net.collect()
    assert net.events()[-1] == ("NOTIFY_RECORD", {"pbx_call_id": f["pbx_call_id"],
                                                  "record_link": "http://pbx/rec/x.mp3"})
    assert net.sw.notifier.tracked == 0
    net.assert_no_leaks()


def test_busy_on_every_phone_is_busy_and_names_the_last_extension_that_rang() -> None:
    net = make_net()
    from_carrier(net)
    (to_101,) = invites(net, ALICE)
    net.feed(answer(to_101, 180, contact="<sip:101@127.0.0.1:5061>"), ALICE)
    net.feed(answer(to_101, 486), ALICE)
    (to_102,) = invites(net, BOB)  # the route's fallback
    net.feed(answer(to_102, 486), BOB)  # busy without ever ringing
    assert [m.status for m in net.take(CARRIER)][-1] == 486
    assert names(net) == ["NOTIFY_START", "NOTIFY_INTERNAL", "NOTIFY_END"]
    end = net.events()[-1][1]
    assert end["disposition"] == "busy" and end["internal"] == "101" and end["duration"] == "0"
    assert net.cdrs[0].disposition == "busy"
    assert net.sw.notifier.tracked == 0
    net.assert_no_leaks()


def test_caller_cancel_while_ringing_is_cancel() -> None:
    net = make_net()
    from_carrier(net)
    (to_101,) = invites(net, ALICE)
    net.feed(answer(to_101, 180, contact="<sip:101@127.0.0.1:5061>"), ALICE)
    cancel_from_carrier(net)
    assert names(net) == ["NOTIFY_START", "NOTIFY_INTERNAL", "NOTIFY_END"]
    assert net.events()[-1][1]["disposition"] == "cancel"
    assert net.events()[-1][1]["internal"] == "101"


def test_caller_cancels_while_the_crm_thinks_and_the_late_answer_changes_nothing() -> None:
    net = crm_net()
    from_carrier(net)
    pbx_call_id = start_event(net).pbx_call_id
    cancel_from_carrier(net)
    statuses = [m.status for m in net.take(CARRIER)]
    assert 487 in statuses
    assert names(net) == ["NOTIFY_START", "NOTIFY_END"]
    end = net.events()[-1][1]
    assert end["disposition"] == "cancel" and "internal" not in end
    net.sw.crm_answer(pbx_call_id, CrmAnswer(redirect="102"), net.clock.now)
    net.collect()
    assert net.take(ALICE) == [] and net.take(BOB) == []
    net.assert_no_leaks()


def test_no_answer_through_the_fallback_names_the_fallback() -> None:
    net = make_net()
    from_carrier(net)
    (to_101,) = invites(net, ALICE)
    net.feed(answer(to_101, 180, contact="<sip:101@127.0.0.1:5061>"), ALICE)
    net.advance(30.2)  # the route's no_answer_timeout: 102 rings
    net.feed(answer(to_101, 487), ALICE)
    (to_102,) = invites(net, BOB)
    net.feed(answer(to_102, 180), BOB)
    net.advance(60.5)  # [calls] no_answer_timeout
    net.feed(answer(to_102, 487), BOB)
    assert names(net) == ["NOTIFY_START", "NOTIFY_INTERNAL", "NOTIFY_INTERNAL", "NOTIFY_END"]
    assert [f.get("internal") for _, f in net.events()[1:]] == ["101", "102", "102"]
    assert net.events()[-1][1]["disposition"] == "no answer"


def nobody_registered(*overrides: str) -> Net:
    net = make_net(*overrides)
    net.sw.registrar = Registrar(settings=net.sw.config.registrar)
    net.crm_answers = False
    return net


def test_unregistered_extensions_and_an_unknown_did_are_failed() -> None:
    net = nobody_registered()
    net.crm_answers = True
    from_carrier(net)
    assert [m.status for m in net.take(CARRIER)][-1] == 480
    assert names(net) == ["NOTIFY_START", "NOTIFY_END"]
    end = net.events()[-1][1]
    assert end["disposition"] == "failed" and "internal" not in end
    net2 = make_net()
    from_carrier(net2, "74959999999")  # no inbound route: the CRM still hears of it
    assert [m.status for m in net2.take(CARRIER)][-1] == 404
    assert names(net2) == ["NOTIFY_START", "NOTIFY_END"]
    assert net2.events()[-1][1]["disposition"] == "failed"
    assert net2.events()[-1][1]["called_did"] == "74959999999"
    net2.assert_no_leaks()


def test_an_unknown_did_redirected_by_the_crm_rings_the_extension() -> None:
    net = crm_net()
    from_carrier(net, "74959999999")
    answer_crm(net, CrmAnswer(redirect="102"))
    assert len(invites(net, BOB)) == 1


def test_two_phones_of_one_extension_are_one_internal_event() -> None:
    net = make_net()
    net.sw.registrar.load([Binding(aor="101", contact="sip:101@127.0.0.1:5063", key="a2",
                                   expires_at=1e9, call_id="y", cseq=1, flow=flow(BOB2))])
    from_carrier(net)
    (inv1,) = invites(net, ALICE)
    (inv2,) = invites(net, BOB2)
    net.feed(answer(inv1, 180, contact="<sip:101@127.0.0.1:5061>"), ALICE)
    net.feed(answer(inv2, 183, tag="t2", contact="<sip:101@127.0.0.1:5063>"), BOB2)
    net.feed(answer(inv2, 200, tag="t2", body=sdp(50002), contact="<sip:101@127.0.0.1:5063>"),
             BOB2)
    assert names(net) == ["NOTIFY_START", "NOTIFY_INTERNAL"]


def test_a_phone_that_answers_without_ringing_still_gets_its_internal_first() -> None:
    net = make_net()
    from_carrier(net)
    (to_101,) = invites(net, ALICE)
    net.feed(answer(to_101, 200, body=sdp(50000), contact="<sip:101@127.0.0.1:5061>"), ALICE)
    assert names(net) == ["NOTIFY_START", "NOTIFY_INTERNAL"]
    assert net.events()[1][1]["internal"] == "101"


@pytest.mark.parametrize("target, rings", [("102", [BOB]), ("group:sales", [ALICE, BOB]),
                                           ("sales", [ALICE, BOB])])
def test_redirect_rings_the_target_instead_of_the_route(target: str, rings) -> None:
    net = crm_net()
    from_carrier(net)
    answer_crm(net, CrmAnswer(redirect=target))
    legs = {who: invites(net, who) for who in (ALICE, BOB)}
    assert [who for who in (ALICE, BOB) if legs[who]] == rings
    for who in rings:
        net.feed(answer(legs[who][0], 180, tag=f"t{who[1]}"), who)
    assert names(net) == ["NOTIFY_START"] + ["NOTIFY_INTERNAL"] * len(rings)
    pbx_ids = {f["pbx_call_id"] for _, f in net.events()}
    assert len(pbx_ids) == 1  # unchanged across the redirect


@pytest.mark.parametrize("target", ["999", "group:nosuch", ""])
def test_redirect_to_an_unknown_target_routes_normally(target: str) -> None:
    net = crm_net()
    from_carrier(net)
    answer_crm(net, CrmAnswer(redirect=target))
    assert len(invites(net, ALICE)) == 1 and invites(net, BOB) == []


def test_redirect_to_an_unregistered_extension_routes_normally() -> None:
    net = nobody_registered()
    net.sw.registrar.load([Binding(aor="101", contact="sip:101@127.0.0.1:5061", key="a",
                                   expires_at=1e9, call_id="a", cseq=1, flow=flow(ALICE))])
    from_carrier(net)
    answer_crm(net, CrmAnswer(redirect="102"))  # 102 has no phone registered
    assert len(invites(net, ALICE)) == 1 and net.take(BOB) == []


def test_sequential_group_redirect_rings_members_one_after_the_other(tmp_path: Path) -> None:
    profiles = edited_profiles(tmp_path, {"dialplan.toml": [
        ('members = ["101", "102"]', 'members = ["101", "102"]\nstrategy = "sequential"\n'
                                     'member_timeout = 10')]})
    net = crm_net(profiles=profiles)
    from_carrier(net)
    answer_crm(net, CrmAnswer(redirect="group:sales"))
    (to_101,) = invites(net, ALICE)
    assert invites(net, BOB) == []
    net.feed(answer(to_101, 180, contact="<sip:101@127.0.0.1:5061>"), ALICE)
    net.advance(10.2)
    net.feed(answer(to_101, 487), ALICE)
    (to_102,) = invites(net, BOB)
    net.feed(answer(to_102, 180), BOB)
    assert [f.get("internal") for e, f in net.events() if e == "NOTIFY_INTERNAL"] == ["101", "102"]


@pytest.mark.parametrize("name, shown", [
    ("Ivanov Ivan", '"Ivanov Ivan"'),
    ("Иванов Иван", '"Иванов Иван"'),
    ('Say "hi" \\ bye', '"Say \\"hi\\" \\\\ bye"'),
    ("Line\r\nInjected: x", '"Line Injected: x"'),
])
def test_caller_name_is_the_display_name_on_the_ringing_phone(name: str, shown: str) -> None:
    net = crm_net()
    from_carrier(net)
    answer_crm(net, parse_answer(json.dumps({"caller_name": name}).encode()))
    (to_101,) = invites(net, ALICE)
    raw = to_101.serialize().decode("utf-8")
    from_line = next(line for line in raw.split("\r\n") if line.startswith("From:"))
    assert from_line.startswith(f"From: {shown} <sip:{CLIENT}@")
    assert parse_message(to_101.serialize()).from_.uri.user == CLIENT


def test_caller_name_and_redirect_together() -> None:
    net = crm_net()
    from_carrier(net)
    answer_crm(net, CrmAnswer(caller_name="ACME Ltd", redirect="102"))
    (to_102,) = invites(net, BOB)
    assert to_102.from_.display == "ACME Ltd"


@pytest.mark.parametrize("body", [b'{"hangup": 1}', b'{"redirect": "blacklist"}'])
def test_hangup_rejects_the_call_busy_and_rings_nobody(body: bytes) -> None:
    net = crm_net()
    from_carrier(net)
    answer_crm(net, parse_answer(body))
    assert [m.status for m in net.take(CARRIER)][-1] == 486
    assert net.take(ALICE) == [] and net.take(BOB) == []
    assert names(net) == ["NOTIFY_START", "NOTIFY_END"]
    assert net.events()[-1][1]["disposition"] == "busy"
    net.assert_no_leaks()


def test_return_timeout_rings_the_redirect_then_the_normal_route() -> None:
    net = crm_net()
    from_carrier(net)
    answer_crm(net, parse_answer(b'{"redirect": "102", "return_timeout": 10}'))
    (to_102,) = invites(net, BOB)
    assert net.take(ALICE) == []
    net.feed(answer(to_102, 180), BOB)
    net.advance(10.2)
    net.feed(answer(to_102, 487), BOB)
    (to_101,) = invites(net, ALICE)
    net.feed(answer(to_101, 180, contact="<sip:101@127.0.0.1:5061>"), ALICE)
    assert [f.get("internal") for e, f in net.events() if e == "NOTIFY_INTERNAL"] == ["102", "101"]


def test_crm_timeout_routes_normally_and_a_late_answer_is_ignored(caplog) -> None:
    net = crm_net()
    from_carrier(net)
    net.advance(1.4)
    assert net.take(ALICE) == []
    net.advance(0.2)  # answer_timeout_ms = 1500
    assert len(invites(net, ALICE)) == 1
    answer_crm(net, CrmAnswer(redirect="102", caller_name="Late"))
    assert net.take(BOB) == []
    assert sum("no CRM answer within" in r.message for r in caplog.records) == 1


def test_a_failed_crm_attempt_routes_at_once_logged_once(caplog) -> None:
    net = crm_net()
    from_carrier(net)
    answer_crm(net, CrmAnswer.failed("HTTP 500"))
    assert len(invites(net, ALICE)) == 1
    assert sum("HTTP 500" in r.message for r in caplog.records) == 1


def test_outbound_answered_and_busy() -> None:
    net = make_net()
    place_call(net, "89991234567")
    (out,) = invites(net, CARRIER)
    assert names(net) == ["NOTIFY_OUT_START"]
    f = net.events()[0][1]
    assert re.fullmatch(r"out_[0-9a-f]{40}", f["pbx_call_id"])
    assert f == {"call_start": f["call_start"], "pbx_call_id": f["pbx_call_id"],
                 "caller_id": "74950000101", "internal": "101", "destination": "89991234567"}
    net.feed(answer(out, 200, body=sdp(50000), contact="<sip:x@127.0.0.1:5070>"), CARRIER)
    net.advance(3.0)
    (call,) = net.sw.calls.values()
    call.hang_up(net.clock.now)
    net.collect()
    assert names(net) == ["NOTIFY_OUT_START", "NOTIFY_OUT_END"]
    end = net.events()[1][1]
    assert end["duration"] == "3" and end["disposition"] == "answered"
    assert end["destination"] == "89991234567" and end["internal"] == "101"


@pytest.mark.parametrize("status, disposition", [(486, "busy"), (503, "failed"),
                                                 (480, "no answer"), (404, "failed")])
def test_outbound_failures(status: int, disposition: str) -> None:
    net = make_net()
    place_call(net, "89991234567")
    (out,) = invites(net, CARRIER)
    net.feed(answer(out, status), CARRIER)
    assert names(net) == ["NOTIFY_OUT_START", "NOTIFY_OUT_END"]
    assert net.events()[1][1]["disposition"] == disposition
    assert net.events()[1][1]["duration"] == "0"


def test_outbound_caller_id_is_0_when_none_is_configured() -> None:
    net = make_net("directory.101.outbound_caller_id_number=")
    place_call(net, "89991234567")
    assert net.events()[0][1]["caller_id"] == "0"


def test_a_did_forwarded_out_is_one_inbound_call() -> None:
    net = make_net("dialplan.inbound[0].destination=gateway:carrier/79991112233",
                   "dialplan.inbound[0].fallback=")
    from_carrier(net)
    (out,) = [m for m in net.take(CARRIER) if getattr(m, "method", "") == "INVITE"]
    net.feed(answer(out, 486, contact="<sip:x@127.0.0.1:5070>"), CARRIER)
    assert names(net) == ["NOTIFY_START", "NOTIFY_END"]
    assert "internal" not in net.events()[1][1]


def test_a_failed_recording_sends_no_record_event_and_extra_fields() -> None:
    net = make_net("crm.extra_fields=true")
    from_carrier(net)
    (to_101,) = invites(net, ALICE)
    net.feed(answer(to_101, 200, body=sdp(50000), contact="<sip:101@127.0.0.1:5061>"), ALICE)
    ok = [m for m in net.take(CARRIER) if m.status == 200][0]
    bye_from_carrier(net, ok)
    end = net.events()[-1][1]
    assert end["status_code"] == "16" and end["is_recorded"] == "1"
    net.sw.recording_finished(net.cdrs[0].call_id, None, net.clock.now)
    net.collect()
    assert names(net)[-1] == "NOTIFY_END" and net.sw.notifier.tracked == 0


def test_unrecorded_call_extra_fields_and_busy_cause() -> None:
    net = make_net("crm.extra_fields=true", "recording.enabled=false")
    place_call(net, "89991234567")
    (out,) = invites(net, CARRIER)
    net.feed(answer(out, 486), CARRIER)
    end = net.events()[-1][1]
    assert end["status_code"] == "17" and end["is_recorded"] == "0"
    assert list(end)[-2:] == ["status_code", "is_recorded"]
    assert net.sw.notifier.tracked == 0


def test_internal_calls_are_silent_unless_asked() -> None:
    net = make_net()
    place_call(net, "102")
    (to_102,) = invites(net, BOB)
    net.feed(answer(to_102, 180), BOB)
    net.feed(answer(to_102, 486), BOB)
    assert net.webhooks == []
    net = make_net("crm.internal_calls=true")
    place_call(net, "102")
    (to_102,) = invites(net, BOB)
    net.feed(answer(to_102, 180), BOB)
    net.feed(answer(to_102, 486), BOB)
    assert names(net) == ["NOTIFY_INTERNAL", "NOTIFY_END"]
    f = net.events()[0][1]
    assert re.fullmatch(r"in_[0-9a-f]{40}", f["pbx_call_id"])
    assert f["caller_id"] == "101" and f["called_did"] == "102" and f["internal"] == "102"
    assert net.cdrs[0].call_id.startswith("int_") and net.cdrs[0].pbx_call_id == f["pbx_call_id"]


def test_events_filter_and_no_wait_without_notify_start() -> None:
    net = crm_net('crm.events=["NOTIFY_END"]')
    from_carrier(net)
    assert len(invites(net, ALICE)) == 1  # routed at once: nobody to wait for
    cancel_from_carrier(net)
    assert names(net) == ["NOTIFY_END"] and net.webhooks[0].seq == 1


# -- the answer parser ----------------------------------------------------------------------
@pytest.mark.parametrize("body, expect", [
    (b"", CrmAnswer()),
    (b"  \n", CrmAnswer()),
    (b'{"caller_name": "A", "redirect": "101"}', CrmAnswer(caller_name="A", redirect="101")),
    (b'{"redirect": 101}', CrmAnswer(redirect="101")),
    (b'{"hangup": 1}', CrmAnswer(hangup=True)),
    (b'{"hangup": "1"}', CrmAnswer(hangup=True)),
    (b'{"redirect": "blacklist"}', CrmAnswer(hangup=True)),
    (b'{"redirect": "102", "return_timeout": "15"}', CrmAnswer(redirect="102",
                                                                return_timeout=15.0)),
])
def test_parse_answer(body: bytes, expect: CrmAnswer) -> None:
    assert parse_answer(body) == expect


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"x"', b"\xff\xfe",
                                  b'{"caller_name": 5}', b'{"redirect": []}',
                                  b'{"return_timeout": -1}'])
def test_parse_answer_problems(body: bytes) -> None:
    assert parse_answer(body).problem


def test_clean_caller_name() -> None:
    assert clean_caller_name("a\x00b\x1bc\u202ed\u2028e") == "abcd e"
    assert len(clean_caller_name("я" * 500)) == 64
    assert clean_caller_name("  two   spaces\t") == "two spaces"


# -- click-to-call (crm-telephony-api.md §5) ------------------------------------------------
def click(net: Net, to: str = "89991234567", *, frm: str = "101", name: str = "") -> str:
    result = net.sw.originate(frm, to, net.clock.now, caller_name=name)
    net.collect()
    assert isinstance(result, str), result
    return result


def test_click_to_call_rings_the_employee_first_then_dials_the_client_and_bridges() -> None:
    net = make_net()
    pbx_call_id = click(net, name="ACME")
    assert re.fullmatch(r"out_[0-9a-f]{40}", pbx_call_id)
    (to_101,) = invites(net, ALICE)
    assert net.take(CARRIER) == []  # nothing dialled before the employee answers
    assert to_101.from_.uri.user == "89991234567" and to_101.from_.display == "ACME"
    offer = parse_sdp(to_101.body)
    assert media_address(offer, 0) == ("127.0.0.1", net.relay.sessions[0].a.rtp_port)
    assert [c.encoding for c in offer.media[0].codecs()] == ["PCMU", "PCMA", "telephone-event"]
    assert direction(offer, 0) is Direction.SENDRECV
    assert net.webhooks == []
    net.feed(answer(to_101, 180, contact="<sip:101@127.0.0.1:5061>"), ALICE)
    net.feed(answer(to_101, 200, body=sdp(40000), contact="<sip:101@127.0.0.1:5061>"), ALICE)
    msgs = net.take(ALICE)
    assert [m.method for m in msgs] == ["ACK"]
    (out,) = invites(net, CARRIER)
    assert out.uri.user == "+79991234567" and out.from_.uri.user == "74950000101"
    assert names(net) == ["NOTIFY_OUT_START"]
    f = net.events()[0][1]
    assert f["pbx_call_id"] == pbx_call_id and f["internal"] == "101"
    assert f["destination"] == "89991234567" and f["caller_id"] == "74950000101"
    # the client's offer is what the employee chose; its answer is relayed
    net.feed(answer(out, 200, body=sdp(50000), contact="<sip:x@127.0.0.1:5070>"), CARRIER)
    (call,) = net.sw.calls.values()
    assert call.state.value == "answered"
    assert call.media.a.rtp.sdp == ("127.0.0.1", 40000)
    assert call.media.b.rtp.sdp == ("127.0.0.1", 50000)
    net.advance(4.0)
    call.hang_up(net.clock.now)
    net.collect()
    assert names(net) == ["NOTIFY_OUT_START", "NOTIFY_OUT_END"]
    end = net.events()[1][1]
    assert end["duration"] == "4" and end["disposition"] == "answered"
    (cdr,) = net.cdrs
    assert cdr.pbx_call_id == pbx_call_id and cdr.direction == "outbound"
    assert cdr.caller_extension == "101"


@pytest.mark.parametrize("status, disposition", [(486, "busy"), (603, "busy"), (480, "no answer")])
def test_click_to_call_employee_refuses_nothing_dialled_one_outcome(status, disposition) -> None:
    net = make_net()
    click(net)
    (to_101,) = invites(net, ALICE)
    net.feed(answer(to_101, status), ALICE)
    assert net.take(CARRIER) == []
    assert names(net) == ["NOTIFY_OUT_END"]
    f = net.events()[0][1]
    assert f["disposition"] == disposition and f["duration"] == "0"
    net.assert_no_leaks()


def test_click_to_call_employee_does_not_answer() -> None:
    net = make_net()
    click(net)
    (to_101,) = invites(net, ALICE)
    net.feed(answer(to_101, 180, contact="<sip:101@127.0.0.1:5061>"), ALICE)
    net.advance(30.2)  # crm.click_to_call_ring_s
    assert [m.method for m in net.take(ALICE)] == ["CANCEL"]
    assert net.take(CARRIER) == []
    assert names(net) == ["NOTIFY_OUT_END"] and net.events()[0][1]["disposition"] == "no answer"


def _employee_answered(net: Net):
    click(net)
    (to_101,) = invites(net, ALICE)
    net.feed(answer(to_101, 200, body=sdp(40000), contact="<sip:101@127.0.0.1:5061>"), ALICE)
    net.take(ALICE)
    (out,) = invites(net, CARRIER)
    return to_101, out


@pytest.mark.parametrize("status, disposition", [(486, "busy"), (480, "no answer"),
                                                 (503, "failed")])
def test_click_to_call_client_fails_and_the_employee_is_hung_up(status, disposition) -> None:
    net = make_net()
    _, out = _employee_answered(net)
    net.feed(answer(out, status), CARRIER)
    assert [m.method for m in net.take(ALICE)] == ["BYE"]
    assert names(net) == ["NOTIFY_OUT_START", "NOTIFY_OUT_END"]
    assert net.events()[1][1]["disposition"] == disposition
    assert net.cdrs[0].disposition == disposition


def test_click_to_call_employee_hangs_up_while_the_client_rings() -> None:
    net = make_net()
    to_101, out = _employee_answered(net)
    net.feed(answer(out, 180, contact="<sip:x@127.0.0.1:5070>"), CARRIER)
    bye = crlf(f"""BYE sip:softpbx@127.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP {ALICE[0]}:{ALICE[1]};branch=z9hG4bKebye;rport
From: <sip:101@127.0.0.1>;tag=callee-tag
To: {to_101.get('from')}
Call-ID: {to_101.call_id}
CSeq: 5 BYE
Max-Forwards: 70
Content-Length: 0

""")
    net.feed(bye, ALICE)
    assert [m.method for m in net.take(CARRIER) if hasattr(m, "method")] == ["CANCEL"]
    assert names(net) == ["NOTIFY_OUT_START", "NOTIFY_OUT_END"]
    assert net.events()[1][1]["disposition"] == "cancel"


def test_click_to_call_refusals() -> None:
    net = make_net()
    sw, now = net.sw, net.clock.now
    assert sw.originate("999", "89991234567", now).status == 404
    assert sw.originate("101", "55", now).status == 422
    nobody = nobody_registered()
    assert nobody.sw.originate("101", "89991234567", now).status == 409
    click(net)
    assert sw.originate("101", "89991234567", now).status == 429  # already in a call
    assert sw.originate("102", "102", now).status == 400


def test_click_to_call_to_an_internal_extension() -> None:
    net = make_net()
    click(net, "102")
    (to_101,) = invites(net, ALICE)
    net.feed(answer(to_101, 200, body=sdp(40000), contact="<sip:101@127.0.0.1:5061>"), ALICE)
    (to_102,) = invites(net, BOB)
    assert to_102.from_.uri.user in ("101", "74950000101")
    assert names(net) == ["NOTIFY_OUT_START"]


def test_click_to_call_auto_answer_headers_only_when_asked() -> None:
    net = make_net()
    click(net)
    (plain,) = invites(net, ALICE)
    assert plain.get("call-info") is None and plain.get("alert-info") is None
    net2 = make_net()
    assert isinstance(net2.sw.originate("101", "89991234567", net2.clock.now, auto_answer=True),
                      str)
    net2.collect()
    (auto,) = invites(net2, ALICE)
    assert "answer-after=0" in (auto.get("call-info") or "")
    assert "info=alert-autoanswer" in (auto.get("alert-info") or "")
