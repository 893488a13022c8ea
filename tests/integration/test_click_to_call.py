"""Click-to-call through a real softpbx process on 127.0.0.1 (``crm-telephony-api.md`` §5):
the CRM's POST over real HTTP, the employee's phone (the Python test phone, registered as 101)
rung first and shown the client's number and name, the client dialled at the carrier (SIPp as
its UAS, or a second test phone on the gateway's port) only after the employee answered,
audio through the relay both ways, the webhooks a real aiohttp CRM gets (the client leg is
an outbound call), the CDR; and every error answer of the endpoint.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_calls_sipp import (
    Sipp,
    assert_echoed,
    received_requests,
    write_profiles,
)
from tests.support.crm import CrmServer, Received
from tests.support.phone import Phone, make_sdp
from tests.support.rtp import RtpEndpoint
from tests.support.server import HOST, PbxProcess, free_port

pytestmark = pytest.mark.integration

TOKEN = "crm-click-t0ken"
PACKETS = 30
CLIENT = "8 (999) 123-45-67"
CLIENT_DIALLED = "89991234567"
"""``CLIENT`` normalised: what the employee's phone shows (before the outbound rewrites)."""
CLIENT_AT_CARRIER = "+79991234567"
"""What the carrier is asked for: the sample's outbound rewrite ``8XXXXXXXXXX`` -> ``+7...``."""
LIVE_COUNTS = ("calls", "dialogs", "media_sessions", "rtp_ports")


class Pbx:
    """The softpbx under test, its carrier port and its click-to-call endpoint."""

    def __init__(self, proc: PbxProcess, carrier_port: int, crm: CrmServer) -> None:
        self.proc = proc
        self.carrier_port = carrier_port
        self.crm = crm

    def events(self, pbx_call_id: str, until: str, timeout: float = 10.0) -> list[Received]:
        """The webhooks of one call, in arrival order, once ``until`` arrived (bounded)."""
        def mine(got: list[Received]) -> list[Received]:
            return [r for r in got if r.pbx_call_id == pbx_call_id]

        got = self.crm.wait_for(lambda got: any(r.event == until for r in mine(got)),
                                f"{until} of {pbx_call_id}", timeout)
        return mine(got)

    def click(self, fields: dict[str, str], *, token: str | None = TOKEN,
              path: str = "/click-to-call") -> tuple[int, str, dict[str, Any]]:
        """POST ``fields`` urlencoded, as the CRM does: (status, Content-Type, JSON body)."""
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if token is not None:
            headers["x-pbx-authentication"] = token
        req = urllib.request.Request(f"http://{HOST}:{self.proc.http_port}{path}",
                                     data=urllib.parse.urlencode(fields).encode(),
                                     headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - 127.0.0.1
                return resp.status, resp.headers["Content-Type"], json.loads(resp.read())
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.headers["Content-Type"], json.loads(err.read())

    def phone(self, user: str, **kw: Any) -> Phone:
        kw.setdefault("password", {"101": "secret101", "102": "secret102"}.get(user, ""))
        return Phone(user=user, pbx=self.proc.sip_addr, **kw)

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Poll (bounded) until no call, dialog, media session or RTP port is left."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.proc.http_json("/api/status")
            if all(st[k] == 0 for k in LIVE_COUNTS):
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"not idle within {timeout}s: {st}")
            time.sleep(0.1)

    def call_state(self, pbx_call_id: str) -> str | None:
        """The state of the click's call in ``/api/calls`` (``None`` once it is gone)."""
        calls = self.proc.http_json("/api/calls")["calls"]
        return next((c["state"] for c in calls if c["id"] == pbx_call_id), None)

    def wait_call_state(self, pbx_call_id: str, state: str, timeout: float = 5.0) -> None:
        """Poll (bounded) until the click's call is in ``state``."""
        deadline = time.monotonic() + timeout
        while (got := self.call_state(pbx_call_id)) != state:
            if time.monotonic() >= deadline:
                raise AssertionError(f"call {pbx_call_id} is {got}, not {state}, after "
                                     f"{timeout}s")
            time.sleep(0.05)

    def cdr(self, pbx_call_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The CDR of the click's call (written off-loop: polled, bounded)."""
        return self.proc.wait_cdr(lambda r: r.get("pbx_call_id") == pbx_call_id, pbx_call_id,
                                  timeout)


@pytest.fixture(scope="module")
def pbx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pbx]:
    root = tmp_path_factory.mktemp("click_to_call")
    crm = CrmServer().start()
    carrier_port = free_port()
    profiles = write_profiles(root / "profiles", carrier_port, 30)
    proc = PbxProcess.create(root / "pbx", profiles=profiles, overrides={
        "crm.click_to_call_token": TOKEN,
        "crm.webhook_url": crm.url,
        "crm.click_to_call_min_interval_s": "0",  # each test clicks for 101 again
        "crm.click_to_call_ring_s": "5",  # a failed test's ringing call ends soon
        "media.rtp_timeout": "4",  # and so does its answered one
        "sip.t1_ms": "100", "sip.t4_ms": "1000",
        "media.rtp_start_port": "21000", "media.rtp_end_port": "21999",
    })
    try:
        proc.start()
        yield Pbx(proc, carrier_port, crm)
    except BaseException:
        proc.kill()
        crm.stop()
        raise
    try:
        proc.stop()
    finally:
        proc.kill()
        crm.stop()


@pytest.fixture(autouse=True)
def idle_after(pbx: Pbx) -> Iterator[None]:
    """Each test leaves no call, dialog, media session or RTP port behind."""
    yield
    pbx.wait_idle(timeout=8.0)


def test_employee_first_then_the_client_at_the_carrier(pbx: Pbx, tmp_path: Path) -> None:
    """The happy path with SIPp as the carrier's UAS: the employee's phone rings with the
    client's number and the CRM's name, the carrier is asked for the client after the answer,
    RTP goes employee -> relay -> carrier (SIPp echoes) -> relay -> employee, and the CDR
    tells an answered outbound call through the carrier."""
    with pbx.phone("101") as employee, RtpEndpoint() as rtp, \
            Sipp("call_answer.xml", pbx.proc.sip_addr, tmp_path / "carrier",
                 port=pbx.carrier_port, service="carrier") as carrier:
        carrier.wait_listening()
        employee.register()
        status, ctype, body = pbx.click({"from": "101", "to": CLIENT, "name": "Ivanov Ivan"})
        assert (status, ctype.split(";")[0]) == (200, "application/json"), body
        assert list(body) == ["status", "pbx_call_id"] and body["status"] == "1", body
        assert re.fullmatch(r"out_[0-9a-f]{40}", body["pbx_call_id"]), body
        inc = employee.wait_invite(timeout=5)
        # The employee sees whom they are about to talk to.
        assert inc.from_user == CLIENT_DIALLED, inc.request.get("from")
        assert inc.from_display == "Ivanov Ivan", inc.request.get("from")
        assert "answer-after" not in (inc.request.get("call-info") or "")  # auto-answer is off
        # The employee's phones ring and nobody else is called yet.
        assert pbx.call_state(body["pbx_call_id"]) == "originating"
        inc.ring()
        inc.answer(make_sdp(rtp.port))
        # Audio can only go through once the client answered too (until then the relay has
        # nowhere to send the employee's packets).
        pbx.wait_call_state(body["pbx_call_id"], "answered")
        relay = inc.remote_media
        assert relay[0] == HOST and 21000 <= relay[1] <= 21999, relay
        sent = rtp.send_pcmu(relay, count=PACKETS)
        assert_echoed(sent, rtp.wait_packets(PACKETS, timeout=5), relay)
        assert inc.bye().status == 200
        assert carrier.wait(10) == 0, carrier.describe()
        invites = received_requests(carrier.message_log(), "INVITE")
        assert len(invites) == 1, carrier.describe()
        assert re.search(rf"(?m)^INVITE sip:{re.escape(CLIENT_AT_CARRIER)}@", invites[0])
        # The carrier sees the employee's outbound caller ID, not the client's number.
        assert re.search(r"(?mi)^From:[^\r\n]*<sip:74950000101@", invites[0]), invites[0]
    pbx.wait_idle()
    row = pbx.cdr(body["pbx_call_id"])
    assert (row["direction"], row["disposition"], row["gateway"]) == \
        ("outbound", "answered", "carrier"), row
    assert row["duration"] >= 0 and row["answered_at"] is not None, row
    # The client leg is an outbound call for the CRM: OUT_START, OUT_END, then the recording
    # (the sample records 101's calls), all under the pbx_call_id the click was answered with.
    events = pbx.events(body["pbx_call_id"], "NOTIFY_RECORD")
    assert [r.event for r in events] == ["NOTIFY_OUT_START", "NOTIFY_OUT_END",
                                         "NOTIFY_RECORD"], events
    start, end, record = (dict(r.fields) for r in events)
    assert (start["internal"], start["destination"], start["caller_id"]) == \
        ("101", CLIENT_DIALLED, "74950000101"), start
    assert (end["internal"], end["destination"], end["disposition"]) == \
        ("101", CLIENT_DIALLED, "answered"), end
    assert record["record_link"].endswith(".mp3"), record


def test_the_client_is_dialled_only_after_the_employee_answers(pbx: Pbx) -> None:
    """A test phone as the carrier: nothing reaches it while the employee's phone rings; once
    the employee answers it gets the INVITE, answers, and audio flows both ways."""
    with pbx.phone("101") as employee, \
            pbx.phone("carrier", port=pbx.carrier_port) as carrier, \
            RtpEndpoint() as employee_rtp, RtpEndpoint() as carrier_rtp:
        employee.register()
        status, _, body = pbx.click({"from": "101", "to": "+7 999 000-00-01"})
        assert status == 200 and body["status"] == "1", body
        inc = employee.wait_invite(timeout=5)
        inc.ring()
        carrier.assert_no_invite(within=1.0)  # the employee's phone rings: no client yet
        assert pbx.call_state(body["pbx_call_id"]) == "originating"
        answered_at = time.monotonic()
        inc.answer(make_sdp(employee_rtp.port))
        out = carrier.wait_invite(timeout=5)
        assert out.received_at > inc.received_at
        assert str(out.request.uri).startswith("sip:+79990000001@"), out.request.uri
        out.ring()
        out.answer(make_sdp(carrier_rtp.port))
        pbx.wait_call_state(body["pbx_call_id"], "answered")
        to_carrier = employee_rtp.send_pcmu(inc.remote_media, count=20)
        got = carrier_rtp.wait_packets(20, timeout=5)
        assert sorted(p.payload for p in got) == sorted(p.payload for p in to_carrier)
        to_employee = carrier_rtp.send_pcmu(out.remote_media, count=20)
        got = employee_rtp.wait_packets(20, timeout=5)
        assert sorted(p.payload for p in got) == sorted(p.payload for p in to_employee)
        assert out.bye().status == 200  # the client hangs up: the employee's leg ends too
        inc.wait_bye()
    pbx.wait_idle()
    row = pbx.cdr(body["pbx_call_id"])
    assert (row["direction"], row["disposition"]) == ("outbound", "answered"), row
    events = pbx.events(body["pbx_call_id"], "NOTIFY_OUT_END")
    assert [r.event for r in events][:2] == ["NOTIFY_OUT_START", "NOTIFY_OUT_END"], events
    # NOTIFY_OUT_START says the client is dialled: not before the employee picked up.
    assert events[0].at > answered_at


def test_employee_busy_dials_nobody(pbx: Pbx) -> None:
    with pbx.phone("101") as employee, pbx.phone("carrier", port=pbx.carrier_port) as carrier:
        employee.register()
        status, _, body = pbx.click({"from": "101", "to": "89990000002"})
        assert status == 200, body
        employee.wait_invite(timeout=5).reject(486)
        carrier.assert_no_invite(within=1.0)
    pbx.wait_idle()
    row = pbx.cdr(body["pbx_call_id"])
    assert (row["disposition"], row["duration"]) == ("busy", 0), row
    # Nothing was dialled, and the CRM's click still gets one outcome.
    events = pbx.events(body["pbx_call_id"], "NOTIFY_OUT_END")
    assert [r.event for r in events] == ["NOTIFY_OUT_END"], events
    end = dict(events[0].fields)
    assert (end["internal"], end["disposition"], end["duration"]) == ("101", "busy", "0"), end


@pytest.mark.parametrize(("fields", "token", "status", "error"), [
    ({"from": "101", "to": "89990000003"}, "wrong", 401, "token"),
    ({"from": "101", "to": "89990000003"}, None, 401, "token"),
    ({"to": "89990000003"}, TOKEN, 400, "'from'"),
    ({"from": "101", "to": "call me"}, TOKEN, 400, "'to'"),
    ({"from": "999", "to": "89990000003"}, TOKEN, 404, "from"),
    ({"from": "102", "to": "89990000003"}, TOKEN, 409, "from"),   # 102 is not registered
])
def test_error_answers(pbx: Pbx, fields: dict[str, str], token: str | None, status: int,
                       error: str) -> None:
    got_status, ctype, body = pbx.click(fields, token=token)
    assert got_status == status, body
    assert ctype.split(";")[0] == "application/json"
    assert body["status"] == "0" and error in body["error"], body


def test_no_route_is_422(pbx: Pbx) -> None:
    with pbx.phone("101") as employee:
        employee.register()
        status, _, body = pbx.click({"from": "101", "to": "12"})  # no rule for 2 digits
    assert status == 422 and body["status"] == "0" and "to" in body["error"], body


def test_extension_already_in_a_call_is_429(pbx: Pbx) -> None:
    with pbx.phone("101") as employee:
        employee.register()
        status, _, first = pbx.click({"from": "101", "to": "89990000004"})
        assert status == 200, first
        inc = employee.wait_invite(timeout=5)
        inc.ring()
        status, _, second = pbx.click({"from": "101", "to": "89990000005"})
        assert status == 429 and "from" in second["error"], second
        inc.reject(603)
    pbx.wait_idle()
