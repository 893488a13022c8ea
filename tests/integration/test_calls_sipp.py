"""Calls through a real softpbx process on 127.0.0.1: SIPp as phones and as the carrier, the
Python test phone (tests/support/phone.py) on the other side, RTP through the relay.

One softpbx serves the whole module, with a copy of the shipped profiles where the carrier
gateway lives on a free port (not 5070, so that parallel runs do not collide) and the DID's
no-answer timeout is 2 s. ``sip.t1_ms=100`` makes the transaction timers (64*T1) short; only
Timer D stays 32 s (RFC 3261 §17.1.1.2: "at least 32 seconds" on UDP), so the tests with a
failed leg run first and the leak check that waits for every transaction runs last.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.phone import Phone, make_sdp
from tests.support.rtp import RtpEndpoint, RtpPacket
from tests.support.server import HOST, SHIPPED_PROFILES, PbxProcess, free_port

pytestmark = pytest.mark.integration

SCENARIOS = Path(__file__).resolve().parents[1] / "data" / "sipp"
DID = "74950000000"
NO_ANSWER_S = 2
PACKETS = 50
LIVE_COUNTS = ("calls", "dialogs", "media_sessions", "rtp_ports")


# -- the switch ---------------------------------------------------------------------------------
def write_profiles(dest: Path, carrier_port: int, no_answer_timeout: int) -> Path:
    """The shipped profiles with the carrier on ``carrier_port`` and a short DID no-answer."""
    shutil.copytree(SHIPPED_PROFILES, dest)
    # The sample carrier (IP-authenticated by address and port), moved to carrier_port.
    (dest / "gateways" / "carrier.toml").write_text(
        f'[gateway]\nproxy = "127.0.0.1:{carrier_port}"\ntransport = "udp"\nregister = false\n'
        f'inbound_addresses = ["127.0.0.1:{carrier_port}"]\nrecord = true\n')
    dp = dest / "dialplan.toml"
    text, n = re.subn(r"(?m)^no_answer_timeout = \d+$",
                      f"no_answer_timeout = {no_answer_timeout}", dp.read_text())
    assert n == 1, "dialplan.toml changed shape: update this test"
    dp.write_text(text)
    return dest


class Switch:
    """The softpbx under test and the carrier port its profiles name."""

    def __init__(self, pbx: PbxProcess, carrier_port: int) -> None:
        self.pbx = pbx
        self.carrier_port = carrier_port

    @property
    def sip_addr(self) -> tuple[str, int]:
        return self.pbx.sip_addr

    def status(self) -> dict[str, Any]:
        return self.pbx.http_json("/api/status")

    def wait_status(self, keys: tuple[str, ...], timeout: float) -> dict[str, Any]:
        """Poll until every count in ``keys`` is 0; fail with the last status otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if all(st[k] == 0 for k in keys):
                return st
            if time.monotonic() >= deadline:
                raise AssertionError(f"{keys} not all 0 within {timeout}s: {st}\n"
                                     f"{self.pbx.log_text()[-3000:]}")
            time.sleep(0.1)

    def cdr(self, sip_call_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The CDR of the call whose caller leg had ``sip_call_id`` (written off-loop: polled)."""
        return self.pbx.wait_cdr(lambda r: r["sip_call_id"] == sip_call_id, sip_call_id, timeout)

    def phone(self, user: str, **kwargs: Any) -> Phone:
        password = {"101": "secret101", "102": "secret102", "103": "secret103"}.get(user, "")
        kwargs.setdefault("password", password)
        return Phone(user=user, pbx=self.sip_addr, **kwargs)


@pytest.fixture(scope="module")
def switch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Switch]:
    root = tmp_path_factory.mktemp("calls_sipp")
    carrier_port = free_port()
    profiles = write_profiles(root / "profiles", carrier_port, NO_ANSWER_S)
    pbx = PbxProcess.create(root / "pbx", profiles=profiles, overrides={
        "sip.t1_ms": "100", "sip.t4_ms": "1000",
        "media.rtp_start_port": "20000", "media.rtp_end_port": "20999",
    })
    pbx.start()
    try:
        yield Switch(pbx, carrier_port)
    except BaseException:
        pbx.kill()
        raise
    try:
        pbx.stop()
    finally:
        pbx.kill()


@pytest.fixture
def live_zero(switch: Switch) -> Iterator[None]:
    """Each test leaves no call, dialog, media session or RTP port behind."""
    yield
    switch.wait_status(LIVE_COUNTS, timeout=5.0)


# -- SIPp ---------------------------------------------------------------------------------------
def udp_bound(port: int) -> bool:
    """Whether some socket is bound to UDP ``127.0.0.1:port`` (Linux /proc/net/udp)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as f:
        return any(line.split()[1] == want for line in f.readlines()[1:])


def free_media_port() -> int:
    """A free even port with port+2 free too (SIPp's -rtp_echo also listens on mp+2)."""
    for _ in range(50):
        p = free_port(tcp=False)
        if p % 2 == 0 and p + 2 < 65535 and not udp_bound(p + 2) and not udp_bound(p + 1):
            return p
    raise RuntimeError("no free media port pair")


class Sipp:
    """One SIPp process running a call_*.xml scenario (bounded, killed when left running)."""

    def __init__(self, scenario: str, target: tuple[str, int], workdir: Path, *, port: int,
                 service: str, extra: list[str] | None = None, echo: bool = True,
                 timeout_s: int = 20) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.media_port = free_media_port() if echo else 0
        self.name = scenario.removesuffix(".xml")
        self.messages = workdir / f"{self.name}_messages.log"
        self.errors = workdir / f"{self.name}_errors.log"
        self.out_path = workdir / f"{self.name}_out.txt"
        self.timeout_s = timeout_s
        cmd = [shutil.which("sipp") or "sipp", f"{target[0]}:{target[1]}",
               "-sf", str(SCENARIOS / scenario), "-s", service, "-i", HOST, "-p", str(port),
               "-m", "1", "-l", "1", "-timeout", f"{timeout_s}s", "-timeout_error", "-nostdin",
               "-trace_msg", "-message_file", str(self.messages),
               "-trace_err", "-error_file", str(self.errors), *(extra or [])]
        if echo:
            cmd += ["-mi", HOST, "-mp", str(self.media_port), "-rtp_echo"]
        assert shutil.which("sipp"), "sipp is not installed (apt-get install sip-tester)"
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=subprocess.STDOUT)

    def wait_listening(self, timeout: float = 5.0) -> None:
        """SIPp has bound its SIP port (and its media port when echoing)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if udp_bound(self.port) and (not self.media_port or udp_bound(self.media_port)):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"SIPp did not bind {self.port}/{self.media_port}:\n{self.describe()}")

    def wait(self, timeout: float | None = None) -> int:
        """Wait for SIPp to exit (bounded); its exit status."""
        try:
            return self.proc.wait(timeout=timeout if timeout is not None else self.timeout_s + 5)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"SIPp still running:\n{self.describe()}") from None
        finally:
            self._out.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._out.close()

    def message_log(self) -> str:
        return self.messages.read_text("utf-8", "replace") if self.messages.exists() else ""

    def describe(self) -> str:
        parts = [f"sipp {self.name} exit {self.proc.poll()}"]
        for f in (self.out_path, self.errors, self.messages):
            if f.exists():
                parts.append(f"--- {f.name} ---\n{f.read_text('utf-8', 'replace')[-4000:]}")
        return "\n".join(parts)

    def __enter__(self) -> Sipp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def received_requests(log: str, method: str) -> list[str]:
    """The requests of ``method`` SIPp received, from its -trace_msg log."""
    out = []
    for block in re.split(r"\n(?=-{10,})", log):
        if re.search(r"message received", block) and re.search(rf"(?m)^{method} sip:", block):
            out.append(block)
    return out


def assert_echoed(sent: list[RtpPacket], got: list[RtpPacket], relay: tuple[str, int]) -> None:
    """Every packet came back with its payload and sequence number, from the relay's port."""
    assert len(got) == len(sent), f"sent {len(sent)} RTP packets, {len(got)} came back"
    assert sorted((p.sequence, p.payload) for p in got) == \
        sorted((p.sequence, p.payload) for p in sent), "echoed payloads differ from those sent"
    assert {p.source for p in got} == {relay}, "RTP did not come back from the relay port we used"


# -- failures and fallback first (their legs hold Timer D for 32 s) ------------------------------
def test_busy_callee_gives_the_caller_486(switch: Switch, live_zero: None) -> None:
    with switch.phone("101") as alice, switch.phone("102") as bob, RtpEndpoint() as rtp:
        alice.register()
        call = bob.call("101", sdp=make_sdp(rtp.port))
        inc = alice.wait_invite()
        assert inc.from_display == "Bob 102" and inc.from_user == "102"
        inc.reject(486)  # waits for softpbx's ACK of the 486
        final = call.wait_final()
        assert final.status == 486, final
        assert call.challenges, "the INVITE from an extension was not challenged"
        row = switch.cdr(call.call_id)
        assert (row["disposition"], row["sip_code"], row["direction"]) == ("busy", 486, "internal")
        assert row["duration"] == 0 and row["answered_at"] is None


def test_caller_cancels_while_ringing(switch: Switch, live_zero: None) -> None:
    with switch.phone("101") as alice, switch.phone("102") as bob, RtpEndpoint() as rtp:
        alice.register()
        call = bob.call("101", sdp=make_sdp(rtp.port))
        inc = alice.wait_invite()
        inc.ring()
        call.wait_status(180)
        ok = call.cancel()
        assert ok.status == 200
        final = call.wait_final()
        assert final.status == 487, final
        inc.wait_cancel()  # the callee's phone stops ringing
        inc.wait_ack()  # softpbx ACKed the callee's 487
        row = switch.cdr(call.call_id)
        assert (row["disposition"], row["sip_code"]) == ("cancel", 487)


def test_parallel_fork_first_answer_wins(switch: Switch, live_zero: None) -> None:
    """101 has two phones registered: both ring, the first to answer gets the call, the other
    gets CANCEL (and its 487 is ACKed)."""
    with switch.phone("101") as desk, switch.phone("101") as mobile, \
            switch.phone("102") as bob, RtpEndpoint() as rtp, RtpEndpoint() as desk_rtp:
        desk.register()
        mobile.register()
        switch.pbx.wait_registrations("101", 2)
        call = bob.call("101", sdp=make_sdp(rtp.port))
        on_desk = desk.wait_invite()
        on_mobile = mobile.wait_invite()
        on_desk.ring()
        on_mobile.ring()
        on_desk.answer(make_sdp(desk_rtp.port))
        assert call.wait_final().status == 200
        on_mobile.wait_cancel()
        on_mobile.wait_ack()
        assert call.bye().status == 200
        on_desk.wait_bye()
        row = switch.cdr(call.call_id)
        assert (row["disposition"], row["extension"]) == ("answered", "101")


def test_did_no_answer_falls_back_to_102(switch: Switch, live_zero: None) -> None:
    """The DID rings 101; after the route's no-answer timeout 101 is cancelled and 102 rings,
    answers, and media flows between the carrier and 102."""
    with switch.phone("101") as alice, switch.phone("102") as bob, \
            switch.phone("79161234567", port=switch.carrier_port) as carrier, \
            RtpEndpoint() as carrier_rtp, RtpEndpoint() as bob_rtp:
        alice.register()
        bob.register()
        call = carrier.call(DID, sdp=make_sdp(carrier_rtp.port), authenticate=False)
        first = alice.wait_invite()
        first.ring()
        call.wait_status(180)
        second = bob.wait_invite(timeout=NO_ANSWER_S + 3)
        waited = second.received_at - first.received_at
        assert NO_ANSWER_S - 0.2 <= waited <= NO_ANSWER_S + 1.5, waited
        first.wait_cancel()
        first.wait_ack()
        second.answer(make_sdp(bob_rtp.port))
        final = call.wait_final()
        assert final.status == 200, final
        assert not call.challenges, "a call from the carrier's address was challenged"
        sent = carrier_rtp.send_pcmu(call.remote_media, count=20)
        got = bob_rtp.wait_packets(20)
        assert sorted(p.payload for p in got) == sorted(p.payload for p in sent)
        assert call.bye().status == 200
        second.wait_bye()
        row = switch.cdr(call.call_id)
        assert row["direction"] == "inbound" and row["did"] == DID
        assert (row["disposition"], row["extension"]) == ("answered", "102")


# -- SIPp on one side ---------------------------------------------------------------------------
def test_ext_to_ext_sipp_phone_answers_and_echoes(switch: Switch, tmp_path: Path,
                                                  live_zero: None) -> None:
    """101 (Python phone) calls 102 (a registered SIPp phone): digest on the INVITE, caller ID
    "Alice 101" on the callee's side, 50 PCMU packets there and back through the relay."""
    sipp_port = free_port()
    reg = Sipp("call_register.xml", switch.sip_addr, tmp_path / "reg", port=sipp_port,
               service="102", echo=False, extra=["-au", "102", "-ap", "secret102"], timeout_s=10)
    with reg:
        assert reg.wait() == 0, reg.describe()
    rows = switch.pbx.wait_registrations("102", 1)
    assert rows[0]["source"] == f"udp:{HOST}:{sipp_port}"
    try:
        with Sipp("call_answer.xml", switch.sip_addr, tmp_path / "uas", port=sipp_port,
                  service="102") as callee, \
                switch.phone("101", display="Not The Configured Name") as alice, \
                RtpEndpoint() as rtp:
            callee.wait_listening()
            call = alice.call("102", sdp=make_sdp(rtp.port))
            final = call.wait_final()
            assert final.status == 200, f"{final}\n{callee.describe()}"
            assert call.challenges and call.challenges[0].status == 401
            statuses = [r.status for r in call.responses() if r.cseq.number == call.cseq]
            assert 100 in statuses and 180 in statuses, statuses
            relay = call.remote_media
            assert relay[0] == HOST and 20000 <= relay[1] <= 20999, relay
            sent = rtp.send_pcmu(relay, count=PACKETS)
            assert_echoed(sent, rtp.wait_packets(PACKETS), relay)
            assert call.bye().status == 200
            assert callee.wait(10) == 0, callee.describe()
            invites = received_requests(callee.message_log(), "INVITE")
            assert len(invites) == 1, callee.describe()
            assert re.search(r'(?m)^From: "Alice 101" <sip:101@', invites[0]), invites[0]
    finally:
        with switch.phone("102") as cleaner:
            cleaner.unregister(everything=True)
    switch.wait_status(LIVE_COUNTS, timeout=5.0)
    row = switch.cdr(call.call_id)
    assert (row["disposition"], row["direction"], row["caller"], row["extension"]) == \
        ("answered", "internal", "101", "102")
    assert row["duration"] > 0 and row["sip_code"] == 200


def test_carrier_calls_did_python_phone_answers(switch: Switch, tmp_path: Path,
                                                live_zero: None) -> None:
    """SIPp as the carrier (from the gateway's address and port) calls the DID; 101 answers;
    RTP goes 101 -> relay -> carrier (SIPp echoes) -> relay -> 101."""
    with switch.phone("101") as alice, RtpEndpoint() as rtp:
        alice.register()
        with Sipp("call_carrier_uac.xml", switch.sip_addr, tmp_path / "uac",
                  port=switch.carrier_port, service=DID) as carrier:
            inc = alice.wait_invite(timeout=8)
            assert inc.from_user == "79161234567", inc.request.get("from")
            inc.ring()
            inc.answer(make_sdp(rtp.port))
            relay = inc.remote_media
            assert relay[0] == HOST and 20000 <= relay[1] <= 20999, relay
            sent = rtp.send_pcmu(relay, count=PACKETS)
            assert_echoed(sent, rtp.wait_packets(PACKETS), relay)
            assert inc.bye().status == 200
            assert carrier.wait(10) == 0, carrier.describe()
            byes = received_requests(carrier.message_log(), "BYE")
            assert len(byes) == 1, carrier.describe()
            m = re.search(r"(?mi)^Call-ID:\s*(\S+)", byes[0])
            assert m is not None, byes[0]
            sip_call_id = m.group(1)
    row = switch.cdr(sip_call_id)
    assert (row["direction"], row["did"], row["disposition"], row["extension"], row["gateway"]) \
        == ("inbound", DID, "answered", "101", "carrier")
    assert row["caller"] == "79161234567"


def test_extension_calls_out_through_the_carrier(switch: Switch, tmp_path: Path,
                                                 live_zero: None) -> None:
    """101 dials 8 999 123-45-67: the carrier (SIPp uas) gets +79991234567 from 74950000101,
    audio echoes back through the relay, BYE ends both legs.

    101 is "behind a NAT": its SDP names one port, its RTP leaves from another; the relay
    latches onto the real source (symmetric RTP), so every echo comes back there.
    """
    with Sipp("call_answer.xml", switch.sip_addr, tmp_path / "uas",
              port=switch.carrier_port, service="carrier") as carrier, \
            switch.phone("101") as alice, RtpEndpoint() as rtp, RtpEndpoint() as sdp_port:
        carrier.wait_listening()
        call = alice.call("89991234567", sdp=make_sdp(sdp_port.port))
        final = call.wait_final()
        assert final.status == 200, f"{final}\n{carrier.describe()}"
        relay = call.remote_media
        sent = rtp.send_pcmu(relay, count=PACKETS)
        assert_echoed(sent, rtp.wait_packets(PACKETS), relay)
        assert sdp_port.received == [], "the relay sent RTP to the SDP port, not the real source"
        assert call.bye().status == 200
        assert carrier.wait(10) == 0, carrier.describe()
        invites = received_requests(carrier.message_log(), "INVITE")
        assert len(invites) == 1, carrier.describe()
        assert re.search(r"(?m)^INVITE sip:\+79991234567@", invites[0]), invites[0]
        assert re.search(r"(?mi)^From:[^\r\n]*<sip:74950000101@", invites[0]), invites[0]
    row = switch.cdr(call.call_id)
    assert (row["direction"], row["disposition"], row["gateway"], row["callee"]) == \
        ("outbound", "answered", "carrier", "89991234567")


def test_unknown_source_cannot_call_out(switch: Switch) -> None:
    """No gateway address, no credentials: 401; wrong credentials: 403; nothing reaches the
    carrier's port, and no call is created."""
    sink = RtpEndpoint(port=switch.carrier_port)  # any datagram at all on the carrier's port
    try:
        with Phone(user="mallory", pbx=switch.sip_addr, password="guess") as mallory, \
                RtpEndpoint() as rtp:
            call = mallory.call("89991234567", sdp=make_sdp(rtp.port), authenticate=False)
            first = call.wait_final()
            assert first.status == 401, first
            guess = mallory.call("89991234567", sdp=make_sdp(rtp.port))
            final = guess.wait_final()
            assert guess.challenges and final.status == 403, final
            as_101 = Phone(user="101", pbx=switch.sip_addr, password="not-secret101")
            with as_101:
                wrong = as_101.call("89991234567", sdp=make_sdp(rtp.port))
                assert wrong.wait_final().status == 403
        time.sleep(0.5)
        assert sink.received == [] and sink.other == [], "a request reached the carrier"
        assert switch.status()["calls"] == 0
    finally:
        sink.close()


# -- last: nothing leaks once every transaction timer has run ----------------------------------
def test_nothing_leaks_after_the_module(switch: Switch) -> None:
    st = switch.wait_status((*LIVE_COUNTS, "transactions"), timeout=40.0)
    assert st["calls"] == st["dialogs"] == st["transactions"] == 0, st

