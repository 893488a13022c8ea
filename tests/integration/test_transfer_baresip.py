"""Real phones transfer and pick up calls: Debian's baresip against a real softpbx process.

baresip's ``transfer <uri>`` command (menu module, over ctrl_tcp) sends a blind REFER
(RFC 3515) from the call it is in; softpbx challenges it (digest, as the INVITE was), rings
the target and bridges the remaining party to it. Audio is checked by tone detection: each
phone plays its own tone (101: 440 Hz, 102: 880 Hz, 103: 660 Hz) and dumps what it hears;
softpbx's call recording (caller left, callee right) shows what the relay got from each side.
Pickup: 103 dials ``*8`` while 102 rings and takes the call. Attended transfer (baresip 1.0
has no command for it): the transferor is the tests' own UDP phone (tests/support/phone.py),
which calls both baresip phones and sends the REFER with Replaces.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.integration.test_calls_sipp import write_profiles
from tests.integration.test_phone_baresip import (
    HEARD,
    Rig,
    _stereo,
    call_between,
    phones,  # noqa: F401  (the fixture, bound to this module's rig)
    talk,
)
from tests.support.baresip import BaresipPhone, require_baresip
from tests.support.phone import (
    OutgoingCall,
    Phone,
    authorization,
    build_request,
    make_sdp,
    md5_challenge,
    new_branch,
)
from tests.support.server import HOST, PbxProcess, free_port
from tests.support.tones import read_mono, tone_fraction

pytestmark = pytest.mark.integration

TONES = {"101": 440.0, "102": 880.0, "103": 660.0}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """One softpbx for the module: shipped profiles (101-103 in pickup group "office")."""
    require_baresip()
    root = tmp_path_factory.mktemp("baresip-xfer")
    carrier_port = free_port()
    profiles = write_profiles(root / "profiles", carrier_port, no_answer_timeout=30)
    pbx = PbxProcess.create(root / "pbx", profiles=profiles, overrides={
        "sip.t1_ms": "100", "sip.t4_ms": "1000",
        "media.rtp_start_port": "22000", "media.rtp_end_port": "22999",
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


def tail_share(phone: BaresipPhone, call_dir: Path, freq: float, seconds: float) -> float:
    """The share of the last ``seconds`` (less the very end) ``phone`` heard holding ``freq``."""
    samples, rate = read_mono(phone.recording("dec", call_dir))
    part = samples[-int(seconds * rate):-int(0.2 * rate)]
    assert part.size > rate // 2, f"{phone.name} heard only {samples.size / rate:.2f}s"
    return tone_fraction(part, freq, rate)


def test_blind_transfer_with_baresip(rig: Rig, phones) -> None:  # noqa: F811
    """101 calls 102; 102 transfers 101 to 103 (``transfer``): 103 rings showing 101, answers,
    102's phone is released, 101 and 103 hear each other; one CDR with the chain."""
    alice, bob = phones("101"), phones("102")
    carol = phones("103")
    sip_call_id = call_between(alice, bob, rig.uri("102"))
    talk(1.0, alice, bob)
    since_bob, since_carol = bob.mark(), carol.mark()
    resp = bob.command("transfer", rig.uri("103"))
    assert resp.get("ok") is not False, resp
    incoming = carol.wait_event("CALL_INCOMING", 8.0, since=since_carol)
    assert incoming["peeruri"].startswith("sip:101@"), incoming
    carol.accept()
    carol.wait_event("CALL_ESTABLISHED", 5.0, since=since_carol)
    bob.wait_event("CALL_CLOSED", 5.0, since=since_bob)  # our BYE after the 200 sipfrag
    started = time.monotonic()
    talk(2.5, alice, carol)
    since_alice, since_carol = alice.mark(), carol.mark()
    alice.hangup()
    alice.wait_event("CALL_CLOSED", 5.0, since=since_alice)
    carol.wait_event("CALL_CLOSED", 5.0, since=since_carol)
    talked = time.monotonic() - started
    # 103 hears 101 (its own, fresh call: the whole dump)
    carol_dir = carol.collect_recordings()
    samples, rate = read_mono(carol.recording("dec", carol_dir))
    assert tone_fraction(samples, TONES["101"], rate) >= HEARD
    row = rig.cdr(lambda r: r["sip_call_id"] == sip_call_id)
    assert (row["disposition"], row["extension"]) == ("answered", "103"), row
    assert row["duration"] >= 1.0 + talked - 1, row
    assert '"event":"blind","by":"102","to":"103"' in row["transfers"], row
    # What the relay got from each side after the transfer: 101 left, 103 right; and 101
    # heard 103 (its dump's last seconds).
    stereo, srate = _stereo(rig.recording(row["call_id"]))
    last = stereo[-int(2.0 * srate):-int(0.3 * srate)]
    assert tone_fraction(last[:, 0], TONES["101"], srate) >= HEARD
    assert tone_fraction(last[:, 1], TONES["103"], srate) >= HEARD
    assert tail_share(alice, alice.collect_recordings(), TONES["103"], 2.0) >= HEARD


def test_group_pickup_with_baresip(rig: Rig, phones) -> None:  # noqa: F811
    """101 calls 102; while 102 rings, 103 dials ``*8`` and gets the call; 102 stops
    ringing; 101 and 103 hear each other; the CDR names 103."""
    alice, bob, carol = phones("101"), phones("102"), phones("103")
    since_alice, since_bob, since_carol = alice.mark(), bob.mark(), carol.mark()
    alice.dial(rig.uri("102"))
    bob.wait_event("CALL_INCOMING", 8.0, since=since_bob)
    carol.dial(rig.uri("*8"))
    carol.wait_event("CALL_ESTABLISHED", 5.0, since=since_carol)
    alice.wait_event("CALL_ESTABLISHED", 5.0, since=since_alice)
    bob.wait_event("CALL_CLOSED", 5.0, since=since_bob)
    talk(2.0, alice, carol)
    since_alice, since_carol = alice.mark(), carol.mark()
    carol.hangup()
    alice.wait_event("CALL_CLOSED", 5.0, since=since_alice)
    carol.wait_event("CALL_CLOSED", 5.0, since=since_carol)
    for phone, freq in ((alice, TONES["103"]), (carol, TONES["101"])):
        samples, rate = read_mono(phone.recording("dec", phone.collect_recordings()))
        assert tone_fraction(samples, freq, rate) >= HEARD, phone.name
    row = rig.cdr(lambda r: '"event":"pickup"' in r["transfers"])
    assert (row["caller"], row["extension"], row["disposition"]) == ("101", "103", "answered")
    assert row["cause"] == "callee hung up", row


def refer(phone: Phone, call: OutgoingCall, refer_to: str, password: str) -> int:
    """REFER in ``call``'s dialog, through the digest challenge; the final status."""
    d = call.dialog
    assert d is not None
    auth = ""
    for _ in range(2):  # bounded: the challenge, then the answer
        d.cseq += 1
        headers = [("Via", phone.via(new_branch())), ("Max-Forwards", "70"),
                   ("From", d.local), ("To", d.remote), ("Call-ID", d.call_id),
                   ("CSeq", f"{d.cseq} REFER"), ("Contact", phone.contact),
                   ("Refer-To", refer_to)]
        if auth:
            headers.append(("Authorization", auth))
        phone.send(build_request("REFER", d.target, headers))
        resp = phone.wait_response(d.call_id, d.cseq, "REFER", timeout=5.0)
        if resp.status != 401:
            return resp.status
        auth = authorization(md5_challenge(resp), username=phone.user, password=password,
                             method="REFER", uri=d.target)
    return 401


def test_attended_transfer_joins_two_baresip_phones(rig: Rig, phones) -> None:  # noqa: F811
    """The test phone (101) calls 102, then 103, then REFERs call 1 with Replaces naming
    call 2: 102 and 103 are joined (103 re-INVITEd to call 1's relay) and hear each other;
    101 gets a BYE on both calls; call 1's CDR names 103, the recording has both tones."""
    bob, carol = phones("102"), phones("103")
    with Phone(user="101", password="secret101", pbx=(HOST, rig.port)) as alice:
        legs = []
        for callee, number in ((bob, "102"), (carol, "103")):
            since = callee.mark()
            out = alice.call(number, sdp=make_sdp(free_port()))
            callee.wait_event("CALL_INCOMING", 8.0, since=since)
            callee.accept()
            assert out.wait_final().status == 200
            legs.append(out)
        call1, call2 = legs
        talk(0.5, bob, carol)
        to_tag = (call2.final.to.tag if call2.final else "") or ""
        replaces = quote(f"{call2.call_id};to-tag={to_tag};from-tag={call2.from_tag}", safe="")
        since_bob, since_carol = bob.mark(), carol.mark()
        assert refer(alice, call1, f"<sip:103@{HOST}?Replaces={replaces}>", "secret101") == 202
        call1.wait_bye(5.0)
        call2.wait_bye(5.0)
        # 103 was re-INVITEd to call 1's relay side (102 keeps its session: same codecs as
        # 101's offer, so softpbx leaves it alone)
        carol.wait_event("CALL_REMOTE_SDP", 5.0, since=since_carol)
        talk(2.5, bob, carol)
        since_bob, since_carol = bob.mark(), carol.mark()
        bob.hangup()
        bob.wait_event("CALL_CLOSED", 5.0, since=since_bob)
        carol.wait_event("CALL_CLOSED", 5.0, since=since_carol)
    assert tail_share(bob, bob.collect_recordings(), TONES["103"], 2.0) >= HEARD
    assert tail_share(carol, carol.collect_recordings(), TONES["102"], 2.0) >= HEARD
    row = rig.cdr(lambda r: r["sip_call_id"] == call1.call_id)
    assert (row["disposition"], row["extension"]) == ("answered", "102"), row
    assert '"event":"attended","by":"101","to":"103"' in row["transfers"], row
    other = rig.cdr(lambda r: r["sip_call_id"] == call2.call_id)
    assert other["cause"].startswith("joined to "), other
    stereo, srate = _stereo(rig.recording(row["call_id"]))
    last = stereo[-int(2.0 * srate):-int(0.3 * srate)]
    assert tone_fraction(last[:, 0], TONES["103"], srate) >= HEARD  # side A: 103 now
    assert tone_fraction(last[:, 1], TONES["102"], srate) >= HEARD
