"""The CRM's answer to NOTIFY_START applied to a live call, end to end: a real softpbx
process, a real aiohttp CRM in the test (tests/support/crm.py), a carrier socket on the
gateway's address and real UDP phones registered as 101 and 102 (tests/support/phone.py).

What each phone is offered is what the CRM asked for (the display name, the redirect), and
the events arrive in order, multipart, with the fields of the spec."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_webhooks_delivery import (
    CALLER,
    DID,
    PBX_CALL_ID,
    Carrier,
    assert_inbound_fields,
    start_pbx,
)
from tests.support.crm import CrmServer
from tests.support.phone import Phone
from tests.support.server import PbxProcess, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def carrier() -> Iterator[Carrier]:
    c = Carrier(free_port())
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def crm() -> Iterator[CrmServer]:
    with CrmServer() as server:
        yield server


@pytest.fixture
def pbx(tmp_path: Path, carrier: Carrier, crm: CrmServer) -> Iterator[PbxProcess]:
    proc = start_pbx(tmp_path, carrier, {"crm.webhook_url": crm.url,
                                         "crm.answer_timeout_ms": "5000"})
    try:
        yield proc
        proc.stop()
    finally:
        proc.kill()


def phones(pbx: PbxProcess) -> tuple[Phone, Phone]:
    p101 = Phone(user="101", password="secret101", pbx=pbx.sip_addr)
    p102 = Phone(user="102", password="secret102", pbx=pbx.sip_addr)
    for p in (p101, p102):
        assert p.register().status == 200
    return p101, p102


def carrier_call_in_background(carrier: Carrier, pbx: PbxProcess):
    import threading

    result: dict[str, int] = {}
    t = threading.Thread(target=lambda: result.setdefault("status", carrier.call(pbx.sip_addr)))
    t.start()
    return t, result


def test_caller_name_is_shown_on_the_phone_and_events_come_in_order(
        pbx: PbxProcess, carrier: Carrier, crm: CrmServer) -> None:
    crm.answer = json.dumps({"caller_name": 'Иванов "Ваня" Иван'})
    p101, p102 = phones(pbx)
    with p101, p102:
        t, result = carrier_call_in_background(carrier, pbx)
        inc = p101.wait_invite()
        assert inc.from_display == 'Иванов "Ваня" Иван' and inc.from_user == CALLER
        raw_from = inc.request.get("from") or ""
        assert raw_from.startswith('"Иванов \\"Ваня\\" Иван" <sip:'), raw_from
        inc.ring()
        inc.reject(486)
        p102_inc = p102.wait_invite()  # the route's fallback rings next, with the same name
        assert p102_inc.from_display == 'Иванов "Ваня" Иван'
        p102_inc.reject(486)
        t.join(15)
        assert result.get("status") == 486
        got = crm.wait_for(lambda g: len(g) >= 3, "START, INTERNAL, END")
        assert [r.event for r in got] == ["NOTIFY_START", "NOTIFY_INTERNAL", "NOTIFY_END"]
        for r in got:
            assert_inbound_fields(r)
        assert len({r.pbx_call_id for r in got}) == 1 and PBX_CALL_ID.match(got[0].pbx_call_id)
        assert dict(got[1].fields)["internal"] == "101"
        end = dict(got[2].fields)
        assert (end["internal"], end["duration"], end["disposition"]) == ("101", "0", "busy")
        assert [k for k, _ in got[2].fields] == ["event", "call_start", "pbx_call_id",
                                                "caller_id", "called_did", "internal",
                                                "duration", "disposition"]
        cdr = pbx.wait_cdr(lambda c: c.get("pbx_call_id") == got[0].pbx_call_id)
        assert cdr["did"] == DID


def test_redirect_rings_the_other_extension_and_not_the_default(
        pbx: PbxProcess, carrier: Carrier, crm: CrmServer) -> None:
    crm.answer = json.dumps({"redirect": "102"})
    p101, p102 = phones(pbx)
    with p101, p102:
        t, result = carrier_call_in_background(carrier, pbx)
        inc = p102.wait_invite()
        p101.assert_no_invite(within=0.5)
        inc.ring()
        inc.reject(603)
        t.join(15)
        assert result.get("status") == 603
        p101.assert_no_invite(within=0.3)  # no return_timeout: the route is not rung after
        got = crm.wait_for(lambda g: len(g) >= 3, "START, INTERNAL, END")
        assert [(r.event, dict(r.fields).get("internal")) for r in got] == [
            ("NOTIFY_START", None), ("NOTIFY_INTERNAL", "102"), ("NOTIFY_END", "102")]
