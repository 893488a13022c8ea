"""Message bodies (RFC 5621): the SDP of a SIP message, alone or in a ``multipart/mixed``.

Carriers' interworking gateways send ``multipart/mixed`` INVITEs with the SDP next to an ISUP
part (RFC 3204), and some PBXs add their own parts; the switch reads only the SDP and ignores
the rest (RFC 5621 §3.1: a UA handles the parts it understands, ``Content-Disposition:
handling=optional`` is the usual case). The split follows RFC 2046 §5.1.1 and is strict
enough to refuse what it cannot frame (``400``) rather than guess.
"""

from __future__ import annotations

from .errors import ParseError

SDP = "application/sdp"
MULTIPART = "multipart/mixed"
_MAX_PARTS = 16
"""More parts than any real INVITE carries: a bigger body is refused, not walked."""


def media_type(value: str | None) -> str | None:
    """The ``type/subtype`` of a Content-Type value, lower-cased, parameters dropped."""
    return None if value is None else value.split(";", 1)[0].strip().lower()


def _boundary(value: str) -> bytes:
    """The ``boundary`` parameter of a multipart Content-Type (RFC 2046 §5.1.1: 1 to 70
    characters, possibly quoted)."""
    for param in value.split(";")[1:]:
        name, _, val = param.partition("=")
        if name.strip().lower() == "boundary":
            val = val.strip()
            if len(val) >= 2 and val[0] == val[-1] == '"':
                val = val[1:-1]
            if 1 <= len(val) <= 70:
                return val.encode("utf-8", "surrogateescape")
            break
    raise ParseError("multipart body without a usable boundary")


def multipart_parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """The parts of a multipart body as ``(media type, content)``, in order. A part without
    Content-Type is ``text/plain`` (RFC 2046 §5.1). Raises :class:`ParseError` (``400``) for
    a missing boundary, a part without its header/body separator, no closing delimiter."""
    boundary = _boundary(content_type)
    if b"\r\n" not in body:  # bare-LF bodies from sloppy senders: the same structure
        body = body.replace(b"\n", b"\r\n")
    # Each delimiter is CRLF "--" boundary; the first may open the body (empty preamble).
    chunks = (b"\r\n" + body).split(b"\r\n--" + boundary)
    parts: list[tuple[str, bytes]] = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            return parts  # the close delimiter; the epilogue is ignored
        if len(parts) >= _MAX_PARTS:
            raise ParseError("multipart body with too many parts")
        eol = chunk.find(b"\r\n")
        if eol < 0 or chunk[:eol].strip(b" \t"):  # only transport padding may follow
            raise ParseError("multipart delimiter followed by junk")
        part = chunk[eol + 2:]
        if part.startswith(b"\r\n"):  # no part headers at all
            head, content = b"", part[2:]
        else:
            head, sep, content = part.partition(b"\r\n\r\n")
            if not sep:
                raise ParseError("multipart part without a blank line after its headers")
        ctype = "text/plain"
        for line in head.split(b"\r\n"):
            name, _, val = line.partition(b":")
            if name.strip().lower() == b"content-type":
                ctype = media_type(val.decode("utf-8", "replace")) or ctype
        parts.append((ctype, content))
    raise ParseError("multipart body without its closing delimiter")


def sdp_of(content_type: str | None, body: bytes) -> bytes | None:
    """The SDP in a body with Content-Type ``content_type`` (the header's whole value):
    the body itself for ``application/sdp`` (or no Content-Type, as the switch always took
    it), the first ``application/sdp`` part of a ``multipart/mixed``, else ``None`` (also
    for a multipart body that cannot be split: the caller validated it already when it
    matters, :func:`multipart_parts`)."""
    if not body:
        return None
    mtype = media_type(content_type)
    if mtype is None or mtype == SDP:
        return body
    if mtype == MULTIPART:
        try:
            parts = multipart_parts(content_type or "", body)
        except ParseError:
            return None
        return next((content for ctype, content in parts if ctype == SDP and content), None)
    return None
