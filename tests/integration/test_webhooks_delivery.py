"""CRM webhook delivery through a real softpbx process: a real aiohttp CRM in the test
(tests/support/crm.py), inbound calls from a carrier socket on the gateway's address.

The calls reach an extension with no phone registered (101, fallback 102), so each one is
NOTIFY_START, the CRM's answer (or its timeout), then NOTIFY_END ``failed``: two events per
call, no phones needed. What is checked is the delivery: every event reaches the CRM once
(counted by ``X-Event-Id`` among the 2xx answers), in order per call, through a CRM outage
and a ``kill -9``; and the built-in inspector receives the same events.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import shutil
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.crm import CrmServer, Received
from tests.support.server import HOST, SHIPPED_PROFILES, PbxProcess, free_port
from tests.support.sip_client import parse_response, token

pytestmark = pytest.mark.integration

DID = "74950000000"
CALLER = "79161234567"
PBX_CALL_ID = re.compile(r"in_[0-9a-f]{40}\Z")
CALL_START = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\Z")
SECRET = "zadarma-api-secret"
FAST_RETRY = {"crm.retry_min_s": "0.1", "crm.retry_max_s": "0.3", "crm.answer_timeout_ms": "300",
              "crm.request_timeout_ms": "2000"}


def write_profiles(dest: Path, carrier_port: int) -> Path:
    """The shipped profiles with the carrier on ``carrier_port`` (IP-authenticated)."""
    shutil.copytree(SHIPPED_PROFILES, dest)
    (dest / "gateways" / "carrier.toml").write_text(
        f'[gateway]\nproxy = "127.0.0.1:{carrier_port}"\ntransport = "udp"\nregister = false\n'
        f'inbound_addresses = ["127.0.0.1:{carrier_port}"]\n')
    return dest


class Carrier:
    """The trunk: INVITEs to a DID from the gateway's address, ACKs the final answer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, port))

    def close(self) -> None:
        self.sock.close()

    def call(self, pbx: tuple[str, int], did: str = DID, timeout: float = 10.0) -> int:
        """One call to ``did``; returns the final status (the call is expected to fail)."""
        call_id, tag, branch = f"{token()}@{HOST}", token(), "z9hG4bK" + token()
        sdp = (f"v=0\r\no=carrier 1 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
               f"m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
        head = (f"Via: SIP/2.0/UDP {HOST}:{self.port};branch={branch};rport\r\n"
                f"From: \"Carrier Caller\" <sip:{CALLER}@{HOST}:{self.port}>;tag={tag}\r\n")
        invite = (f"INVITE sip:{did}@{pbx[0]}:{pbx[1]} SIP/2.0\r\n{head}"
                  f"To: <sip:{did}@{pbx[0]}:{pbx[1]}>\r\nCall-ID: {call_id}\r\n"
                  f"CSeq: 1 INVITE\r\nContact: <sip:{CALLER}@{HOST}:{self.port}>\r\n"
                  f"Max-Forwards: 70\r\nContent-Type: application/sdp\r\n"
                  f"Content-Length: {len(sdp)}\r\n\r\n{sdp}")
        self.sock.sendto(invite.encode(), pbx)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, _ = self.sock.recvfrom(65535)
            except TimeoutError:
                break
            if not data.startswith(b"SIP/2.0"):
                continue
            resp = parse_response(data)
            if resp.status < 200:
                continue
            to = resp.get("to") or ""
            # RFC 3261 §17.1.1.3: the ACK of a non-2xx goes in the INVITE's transaction.
            ack = (f"ACK sip:{did}@{pbx[0]}:{pbx[1]} SIP/2.0\r\n{head}To: {to}\r\n"
                   f"Call-ID: {call_id}\r\nCSeq: 1 ACK\r\nMax-Forwards: 70\r\n"
                   f"Content-Length: 0\r\n\r\n")
            self.sock.sendto(ack.encode(), pbx)
            return resp.status
        raise AssertionError(f"no final answer to the INVITE within {timeout}s")


@pytest.fixture
def carrier() -> Iterator[Carrier]:
    c = Carrier(free_port())
    try:
        yield c
    finally:
        c.close()


def start_pbx(tmp_path: Path, carrier: Carrier, overrides: dict[str, str]) -> PbxProcess:
    profiles = write_profiles(tmp_path / "profiles", carrier.port)
    pbx = PbxProcess.create(tmp_path / "pbx", profiles=profiles,
                            overrides={"sip.t1_ms": "100", **overrides})
    pbx.start()
    return pbx


def events_by_call(received: list[Received]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in received:
        out.setdefault(r.pbx_call_id, []).append(r.event)
    return out


def assert_once_each(accepted: list[Received]) -> None:
    ids = [r.event_id for r in accepted]
    dup = {i for i in ids if ids.count(i) > 1}
    assert not dup, f"events the CRM confirmed and got again: {sorted(dup)}"


def assert_inbound_fields(r: Received) -> None:
    f = dict(r.fields)
    assert r.content_type == "multipart/form-data"
    assert [k for k, _ in r.fields][:3] == ["event", "call_start", "pbx_call_id"], r.fields
    assert PBX_CALL_ID.match(f["pbx_call_id"]) and CALL_START.match(f["call_start"]), f
    assert (f["caller_id"], f["called_did"]) == (CALLER, DID), f
    assert r.event_id.startswith(f["pbx_call_id"] + "."), r.event_id


def test_a_crm_down_for_a_while_gets_every_event_once_in_order(
        tmp_path: Path, carrier: Carrier) -> None:
    with CrmServer() as crm:
        crm.status = 500
        pbx = start_pbx(tmp_path, carrier, {"crm.webhook_url": crm.url, **FAST_RETRY})
        try:
            finals = [carrier.call(pbx.sip_addr) for _ in range(3)]
            assert all(s >= 400 for s in finals), finals
            crm.wait_for(lambda got: len(got) >= 6, "a few refused attempts")
            crm.status = 200
            got = crm.wait_for(lambda got: len([r for r in got if r.status == 200]) >= 6,
                               "every event accepted")
            time.sleep(0.5)  # a duplicate would come within the retry delays
            accepted = crm.accepted()
            assert len(accepted) == 6, [(r.event, r.status) for r in got]
            assert_once_each(accepted)
            by_call = events_by_call(accepted)
            assert len(by_call) == 3
            assert all(evs == ["NOTIFY_START", "NOTIFY_END"] for evs in by_call.values()), by_call
            for r in accepted:
                assert_inbound_fields(r)
                if r.event == "NOTIFY_END":
                    f = dict(r.fields)
                    assert (f["duration"], f["disposition"]) == ("0", "failed"), f
            # Every refused attempt was a retry of an event later accepted (same X-Event-Id).
            assert {r.event_id for r in got} == {r.event_id for r in accepted}
            api = pbx.http_json("/api/webhooks?state=delivered")
            assert api["counts"]["delivered"] == 6 and api["counts"]["pending"] == 0, api
            assert all(w["attempts"] >= 1 and w["last_status"] == 200 for w in api["webhooks"])
            assert any(w["attempts"] > 1 for w in api["webhooks"]), api
            log = pbx.log_text()
            assert re.search(r"webhook NOTIFY_START in_[0-9a-f]{40} attempt 1: 500 in "
                             r"[\d.]+ ms -> pending", log), log[-3000:]
            pbx.stop()
        finally:
            pbx.kill()


def test_events_pending_at_kill_9_are_delivered_after_restart_once(
        tmp_path: Path, carrier: Carrier) -> None:
    with CrmServer() as crm:
        pbx = start_pbx(tmp_path, carrier, {"crm.webhook_url": crm.url, **FAST_RETRY,
                                            "crm.signature_secret": SECRET})
        try:
            carrier.call(pbx.sip_addr)
            crm.wait_for(lambda got: len(got) == 2, "the first call's two events")
            delivered_before = {r.event_id for r in crm.accepted()}
            crm.status = 503
            carrier.call(pbx.sip_addr)
            carrier.call(pbx.sip_addr)
            # Both calls ended (their ENDs are committed, waiting behind their STARTs).
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                pending = pbx.http_json("/api/webhooks?state=pending")["webhooks"]
                if len(pending) == 4:
                    break
                time.sleep(0.05)
            assert len(pending) == 4, pending
            pbx.kill()  # kill -9: no clean shutdown
            crm.status = 200
            mark = len(crm.snapshot())
            pbx.start()
            crm.wait_for(lambda got: len([r for r in got[mark:] if r.status == 200]) == 4,
                         "the four pending events after the restart")
            time.sleep(0.5)
            accepted = crm.accepted()
            assert_once_each(accepted)
            assert delivered_before <= {r.event_id for r in accepted}
            assert not delivered_before & {r.event_id for r in crm.snapshot()[mark:]}
            by_call = events_by_call(accepted)
            assert len(by_call) == 3
            assert all(evs == ["NOTIFY_START", "NOTIFY_END"] for evs in by_call.values()), by_call
            assert pbx.http_json("/api/webhooks")["counts"]["pending"] == 0
            for r in crm.snapshot():  # Zadarma's formula, computed here independently
                f = dict(r.fields)
                text = f["caller_id"] + f["called_did"] + f["call_start"]
                digest = hmac.new(SECRET.encode(), text.encode(), hashlib.sha1).hexdigest()
                assert r.signature == base64.b64encode(digest.encode()).decode(), r
            pbx.stop()
        finally:
            pbx.kill()


def post_form(url: str, form: dict[str, str]) -> Any:
    data = urllib.parse.urlencode(form).encode()
    req = urllib.request.Request(url, data=data, headers={"Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - 127.0.0.1 only
        return json.loads(resp.read())


def test_the_inspector_receives_an_inbound_calls_events_and_answers_the_start(
        tmp_path: Path, carrier: Carrier) -> None:
    # A long answer timeout: the answer comes in milliseconds, but a loaded CI machine must
    # not turn this into a "CRM too slow, route normally" call.
    pbx = start_pbx(tmp_path, carrier, {"crm.answer_timeout_ms": "5000"})
    try:
        base = f"http://{HOST}:{pbx.http_port}/crm"
        # The answer the next NOTIFY_START gets: reject the call (Zadarma's hangup).
        assert post_form(base + "/answer", {"mode": "hangup"}) == {"next_answer": {"hangup": 1}}
        assert carrier.call(pbx.sip_addr) == 486
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            feed = pbx.http_json("/crm/events.json")
            if len(feed["events"]) >= 2:
                break
            time.sleep(0.05)
        events = feed["events"]
        assert [e["event"] for e in events] == ["NOTIFY_END", "NOTIFY_START"], events  # newest first
        start, end = events[1], events[0]
        assert start["answer"] == {"hangup": 1} and feed["next_answer"] == {}
        fields = dict(end["fields"])
        assert fields["disposition"] == "busy" and fields["called_did"] == DID, fields
        assert start["content_type"] == "multipart/form-data" and not start["duplicate"]
        assert PBX_CALL_ID.match(fields["pbx_call_id"])
        with urllib.request.urlopen(base + "/", timeout=5) as resp:  # noqa: S310
            page = resp.read().decode()
            assert resp.headers["Content-Type"].startswith("text/html")
        assert "textContent" in page and "/crm/events.json" in page
        deadline = time.monotonic() + 5  # a 2xx is written back as delivered within 20 ms
        while time.monotonic() < deadline:
            api = pbx.http_json("/api/webhooks")
            if api["counts"]["delivered"] == 2:
                break
            time.sleep(0.05)
        assert api["counts"]["delivered"] == 2, api
        pbx.stop()
    finally:
        pbx.kill()
