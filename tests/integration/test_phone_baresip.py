"""Real phones: Debian's baresip (libre's SIP stack) against a real softpbx process.

Each phone plays a tone as its microphone (101: 440 Hz, 102: 880 Hz) and dumps what it hears;
audio is checked by tone detection on those dumps (:mod:`tests.support.tones`), not by
"a packet arrived". The carrier is SIPp on the carrier gateway's address and port, echoing
RTP (``-rtp_echo``), so a phone talking to it hears its own tone back through the relay.

One softpbx serves the module (the shipped profiles, the carrier moved to a free port); each
test starts its own phones and stops them (``quit``: they unregister) by PID. On failure the
phones' logs (with their SIP trace) and control traffic and the softpbx log are printed.

baresip 1.0.0 quirks met here (none needed a tolerance in softpbx):

* It walks every ``WWW-Authenticate`` and fails with ENOSYS on an algorithm it does not know:
  softpbx offers only MD5 by default (``[auth] algorithms``), which is what this module runs.
* On hold it sends no RTP at all (not even with ``a=sendonly``), and after a hold its
  ``sndfile`` dump of received audio stops for the rest of the call (also in a direct
  baresip-to-baresip call, without softpbx): audio after ``resume`` is checked on softpbx's
  call recording (what the relay got from each phone) instead of the phones' dumps.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.test_calls_sipp import Sipp, received_requests, write_profiles
from tests.support.baresip import BaresipPhone, require_baresip
from tests.support.server import HOST, PbxProcess, free_port
from tests.support.tones import read_mono, tone_fraction

pytestmark = pytest.mark.integration

DID = "74950000000"
PASSWORDS = {"101": "secret101", "102": "secret102", "103": "secret103"}
TONES = {"101": 440.0, "102": 880.0}
HEARD = 0.7
"""Share of the heard audio's 20 ms frames that must hold the far side's tone."""
LOG_TAIL = 60


# -- fixtures ----------------------------------------------------------------------------------
class Rig:
    """The module's softpbx and the carrier port its profiles name."""

    def __init__(self, pbx: PbxProcess, carrier_port: int) -> None:
        self.pbx = pbx
        self.carrier_port = carrier_port

    @property
    def port(self) -> int:
        return self.pbx.sip_port

    def uri(self, user: str, transport: str = "udp") -> str:
        """What a phone dials to reach ``user`` through softpbx."""
        return f"sip:{user}@{HOST}:{self.port};transport={transport}"

    def cdr(self, match: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        """The one CDR matching ``match``."""
        return self.pbx.wait_cdr(match, timeout=timeout)

    def recording(self, call_id: str, timeout: float = 5.0) -> Path:
        """The finished MP3 of softpbx call ``call_id`` (caller left, callee right)."""
        self.pbx.wait_for_log(f"recording ready: call {call_id}", timeout)
        return self.pbx.workdir / "recordings" / f"{call_id}.mp3"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """One softpbx for the module: shipped profiles, carrier on a free port."""
    require_baresip()
    root = tmp_path_factory.mktemp("baresip")
    carrier_port = free_port()
    profiles = write_profiles(root / "profiles", carrier_port, no_answer_timeout=30)
    pbx = PbxProcess.create(root / "pbx", profiles=profiles, overrides={
        "sip.t1_ms": "100", "sip.t4_ms": "1000",
        "media.rtp_start_port": "21000", "media.rtp_end_port": "21999",
        # 103 opted in to SHA-256 (RFC 8760), which baresip 1.0 cannot do: see the test.
        "directory.103.auth_algorithms": '["SHA-256", "MD5"]',
    })
    pbx.start()
    try:
        yield Rig(pbx, carrier_port)
    except BaseException:
        pbx.kill()
        raise
    try:
        pbx.stop()
    finally:
        pbx.kill()


PhoneFactory = Callable[..., BaresipPhone]


@pytest.fixture
def phones(request: pytest.FixtureRequest, rig: Rig, tmp_path: Path) -> Iterator[PhoneFactory]:
    """``phones("101")`` starts a baresip for that extension (registered unless
    ``register=False``); all are stopped at teardown, their logs printed if the test failed."""
    started: list[BaresipPhone] = []

    def start(user: str, *, transport: str = "udp", register: bool = True,
              password: str | None = None) -> BaresipPhone:
        phone = BaresipPhone.create(tmp_path / f"{user}-{len(started)}", name=user,
                                    tone_hz=TONES.get(user, 660.0))
        started.append(phone)
        phone.start()
        if register:
            event = phone.register(user, password or PASSWORDS[user], rig.port,
                                   transport=transport)
            assert event["type"] == "REGISTER_OK", f"{event}\n{phone.report()}"
        return phone

    yield start
    rep = getattr(request.node, "rep_call", None)
    failed = rep is None or rep.failed
    for phone in started:
        if failed:
            print(phone.report(LOG_TAIL))
        phone.stop()
    if failed:
        tail = "\n".join(rig.pbx.log_text().splitlines()[-LOG_TAIL:])
        print(f"--- softpbx log ({rig.pbx.workdir}), last {LOG_TAIL} lines ---\n{tail}")


# -- helpers -----------------------------------------------------------------------------------
def call_between(caller: BaresipPhone, callee: BaresipPhone, uri: str) -> str:
    """``caller`` dials ``uri``, ``callee`` answers; both see the call established. Returns the
    caller leg's Call-ID (the CDR's ``sip_call_id``)."""
    since_callee, since_caller = callee.mark(), caller.mark()
    caller.dial(uri)
    incoming = callee.wait_event("CALL_INCOMING", 8.0, since=since_callee)
    assert incoming["peeruri"].startswith(f"sip:{caller.name}@"), incoming
    callee.accept()
    established = caller.wait_event("CALL_ESTABLISHED", 5.0, since=since_caller)
    callee.wait_event("CALL_ESTABLISHED", 5.0, since=since_callee)
    return str(established["id"])


def talk(seconds: float, *phones: BaresipPhone) -> None:
    """Let audio flow for ``seconds`` while reading every phone's events."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        for phone in phones:
            phone.drain(min(left, 0.1) / len(phones))


def assert_heard(phone: BaresipPhone, call_dir: Path, freq: float, *,
                 min_seconds: float = 1.0) -> None:
    """``phone`` heard ``freq`` for most of its dump, and not its own tone."""
    heard = phone.recording("dec", call_dir)
    samples, rate = read_mono(heard)
    assert samples.size / rate >= min_seconds, \
        f"{phone.name} heard only {samples.size / rate:.2f}s of audio ({heard})"
    share = tone_fraction(samples, freq, rate)
    own = tone_fraction(samples, phone.tone_hz, rate) if phone.tone_hz != freq else 0.0
    assert share >= HEARD, f"{phone.name}: {freq} Hz in {share:.0%} of what it heard ({heard})"
    assert own < 0.1, f"{phone.name} heard its own {phone.tone_hz} Hz ({own:.0%}): an echo"


def hang_up(by: BaresipPhone, other: BaresipPhone) -> None:
    """``by`` hangs up; both phones see the call closed."""
    since_by, since_other = by.mark(), other.mark()
    by.hangup()
    by.wait_event("CALL_CLOSED", 5.0, since=since_by)
    other.wait_event("CALL_CLOSED", 5.0, since=since_other)


# -- registration ------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_registers_with_digest(rig: Rig, phones: PhoneFactory, transport: str) -> None:
    """A stock baresip registers with the shipped defaults (one MD5 challenge), over UDP and
    TCP; the binding names the transport and the phone's real source."""
    phone = phones("101", transport=transport)
    rows = rig.pbx.wait_registrations("101", 1)
    assert rows[0]["source"].startswith(f"{transport}:{HOST}:"), rows
    assert "baresip" in rows[0]["user_agent"], rows
    log = phone.log_text()
    challenges = re.findall(r"(?m)^WWW-Authenticate: (.*)$", log)
    assert challenges and all("algorithm=MD5" in c for c in challenges), challenges
    phone.stop()  # quit unregisters
    rig.pbx.wait_registrations("101", 0)


def test_wrong_password_is_refused(rig: Rig, phones: PhoneFactory) -> None:
    """The phone's digest with a wrong password: 403, no binding."""
    phone = phones("102", register=False)
    event = phone.register("102", "not-secret102", rig.port)
    assert event["type"] == "REGISTER_FAIL", event
    assert "403" in event.get("param", ""), event
    assert rig.pbx.registrations("102") == []


def test_sha256_challenge_defeats_baresip(rig: Rig, phones: PhoneFactory) -> None:
    """Why MD5 alone is the default: 103 opted in to SHA-256 (the per-extension key reaches
    its challenges), and baresip 1.0 (Debian 12), which walks every challenge and knows no
    SHA-256, gives up with ENOSYS without answering the MD5 one. A baresip that does know
    SHA-256 must then register with it."""
    phone = phones("103", register=False)
    event = phone.register("103", PASSWORDS["103"], rig.port)
    log = phone.log_text()
    challenges = re.findall(r"(?m)^WWW-Authenticate: (.*)$", log)
    assert [re.search(r"algorithm=([\w-]+)", c).group(1) for c in challenges[:2]] == \
        ["SHA-256", "MD5"], challenges
    if event["type"] == "REGISTER_FAIL":
        assert event.get("param") == "Function not implemented", event
        assert rig.pbx.registrations("103") == []
    else:
        assert event["type"] == "REGISTER_OK", event
        assert re.search(r"(?m)^Authorization: Digest .*algorithm=SHA-256", log), log[-3000:]


# -- calls between phones ----------------------------------------------------------------------
def test_call_between_phones_audio_both_ways_caller_hangs_up(rig: Rig,
                                                             phones: PhoneFactory) -> None:
    """101 (UDP) calls 102 (TCP): each hears the other's tone; 101 hangs up; the CDR says
    answered, 101 -> 102, with the talk time."""
    alice, bob = phones("101"), phones("102", transport="tcp")
    sip_call_id = call_between(alice, bob, rig.uri("102"))
    started = time.monotonic()
    talk(2.0, alice, bob)
    hang_up(alice, bob)
    talked = time.monotonic() - started
    assert_heard(alice, alice.collect_recordings(), TONES["102"], min_seconds=1.5)
    assert_heard(bob, bob.collect_recordings(), TONES["101"], min_seconds=1.5)
    row = rig.cdr(lambda r: r["sip_call_id"] == sip_call_id)
    assert (row["direction"], row["disposition"], row["caller"], row["extension"]) == \
        ("internal", "answered", "101", "102"), row
    assert 1 <= row["duration"] <= talked + 1, (row, talked)
    assert row["cause"] == "caller hung up", row  # the caller's BYE


def test_callee_hangs_up(rig: Rig, phones: PhoneFactory) -> None:
    """102 hangs up: the BYE reaches 101 through softpbx and the CDR says so."""
    alice, bob = phones("101"), phones("102")
    sip_call_id = call_between(alice, bob, rig.uri("102"))
    talk(1.0, alice, bob)
    hang_up(bob, alice)
    assert_heard(alice, alice.collect_recordings(), TONES["102"], min_seconds=0.5)
    row = rig.cdr(lambda r: r["sip_call_id"] == sip_call_id)
    assert row["disposition"] == "answered" and row["cause"] == "callee hung up", row


def test_hold_and_resume(rig: Rig, phones: PhoneFactory) -> None:
    """101 holds (re-INVITE with a=sendonly, reaching 102 through softpbx), then resumes:
    the call stays up and audio flows both ways again (checked on softpbx's recording, see
    the module docstring); before the hold each phone heard the other."""
    alice, bob = phones("101"), phones("102")
    sip_call_id = call_between(alice, bob, rig.uri("102"))
    talk(1.2, alice, bob)
    since = bob.mark()
    alice.hold()
    bob.wait_event("CALL_REMOTE_SDP", 5.0, since=since)
    talk(1.0, alice, bob)
    since = bob.mark()
    alice.resume()
    bob.wait_event("CALL_REMOTE_SDP", 5.0, since=since)
    talk(2.0, alice, bob)
    hang_up(alice, bob)
    # The re-INVITEs as 102 got them from softpbx (its SIP trace): sendonly, then sendrecv.
    blocks = [b for b in bob.log_text().split("\x1b[") if re.search(r"(?m)^INVITE sip:", b)]
    directions = [m.group(1) for b in blocks
                  if (m := re.search(r"(?m)^a=(sendonly|sendrecv|recvonly|inactive)", b))]
    assert directions[-2:] == ["sendonly", "sendrecv"], directions
    assert_heard(alice, alice.collect_recordings(), TONES["102"], min_seconds=0.8)
    assert_heard(bob, bob.collect_recordings(), TONES["101"], min_seconds=0.8)
    row = rig.cdr(lambda r: r["sip_call_id"] == sip_call_id)
    assert row["disposition"] == "answered", row
    samples, rate = _stereo(rig.recording(row["call_id"]))
    resumed = samples[-int(1.5 * rate):-int(0.2 * rate)]  # the last of the resumed talk
    assert tone_fraction(resumed[:, 0], TONES["101"], rate) >= HEARD, "101 silent after resume"
    assert tone_fraction(resumed[:, 1], TONES["102"], rate) >= HEARD, "102 silent after resume"


def _stereo(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    data, rate = sf.read(str(path), dtype="float64", always_2d=True)
    assert data.shape[1] == 2, f"{path}: {data.shape[1]} channels, stereo expected"
    return data, int(rate)


def test_rfc4733_dtmf_passes_through(rig: Rig, phones: PhoneFactory) -> None:
    """101 sends 1, 5, # as telephone-events; 102 receives them, in order."""
    alice, bob = phones("101"), phones("102")
    call_between(alice, bob, rig.uri("102"))
    talk(0.5, alice, bob)
    since = bob.mark()
    for digit in "15#":
        alice.send_dtmf(digit)
        bob.wait_event(lambda e, d=digit: e.get("type") == "CALL_DTMF_START"
                       and e.get("param") == d, 3.0, since=since)
        talk(0.3, alice, bob)
    got = [e["param"] for e in bob.events[since:] if e.get("type") == "CALL_DTMF_START"]
    assert got == ["1", "5", "#"], got
    hang_up(alice, bob)


# -- the trunk ---------------------------------------------------------------------------------
def test_call_out_through_the_trunk(rig: Rig, phones: PhoneFactory, tmp_path: Path) -> None:
    """101 dials 8 999 123-45-67: the carrier (SIPp, echoing RTP) gets +79991234567 and 101
    hears its own tone back through the relay and the carrier."""
    alice = phones("101")
    with Sipp("call_answer.xml", (HOST, rig.port), tmp_path / "uas", port=rig.carrier_port,
              service="carrier") as carrier:
        carrier.wait_listening()
        since = alice.mark()
        alice.dial(rig.uri("89991234567"))
        established = alice.wait_event("CALL_ESTABLISHED", 8.0, since=since)
        talk(2.0, alice)
        alice.hangup()
        alice.wait_event("CALL_CLOSED", 5.0, since=since)
        assert carrier.wait(10) == 0, carrier.describe()
        invites = received_requests(carrier.message_log(), "INVITE")
        assert len(invites) == 1, carrier.describe()
        assert re.search(r"(?m)^INVITE sip:\+79991234567@", invites[0]), invites[0]
    assert_heard(alice, alice.collect_recordings(), TONES["101"], min_seconds=1.5)
    row = rig.cdr(lambda r: r["sip_call_id"] == established["id"])
    assert (row["direction"], row["disposition"], row["gateway"], row["callee"]) == \
        ("outbound", "answered", "carrier", "89991234567"), row


def test_answers_a_did_call_from_the_carrier(rig: Rig, phones: PhoneFactory,
                                            tmp_path: Path) -> None:
    """The carrier calls DID 74950000000 (-> 101): baresip rings, answers, hears its own tone
    echoed by the carrier, hangs up; the CDR is inbound, answered by 101."""
    alice = phones("101")
    since = alice.mark()
    with Sipp("call_carrier_uac.xml", (HOST, rig.port), tmp_path / "uac",
              port=rig.carrier_port, service=DID) as carrier:
        incoming = alice.wait_event("CALL_INCOMING", 8.0, since=since)
        assert incoming["peeruri"].startswith("sip:79161234567@"), incoming
        alice.accept()
        alice.wait_event("CALL_ESTABLISHED", 5.0, since=since)
        talk(2.0, alice)
        alice.hangup()
        alice.wait_event("CALL_CLOSED", 5.0, since=since)
        assert carrier.wait(10) == 0, carrier.describe()
        byes = received_requests(carrier.message_log(), "BYE")
        assert len(byes) == 1, carrier.describe()
        m = re.search(r"(?mi)^Call-ID:\s*(\S+)", byes[0])
        assert m is not None, byes[0]
    assert_heard(alice, alice.collect_recordings(), TONES["101"], min_seconds=1.5)
    row = rig.cdr(lambda r: r["sip_call_id"] == m.group(1))
    assert (row["direction"], row["did"], row["disposition"], row["extension"]) == \
        ("inbound", DID, "answered", "101"), row
