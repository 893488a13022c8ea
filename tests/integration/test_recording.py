"""Call recording end to end: a real softpbx process, a real call between two test phones,
a known tone on each side as RTP through the relay, the MP3 fetched from its public link.

101 (the caller) sends 440 Hz, 102 (the callee) sends 880 Hz, both PCMU encoded here with an
independent mu-law encoder. After the BYE, softpbx logs one ``recording ready`` line with the
link; the link serves an MP3 whose left channel is 440 Hz and right channel 880 Hz, as long as
the talk time the test saw (answer -> BYE) to within 0.1 s, with Range and HEAD. Bad and
malformed tokens get the same 404. Last, a restart with ``recording.max_age_days=1`` (after the
test ages the index row) deletes the file and the link answers 410.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from tests.support.phone import Phone, make_sdp
from tests.support.rtp import SAMPLES_PER_PACKET, RtpEndpoint, RtpPacket
from tests.support.server import HOST, PbxProcess

pytestmark = pytest.mark.integration

RATE = 8000
TALK_S = 3.0
PACKETS = int(TALK_S * RATE / SAMPLES_PER_PACKET)
LIVE_COUNTS = ("calls", "dialogs", "media_sessions", "rtp_ports")
READY_RE = re.compile(r"recording ready: call (\S+) ([\d.]+) s (\d+) bytes (\S+)")


# -- signals ------------------------------------------------------------------------------------
def ulaw(pcm: np.ndarray) -> bytes:
    """G.711 mu-law (bias 0x84, clip 32635), independent of softpbx.media.g711."""
    x = pcm.astype(np.int32)
    sign = np.where(x < 0, 0x80, 0)
    mag = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.floor(np.log2(mag)).astype(np.int32) - 7
    mantissa = (mag >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def tone_payloads(freq: float, packets: int) -> list[bytes]:
    t = np.arange(packets * SAMPLES_PER_PACKET) / RATE
    data = ulaw((0.3 * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16))
    return [data[i:i + SAMPLES_PER_PACKET]
            for i in range(0, len(data), SAMPLES_PER_PACKET)]


def spectrum(signal: np.ndarray) -> np.ndarray:
    """Magnitude spectrum of 1 s from 1 s in (1 Hz bins; past the encoder's start-up)."""
    part = signal[RATE:2 * RATE].astype(np.float64)
    return np.abs(np.fft.rfft(part * np.hanning(len(part))))


def peak_hz(signal: np.ndarray) -> float:
    return float(np.argmax(spectrum(signal)))


def band(signal: np.ndarray, freq: int) -> float:
    return float(spectrum(signal)[freq - 3:freq + 4].max())


# -- HTTP ---------------------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(url: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> Answer:
    """One request, bounded; HTTP errors are answers too."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - 127.0.0.1 only
            return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                          resp.read())
    except urllib.error.HTTPError as err:
        return Answer(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


# -- the switch and one recorded call -----------------------------------------------------------
@pytest.fixture(scope="module")
def pbx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxProcess]:
    root = tmp_path_factory.mktemp("recording")
    proc = PbxProcess.create(root, overrides={
        "sip.t1_ms": "100", "sip.t4_ms": "1000",
        "media.rtp_start_port": "23000", "media.rtp_end_port": "23999",
        "recording.enabled": "true",
        "recording.dir": str(root / "recordings"),
        "recording.flush_seconds": "1",
    })
    # Links must point at this process's HTTP port.
    proc.overrides["http.public_base_url"] = f"http://{HOST}:{proc.http_port}"
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


@dataclass
class RecordedCall:
    call_id: str
    """softpbx's call id (CDR ``call_id``)."""
    link: str
    talk_s: float
    """Answer (200 sent by the callee) to BYE (sent by the caller), as the test saw it."""
    log_line: str
    missing: tuple[list[int], list[int]]
    """Sequence numbers sent by the caller / callee that never came out of the relay."""


def wait_status_zero(pbx: PbxProcess, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = pbx.http_json("/api/status")
        if all(st[k] == 0 for k in LIVE_COUNTS):
            return st
        assert time.monotonic() < deadline, f"{LIVE_COUNTS} not all 0 within {timeout}s: {st}"
        time.sleep(0.1)


def cdr(pbx: PbxProcess, sip_call_id: str, timeout: float = 5.0) -> dict[str, Any]:
    return pbx.wait_cdr(lambda r: r["sip_call_id"] == sip_call_id, sip_call_id, timeout)


@pytest.fixture(scope="module")
def recorded(pbx: PbxProcess) -> RecordedCall:
    """101 calls 102 (both record = true in the sample directory); tones both ways; BYE."""
    with Phone(user="102", password="secret102", pbx=pbx.sip_addr) as bob, \
            Phone(user="101", password="secret101", pbx=pbx.sip_addr) as alice, \
            RtpEndpoint() as rtp_a, RtpEndpoint() as rtp_b:
        assert bob.register().status == 200
        call = alice.call("102", sdp=make_sdp(rtp_a.port))
        inc = bob.wait_invite()
        inc.ring()
        answered = time.monotonic()
        inc.answer(make_sdp(rtp_b.port))
        assert call.wait_final().status == 200
        to_callee_relay, to_caller_relay = call.remote_media, inc.remote_media
        errors: list[BaseException] = []

        sent: dict[RtpEndpoint, list[RtpPacket]] = {}

        def send(ep: RtpEndpoint, dest: tuple[str, int], freq: float) -> None:
            try:
                sent[ep] = ep.send_pcmu(dest, count=PACKETS, payloads=tone_payloads(freq, PACKETS))
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        senders = [threading.Thread(target=send, args=(rtp_a, to_callee_relay, 440)),
                   threading.Thread(target=send, args=(rtp_b, to_caller_relay, 880))]
        for t in senders:
            t.start()
        for t in senders:
            t.join(TALK_S + 5)
        assert not errors and not any(t.is_alive() for t in senders), errors
        # The last packets are relayed before the BYE (the relay does not wait for them).
        got_b = {p.sequence for p in rtp_b.wait_packets(PACKETS, timeout=2)}
        got_a = {p.sequence for p in rtp_a.wait_packets(PACKETS, timeout=2)}
        missing = ([p.sequence for p in sent[rtp_a] if p.sequence not in got_b],
                   [p.sequence for p in sent[rtp_b] if p.sequence not in got_a])
        hung_up = time.monotonic()
        assert call.bye().status == 200
        talk = hung_up - answered
        bob.unregister(everything=True)
    wait_status_zero(pbx)
    call_id = cdr(pbx, call.call_id)["call_id"]
    log = pbx.wait_for_log(f"recording ready: call {call_id}", timeout=10)
    lines = [ln for ln in log.splitlines() if f"recording ready: call {call_id}" in ln]
    assert len(lines) == 1, lines
    m = READY_RE.search(lines[0])
    assert m is not None, lines[0]
    return RecordedCall(call_id=call_id, link=m.group(4), talk_s=talk, log_line=lines[0],
                        missing=missing)


# -- the tests ----------------------------------------------------------------------------------
def test_media_was_relayed_while_recording(recorded: RecordedCall) -> None:
    assert recorded.missing == ([], []), "RTP lost in the relay (first sent: lowest number)"


def test_one_log_line_with_call_id_and_public_link(pbx: PbxProcess,
                                                   recorded: RecordedCall) -> None:
    m = READY_RE.search(recorded.log_line)
    assert m is not None
    assert re.fullmatch(rf"http://{re.escape(HOST)}:{pbx.http_port}/rec/[A-Za-z0-9_-]{{22,}}\.mp3",
                        recorded.link), recorded.link
    token = recorded.link.rsplit("/", 1)[1].removesuffix(".mp3")
    assert len(token) * 6 >= 128
    assert token not in pbx.db_path.read_bytes().decode("latin-1"), "the index holds the token"
    assert abs(float(m.group(2)) - recorded.talk_s) <= 0.1, (m.group(2), recorded.talk_s)
    rec_dir = pbx.workdir / "recordings"
    assert sorted(p.name for p in rec_dir.iterdir()) == [f"{recorded.call_id}.mp3"]
    assert int(m.group(3)) == (rec_dir / f"{recorded.call_id}.mp3").stat().st_size


def test_link_serves_the_call_in_stereo(recorded: RecordedCall, tmp_path: Path) -> None:
    got = http(recorded.link)
    assert got.status == 200, got
    assert got.headers["content-type"] == "audio/mpeg"
    assert int(got.headers["content-length"]) == len(got.body) > 0
    assert got.headers.get("accept-ranges") == "bytes"
    mp3 = tmp_path / "fetched.mp3"
    mp3.write_bytes(got.body)
    audio, rate = sf.read(mp3, dtype="int16")
    assert rate == RATE and audio.ndim == 2 and audio.shape[1] == 2
    duration = len(audio) / RATE
    assert abs(duration - recorded.talk_s) <= 0.1, (duration, recorded.talk_s)
    left, right = audio[:, 0], audio[:, 1]
    assert peak_hz(left) == pytest.approx(440, abs=2), "caller's tone is not on the left"
    assert peak_hz(right) == pytest.approx(880, abs=2), "callee's tone is not on the right"
    assert band(left, 880) < band(left, 440) / 50
    assert band(right, 440) < band(right, 880) / 50


def test_range_and_head(recorded: RecordedCall) -> None:
    full = http(recorded.link)
    part = http(recorded.link, headers={"Range": "bytes=100-199"})
    assert part.status == 206, part
    assert part.body == full.body[100:200] and len(part.body) == 100
    assert part.headers["content-range"] == f"bytes 100-199/{len(full.body)}"
    assert part.headers["content-type"] == "audio/mpeg"
    tail = http(recorded.link, headers={"Range": "bytes=-50"})
    assert tail.status == 206 and tail.body == full.body[-50:]
    beyond = http(recorded.link, headers={"Range": f"bytes={len(full.body) + 10}-"})
    assert beyond.status == 416, beyond
    for ignored in ("bytes=0-1,5-6", "items=0-1", "bytes=9-3", "bytes=x"):  # RFC 9110 §14.2
        whole = http(recorded.link, headers={"Range": ignored})
        assert (whole.status, whole.body) == (200, full.body), ignored
    empty = http(recorded.link, headers={"Range": "bytes=-0"})
    assert empty.status == 416 and empty.headers["content-range"] == f"bytes */{len(full.body)}"
    stale = http(recorded.link, headers={"Range": "bytes=0-9", "If-Range": '"not-it"'})
    assert (stale.status, stale.body) == (200, full.body)
    fresh = http(recorded.link, headers={"Range": "bytes=0-9", "If-Range": full.headers["etag"]})
    assert (fresh.status, fresh.body) == (206, full.body[:10])
    head = http(recorded.link, method="HEAD")
    assert head.status == 200 and head.body == b""
    assert int(head.headers["content-length"]) == len(full.body)
    assert head.headers["content-type"] == "audio/mpeg"


@pytest.mark.parametrize("path", [
    "/rec/{random}.mp3",                      # well formed, unknown
    "/rec/{random}x.mp3",                     # unknown, other length
    "/rec/short.mp3",                         # too short to be a token
    "/rec/{token}",                           # no .mp3
    "/rec/{token}.mp3/",                      # trailing slash
    "/rec/{token}.wav",
    "/rec/{token_bad}.mp3",                   # a character no token has
    "/rec/",                                  # no listing
    "/rec",
    "/rec/..%2Fsoftpbx.db.mp3",
    "/rec/%2e%2e/%2e%2e/softpbx.db",
])
def test_bad_and_malformed_tokens_get_the_same_404(recorded: RecordedCall, path: str) -> None:
    token = recorded.link.rsplit("/", 1)[1].removesuffix(".mp3")
    base = recorded.link.split("/rec/", 1)[0]
    url = base + path.format(random=secrets.token_urlsafe(24), token=token,
                             token_bad=token[:-1] + "~")
    got = http(url)
    assert got.status == 404, (url, got)
    assert got.headers["content-type"].startswith("application/json")
    assert got.json()["status"] == 404
    assert b"ID3" not in got.body[:3] and len(got.body) < 200


def test_unknown_tokens_are_not_told_apart_from_malformed(recorded: RecordedCall) -> None:
    base = recorded.link.split("/rec/", 1)[0]
    unknown = http(f"{base}/rec/{secrets.token_urlsafe(24)}.mp3")
    malformed = http(f"{base}/rec/x.mp3")
    assert (unknown.status, unknown.body) == (malformed.status, malformed.body)


# -- last: retention (restarts the switch) ------------------------------------------------------
def test_retention_deletes_old_recordings_and_the_link_answers_410(
        pbx: PbxProcess, recorded: RecordedCall) -> None:
    pbx.stop()
    con = sqlite3.connect(pbx.db_path)
    try:
        with con:
            n = con.execute("UPDATE recordings SET created_at = created_at - 3 * 86400"
                            " WHERE call_id = ?", (recorded.call_id,)).rowcount
    finally:
        con.close()
    assert n == 1
    pbx.overrides["recording.max_age_days"] = "1"
    pbx.start()  # retention runs at start-up, then hourly
    deadline = time.monotonic() + 10
    while (got := http(recorded.link)).status == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert got.status == 410, got
    assert got.json()["status"] == 410
    assert http(recorded.link, method="HEAD").status == 410
    assert not (pbx.workdir / "recordings" / f"{recorded.call_id}.mp3").exists()
    pbx.wait_for_log("retention: 1 recordings deleted", timeout=5)
