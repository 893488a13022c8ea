"""SDP (RFC 4566) parsing and serialization, and the rewrites a media-relaying B2BUA needs.

The model keeps every line it read, in order and with its own line ending, so an SDP that is
parsed and serialized unchanged comes back byte for byte (unknown lines are kept verbatim). The
fields a B2BUA reads -- ``m=`` lines, ``c=``, ``a=rtpmap``/``fmtp``/``ptime``, the direction
attributes and ``a=rtcp`` (RFC 3605) -- are validated when parsed, so the accessors below never
fail later. Every malformed body raises :class:`SdpError` (``488 Not Acceptable Here``) and
nothing else.

Offer/answer (RFC 3264) helpers: :func:`rewrite` points an SDP at the relay (``c=`` and ``m=``
ports), :class:`LocalOrigin` produces our own ``o=`` line per leg with a version that only moves
when what we send changes (RFC 3264 §8), :func:`direction` / :func:`set_direction` /
:func:`is_hold` read and write hold state (RFC 3264 §8.4, and the RFC 2543 ``c=0.0.0.0`` form).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Literal

__all__ = [
    "ICE_ATTRIBUTES",
    "STATIC_PAYLOAD_TYPES",
    "Codec",
    "Connection",
    "Direction",
    "LocalOrigin",
    "MediaDescription",
    "Origin",
    "RtcpAttribute",
    "SdpError",
    "SdpLine",
    "SessionDescription",
    "answer_direction",
    "direction",
    "is_hold",
    "media_address",
    "parse_sdp",
    "rewrite",
    "rtcp_address",
    "set_direction",
]


class SdpError(ValueError):
    """An SDP body is malformed or unusable; the INVITE/answer deserves ``488``."""

    status_hint: int = 488

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Direction(StrEnum):
    """RFC 3264 §5.1 / RFC 4566 §6 media direction attributes."""

    SENDRECV = "sendrecv"
    SENDONLY = "sendonly"
    RECVONLY = "recvonly"
    INACTIVE = "inactive"


_DIRECTIONS = {d.value: d for d in Direction}

# RFC 3264 §6.1: the answer's direction mirrors the offer's.
_ANSWER_DIRECTION = {
    Direction.SENDRECV: Direction.SENDRECV,
    Direction.SENDONLY: Direction.RECVONLY,
    Direction.RECVONLY: Direction.SENDONLY,
    Direction.INACTIVE: Direction.INACTIVE,
}

# RFC 3551 §6 table 4: static audio payload types -> (encoding name, clock rate, channels).
STATIC_PAYLOAD_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("PCMU", 8000, 1),
    3: ("GSM", 8000, 1),
    4: ("G723", 8000, 1),
    5: ("DVI4", 8000, 1),
    6: ("DVI4", 16000, 1),
    7: ("LPC", 8000, 1),
    8: ("PCMA", 8000, 1),
    9: ("G722", 8000, 1),  # RFC 3551 §4.5.2: 8000 in SDP although sampled at 16 kHz
    10: ("L16", 44100, 2),
    11: ("L16", 44100, 1),
    12: ("QCELP", 8000, 1),
    13: ("CN", 8000, 1),
    14: ("MPA", 90000, 1),
    15: ("G728", 8000, 1),
    16: ("DVI4", 11025, 1),
    17: ("DVI4", 22050, 1),
    18: ("G729", 8000, 1),
}

ICE_ATTRIBUTES: tuple[str, ...] = (
    "candidate",
    "remote-candidates",
    "end-of-candidates",
    "ice-ufrag",
    "ice-pwd",
    "ice-options",
    "ice-lite",
)
"""Attribute names a relaying B2BUA may pass as ``rewrite(drop_attributes=...)``: the phone's
ICE candidates are meaningless once media goes through the relay."""


@dataclass(frozen=True, slots=True)
class SdpLine:
    """One ``<type>=<value>`` line exactly as read (a blank line has ``type == ""``)."""

    type: str
    """The one-letter type (``v``, ``o``, ``c``, ``a`` ...); empty for a blank line."""
    value: str
    """Everything after ``=`` (for a blank line: its whitespace)."""
    eol: str = "\r\n"
    """The line's own ending: ``\\r\\n``, ``\\n`` or ``""`` for a last line without one."""

    def render(self) -> str:
        """The line as text, including its ending."""
        if not self.type:
            return self.value + self.eol
        return f"{self.type}={self.value}{self.eol}"

    @property
    def attribute(self) -> tuple[str, str | None]:
        """For an ``a=`` line: ``(name, value)``; ``value`` is ``None`` for a flag attribute."""
        name, sep, val = self.value.partition(":")
        return name.strip(), (val if sep else None)


@dataclass(frozen=True, slots=True)
class Connection:
    """``c=`` (RFC 4566 §5.7): ``c=<nettype> <addrtype> <connection-address>``."""

    net_type: str
    """``IN``."""
    addr_type: str
    """``IP4`` or ``IP6``."""
    address: str
    """The address, with any multicast ``/ttl[/count]`` suffix."""

    @property
    def host(self) -> str:
        """The address without a multicast suffix."""
        return self.address.split("/", 1)[0]

    @property
    def is_unspecified(self) -> bool:
        """``0.0.0.0`` or ``::``: the RFC 2543 way of putting a stream on hold."""
        return _is_unspecified(self.host)

    def render(self) -> str:
        """The value of the ``c=`` line."""
        return f"{self.net_type} {self.addr_type} {self.address}"

    @classmethod
    def for_address(cls, host: str) -> Connection:
        """``IN IP4 host`` or ``IN IP6 host`` by the address family of ``host``."""
        return cls("IN", "IP6" if ":" in host else "IP4", host)


@dataclass(frozen=True, slots=True)
class Origin:
    """``o=`` (RFC 4566 §5.2): ``o=<username> <sess-id> <sess-version> <nettype> <addrtype> <addr>``."""

    username: str
    """``-`` when there is no user concept."""
    session_id: str
    """Numeric string, unique per session of this origin."""
    session_version: int
    """Incremented each time the session description changes."""
    net_type: str
    """``IN``."""
    addr_type: str
    """``IP4`` or ``IP6``."""
    address: str
    """Address of the machine the session was created on."""

    def render(self) -> str:
        """The value of the ``o=`` line."""
        return (
            f"{self.username} {self.session_id} {self.session_version} "
            f"{self.net_type} {self.addr_type} {self.address}"
        )


@dataclass(frozen=True, slots=True)
class Codec:
    """One payload format of an RTP ``m=`` line, from ``a=rtpmap`` or RFC 3551 static types."""

    payload_type: int
    """RTP payload type (0..127)."""
    encoding: str
    """Encoding name as written (``PCMU``, ``telephone-event``, ``opus``)."""
    clock_rate: int
    """RTP clock rate in Hz."""
    channels: int = 1
    """Audio channels (the optional third ``rtpmap`` field)."""
    fmtp: str | None = None
    """The ``a=fmtp`` parameters for this payload type, if any."""


@dataclass(frozen=True, slots=True)
class RtcpAttribute:
    """``a=rtcp`` (RFC 3605): ``a=rtcp:<port> [<nettype> <addrtype> <connection-address>]``."""

    port: int
    """RTCP port."""
    connection: Connection | None = None
    """RTCP address when it differs from the ``c=`` address."""


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _int(text: str, what: str, lo: int, hi: int) -> int:
    # ``int()`` accepts "+1", " 1", "1_0" and non-ASCII digits; SDP numbers are plain ASCII digits.
    if not text or not text.isascii() or not text.isdigit() or len(text) > 20:
        raise SdpError(f"bad {what}: {text!r}")
    n = int(text)
    if not lo <= n <= hi:
        raise SdpError(f"{what} out of range: {text!r}")
    return n


def _parse_connection(value: str) -> Connection:
    # connection-field = "c=" nettype SP addrtype SP connection-address
    parts = value.split()
    if len(parts) != 3 or not parts[2].split("/", 1)[0]:
        raise SdpError(f"bad c= line: {value!r}")
    return Connection(parts[0], parts[1], parts[2])


def _first_connection(lines: list[SdpLine]) -> Connection | None:
    """The first ``c=`` among ``lines`` (one section's, or the session part's)."""
    for line in lines:
        if line.type == "c":
            return _parse_connection(line.value)
    return None


def _parse_origin(value: str) -> Origin:
    # origin-field = "o=" username SP sess-id SP sess-version SP nettype SP addrtype SP unicast-address
    parts = value.split()
    if len(parts) != 6:
        raise SdpError(f"bad o= line: {value!r}")
    version = _int(parts[2], "o= session version", 0, 2**64)
    return Origin(parts[0], parts[1], version, parts[3], parts[4], parts[5])


def _parse_rtpmap(value: str) -> tuple[int, str, int, int]:
    # a=rtpmap:<payload type> <encoding name>/<clock rate>[/<encoding parameters>]
    pt_text, _, rest = value.strip().partition(" ")
    pt = _int(pt_text, "rtpmap payload type", 0, 127)
    parts = rest.strip().split("/")
    if len(parts) not in (2, 3) or not parts[0]:
        raise SdpError(f"bad rtpmap: {value!r}")
    clock = _int(parts[1].strip(), "rtpmap clock rate", 1, 10_000_000)
    channels = _int(parts[2].strip(), "rtpmap channels", 1, 255) if len(parts) == 3 else 1
    return pt, parts[0].strip(), clock, channels


def _parse_rtcp(value: str) -> RtcpAttribute:
    # rtcp-attribute = "a=rtcp:" port [nettype space addrtype space connection-address]
    parts = value.split()
    if len(parts) not in (1, 4):
        raise SdpError(f"bad a=rtcp: {value!r}")
    port = _int(parts[0], "a=rtcp port", 0, 65535)
    conn = _parse_connection(" ".join(parts[1:])) if len(parts) == 4 else None
    return RtcpAttribute(port, conn)


def _parse_ptime(value: str) -> float:
    text = value.strip()
    try:
        ptime = float(text)
    except ValueError:
        raise SdpError(f"bad a=ptime: {value!r}") from None
    if not text.replace(".", "", 1).isdigit() or not 0 < ptime <= 10_000:
        raise SdpError(f"bad a=ptime: {value!r}")
    return ptime


def _validate_attribute(line: SdpLine) -> None:
    name, value = line.attribute
    if name == "rtpmap":
        _parse_rtpmap(value or "")
    elif name == "fmtp" and not (value or "").strip():
        raise SdpError("empty a=fmtp")
    elif name == "ptime":
        _parse_ptime(value or "")
    elif name == "rtcp":
        _parse_rtcp(value or "")


@dataclass(slots=True)
class MediaDescription:
    """One media section: its ``m=`` line and the lines that follow it (RFC 4566 §5.14).

    ``m=<media> <port>[/<number of ports>] <proto> <fmt> ...``
    """

    media: str
    """``audio``, ``video``, ``image``, ``application`` ..."""
    port: int
    """Transport port; ``0`` means the stream is rejected/disabled (RFC 3264 §6)."""
    port_count: int | None
    """The optional ``/<number of ports>``."""
    proto: str
    """``RTP/AVP``, ``RTP/SAVP``, ``udptl`` ..."""
    formats: list[str]
    """Formats in preference order (payload type numbers for RTP)."""
    lines: list[SdpLine] = field(default_factory=list)
    """The lines after ``m=`` up to the next ``m=``, in order."""
    eol: str = "\r\n"
    """The ``m=`` line's own ending."""
    _raw: str = ""
    _orig: tuple[object, ...] = ()

    def _fields(self) -> tuple[object, ...]:
        return (self.media, self.port, self.port_count, self.proto, tuple(self.formats))

    def m_value(self) -> str:
        """The value of the ``m=`` line (verbatim when its fields are unchanged)."""
        if self._raw and self._fields() == self._orig:
            return self._raw
        port = f"{self.port}/{self.port_count}" if self.port_count is not None else str(self.port)
        return " ".join([self.media, port, self.proto, *self.formats])

    def render(self) -> str:
        """The section as text."""
        return f"m={self.m_value()}{self.eol}" + "".join(line.render() for line in self.lines)

    def copy(self) -> MediaDescription:
        """An independent copy (lines are immutable and shared)."""
        return replace(self, formats=list(self.formats), lines=list(self.lines))

    @property
    def is_rtp(self) -> bool:
        """The transport is RTP (``RTP/AVP``, ``RTP/SAVP``, ``UDP/TLS/RTP/SAVPF`` ...)."""
        return "RTP/" in self.proto.upper()

    @property
    def connection(self) -> Connection | None:
        """The media-level ``c=``, if any."""
        return _first_connection(self.lines)

    def attributes(self, name: str) -> list[str | None]:
        """Values of this section's ``a=<name>`` lines, in order."""
        out: list[str | None] = []
        for line in self.lines:
            if line.type == "a":
                attr, value = line.attribute
                if attr == name:
                    out.append(value)
        return out

    @property
    def direction(self) -> Direction | None:
        """The media-level direction attribute, if any (see :func:`direction`)."""
        return _direction_of(self.lines)

    @property
    def ptime(self) -> float | None:
        """``a=ptime`` in milliseconds, if given."""
        values = self.attributes("ptime")
        return _parse_ptime(values[0] or "") if values else None

    @property
    def rtcp(self) -> RtcpAttribute | None:
        """``a=rtcp`` (RFC 3605), if given."""
        values = self.attributes("rtcp")
        return _parse_rtcp(values[0] or "") if values else None

    def codecs(self) -> list[Codec]:
        """The RTP payload formats in ``m=`` order, named by ``a=rtpmap`` or RFC 3551.

        Dynamic payload types without an ``a=rtpmap`` are left out; non-RTP sections have none.
        """
        if not self.is_rtp:
            return []
        maps: dict[int, tuple[str, int, int]] = {}
        fmtps: dict[int, str] = {}
        for line in self.lines:
            if line.type != "a":
                continue
            name, value = line.attribute
            if name == "rtpmap":
                pt, enc, clock, channels = _parse_rtpmap(value or "")
                maps.setdefault(pt, (enc, clock, channels))
            elif name == "fmtp":
                fmt, _, params = (value or "").strip().partition(" ")
                if fmt.isascii() and fmt.isdigit() and len(fmt) < 4:
                    fmtps.setdefault(int(fmt), params.strip())
        out = []
        for fmt in self.formats:
            pt = int(fmt)
            entry = maps.get(pt) or STATIC_PAYLOAD_TYPES.get(pt)
            if entry is not None:
                out.append(Codec(pt, entry[0], entry[1], entry[2], fmtps.get(pt)))
        return out


def _direction_of(lines: list[SdpLine]) -> Direction | None:
    for line in lines:
        if line.type == "a":
            found = _DIRECTIONS.get(line.value.strip())
            if found is not None:
                return found
    return None


@dataclass(slots=True)
class SessionDescription:
    """A parsed SDP: the session-level lines in order, then the media sections."""

    lines: list[SdpLine]
    """Session-level lines (``v=`` ... up to the first ``m=``), in order."""
    media: list[MediaDescription]
    """Media sections in order."""

    def to_bytes(self) -> bytes:
        """The SDP as bytes; identical to the input when nothing was changed."""
        return str(self).encode("utf-8", "surrogateescape")

    def __str__(self) -> str:
        return "".join(line.render() for line in self.lines) + "".join(
            m.render() for m in self.media
        )

    def copy(self) -> SessionDescription:
        """An independent copy, safe to modify."""
        return SessionDescription(list(self.lines), [m.copy() for m in self.media])

    @property
    def origin(self) -> Origin:
        """The ``o=`` line."""
        for line in self.lines:
            if line.type == "o":
                return _parse_origin(line.value)
        raise SdpError("no o= line")  # parse_sdp guarantees one; only reachable after edits

    @property
    def connection(self) -> Connection | None:
        """The session-level ``c=``, if any."""
        return _first_connection(self.lines)

    @property
    def direction(self) -> Direction | None:
        """The session-level direction attribute, if any (see :func:`direction`)."""
        return _direction_of(self.lines)


def _split_lines(text: str) -> list[SdpLine]:
    # RFC 4566 §5: lines end in CRLF, but parsers SHOULD accept a bare LF too.
    lines: list[SdpLine] = []
    pos, n = 0, len(text)
    while pos < n:
        nl = text.find("\n", pos)
        if nl < 0:
            content, eol, pos = text[pos:], "", n
        else:
            end, eol = nl, "\n"
            if end > pos and text[end - 1] == "\r":
                end, eol = end - 1, "\r\n"
            content, pos = text[pos:end], nl + 1
        if not content.strip():
            lines.append(SdpLine("", content, eol))
            continue
        # RFC 4566 §5: <type>=<value>, <type> exactly one case-significant letter.
        if len(content) < 2 or content[1] != "=" or not ("a" <= content[0] <= "z"):
            raise SdpError(f"bad SDP line: {content[:40]!r}")
        lines.append(SdpLine(content[0], content[2:], eol))
    return lines


def _parse_media_line(line: SdpLine) -> MediaDescription:
    # media-field = "m=" media SP port ["/" integer] SP proto 1*(SP fmt)
    parts = line.value.split()
    if len(parts) < 3:
        raise SdpError(f"bad m= line: {line.value!r}")
    port_text, slash, count_text = parts[1].partition("/")
    port = _int(port_text, "m= port", 0, 65535)
    count = _int(count_text, "m= port count", 1, 65535) if slash else None
    media = MediaDescription(parts[0], port, count, parts[2], parts[3:], [], line.eol, line.value)
    if media.is_rtp:
        for fmt in media.formats:
            _int(fmt, "RTP payload type", 0, 127)
    media._orig = media._fields()
    return media


def parse_sdp(data: bytes | str) -> SessionDescription:
    """Parse an SDP body (RFC 4566).

    Raises :class:`SdpError` for anything malformed: no ``v=0`` first, no valid ``o=``, a
    broken ``m=``/``c=``/``a=rtpmap``/``a=fmtp``/``a=ptime``/``a=rtcp`` line, or an active
    stream with no connection address at either level.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        text = bytes(data).decode("utf-8", "surrogateescape")
    elif isinstance(data, str):
        try:
            text = data
            text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise SdpError("SDP text is not encodable") from None
    else:
        raise SdpError(f"SDP must be bytes or str, not {type(data).__name__}")
    lines = _split_lines(text)
    significant = [line for line in lines if line.type]
    if not significant:
        raise SdpError("empty SDP")
    if significant[0].type != "v" or significant[0].value.strip() != "0":
        raise SdpError("SDP must start with v=0")

    session: list[SdpLine] = []
    media: list[MediaDescription] = []
    origin_seen = False
    for line in lines:
        if line.type == "m":
            media.append(_parse_media_line(line))
            continue
        target = media[-1].lines if media else session
        if line.type == "c":
            _parse_connection(line.value)
        elif line.type == "a":
            _validate_attribute(line)
        elif line.type == "o" and not media:
            _parse_origin(line.value)
            origin_seen = True
        target.append(line)
    if not origin_seen:
        raise SdpError("no o= line")
    sdp = SessionDescription(session, media)
    if sdp.connection is None:
        for m in media:
            if m.port != 0 and m.connection is None:
                raise SdpError(f"no c= for active {m.media} stream")
    return sdp


# -- offer/answer helpers --------------------------------------------------------------------


def _effective_connection(sdp: SessionDescription, media: MediaDescription) -> Connection | None:
    return media.connection or sdp.connection


def direction(sdp: SessionDescription, index: int = 0) -> Direction:
    """The direction of media section ``index``: media level, else session level, else sendrecv."""
    media = sdp.media[index]
    return media.direction or sdp.direction or Direction.SENDRECV


def answer_direction(offered: Direction) -> Direction:
    """The direction an answer takes for an offered one (RFC 3264 §6.1)."""
    return _ANSWER_DIRECTION[offered]


def is_hold(sdp: SessionDescription, index: int | None = None) -> bool:
    """Whether the SDP puts media on hold: ``sendonly``/``inactive`` (RFC 3264 §8.4) or the
    RFC 2543 ``c=0.0.0.0``. With ``index=None``: whether every active stream is on hold."""
    indexes = range(len(sdp.media)) if index is None else [index]
    active = [i for i in indexes if sdp.media[i].port != 0]
    if not active:
        return False
    for i in active:
        conn = _effective_connection(sdp, sdp.media[i])
        held = direction(sdp, i) in (Direction.SENDONLY, Direction.INACTIVE)
        if not held and not (conn is not None and conn.is_unspecified):
            return False
    return True


def set_direction(
    sdp: SessionDescription, value: Direction, index: int | None = None
) -> SessionDescription:
    """A copy with media section ``index`` (every section when ``None``) set to ``value``.

    An existing media-level direction attribute is replaced in place; otherwise one is
    appended to the section (media level overrides session level, RFC 4566 §6).
    """
    out = sdp.copy()
    targets = range(len(out.media)) if index is None else [index]
    for i in targets:
        media = out.media[i]
        new_lines: list[SdpLine] = []
        done = False
        for line in media.lines:
            if line.type == "a" and line.value.strip() in _DIRECTIONS:
                if not done:
                    new_lines.append(SdpLine("a", value.value, line.eol))
                    done = True
                continue
            new_lines.append(line)
        if not done:
            _append_line(media, new_lines, SdpLine("a", value.value, media.eol or "\r\n"))
        media.lines = new_lines
    return out


def _append_line(media: MediaDescription, lines: list[SdpLine], line: SdpLine) -> None:
    # Keep trailing blank lines last, and give a last line that had no ending one first.
    at = len(lines)
    while at > 0 and not lines[at - 1].type:
        at -= 1
    if at and not lines[at - 1].eol:
        lines[at - 1] = replace(lines[at - 1], eol="\r\n")
        line = replace(line, eol="")
    elif not at and not media.eol:
        media.eol = "\r\n"  # the m= line itself was the last line
        line = replace(line, eol="")
    lines.insert(at, line)


def media_address(sdp: SessionDescription, index: int = 0) -> tuple[str, int] | None:
    """Where the SDP's owner receives RTP for section ``index``: ``(host, port)``, or ``None``
    when the stream is disabled (port 0) or on RFC 2543 hold (``c=0.0.0.0``)."""
    media = sdp.media[index]
    conn = _effective_connection(sdp, media)
    if media.port == 0 or conn is None or conn.is_unspecified:
        return None
    return conn.host, media.port


def rtcp_address(sdp: SessionDescription, index: int = 0) -> tuple[str, int] | None:
    """Where the SDP's owner receives RTCP: ``a=rtcp`` (RFC 3605), else RTP port + 1."""
    rtp = media_address(sdp, index)
    if rtp is None:
        return None
    attr = sdp.media[index].rtcp
    if attr is None:
        return rtp[0], rtp[1] + 1
    host = attr.connection.host if attr.connection is not None else rtp[0]
    return host, attr.port


def _connection_for(new_host: str, old: Connection | None, keep_hold: bool) -> Connection:
    if keep_hold and old is not None and old.is_unspecified:
        return Connection.for_address("::" if ":" in new_host else "0.0.0.0")
    return Connection.for_address(new_host)


def _rtcp_line(line: SdpLine, port: int, host: str, mode: str) -> SdpLine | None:
    if mode == "drop" or port == 0:
        return None
    attr = _parse_rtcp(line.attribute[1] or "")
    value = f"rtcp:{port + 1}"
    if attr.connection is not None:
        value += " " + Connection.for_address(host).render()
    return SdpLine("a", value, line.eol)


# RFC 4566 §5: inside a media section, c= comes after i= and before b=, k= and a=.
_AFTER_CONNECTION = frozenset("bka")


def rewrite(
    sdp: SessionDescription,
    media_addrs: list[tuple[str, int]],
    *,
    origin: Origin | None = None,
    rtcp: Literal["rewrite", "drop"] = "rewrite",
    drop_attributes: tuple[str, ...] = (),
    keep_hold: bool = True,
) -> SessionDescription:
    """A copy of ``sdp`` pointing at the relay.

    ``media_addrs[i]`` is the relay's ``(host, port)`` for media section ``i`` (one entry per
    section; port ``0`` disables the stream). Session- and media-level ``c=`` get the new host
    (``IN IP4``/``IN IP6`` by its family); a section whose host differs from the session-level
    one gets its own ``c=``. ``m=`` ports are replaced (a stream the input disabled stays at 0),
    ``a=rtcp`` becomes port + 1 or is dropped, ``a=<name>`` lines named in ``drop_attributes``
    go, ``o=`` becomes ``origin`` when given. Formats and their order, rtpmaps (including
    telephone-event) and every other line stay as they were. With ``keep_hold``, an RFC 2543
    ``c=0.0.0.0`` stays unspecified so the hold survives the relay.

    Raises ``ValueError`` (a caller bug, not an SDP problem) when ``media_addrs`` does not have
    one entry per media section.
    """
    if len(media_addrs) != len(sdp.media):
        raise ValueError(f"{len(media_addrs)} relay addresses for {len(sdp.media)} media sections")
    out = sdp.copy()
    drop = frozenset(drop_attributes)
    old_session_conn = sdp.connection
    session_host = media_addrs[0][0] if media_addrs else None
    for i, (host, port) in enumerate(media_addrs):
        if port != 0 and out.media[i].port != 0:
            session_host = host
            break

    def keep(line: SdpLine) -> bool:
        return not (line.type == "a" and line.attribute[0] in drop)

    session_lines: list[SdpLine] = []
    for line in sdp.lines:
        if not keep(line):
            continue
        if line.type == "c" and session_host is not None:
            conn = _connection_for(session_host, old_session_conn, keep_hold)
            line = SdpLine("c", conn.render(), line.eol)
        elif line.type == "o" and origin is not None:
            line = SdpLine("o", origin.render(), line.eol)
        elif line.type == "a" and line.attribute[0] == "rtcp" and media_addrs:
            new = _rtcp_line(line, media_addrs[0][1], media_addrs[0][0], rtcp)
            if new is None:
                continue
            line = new
        session_lines.append(line)
    out.lines = session_lines

    for media, (host, port) in zip(out.media, media_addrs, strict=True):
        old_conn = media.connection
        if media.port != 0:
            media.port = port
            media.port_count = None
        new_lines: list[SdpLine] = []
        has_conn = False
        for line in media.lines:
            if not keep(line):
                continue
            if line.type == "c":
                has_conn = True
                conn = _connection_for(host, old_conn, keep_hold)
                line = SdpLine("c", conn.render(), line.eol)
            elif line.type == "a" and line.attribute[0] == "rtcp":
                new = _rtcp_line(line, media.port, host, rtcp)
                if new is None:
                    continue
                line = new
            new_lines.append(line)
        if not has_conn and media.port != 0 and (old_session_conn is None or host != session_host):
            conn = _connection_for(host, old_session_conn, keep_hold)
            at = next(
                (k for k, line in enumerate(new_lines) if line.type in _AFTER_CONNECTION),
                len(new_lines),
            )
            if at == len(new_lines):
                _append_line(media, new_lines, SdpLine("c", conn.render(), media.eol or "\r\n"))
            else:
                new_lines.insert(at, SdpLine("c", conn.render(), media.eol))
        media.lines = new_lines
    return out


class LocalOrigin:
    """Our own ``o=`` line towards one leg (a B2BUA must not pass the far end's through).

    The session id is fixed for the leg; the version starts at ``version`` and goes up by one
    each time :meth:`stamp` sees an SDP that differs from the last one stamped, so a re-INVITE
    that changes nothing keeps the version, as RFC 3264 §8 requires.
    """

    __slots__ = ("_last", "address", "session_id", "username", "version")

    def __init__(
        self, *, session_id: int, address: str, version: int | None = None, username: str = "-"
    ) -> None:
        self.session_id = str(session_id)
        self.version = session_id if version is None else version
        self.address = address
        self.username = username
        self._last: str | None = None

    def current(self) -> Origin:
        """The ``o=`` as it stands."""
        conn = Connection.for_address(self.address)
        return Origin(
            self.username, self.session_id, self.version, "IN", conn.addr_type, self.address
        )

    def bump(self) -> Origin:
        """Increment the version (a new offer that must be seen as a change) and return it."""
        self.version += 1
        return self.current()

    def stamp(self, sdp: SessionDescription) -> SessionDescription:
        """A copy of ``sdp`` carrying our ``o=``; the version moves only if the rest changed."""
        probe = sdp.copy()
        probe.lines = [line for line in probe.lines if line.type != "o"]
        body = str(probe)
        if self._last is not None and body != self._last:
            self.version += 1
        self._last = body
        out = sdp.copy()
        value = self.current().render()
        out.lines = [
            SdpLine("o", value, line.eol) if line.type == "o" else line for line in out.lines
        ]
        return out
