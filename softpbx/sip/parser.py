"""Bytes -> :class:`Request`/:class:`Response` (RFC 3261 §7, §25).

::

    generic-message = start-line *message-header CRLF [ message-body ]
    Request-Line    = Method SP Request-URI SP SIP-Version CRLF
    Status-Line     = SIP-Version SP Status-Code SP Reason-Phrase CRLF
    message-header  = field-name *(SP/HTAB) ":" SWS field-value CRLF   (folding: CRLF 1*WSP)

Only what every message needs is validated here (start line, header-line syntax, the
mandatory headers, Content-Length, CSeq); the rest is parsed when read. Every problem is a
:class:`~.errors.SipError`: nothing else can escape ``parse_message``.
"""

from __future__ import annotations

import functools
import re

from .errors import ParseError, SipError, VersionError
from .headers import COMPACT, SINGLE_HEADERS, TOKEN_RE, canonical_name, parse_uint
from .message import Message, Request, Response

_FOLD_RE = re.compile(r"\r?\n[ \t]+")
_VERSION_RE = re.compile(r"SIP/\d+\.\d+\Z", re.I)
_REQUIRED = ("via", "from", "to", "call-id", "cseq")


@functools.lru_cache(maxsize=512)
def _is_token(name: str) -> bool:
    """``field-name = token``; memoised: the same few dozen names come in every message."""
    return TOKEN_RE.match(name) is not None


def header_end(data: bytes | bytearray, start: int = 0) -> tuple[int, int]:
    """(index of the blank line, length of the separator) or (-1, 0)."""
    i = data.find(b"\r\n\r\n", start)
    if i >= 0:
        return i, 4
    i = data.find(b"\n\n", start)
    if i >= 0:
        return i, 2
    return -1, 0


def parse_message(data: bytes, *, stream: bool = False, complete: bool = True) -> Request | Response:
    """Parse one message.

    ``stream``: the bytes came from a connection-oriented transport, where Content-Length
    is mandatory (RFC 3261 §18.3). On a datagram, octets beyond Content-Length are ignored.
    ``complete``: nothing more will follow (a datagram, or a stream at EOF), so a header block
    missing its final empty line is read as ending there.

    Raises :class:`SipError`; when the start line and headers were readable the exception's
    ``message`` attribute holds the partial request so that a response can be built.
    """
    # RFC 3261 §7.5: CRLFs before the start line are ignored.
    start = 0
    while data.startswith(b"\r\n", start):
        start += 2
    end, sep = header_end(data, start)
    if end < 0 and complete and data.endswith(b"\n"):
        # Liberal: a datagram whose last header line lacks the empty line after it.
        sep = 4 if data.endswith(b"\r\n") else 2
        end = len(data) - sep // 2
        data = data + (b"\r\n" if sep == 4 else b"\n")
    if end < 0 or end < start:
        raise ParseError("No end of headers")
    head = data[start:end].decode("utf-8", "surrogateescape")
    if "\n " in head or "\n\t" in head:
        head = _FOLD_RE.sub(" ", head)
    lines = head.split("\r\n") if sep == 4 else [ln.rstrip("\r") for ln in head.split("\n")]
    first = lines[0]
    headers: list[tuple[str, str]] = []
    index: dict[str, list[str]] = {}
    line_error: SipError | None = None
    for line in lines[1:]:
        colon = line.find(":")
        if colon <= 0:
            line_error = line_error or ParseError("Malformed header line")
            continue  # keep reading: the answer still needs Via, From, To, Call-ID, CSeq
        name = line[:colon].rstrip(" \t")
        if not _is_token(name):
            line_error = line_error or ParseError("Malformed header name")
            continue
        value = line[colon + 1 :].strip(" \t")
        headers.append((name, value))
        lname = name.lower()
        if len(lname) == 1:
            lname = COMPACT.get(lname, lname)
        lst = index.get(lname)
        if lst is None:
            index[lname] = [value]
        else:
            lst.append(value)
    body = data[end + sep :]

    msg: Request | Response
    start_error: SipError | None = None
    # RFC 3261 §7.1: the SIP-Version is case-insensitive on receipt (``sip/2.0``); we always
    # send upper case. The exact comparison comes first: it is what every peer sends.
    if first.startswith("SIP/") or first[:4].upper() == "SIP/":
        parts = first.split(" ", 2)
        if len(parts) < 2 or (parts[0] != "SIP/2.0" and parts[0].upper() != "SIP/2.0"):
            raise VersionError("Bad response version")
        code = parts[1]
        if len(code) != 3 or not (code.isascii() and code.isdigit()) or not 100 <= int(code) <= 699:
            raise ParseError("Bad status code")
        msg = Response(int(code), parts[2] if len(parts) > 2 else "", headers)
    else:
        parts = first.split(" ")
        if len(parts) != 3:
            # Keep what can be kept so that a 400 can still be sent.
            start_error = ParseError("Malformed Request-Line")
            parts = [parts[0], parts[1] if len(parts) > 1 else "", "SIP/2.0"]
        method, uri, version = parts
        if not TOKEN_RE.match(method):
            raise ParseError("Bad method")
        if start_error is None and (not uri or uri[0] == "<"):
            start_error = ParseError("Bad Request-URI")
        msg = Request(method, uri, headers)
        if start_error is None and version != "SIP/2.0" and version.upper() != "SIP/2.0":
            if _VERSION_RE.match(version):
                start_error = VersionError("Version Not Supported")
            else:
                start_error = ParseError("Bad SIP-Version")
    msg._index = index

    try:
        cl_values = index.get("content-length")
        if cl_values is not None:
            if len(cl_values) > 1:
                raise ParseError("Multiple Content-Length values")
            v = cl_values[0].strip()
            if v.startswith("-"):
                raise ParseError("Negative Content-Length")
            length = parse_uint(v, "Content-Length")
            if length > len(body):
                raise ParseError("Content-Length larger than message")
            body = body[:length]
        elif stream:
            raise ParseError("Missing Content-Length")
        msg.body = body
        for name in _REQUIRED:
            if name not in index:
                raise ParseError(f"Missing {canonical_name(name)} header")
        for name in SINGLE_HEADERS:
            lst = index.get(name)
            if lst is not None and len(lst) > 1:
                raise ParseError(f"Multiple {canonical_name(name)} values")
        if start_error is not None:
            raise start_error
        if line_error is not None:
            raise line_error
        cseq = msg.cseq
        if isinstance(msg, Request):
            if cseq.method != msg.method:
                raise ParseError("CSeq method does not match Request-Line")
            msg.uri  # noqa: B018 - validates the Request-URI syntax now
            msg.from_  # noqa: B018
            msg.to  # noqa: B018
            msg.max_forwards  # noqa: B018
        msg.top_via  # noqa: B018
    except SipError as exc:
        exc.message = msg  # type: ignore[attr-defined]
        raise
    return msg


def parse_or_none(data: bytes, *, stream: bool = False) -> Message | None:
    """Parse, returning ``None`` instead of raising (for tests and tools)."""
    try:
        return parse_message(data, stream=stream)
    except SipError:
        return None
