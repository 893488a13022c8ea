"""G.711 tables against known vectors and the ITU-T quantisation bounds."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from softpbx.media import g711

# (code byte, linear value) pairs from the G.711 tables (16-bit scaling as in the reference
# g711.c): mu-law 0xFF/0x7F are +0/-0, 0x00/0x80 the extremes; A-law 0xD5/0x55 the smallest
# positive/negative steps, 0xAA/0x2A the extremes.
ULAW_VECTORS = [
    (0xFF, 0),
    (0x7F, 0),
    (0x00, -32124),
    (0x80, 32124),
    (0xFE, 8),
    (0x7E, -8),
    (0xF0, 120),
    (0xEF, 132),
    (0xCF, 924),
]
ALAW_VECTORS = [
    (0xD5, 8),
    (0x55, -8),
    (0xD4, 24),
    (0xAA, 32256),
    (0x2A, -32256),
    (0xC5, 264),
    (0xF5, 528),
]


@pytest.mark.parametrize(("code", "value"), ULAW_VECTORS)
def test_ulaw_decode_vectors(code: int, value: int) -> None:
    assert g711.PCMU_DECODE[code] == value
    assert g711.ulaw_decode(bytes([code]))[0] == value


@pytest.mark.parametrize(("code", "value"), ALAW_VECTORS)
def test_alaw_decode_vectors(code: int, value: int) -> None:
    assert g711.PCMA_DECODE[code] == value
    assert g711.alaw_decode(bytes([code]))[0] == value


def test_silence_encodes_to_the_idle_codes() -> None:
    assert g711.ulaw_encode([0]) == b"\xff"
    assert g711.alaw_encode([0]) == b"\xd5"


def test_tables_are_symmetric_and_monotonic() -> None:
    # Positive half of mu-law: codes 0xFF down to 0x80 rise; A-law: sign bit flips the sign.
    ulaw_positive = g711.PCMU_DECODE[np.arange(0xFF, 0x7F, -1)]
    assert np.all(np.diff(ulaw_positive.astype(np.int32)) > 0)
    assert np.array_equal(g711.PCMU_DECODE[:128], -g711.PCMU_DECODE[128:])
    assert np.array_equal(g711.PCMA_DECODE[:128], -g711.PCMA_DECODE[128:])


@pytest.mark.parametrize(
    ("encode", "decode"),
    [(g711.PCMU_ENCODE, g711.PCMU_DECODE), (g711.PCMA_ENCODE, g711.PCMA_DECODE)],
    ids=["pcmu", "pcma"],
)
def test_round_trip_within_quantisation(encode: np.ndarray, decode: np.ndarray) -> None:
    x = np.arange(-32768, 32768)
    error = np.abs(decode[encode[x + 32768]].astype(np.int32) - x)
    in_range = np.abs(x) < 32000
    # Logarithmic steps: half a step is at most 1/32 of the magnitude (+ the smallest step).
    assert np.all(error[in_range] <= np.abs(x[in_range]) / 32 + 8)
    assert error.max() <= 644  # clipping beyond the largest reconstruction level


@pytest.mark.parametrize(
    ("encode", "decode"),
    [(g711.PCMU_ENCODE, g711.PCMU_DECODE), (g711.PCMA_ENCODE, g711.PCMA_DECODE)],
    ids=["pcmu", "pcma"],
)
def test_every_code_survives_decode_encode(encode: np.ndarray, decode: np.ndarray) -> None:
    codes = np.arange(256)
    again = encode[decode[codes].astype(np.int32) + 32768]
    same = again == codes
    # Only mu-law's negative zero (0x7F) comes back as positive zero (0xFF).
    assert set(codes[~same].tolist()) <= {0x7F}


def test_decode_by_encoding_name() -> None:
    payload = bytes([0x00, 0x80, 0xFF])
    assert g711.decode("pcmu", payload).tolist() == [-32124, 32124, 0]
    assert g711.decode("PCMA", b"\xd5").tolist() == [8]
    assert g711.decoder_table("G722") is None
    with pytest.raises(ValueError):
        g711.decode("G722", payload)


def test_tables_are_read_only() -> None:
    with pytest.raises(ValueError):
        g711.PCMU_DECODE[0] = 1


def test_matches_audioop_when_available() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # removed in Python 3.13
    codes = bytes(range(256))
    assert np.array_equal(np.frombuffer(audioop.ulaw2lin(codes, 2), np.int16), g711.PCMU_DECODE)
    assert np.array_equal(np.frombuffer(audioop.alaw2lin(codes, 2), np.int16), g711.PCMA_DECODE)
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    assert audioop.lin2ulaw(pcm.tobytes(), 2) == g711.ulaw_encode(pcm)
    assert audioop.lin2alaw(pcm.tobytes(), 2) == g711.alaw_encode(pcm)
