"""Linphone (``linphonec``, belle-sip + mediastreamer2) as a real phone against softpbx.

A second SIP stack besides baresip's: digest registration over UDP and TCP, a refused
password, calls between two Linphones with audio checked both ways by tone detection on what
each phone recorded (101 plays 440 Hz, 102 plays 880 Hz), calls out through the trunk and a
DID call in (a SIPp carrier echoing RTP, so the phone must hear its own tone back), hang-up
from either side (the CDR's cause), hold/resume (re-INVITE with ``a=sendonly``) and RFC 4733
DTMF relayed end to end.

One softpbx serves the module; its carrier gateway is moved to a free port where each trunk
test runs its SIPp. Phones are started per test (about 0.5 s each) and stopped by PID; on a
failure their console output and log tail are printed into the report.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PbxFactory
from tests.integration.test_calls_sipp import Sipp, received_requests
from tests.support.linphone import Linphone
from tests.support.server import HOST, PbxProcess, free_port
from tests.support.tones import make_tone_wav, read_mono, tone_fraction

pytestmark = pytest.mark.integration

PASSWORDS = {"101": "secret101", "102": "secret102", "103": "secret103"}
DID = "74950000000"
OUTSIDE = "79161234567"
TONE_S = 30
"""Length of the tone files (longer than any call here: the player does not have to loop)."""
HEARD = 0.7
"""Share of 20 ms frames of a recording that must hold the far end's tone. The first frames
of a recording precede the first packet; everything else must be the tone."""
CROSSTALK = 0.05
"""At most this share of a recording may hold the phone's own tone (no echo or loop-back)."""
TALK_S = 1.5


# -- the switch and the phones ------------------------------------------------------------------
class Rig:
    """The module's softpbx, its carrier port and the tone files."""

    def __init__(self, pbx: PbxProcess, carrier_port: int, tones: dict[int, Path]) -> None:
        self.pbx = pbx
        self.carrier_port = carrier_port
        self.tones = tones

    def cdr_since(self, since: float, callee: str, timeout: float = 5.0) -> dict[str, Any]:
        """The CDR of the one call to ``callee`` that started after ``since`` (written
        off-loop: polled, bounded)."""
        return self.pbx.wait_cdr(lambda r: r["callee"] == callee and r["started_at"] >= since,
                                 f"a call to {callee}", timeout)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("linphone")
    carrier_port = free_port()
    pbx = PbxProcess.create(root / "pbx", overrides={
        "gateways.carrier.proxy": f"{HOST}:{carrier_port}",
        "gateways.carrier.inbound_addresses": f'["{HOST}:{carrier_port}"]',
        "media.rtp_start_port": "21000", "media.rtp_end_port": "21999",
    })
    tones = {f: make_tone_wav(root / f"tone{f}.wav", f, TONE_S) for f in (440, 880)}
    pbx.start()
    try:
        yield Rig(pbx, carrier_port, tones)
    except BaseException:
        pbx.kill()
        raise
    try:
        pbx.stop()
    finally:
        pbx.kill()


PhoneFactory = Callable[..., Linphone]


@pytest.fixture
def phones(request: pytest.FixtureRequest, rig: Rig, tmp_path: Path) -> Iterator[PhoneFactory]:
    """``phones("101", tone=440, transport="udp")`` starts a Linphone for that extension.

    Every phone is stopped at teardown; when the test failed, each one's console and log tail
    are printed (pytest shows them in the failure report), like conftest does for softpbx.
    """
    started: list[Linphone] = []

    def start(user: str, *, tone: int | None = None, transport: str = "udp",
              password: str | None = None, pbx: PbxProcess | None = None) -> Linphone:
        phone = Linphone(tmp_path / f"{user}-{len(started)}", user=user,
                         password=password if password is not None else PASSWORDS[user],
                         pbx=(pbx or rig.pbx).sip_addr, transport=transport,
                         play=rig.tones[tone] if tone else None)
        started.append(phone)
        phone.start()
        return phone

    yield start
    rep = getattr(request.node, "rep_call", None)
    failed = rep is None or rep.failed
    for phone in started:
        phone.stop()
        if failed:
            print(phone.describe())
    if failed:
        print(f"--- softpbx log (tail) ---\n{rig.pbx.log_text()[-6000:]}")


def registered(rig: Rig, phone: Linphone) -> dict[str, Any]:
    """Register ``phone`` and wait (bounded) for its new binding at softpbx.

    The binding is the one whose source is new: a phone of an earlier, failed test may have
    left its own, and over TCP the source is the connection's port, not the listening one.
    """
    before = {r["source"] for r in rig.pbx.registrations(phone.user)}
    phone.register()
    deadline = time.monotonic() + 5
    while True:
        rows = [r for r in rig.pbx.registrations(phone.user) if r["source"] not in before
                and r["source"].startswith(f"{phone.transport}:{HOST}:")]
        if rows:
            assert len(rows) == 1, rows
            return rows[0]
        if time.monotonic() >= deadline:
            raise AssertionError(f"{phone.user} not registered within 5 s: "
                                 f"{rig.pbx.registrations(phone.user)}\n{phone.describe()}")
        time.sleep(0.05)


def connect(caller: Linphone, callee: Linphone, number: str | None = None) -> None:
    """``caller`` dials ``callee``'s extension, ``callee`` answers; both report media up."""
    caller.call(number or callee.user)
    callee.wait_output(r"Receiving new incoming call from .*, assigned id \d+", timeout=5)
    callee.command("answer")
    for phone in (caller, callee):
        phone.wait_output(r"Media streams established with .* \(audio\)", timeout=5)


def heard(phone: Linphone, tone: int, own: int | None = None, *, skip_bytes: int = 0,
          min_seconds: float = 0.5) -> float:
    """Share of ``phone``'s recording (after ``skip_bytes`` of it) that holds ``tone``;
    asserts the part is ``min_seconds`` long at least, the share is at least ``HEARD`` and
    ``own`` is nearly absent."""
    samples, rate = read_mono(phone.record)
    samples = samples[max(0, skip_bytes - 44) // 2:]  # 16-bit mono after a 44-byte header
    assert samples.size >= min_seconds * rate, (
        f"{phone.user} recorded only {samples.size / rate:.2f} s there:\n{phone.describe()}")
    share = tone_fraction(samples, tone, rate)
    assert share >= HEARD, f"{phone.user} heard {tone} Hz in {share:.0%} of {phone.record}"
    if own is not None:
        echo = tone_fraction(samples, own, rate)
        assert echo <= CROSSTALK, f"{phone.user} heard its own {own} Hz in {echo:.0%}"
    return share


# -- registration -------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_register_with_digest(rig: Rig, phones: PhoneFactory, transport: str) -> None:
    """Linphone answers softpbx's default challenge (MD5 only) and its binding is the source
    it registered from; ``quit`` unregisters (Expires: 0)."""
    phone = phones("103", transport=transport)
    row = registered(rig, phone)
    if transport == "udp":
        assert row["source"] == f"udp:{HOST}:{phone.sip_port}", row
    assert f"transport={transport}" in row["contact"], row
    phone.stop()
    rig.pbx.wait_registrations("103", 0)
    # liblinphone's log file is complete once the phone has exited.
    first, second, *_ = phone.requests("REGISTER", sent=True)
    assert "Authorization:" not in first, first
    assert "Authorization:" in second and 'username="103"' in second, second
    statuses = [s.split(" ", 2)[1] for s in phone.responses(sent=False)]
    assert statuses[:2] == ["401", "200"], statuses
    assert "algorithm=MD5" in second, second


def test_register_with_sha256_digest(phones: PhoneFactory, pbx_factory: PbxFactory) -> None:
    """Extension 103 opted in to SHA-256 only (RFC 8760, ``directory/103.toml``
    ``auth_algorithms``): Linphone answers that challenge; a real phone for the opt-in path,
    which SIPp and pyVoIP cannot take."""
    pbx = pbx_factory(overrides={"directory.103.auth_algorithms": '["SHA-256"]'})
    phone = phones("103", pbx=pbx)
    phone.register()
    pbx.wait_registrations("103", 1)
    phone.stop()
    pbx.wait_registrations("103", 0)
    challenge = next(m for m in phone.sip_messages(sent=False) if m.startswith("SIP/2.0 401"))
    assert "algorithm=SHA-256" in challenge and "algorithm=MD5" not in challenge, challenge
    answer = phone.requests("REGISTER", sent=True)[1]
    assert re.search(r"(?m)^Authorization:.*algorithm=SHA-256", answer), answer


def test_wrong_password_refused(rig: Rig, phones: PhoneFactory) -> None:
    """The digest answer with a wrong password gets 403: no binding, and Linphone asks its
    user for another password instead of retrying in a loop."""
    phone = phones("103", password="not-the-password")
    phone.register()
    phone.wait_output(r"Password for 103 on \S+: ", timeout=5)
    assert rig.pbx.registrations("103") == []
    phone.stop()
    statuses = [s.split(" ", 2)[1] for s in phone.responses(sent=False)]
    assert statuses == ["401", "403"], statuses
    rig.pbx.wait_for_log('method=REGISTER user="103" reason=wrong_password')


# -- calls between two Linphones ----------------------------------------------------------------
def test_call_audio_both_ways_caller_hangs_up(rig: Rig, phones: PhoneFactory) -> None:
    """101 calls 102 (both UDP): each hears the other's tone, not its own; the caller's BYE
    ends the call for the callee too and the CDR says the caller hung up."""
    alice, bob = phones("101", tone=440), phones("102", tone=880)
    registered(rig, alice)
    registered(rig, bob)
    since = time.time() - 1
    connect(alice, bob)
    time.sleep(TALK_S)  # talk: the recordings fill
    alice.command("terminate")
    bob.wait_output(r"Call \d+ with .* ended", timeout=5)
    alice.wait_output(r"Call \d+ with .* ended", timeout=5)
    heard(alice, 880, own=440)
    heard(bob, 440, own=880)
    row = rig.cdr_since(since, "102")
    assert (row["direction"], row["caller"], row["extension"]) == ("internal", "101", "102")
    assert (row["disposition"], row["cause"]) == ("answered", "caller hung up"), row


def test_hold_resume_over_tcp_callee_hangs_up(rig: Rig, phones: PhoneFactory) -> None:
    """101 (UDP) calls 102 (TCP), puts it on hold and resumes: the re-INVITEs reach 102 with
    ``a=sendonly`` then without it; 101 hears 102 again after the resume; 102 hangs up."""
    alice, bob = phones("101", tone=440), phones("102", tone=880, transport="tcp")
    registered(rig, alice)
    registered(rig, bob)
    since = time.time() - 1
    connect(alice, bob)
    time.sleep(1.0)
    alice.command("pause")
    alice.wait_output(r"Call \d+ with .* is now paused", timeout=5)
    bob.wait_output(r"Call \d+ has been paused by ", timeout=5)
    # 101's recorder stops while the call is on hold (nothing to hear: 102 answered
    # recvonly) and appends after the resume: what follows this offset came after it.
    before_resume = alice.record.stat().st_size
    time.sleep(0.5)
    alice.command("resume")
    alice.wait_output(r"Media streams established with .* \(audio\)", timeout=5)
    time.sleep(TALK_S)
    bob.command("terminate")
    alice.wait_output(r"Call \d+ with .* ended", timeout=5)
    bob.stop()  # its log is complete once it has exited
    invites = bob.requests("INVITE", sent=False)
    assert len(invites) == 3, f"wanted INVITE, hold, resume; got {len(invites)}"
    assert "a=sendonly" in invites[1], invites[1]
    assert "a=sendonly" not in invites[2] and "a=inactive" not in invites[2], invites[2]
    answers = [m for m in bob.sip_messages(sent=True) if m.startswith("SIP/2.0 200")
               and "CSeq:" in m and "INVITE" in m.split("CSeq:", 1)[1].split("\n", 1)[0]]
    assert "a=recvonly" in answers[1], answers[1]
    heard(alice, 880, own=440, skip_bytes=before_resume, min_seconds=TALK_S - 0.5)
    heard(bob, 440, own=880)
    row = rig.cdr_since(since, "102")
    assert (row["disposition"], row["cause"]) == ("answered", "callee hung up"), row


def test_rfc4733_dtmf_both_ways(rig: Rig, phones: PhoneFactory) -> None:
    """Digits typed on either phone arrive at the other as RFC 4733 telephone-events through
    the relay (not SIP INFO)."""
    alice, bob = phones("101", tone=440), phones("102", tone=880)
    registered(rig, alice)
    registered(rig, bob)
    connect(alice, bob)
    for sender, receiver, digits in ((alice, bob, "15#"), (bob, alice, "9*")):
        for digit in digits:
            sender.command(digit)
            receiver.wait_output(rf"Receiving tone {re.escape(digit)} from ", timeout=3)
    alice.command("terminate")
    bob.wait_output(r"Call \d+ with .* ended", timeout=5)
    for phone in (alice, bob):
        phone.stop()  # its log is complete once it has exited
        assert phone.requests("INFO", sent=True) == [], "DTMF went as SIP INFO"
        invite = (phone.requests("INVITE", sent=True) or phone.requests("INVITE", sent=False))[0]
        assert "telephone-event/8000" in invite, invite


# -- through the trunk --------------------------------------------------------------------------
def test_call_out_through_the_trunk(rig: Rig, phones: PhoneFactory, tmp_path: Path) -> None:
    """101 dials an outside number: the carrier (SIPp, echoing RTP) gets the INVITE with the
    extension's outbound caller ID; 101 hears its own tone back through the relay both ways;
    101 hangs up and the carrier gets the BYE."""
    alice = phones("101", tone=440)
    registered(rig, alice)
    since = time.time() - 1
    with Sipp("call_answer.xml", rig.pbx.sip_addr, tmp_path / "carrier",
              port=rig.carrier_port, service=OUTSIDE) as carrier:
        carrier.wait_listening()
        alice.call(OUTSIDE)
        alice.wait_output(r"Media streams established with .* \(audio\)", timeout=5)
        time.sleep(TALK_S)
        alice.command("terminate")
        alice.wait_output(r"Call \d+ with .* ended", timeout=5)
        assert carrier.wait() == 0, carrier.describe()
        (invite,) = received_requests(carrier.message_log(), "INVITE")
    assert f"INVITE sip:{OUTSIDE}@" in invite, invite
    assert "74950000101" in invite.split("From:", 1)[1].split("\n", 1)[0], invite
    heard(alice, 440)
    row = rig.cdr_since(since, OUTSIDE)
    assert (row["direction"], row["gateway"], row["disposition"]) == \
        ("outbound", "carrier", "answered"), row
    assert row["cause"] == "caller hung up", row


def test_answer_a_did_call_from_the_carrier(rig: Rig, phones: PhoneFactory,
                                           tmp_path: Path) -> None:
    """The carrier (SIPp) calls the DID routed to 101: Linphone rings, answers, hears its
    own tone echoed by the carrier, and hangs up (the carrier gets the BYE)."""
    alice = phones("101", tone=440)
    registered(rig, alice)
    since = time.time() - 1
    with Sipp("call_carrier_uac.xml", rig.pbx.sip_addr, tmp_path / "carrier",
              port=rig.carrier_port, service=DID) as carrier:
        alice.wait_output(r"Receiving new incoming call from .*79161234567.*, assigned id",
                          timeout=5)
        alice.command("answer")
        alice.wait_output(r"Media streams established with .* \(audio\)", timeout=5)
        time.sleep(TALK_S)
        alice.command("terminate")
        alice.wait_output(r"Call \d+ with .* ended", timeout=5)
        assert carrier.wait() == 0, carrier.describe()
    heard(alice, 440)
    row = rig.cdr_since(since, DID)
    assert (row["direction"], row["did"], row["extension"]) == ("inbound", DID, "101"), row
    assert (row["disposition"], row["cause"]) == ("answered", "callee hung up"), row
