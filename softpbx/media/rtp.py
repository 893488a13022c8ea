"""RTP (RFC 3550) and RTCP packet helpers: fixed-header parsing, RTCP detection, building.

The relay itself never parses packets (it forwards bytes); these are for the recorder, tone
senders and tests. :func:`unpack_header` is the fast form: one ``struct`` call, a plain tuple,
no object per packet.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "RTP_HEADER_SIZE",
    "RtpError",
    "RtpHeader",
    "build_rtcp_receiver_report",
    "build_rtp",
    "is_rtcp",
    "parse_header",
    "rtp_payload",
    "unpack_header",
]

RTP_HEADER_SIZE = 12
"""Length of the RTP fixed header (no CSRCs, no extension)."""

# RFC 3550 §5.1 fixed header:
#  0                   1                   2                   3
#  |V=2|P|X|  CC   |M|     PT      |       sequence number         |
#  |                           timestamp                           |
#  |           synchronization source (SSRC) identifier            |
_FIXED = struct.Struct("!BBHII")
_unpack_fixed = _FIXED.unpack_from
_pack_fixed = _FIXED.pack
_EXT = struct.Struct("!HH")


class RtpError(ValueError):
    """A datagram is not a well-formed RTP packet."""


@dataclass(frozen=True, slots=True)
class RtpHeader:
    """The RTP fixed header (RFC 3550 §5.1) plus where the payload starts."""

    version: int
    """Always 2 for RTP."""
    padding: bool
    """P bit: the payload ends with padding whose length is its last byte."""
    extension: bool
    """X bit: a header extension follows the CSRC list."""
    csrc_count: int
    """CC: number of CSRC identifiers."""
    marker: bool
    """M bit (start of a talkspurt for audio)."""
    payload_type: int
    """PT, 0..127."""
    sequence: int
    """16-bit sequence number."""
    timestamp: int
    """32-bit RTP timestamp."""
    ssrc: int
    """Synchronization source."""
    payload_offset: int
    """Offset of the payload in the packet (after CSRCs and any extension)."""
    payload_end: int
    """End of the payload (before any padding)."""


def unpack_header(data: bytes) -> tuple[int, int, int, int, int]:
    """``(marker, payload_type, sequence, timestamp, ssrc)`` of an RTP packet, fast.

    Checks only the length and the version; raises :class:`RtpError` otherwise.
    """
    if len(data) < RTP_HEADER_SIZE:
        raise RtpError("shorter than the RTP header")
    b0, b1, seq, ts, ssrc = _unpack_fixed(data)
    if b0 >> 6 != 2:
        raise RtpError("not RTP version 2")
    return b1 >> 7, b1 & 0x7F, seq, ts, ssrc


def payload_bounds(data: bytes) -> tuple[int, int, int, int, int, int, int] | None:
    """``(first octet, second octet, sequence, timestamp, ssrc, payload start, payload end)``
    of an RTP v2 packet, or ``None`` (not version 2, truncated, bad padding): the header walk
    (RFC 3550 §5.1, §5.3.1) without building an object, shared by :func:`parse_header` and the
    recorder's flush loop."""
    if len(data) < RTP_HEADER_SIZE:
        return None
    b0, b1, seq, ts, ssrc = _unpack_fixed(data)
    if b0 >> 6 != 2:
        return None
    offset = RTP_HEADER_SIZE + 4 * (b0 & 0x0F)
    if b0 & 0x10:
        # RFC 3550 §5.3.1: 16-bit profile-defined id, 16-bit length in 32-bit words.
        if len(data) < offset + 4:
            return None
        _, words = _EXT.unpack_from(data, offset)
        offset += 4 + 4 * words
    end = len(data)
    if b0 & 0x20:
        if data[-1] == 0:
            return None
        end -= data[-1]
    if offset > end:
        return None
    return b0, b1, seq, ts, ssrc, offset, end


def parse_header(data: bytes) -> RtpHeader:
    """The full RTP header of ``data``, with payload bounds (CSRCs, extension, padding)."""
    fields = payload_bounds(data)
    if fields is None:
        raise RtpError("not a well-formed RTP version 2 packet")
    b0, b1, seq, ts, ssrc, offset, end = fields
    cc = b0 & 0x0F
    return RtpHeader(
        version=2,
        padding=bool(b0 & 0x20),
        extension=bool(b0 & 0x10),
        csrc_count=cc,
        marker=bool(b1 & 0x80),
        payload_type=b1 & 0x7F,
        sequence=seq,
        timestamp=ts,
        ssrc=ssrc,
        payload_offset=offset,
        payload_end=end,
    )


def rtp_payload(data: bytes) -> bytes:
    """The payload of an RTP packet (CSRCs, extension and padding removed)."""
    if len(data) >= RTP_HEADER_SIZE and data[0] == 0x80:
        return data[RTP_HEADER_SIZE:]  # the common case: V=2, no P/X/CC
    header = parse_header(data)
    return data[header.payload_offset : header.payload_end]


def is_rtcp(data: bytes) -> bool:
    """Whether ``data`` looks like RTCP rather than RTP.

    RFC 5761 §4: with RTP and RTCP on one port, the second byte tells them apart: RTCP
    packet types 192..223 (SR 200, RR 201, SDES 202, BYE 203, APP 204, RTPFB/PSFB 205/206)
    collide only with RTP payload types 64..95 plus the marker bit, which are not used.
    """
    return len(data) >= 8 and data[0] >> 6 == 2 and 192 <= data[1] <= 223


def build_rtp(
    payload_type: int,
    sequence: int,
    timestamp: int,
    ssrc: int,
    payload: bytes,
    *,
    marker: bool = False,
) -> bytes:
    """An RTP packet with the fixed header only (V=2, no padding/extension/CSRC)."""
    b1 = (0x80 if marker else 0) | (payload_type & 0x7F)
    return (
        _pack_fixed(0x80, b1, sequence & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc & 0xFFFFFFFF)
        + payload
    )


def build_rtcp_receiver_report(ssrc: int) -> bytes:
    """An RTCP receiver report with no report blocks (RFC 3550 §6.4.2): 8 bytes."""
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc & 0xFFFFFFFF)
