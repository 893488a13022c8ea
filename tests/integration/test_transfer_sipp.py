"""Blind transfer by a SIPp phone through a real softpbx process
(tests/data/sipp/call_refer_blind.xml): SIPp (101) calls 102 (the Python test phone), then
REFERs it to 103 (another Python phone), answering the digest challenge of both its INVITE
and its REFER; softpbx rings 103 with Referred-By, bridges 102 to it, sends SIPp the
sipfrag NOTIFYs and a BYE. RTP from 102 reaches 103 through the relay after the transfer
(before it, SIPp echoed it back to 102)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.integration.test_calls_sipp import (
    PACKETS,
    Sipp,
    Switch,
    assert_echoed,
    received_requests,
)
from tests.integration.test_late_offer_sipp import caller_call_id
from tests.integration.test_late_offer_sipp import pbx as pbx  # noqa: F401 (module fixture)
from tests.support.phone import make_sdp
from tests.support.rtp import RtpEndpoint
from tests.support.server import HOST, free_port

pytestmark = pytest.mark.integration


def test_sipp_phone_blind_transfers_102_to_103(pbx: Switch, tmp_path: Path) -> None:  # noqa: F811
    with pbx.phone("102") as bob, pbx.phone("103") as carol, \
            RtpEndpoint() as bob_rtp, RtpEndpoint() as carol_rtp:
        bob.register()
        carol.register()
        with Sipp("call_refer_blind.xml", pbx.sip_addr, tmp_path / "uac", port=free_port(),
                  service="102", extra=["-au", "101", "-ap", "secret101",
                                        "-key", "target", "103"]) as phone:
            inc = bob.wait_invite(timeout=8)
            relay_b = inc.remote_media
            inc.answer(make_sdp(bob_rtp.port))
            # before the transfer: 102 -> relay -> SIPp (echo) -> relay -> 102
            assert_echoed(bob_rtp.send_pcmu(relay_b, count=PACKETS),
                          bob_rtp.wait_packets(PACKETS), relay_b)
            to_103 = carol.wait_invite(timeout=8)
            assert to_103.from_user == "102"  # the remaining party, as 103 sees it
            assert re.match(r"<sip:101@", to_103.request.get("referred-by") or ""), \
                to_103.request.get("referred-by")
            to_103.answer(make_sdp(carol_rtp.port))
            assert phone.wait(10) == 0, phone.describe()
            frags = [re.search(r"(?m)^SIP/2.0 \d+ .*$", b).group(0)  # type: ignore[union-attr]
                     for b in received_requests(phone.message_log(), "NOTIFY")]
            assert frags == ["SIP/2.0 100 Trying", "SIP/2.0 200 OK"], phone.describe()
            # after it: 102 -> relay -> 103, no echo any more; 102 keeps its relay address
            bob_rtp.clear()
            bob_rtp.send_pcmu(relay_b, count=PACKETS)
            got = carol_rtp.wait_packets(PACKETS)
            assert len(got) == PACKETS and {p.source[0] for p in got} == {HOST}
            assert inc.bye().status == 200
            to_103.wait_bye(timeout=5)
    row = pbx.cdr(caller_call_id(phone))
    assert (row["disposition"], row["extension"]) == ("answered", "102"), row
    assert '"event":"blind","by":"101","to":"103"' in row["transfers"], row
