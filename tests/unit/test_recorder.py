"""CallRecorder: RTP packets in, placed and aligned PCM out (no sockets, hand-stepped time)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from softpbx.config.schema import RecordingSettings
from softpbx.media.g711 import PCMA_DECODE, PCMU_DECODE, alaw_encode
from softpbx.media.recorder import (
    SAMPLE_RATE,
    UNDECODABLE_LIMIT,
    CallRecorder,
    RtpPayload,
    Side,
    parse_rtp,
)

START = 1000.0
PTIME = 0.02
SPP = 160  # samples per 20 ms packet
CALLER, CALLEE = Side.CALLER, Side.CALLEE


def rtp(
    payload: bytes,
    *,
    ts: int,
    seq: int = 0,
    ssrc: int = 0x11223344,
    pt: int = 0,
    marker: bool = False,
    csrcs: tuple[int, ...] = (),
    extension: bytes | None = None,
    padding: int = 0,
) -> bytes:
    """Build an RTP packet (RFC 3550 §5.1)."""
    first = 0x80 | len(csrcs) | (0x10 if extension is not None else 0) | (0x20 if padding else 0)
    second = (0x80 if marker else 0) | pt
    out = struct.pack("!BBHII", first, second, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
    out += b"".join(struct.pack("!I", c) for c in csrcs)
    if extension is not None:
        out += struct.pack("!HH", 0xBEDE, len(extension) // 4) + extension
    out += payload
    if padding:
        out += bytes(padding - 1) + bytes([padding])
    return out


def code(k: int) -> int:
    """A distinct, loud mu-law code per packet number (never silence)."""
    return 0x10 + (k % 0x60)


def packet(k: int, *, ts0: int = 5000, ssrc: int = 0x11223344, pt: int = 0) -> bytes:
    """Packet number ``k`` of a 20 ms PCMU stream whose samples all decode to one value."""
    return rtp(bytes([code(k)]) * SPP, ts=ts0 + k * SPP, seq=k, ssrc=ssrc, pt=pt)


def value(k: int) -> int:
    return int(PCMU_DECODE[code(k)])


def chunk(out: np.ndarray, k: int, offset: int = 0) -> np.ndarray:
    """Samples of packet slot ``k`` (20 ms slots from ``offset`` samples)."""
    return out[offset + k * SPP : offset + (k + 1) * SPP]


def feed_stream(rec: CallRecorder, side: Side, ks, *, t0: float = 0.0, **kw) -> None:
    for k in ks:
        rec.feed(side, packet(k, **kw), START + t0 + k * PTIME)


def mono(side_out: np.ndarray, side: Side) -> np.ndarray:
    return side_out[:, int(side)]


# ---------------------------------------------------------------- parsing


def test_parse_plain_csrc_extension_padding() -> None:
    payload = b"\x01\x02\x03"
    assert parse_rtp(rtp(payload, ts=7, ssrc=9, pt=8)) == RtpPayload(8, 7, 9, payload)
    full = rtp(payload, ts=7, ssrc=9, pt=0, csrcs=(1, 2), extension=bytes(8), padding=4)
    assert parse_rtp(full) == RtpPayload(0, 7, 9, payload)


@pytest.mark.parametrize(
    "data",
    [
        b"\x80\x00",  # truncated header
        bytes([0x40, 0]) + bytes(10) + b"xx",  # version 1
        bytes([0x80, 200]) + bytes(10),  # RTCP SR multiplexed on the RTP port
        bytes([0x81, 0]) + bytes(10),  # CSRC count beyond the packet
        bytes([0xA0, 0]) + bytes(10) + b"\x00",  # padding count 0
        bytes([0x90, 0]) + bytes(10) + b"\x00",  # extension header cut short
    ],
)
def test_parse_rejects_non_rtp(data: bytes) -> None:
    assert parse_rtp(data) is None


# ---------------------------------------------------------------- placement


def test_contiguous_stream_is_placed_in_order() -> None:
    rec = CallRecorder(start=START, stereo=False)
    feed_stream(rec, CALLER, range(50))
    out = rec.finish(START + 1.0)
    assert out.shape == (SAMPLE_RATE,)
    for k in range(50):
        assert np.all(chunk(out, k) == value(k))


def test_loss_becomes_silence() -> None:
    rec = CallRecorder(start=START)
    feed_stream(rec, CALLER, [k for k in range(10) if k not in (3, 4, 7)])
    out = rec.finish(START + 10 * PTIME)
    left = mono(out, CALLER)
    assert len(left) == 10 * SPP
    for k in range(10):
        expected = 0 if k in (3, 4, 7) else value(k)
        assert np.all(chunk(left, k) == expected), k
    assert not mono(out, CALLEE).any()


def test_reordered_packets_land_in_place() -> None:
    rec = CallRecorder(start=START, stereo=False)
    order = [0, 1, 3, 2, 4, 6, 7, 5, 8, 9]
    for i, k in enumerate(order):
        # A packet is never here before its time (k x 20 ms): the overtaken one is late.
        rec.feed(CALLER, packet(k), START + max(i, k) * PTIME)
    out = rec.finish(START + 0.2)
    for k in range(10):
        assert np.all(chunk(out, k) == value(k)), k
    assert rec.stats().resyncs == 0


def test_duplicates_are_ignored() -> None:
    plain = CallRecorder(start=START, stereo=False)
    feed_stream(plain, CALLER, range(10))
    twice = CallRecorder(start=START, stereo=False)
    feed_stream(twice, CALLER, range(10))
    for k in (2, 5, 9):
        twice.feed(CALLER, packet(k), START + 0.19)
    assert np.array_equal(plain.finish(START + 0.2), twice.finish(START + 0.2))
    assert twice.stats().resyncs == 0


def test_packets_flushed_past_are_dropped_as_late() -> None:
    rec = CallRecorder(start=START, stereo=False)
    feed_stream(rec, CALLER, [k for k in range(50) if k != 10])
    first = rec.flush(START + 1.0)  # final up to 0.8 s
    assert len(first) == int(0.8 * SAMPLE_RATE)
    assert not chunk(first, 10).any()
    rec.feed(CALLER, packet(10), START + 1.01)  # 0.8 s too late
    feed_stream(rec, CALLER, range(50, 60))
    rest = rec.finish(START + 1.2)
    out = np.concatenate([first, rest])
    assert len(out) == int(1.2 * SAMPLE_RATE)
    assert not chunk(out, 10).any()
    assert rec.stats().late == 1
    assert np.all(chunk(out, 55) == value(55))


def test_jitter_window_keeps_late_packets_landing() -> None:
    rec = CallRecorder(start=START, stereo=False, jitter_window=0.2)
    feed_stream(rec, CALLER, [k for k in range(50) if k != 45])
    first = rec.flush(START + 1.0)  # slot 45 is at 0.90 s: still un-flushed
    rec.feed(CALLER, packet(45), START + 1.05)  # 150 ms late
    rest = rec.finish(START + 1.0)
    out = np.concatenate([first, rest])
    assert np.all(chunk(out, 45) == value(45))
    assert rec.stats().late == 0


def test_timestamp_wrap_is_seamless() -> None:
    rec = CallRecorder(start=START, stereo=False)
    ts0 = 2**32 - 5 * SPP  # wraps after packet 4
    feed_stream(rec, CALLER, range(20), ts0=ts0)
    out = rec.finish(START + 0.4)
    for k in range(20):
        assert np.all(chunk(out, k) == value(k)), k
    assert rec.stats().resyncs == 0


def test_reordered_across_wrap() -> None:
    rec = CallRecorder(start=START, stereo=False)
    ts0 = 2**32 - 2 * SPP
    for i, k in enumerate([0, 2, 1, 3]):  # packet 2 (ts 0) arrives before packet 1 (ts 2^32-160)
        rec.feed(CALLER, packet(k, ts0=ts0), START + max(i, k) * PTIME)
    out = rec.finish(START + 0.08)
    for k in range(4):
        assert np.all(chunk(out, k) == value(k)), k


def test_ssrc_change_is_anchored_by_arrival() -> None:
    rec = CallRecorder(start=START)
    feed_stream(rec, CALLER, range(50), ssrc=1, ts0=1000)
    # New source (e.g. a re-INVITE to another device) with an unrelated timestamp base.
    feed_stream(rec, CALLER, range(50, 100), ssrc=2, ts0=123_456_789)
    left = mono(rec.finish(START + 2.0), CALLER)
    for k in range(100):
        assert np.all(chunk(left, k) == value(k)), k
    assert rec.stats().streams == 2


def test_late_packet_of_the_previous_ssrc_uses_its_old_anchor() -> None:
    rec = CallRecorder(start=START, stereo=False)
    feed_stream(rec, CALLER, [k for k in range(10) if k != 8], ssrc=1)
    feed_stream(rec, CALLER, range(10, 20), ssrc=2, ts0=77)
    rec.feed(CALLER, packet(8, ssrc=1), START + 0.25)
    out = rec.finish(START + 0.4)
    for k in range(20):
        assert np.all(chunk(out, k) == value(k)), k


@pytest.mark.parametrize("jump", [10 * SAMPLE_RATE, -10 * SAMPLE_RATE, 2**31 + 12345])
def test_timestamp_jump_resyncs_by_arrival(jump: int) -> None:
    rec = CallRecorder(start=START, stereo=False)
    feed_stream(rec, CALLER, range(50))
    for k in range(50, 100):  # same SSRC, timestamps jump at 1.0 s
        rec.feed(CALLER, packet(k, ts0=5000 + jump), START + k * PTIME)
    out = rec.finish(START + 2.0)
    backwards = jump > 2**31 or jump < 0  # the first packet after a backward jump is dropped
    for k in range(100):
        if k == 50 and backwards:
            assert not chunk(out, k).any()
        else:
            assert np.all(chunk(out, k) == value(k)), k
    assert rec.stats().resyncs == 1


def test_sender_that_stops_the_clock_in_a_pause_is_resynced() -> None:
    # Timestamps do not advance over a 3 s pause (a buggy sender): audio after the pause must
    # still land at its arrival time, not 3 s early.
    rec = CallRecorder(start=START, stereo=False)
    feed_stream(rec, CALLER, range(25))
    for i, k in enumerate(range(25, 50)):
        rec.feed(CALLER, packet(k), START + 3.5 + i * PTIME)
    out = rec.finish(START + 4.0)
    assert np.all(out[int(3.5 * SAMPLE_RATE) : int(3.5 * SAMPLE_RATE) + SPP] == value(25))
    assert not out[int(0.5 * SAMPLE_RATE) : int(3.5 * SAMPLE_RATE)].any()


def test_dtmf_and_comfort_noise_are_not_audio() -> None:
    rec = CallRecorder(start=START, stereo=False, codecs={101: "telephone-event/8000"})
    for k in range(10):
        arrival = START + k * PTIME
        if k in (4, 5):
            # RFC 4733 event (digit 5, end bit later) and RFC 3389 CN in the audio's place.
            event = struct.pack("!BBH", 5, 0x0A, 160 * (k - 3))
            rec.feed(CALLER, rtp(event, ts=5000 + 4 * SPP, seq=k, ssrc=0x11223344, pt=101), arrival)
            rec.feed(
                CALLER, rtp(b"\x40", ts=5000 + k * SPP, seq=k, ssrc=0x11223344, pt=13), arrival
            )
        else:
            rec.feed(CALLER, packet(k), arrival)
    out = rec.finish(START + 0.2)
    assert rec.failure is None
    for k in range(10):
        assert np.all(chunk(out, k) == (0 if k in (4, 5) else value(k))), k
    assert rec.stats().ignored == 4


def test_dynamic_payload_type_mapped_to_pcma() -> None:
    rec = CallRecorder(start=START, stereo=False, codecs={96: "PCMA/8000"})
    tone = (1000 * np.sin(np.arange(SPP) / 5)).astype(np.int16)
    rec.feed(CALLER, rtp(alaw_encode(tone), ts=0, pt=96), START)
    rec.feed(CALLER, rtp(alaw_encode(tone), ts=SPP, pt=8), START + PTIME)
    out = rec.finish(START + 2 * PTIME)
    expected = PCMA_DECODE[np.frombuffer(alaw_encode(tone), np.uint8)]
    assert np.array_equal(out[:SPP], expected)
    assert np.array_equal(out[SPP:], expected)


@pytest.mark.parametrize(
    ("codecs", "pt", "needle"),
    [({}, 9, "G722"), ({}, 96, "payload type 96"), ({111: "opus/48000/2"}, 111, "opus")],
)
def test_undecodable_codec_marks_not_recorded(codecs: dict, pt: int, needle: str) -> None:
    rec = CallRecorder(start=START, codecs=codecs)
    feed_stream(rec, CALLER, range(30))
    for i in range(UNDECODABLE_LIMIT):
        rec.feed(CALLEE, rtp(b"\x00" * 80, ts=i * SPP, pt=pt), START + 0.05 + i * PTIME)
    out = rec.flush(START + 1.0)
    assert out.shape == (0, 2)
    assert rec.failure is not None and needle in rec.failure
    rec.feed(CALLER, packet(10), START + 1.0)  # ignored from now on
    assert rec.pending_packets == 0
    assert rec.finish(START + 2.0).shape == (0, 2)
    assert rec.held_samples == 0


def test_short_undecodable_call_fails_at_finish() -> None:
    # fewer packets than the limit, but nothing else on that side: still not recorded
    rec = CallRecorder(start=START)
    feed_stream(rec, CALLER, range(5))
    for i in range(5):
        rec.feed(CALLEE, rtp(b"\x00" * 80, ts=i * SPP, pt=9), START + i * PTIME)
    assert rec.flush(START + 0.05).shape[1] == 2 and rec.failure is None
    assert rec.finish(START + 0.1).shape == (0, 2)
    assert rec.failure is not None and "G722" in rec.failure


def test_stray_packets_in_other_types_do_not_spoil_the_recording() -> None:
    # An RFC 6263 keep-alive (no payload, unnegotiated type) and a single stray packet of an
    # undecodable type amid good audio: the call is recorded, the stray packet is silence.
    rec = CallRecorder(start=START, stereo=False)
    for k in range(50):
        if k == 20:
            rec.feed(CALLER, rtp(b"", ts=5000 + k * SPP, pt=123), START + k * PTIME)
            rec.feed(CALLER, packet(k, pt=9), START + k * PTIME)
        else:
            rec.feed(CALLER, packet(k), START + k * PTIME)
    out = rec.finish(START + 50 * PTIME)
    assert rec.failure is None and len(out) == 50 * SPP
    assert not chunk(out, 20).any()  # the stray G.722 packet: silence
    assert (chunk(out, 19) == value(19)).all() and (chunk(out, 21) == value(21)).all()


def test_set_codecs_applies_to_later_packets_only() -> None:
    rec = CallRecorder(start=START, stereo=False)
    rec.feed(CALLER, packet(0, pt=0), START)
    rec.set_codecs({0: "G722"}, CALLEE)  # the other side: no effect on the caller
    rec.feed(CALLER, packet(1), START + PTIME)
    rec.set_codecs({97: "PCMU"}, CALLER)
    rec.feed(CALLER, packet(2, pt=97), START + 2 * PTIME)
    out = rec.finish(START + 3 * PTIME)
    assert rec.failure is None
    for k in range(3):
        assert np.all(chunk(out, k) == value(k))


def test_malformed_packets_are_counted_and_skipped() -> None:
    rec = CallRecorder(start=START, stereo=False)
    rec.feed(CALLER, b"\x00\x01", START)
    rec.feed(CALLER, bytes([0x80, 201]) + bytes(30), START)
    feed_stream(rec, CALLER, range(5))
    rec.finish(START + 0.1)
    stats = rec.stats()
    assert stats.malformed == 2 and stats.placed == 5 and rec.failure is None


# ---------------------------------------------------------------- two sides


def test_stereo_alignment_by_arrival_time() -> None:
    rec = CallRecorder(start=START)
    feed_stream(rec, CALLER, range(150), ts0=1)  # 0..3 s
    feed_stream(rec, CALLEE, range(50, 150), ts0=999_999)  # starts 1 s in, unrelated clock
    out = rec.finish(START + 3.0)
    assert out.shape == (3 * SAMPLE_RATE, 2)
    left, right = mono(out, CALLER), mono(out, CALLEE)
    assert np.all(chunk(left, 0) == value(0))
    assert not right[:SAMPLE_RATE].any()
    assert np.all(right[SAMPLE_RATE : SAMPLE_RATE + SPP] == value(50))
    for k in range(50, 150):
        assert np.all(chunk(right, k) == value(k)), k
        assert np.all(chunk(left, k) == value(k)), k


@pytest.mark.parametrize("burst", [True, False], ids=["queued-start", "first-packet-only"])
def test_a_delayed_first_packet_does_not_misalign_the_channels(burst: bool) -> None:
    """The caller's first packet comes 150 ms late (below the resync threshold); with
    ``burst`` the packets queued behind it come with it. Then all are on time. Packets never
    arrive before they are sent, so the first on-time one shows the anchor was late."""
    rec = CallRecorder(start=START)
    parts = []
    for k in range(150):
        on_time = START + k * PTIME
        delayed = k == 0 or (burst and k * PTIME < 0.15)
        rec.feed(CALLER, packet(k, ssrc=1), START + 0.15 if delayed else on_time)
        rec.feed(CALLEE, packet(k, ssrc=2, ts0=777), on_time)
        if k % 50 == 49:
            parts.append(rec.flush(on_time))
    parts.append(rec.finish(START + 3.0))
    out = np.concatenate(parts)
    left, right = mono(out, CALLER), mono(out, CALLEE)
    # Each channel's packet k at k x 20 ms (so the channels within 20 ms of each other: here 0).
    for k in range(10, 150):
        assert np.all(chunk(right, k) == value(k)), k
        assert np.all(chunk(left, k) == value(k)), k
    assert rec.stats().resyncs == 0


def test_jitter_never_pulls_the_anchor_past_the_least_delayed_packet() -> None:
    """Random network delay of 0..80 ms per packet (in arrival order): the anchor settles on
    the quickest packet and stays; flushes in between change nothing."""
    rng = np.random.default_rng(7)
    delays = rng.integers(0, 81, size=500) / 1000
    delays[0] = 0.06
    delays[[40, 300]] = 0.0
    arrivals = sorted((START + k * PTIME + delays[k], k) for k in range(500))
    rec = CallRecorder(start=START, stereo=False)
    parts = []
    next_flush = START + 1.0
    for at, k in arrivals:
        if at >= next_flush:
            parts.append(rec.flush(next_flush))
            next_flush += 1.0
        rec.feed(CALLER, packet(k), at)
    parts.append(rec.finish(START + 10.0))
    out = np.concatenate(parts)
    for k in range(40, 500):
        assert np.all(chunk(out, k) == value(k)), k
    assert rec.stats().resyncs == 0 and rec.stats().late == 0


def test_mono_mix_sums_both_sides_with_saturation() -> None:
    rec = CallRecorder(start=START, stereo=False)
    loud = 0x80  # +32124
    for k in range(5):
        rec.feed(CALLER, rtp(bytes([loud]) * SPP, ts=k * SPP, ssrc=1), START + k * PTIME)
        rec.feed(CALLEE, rtp(bytes([0xCF]) * SPP, ts=k * SPP, ssrc=2), START + k * PTIME)
    out = rec.finish(START + 5 * PTIME)
    assert out.dtype == np.int16 and out.shape == (5 * SPP,)
    assert np.all(out == 32767)
    rec = CallRecorder.from_settings(RecordingSettings(stereo=False), start=START)
    rec.feed(CALLER, rtp(bytes([0xCF]) * SPP, ts=0, ssrc=1), START)
    rec.feed(CALLEE, rtp(bytes([0x4F]) * SPP, ts=0, ssrc=2), START)  # -924
    assert not rec.finish(START + PTIME).any()


def test_flush_output_totals_the_talk_time() -> None:
    rec = CallRecorder(start=START)
    feed_stream(rec, CALLER, range(100))
    parts = [rec.flush(START + 0.5), rec.flush(START + 1.3), rec.finish(START + 2.345)]
    assert sum(len(p) for p in parts) == round(2.345 * SAMPLE_RATE)
    assert rec.emitted_seconds == pytest.approx(2.345, abs=1 / SAMPLE_RATE)
    assert rec.flush(START + 5.0).shape == (0, 2)  # finished


def test_silent_call_still_produces_time() -> None:
    rec = CallRecorder(start=START)
    out = rec.flush(START + 5.0)
    assert out.shape == (int(4.8 * SAMPLE_RATE), 2) and not out.any()


def test_memory_is_bounded_by_the_flush_window() -> None:
    rec = CallRecorder(start=START)
    flush_every = 5.0
    total = 0
    next_flush = flush_every
    for k in range(int(120 / PTIME)):  # a 2-minute call, both sides
        t = k * PTIME
        rec.feed(CALLER, packet(k, ssrc=1), START + t)
        rec.feed(CALLEE, packet(k, ssrc=2, ts0=42), START + t + 0.003)
        if t >= next_flush:
            total += len(rec.flush(START + t))
            next_flush += flush_every
            assert rec.pending_packets == 0
            # Held: the jitter window plus at most one packet and a growth step, per side.
            assert rec.held_samples <= 2 * (0.2 * SAMPLE_RATE + SPP + SAMPLE_RATE)
    total += len(rec.finish(START + 120.0))
    assert total == 120 * SAMPLE_RATE
    assert rec.held_samples == 0


def test_rejects_bad_windows() -> None:
    with pytest.raises(ValueError):
        CallRecorder(start=0.0, jitter_window=-1)
    with pytest.raises(ValueError):
        CallRecorder(start=0.0, jitter_window=0.0)
