"""Late offer through a real softpbx process: a SIPp carrier and a SIPp phone send INVITEs
without SDP (tests/data/sipp/call_late_offer_*.xml); softpbx offers to the Python test phone
on the other side, gives the SIPp caller the callee's answer as its offer in the 200, and takes
the answer from SIPp's ACK. RTP then flows both ways: the Python phone's packets reach SIPp
(which echoes them) only if the relay learnt SIPp's media address from that ACK."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_calls_sipp import (
    DID,
    LIVE_COUNTS,
    NO_ANSWER_S,
    PACKETS,
    Sipp,
    Switch,
    assert_echoed,
    received_requests,
    write_profiles,
)
from tests.support.phone import make_sdp, sdp_audio_address
from tests.support.rtp import RtpEndpoint
from tests.support.server import HOST, PbxProcess, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pbx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switch]:
    root = tmp_path_factory.mktemp("late_offer")
    carrier_port = free_port()
    profiles = write_profiles(root / "profiles", carrier_port, NO_ANSWER_S)
    proc = PbxProcess.create(root / "pbx", profiles=profiles, overrides={
        "sip.t1_ms": "100", "sip.t4_ms": "1000",
        "media.rtp_start_port": "21000", "media.rtp_end_port": "21999",
    })
    proc.start()
    try:
        yield Switch(proc, carrier_port)
    except BaseException:
        proc.kill()
        raise
    try:
        proc.stop()
    finally:
        proc.kill()


def sipp_answer_in_ack(sipp: Sipp) -> tuple[str, int]:
    """The media address SIPp's ACK gave as its SDP answer (from its message log)."""
    acks = [b for b in re.split(r"\n(?=-{10,})", sipp.message_log())
            if "message sent" in b and re.search(r"(?m)^ACK sip:", b) and "m=audio" in b]
    assert len(acks) == 1, sipp.describe()
    port = re.search(r"(?m)^m=audio (\d+) ", acks[0])
    assert port is not None
    return HOST, int(port.group(1))


def caller_call_id(sipp: Sipp) -> str:
    """The Call-ID of SIPp's call (its first message), which the CDR names."""
    m = re.search(r"(?mi)^Call-ID:\s*(\S+)", sipp.message_log())
    assert m is not None, sipp.describe()
    return m.group(1)


def media_flows(rtp: RtpEndpoint, relay: tuple[str, int], timeout: float = 3.0) -> None:
    """Late offer: the relay learns the SDP-less side's address only from its ACK, which
    may come after the answering phone started to talk (its packets are dropped until
    then, as in any B2BUA). Probe (bounded) until one echo comes back, then start clean."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rtp.send_pcmu(relay, count=1)
        if rtp.wait_packets(1, timeout=0.1):
            rtp.clear()
            return
    raise AssertionError(f"no RTP came back through {relay} within {timeout}s")


def test_carrier_late_offer_to_a_phone(pbx: Switch, tmp_path: Path) -> None:
    """The carrier's SDP-less INVITE to the DID: 101 gets our offer (relay address, our
    codecs), answers; the carrier's 200 is an offer, its ACK the answer; RTP 101 -> relay ->
    carrier (echo) -> relay -> 101."""
    with pbx.phone("101") as alice, RtpEndpoint() as rtp:
        alice.register()
        with Sipp("call_late_offer_carrier.xml", pbx.sip_addr, tmp_path / "uac",
                  port=pbx.carrier_port, service=DID) as carrier:
            inc = alice.wait_invite(timeout=8)
            relay = inc.remote_media  # our own offer to the phone
            assert relay[0] == HOST and 21000 <= relay[1] <= 21999, relay
            assert b"PCMU/8000" in inc.request.body and b"telephone-event" in inc.request.body
            inc.ring()
            inc.answer(make_sdp(rtp.port))
            media_flows(rtp, relay)
            sent = rtp.send_pcmu(relay, count=PACKETS)
            assert_echoed(sent, rtp.wait_packets(PACKETS), relay)
            assert inc.bye().status == 200
            assert carrier.wait(10) == 0, carrier.describe()
            log = carrier.message_log()
            oks = [b for b in re.split(r"\n(?=-{10,})", log)
                   if "message received" in b and re.search(r"(?m)^SIP/2.0 200", b)
                   and "INVITE" in b]
            assert oks and "m=audio" in oks[0], carrier.describe()
            assert sipp_answer_in_ack(carrier)[1] == carrier.media_port
            assert len(received_requests(log, "BYE")) == 1, carrier.describe()
    row = pbx.cdr(caller_call_id(carrier))
    assert (row["direction"], row["disposition"], row["extension"]) == \
        ("inbound", "answered", "101")
    pbx.wait_status(LIVE_COUNTS, timeout=5.0)


def test_phone_late_offer_to_a_phone(pbx: Switch, tmp_path: Path) -> None:
    """A SIPp phone (extension 101, digest-authenticated) dials 102 with an SDP-less INVITE:
    102 (Python phone) is offered our SDP and answers; SIPp's ACK carries its answer; RTP
    102 -> relay -> SIPp (echo) -> relay -> 102."""
    with pbx.phone("102") as bob, RtpEndpoint() as rtp:
        bob.register()
        with Sipp("call_late_offer_phone.xml", pbx.sip_addr, tmp_path / "uac",
                  port=free_port(), service="102",
                  extra=["-au", "101", "-ap", "secret101"]) as phone:
            inc = bob.wait_invite(timeout=8)
            assert inc.from_user == "101"
            relay = sdp_audio_address(inc.request.body)
            assert relay[0] == HOST and 21000 <= relay[1] <= 21999, relay
            inc.ring()
            inc.answer(make_sdp(rtp.port))
            media_flows(rtp, relay)
            sent = rtp.send_pcmu(relay, count=PACKETS)
            assert_echoed(sent, rtp.wait_packets(PACKETS), relay)
            assert inc.bye().status == 200
            assert phone.wait(10) == 0, phone.describe()
            assert sipp_answer_in_ack(phone)[1] == phone.media_port
    row = pbx.cdr(caller_call_id(phone))
    assert (row["direction"], row["disposition"], row["caller"], row["extension"]) == \
        ("internal", "answered", "101", "102")
    pbx.wait_status(LIVE_COUNTS, timeout=5.0)
