"""pyVoIP as a real phone behind softpbx: registered as 102, it takes a call from the Python
test phone (101), talks for a moment and hangs up.

pyVoIP is threaded and blocking: its register/deregister waits are shortened, every wait in
the test is bounded, and the phone is stopped in ``finally``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pyVoIP.VoIP import CallState, InvalidStateError, VoIPCall, VoIPPhone

from tests.support.phone import Phone, make_sdp
from tests.support.rtp import RtpEndpoint, pattern_payload
from tests.support.server import HOST, PbxProcess, free_port

pytestmark = pytest.mark.integration

LIVE_COUNTS = ("calls", "dialogs", "media_sessions", "rtp_ports")
PCMU_SILENCE = frozenset({0xFF, 0x7F})
"""G.711 mu-law encodings of zero."""
TALK_S = 1.5


@pytest.fixture(scope="module")
def pbx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxProcess]:
    proc = PbxProcess.create(tmp_path_factory.mktemp("calls_pyvoip"), overrides={
        "sip.t1_ms": "100", "sip.t4_ms": "1000",
        "media.rtp_start_port": "21000", "media.rtp_end_port": "21999",
    })
    proc.start()
    try:
        yield proc
    except BaseException:
        proc.kill()
        raise
    try:
        proc.stop()
    finally:
        proc.kill()


def wait_counts(pbx: PbxProcess, keys: tuple[str, ...], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = pbx.http_json("/api/status")
        if all(st[k] == 0 for k in keys):
            return st
        if time.monotonic() >= deadline:
            raise AssertionError(f"{keys} not all 0 within {timeout}s: {st}")
        time.sleep(0.1)


def wait_cdr(pbx: PbxProcess, sip_call_id: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in pbx.http_json("/api/cdr")["cdr"] if r["sip_call_id"] == sip_call_id]
        if rows:
            return rows[0]
        if time.monotonic() >= deadline:
            raise AssertionError(f"no CDR for {sip_call_id} within {timeout}s")
        time.sleep(0.1)


class PyVoipCallee:
    """What the pyVoIP phone's call callback did (it runs in a pyVoIP thread)."""

    def __init__(self) -> None:
        self.answered = threading.Event()
        self.done = threading.Event()
        self.heard: list[bytes] = []
        self.error: BaseException | None = None
        self.caller = ""

    def __call__(self, call: VoIPCall) -> None:
        try:
            self.caller = call.request.headers["From"]["raw"]
            call.answer()
            self.answered.set()
            # A 400 Hz-ish square wave, 8-bit unsigned linear as pyVoIP wants it.
            tone = bytes(0xE0 if (i // 10) % 2 else 0x20 for i in range(160))
            call.write_audio(tone * int(TALK_S / 0.02))
            deadline = time.monotonic() + TALK_S
            while time.monotonic() < deadline and call.state is CallState.ANSWERED:
                chunk = call.read_audio(160, blocking=False)
                if chunk.strip(b"\x80"):
                    self.heard.append(chunk)
                time.sleep(0.01)
            call.hangup()
        except (InvalidStateError, OSError, KeyError, AssertionError) as exc:
            self.error = exc
        finally:
            self.done.set()


def test_pyvoip_answers_a_call_from_101_and_hangs_up(pbx: PbxProcess) -> None:
    callee = PyVoipCallee()
    rtp_port = free_port(tcp=False)
    phone = VoIPPhone(HOST, pbx.sip_port, "102", "secret102", myIP=HOST, callCallback=callee,
                      sipPort=free_port(tcp=False), rtpPortLow=rtp_port, rtpPortHigh=rtp_port)
    phone.sip.register_timeout = 3  # pyVoIP waits 30 s for a REGISTER answer by default
    started = False
    try:
        phone.start()
        started = True
        pbx.wait_registrations("102", 1)
        with Phone(user="101", password="secret101", pbx=pbx.sip_addr) as alice, \
                RtpEndpoint() as rtp:
            call = alice.call("102", sdp=make_sdp(rtp.port))
            final = call.wait_final(timeout=8)  # pyVoIP rings 1 s before its callback runs
            assert final.status == 200, final
            assert callee.answered.wait(2)
            relay = call.remote_media
            payloads = [pattern_payload(i) for i in range(int(TALK_S / 0.02))]
            rtp.send_pcmu(relay, count=len(payloads), payloads=payloads)
            bye = call.wait_bye(timeout=TALK_S + 4)  # pyVoIP hangs up, softpbx passes it on
            assert bye.method == "BYE"
            assert callee.done.wait(3)
            assert callee.error is None, repr(callee.error)
            # pyVoIP -> relay -> 101: its tone, not just the silence it sends when idle.
            voiced = [p for p in rtp.received if set(p.payload) - PCMU_SILENCE]
            assert voiced, f"no voiced RTP from pyVoIP among {len(rtp.received)} packets"
            assert {p.source for p in rtp.received} == {relay}
            # 101 -> relay -> pyVoIP: pyVoIP decoded something other than silence.
            assert callee.heard, "pyVoIP heard only silence"
            assert '"Alice 101"' in callee.caller, callee.caller
        wait_counts(pbx, LIVE_COUNTS, timeout=5)
        row = wait_cdr(pbx, call.call_id)
        assert (row["disposition"], row["extension"], row["direction"]) == \
            ("answered", "102", "internal")
        assert row["duration"] >= 1
    finally:
        if started:
            phone.stop()  # deregisters (bounded by register_timeout) and closes its sockets
        else:
            phone.sip.stop()


def test_nothing_leaks_after_the_module(pbx: PbxProcess) -> None:
    st = wait_counts(pbx, (*LIVE_COUNTS, "transactions"), timeout=40)
    assert st["calls"] == st["transactions"] == 0, st
