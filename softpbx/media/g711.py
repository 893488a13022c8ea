"""ITU-T G.711 PCMU (mu-law) and PCMA (A-law) as numpy lookup tables.

Decoding is one table lookup per byte: ``PCMU_DECODE[np.frombuffer(payload, np.uint8)]`` gives
int16 linear PCM. The 256-entry decode tables and the 65536-entry encode tables are built once at
import from the ITU-T G.711 algorithm (the segment/mantissa arithmetic of the reference
``g711.c``), vectorised with numpy, so there is no per-sample Python on any path.

Encoding is only needed by tests and tone generators (the switch relays G.711 untouched), but it
is cheap to keep next to the decoder and makes round-trip tests possible.

Sans-IO: stdlib + numpy only.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "PCMA_DECODE",
    "PCMA_ENCODE",
    "PCMU_DECODE",
    "PCMU_ENCODE",
    "alaw_decode",
    "alaw_encode",
    "decode",
    "decoder_table",
    "ulaw_decode",
    "ulaw_encode",
]

Int16Array = npt.NDArray[np.int16]
Uint8Array = npt.NDArray[np.uint8]


def _build_ulaw_decode() -> Int16Array:
    # G.711 §3 (mu-law): the code word is transmitted inverted; bit 7 is the sign (1 = positive),
    # bits 6..4 the segment (exponent), bits 3..0 the step within the segment. The biased
    # magnitude is ((2 * mantissa + 33) << exponent) - 33 in 14-bit units; scaled by 4 (<< 2)
    # to 16-bit: ((mantissa << 3) + 0x84) << exponent) - 0x84.
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def _build_alaw_decode() -> Int16Array:
    # G.711 §2 (A-law): even bits are inverted on the line (XOR 0x55); bit 7 is the sign
    # (1 = positive), bits 6..4 the segment, bits 3..0 the step. Segment 0 is linear (no implied
    # leading one), segments >= 1 add the leading one (0x100) and shift by segment - 1. The
    # reconstruction point is the middle of the step (+8 in 16-bit units).
    a = np.arange(256, dtype=np.int32) ^ 0x55
    segment = (a & 0x70) >> 4
    step = (a & 0x0F) << 4
    magnitude = np.where(
        segment == 0,
        step + 8,
        (step + 0x108) << np.maximum(segment - 1, 0),
    )
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


def _build_ulaw_encode() -> Uint8Array:
    # Reference g711.c linear2ulaw(): work on the 14-bit magnitude (16-bit >> 2), clip at 8159,
    # add the bias 33, find the segment = position of the leading one above bit 5, take the four
    # bits below it, invert the whole code word.
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 2
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm), 8159) + (0x84 >> 2)
    segment_ends = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
    segment = np.searchsorted(segment_ends, magnitude, side="left")
    code = (segment << 4) | ((magnitude >> (segment + 1)) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)
    return ((code ^ mask) & 0xFF).astype(np.uint8)


def _build_alaw_encode() -> Uint8Array:
    # Reference g711.c linear2alaw(): 13-bit value (16-bit >> 3); negative values use the
    # one's complement magnitude; segment from the leading one; XOR 0xD5 (positive) or 0x55
    # (negative) sets the sign and inverts the even bits. Values beyond segment 7 saturate.
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 3
    negative = pcm < 0
    mask = np.where(negative, 0x55, 0xD5)
    magnitude = np.where(negative, -pcm - 1, pcm)
    segment_ends = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
    segment = np.searchsorted(segment_ends, magnitude, side="left")
    shift = np.where(segment < 2, 1, segment)
    code = (segment << 4) | ((magnitude >> shift) & 0x0F)
    code = np.where(segment >= 8, 0x7F, code)
    return ((code ^ mask) & 0xFF).astype(np.uint8)


PCMU_DECODE: Final[Int16Array] = _build_ulaw_decode()
"""mu-law code byte -> int16 linear sample (256 entries)."""
PCMA_DECODE: Final[Int16Array] = _build_alaw_decode()
"""A-law code byte -> int16 linear sample (256 entries)."""
PCMU_ENCODE: Final[Uint8Array] = _build_ulaw_encode()
"""int16 linear sample + 32768 -> mu-law code byte (65536 entries)."""
PCMA_ENCODE: Final[Uint8Array] = _build_alaw_encode()
"""int16 linear sample + 32768 -> A-law code byte (65536 entries)."""
for _table in (PCMU_DECODE, PCMA_DECODE, PCMU_ENCODE, PCMA_ENCODE):
    _table.flags.writeable = False  # shared module-level tables must never be mutated

_DECODERS: Final[dict[str, Int16Array]] = {"PCMU": PCMU_DECODE, "PCMA": PCMA_DECODE}


def decoder_table(encoding: str) -> Int16Array | None:
    """The decode table for an SDP encoding name (``PCMU``/``PCMA``, any case), else ``None``."""
    return _DECODERS.get(encoding.upper())


def ulaw_decode(payload: bytes | bytearray | memoryview) -> Int16Array:
    """Decode mu-law bytes to int16 PCM."""
    return PCMU_DECODE[np.frombuffer(payload, dtype=np.uint8)]


def alaw_decode(payload: bytes | bytearray | memoryview) -> Int16Array:
    """Decode A-law bytes to int16 PCM."""
    return PCMA_DECODE[np.frombuffer(payload, dtype=np.uint8)]


def decode(encoding: str, payload: bytes | bytearray | memoryview) -> Int16Array:
    """Decode a PCMU or PCMA payload; ``ValueError`` for any other encoding."""
    table = decoder_table(encoding)
    if table is None:
        raise ValueError(f"not a G.711 encoding: {encoding!r}")
    return table[np.frombuffer(payload, dtype=np.uint8)]


def _as_index(pcm: npt.ArrayLike) -> npt.NDArray[np.int32]:
    return np.asarray(pcm, dtype=np.int16).astype(np.int32) + 32768


def ulaw_encode(pcm: npt.ArrayLike) -> bytes:
    """Encode int16 PCM to mu-law bytes."""
    return PCMU_ENCODE[_as_index(pcm)].tobytes()


def alaw_encode(pcm: npt.ArrayLike) -> bytes:
    """Encode int16 PCM to A-law bytes."""
    return PCMA_ENCODE[_as_index(pcm)].tobytes()
