"""Stopping softpbx in the middle of calls: both phones of an answered call get a BYE, a
ringing callee gets a CANCEL and its caller a 487, and each call leaves its CDR."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.phone import Phone, make_sdp
from tests.support.rtp import RtpEndpoint
from tests.support.server import PbxProcess

pytestmark = pytest.mark.integration


def test_stop_hangs_up_live_calls_and_writes_their_cdrs(tmp_path: Path) -> None:
    pbx = PbxProcess.create(tmp_path / "pbx", overrides={"recording.enabled": "false"})
    pbx.start()
    try:
        with Phone(user="101", pbx=pbx.sip_addr, password="secret101") as alice, \
                Phone(user="102", pbx=pbx.sip_addr, password="secret102") as bob, \
                Phone(user="103", pbx=pbx.sip_addr, password="secret103") as carol, \
                RtpEndpoint() as rtp:
            alice.register()
            carol.register()
            answered = bob.call("101", sdp=make_sdp(rtp.port))
            inc = alice.wait_invite()
            inc.answer(make_sdp(rtp.port))
            assert answered.wait_final().status == 200
            ringing = alice.call("103", sdp=make_sdp(rtp.port))
            inc3 = carol.wait_invite()
            inc3.ring()
            ringing.wait_status(180)
            pbx.stop()  # asserts a clean exit (status 0, no traceback)
            inc.wait_bye()
            answered.wait_bye()
            inc3.wait_cancel()
            assert ringing.wait_final().status == 487
        assert "hanging up 2 calls" in pbx.log_text()
        pbx.start()
        rows = {r["sip_call_id"]: r for r in pbx.http_json("/api/cdr?limit=10")["cdr"]}
        assert rows[answered.call_id]["answered_at"] is not None
        assert rows[answered.call_id]["cause"] == "switch shut down"
        assert rows[ringing.call_id]["cause"] == "switch shut down"
        assert rows[ringing.call_id]["answered_at"] is None
        pbx.stop()
    finally:
        pbx.kill()
