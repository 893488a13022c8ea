"""SIP requests and responses (RFC 3261 §7): raw headers in order, structured fields on demand.

A message keeps its headers as ``(name, value)`` pairs exactly as received (so that
``serialize(parse(b)) == b`` for well-formed input) plus an index by lower-cased full name
(compact forms expanded). Structured values (Via, From, To, CSeq ...) are parsed on first
access and cached; headers the switch never reads cost nothing beyond the split.
"""

from __future__ import annotations

from typing import Any

from .body import sdp_of
from .errors import ParseError
from .headers import (
    COMPACT,
    LIST_HEADERS,
    CSeq,
    NameAddr,
    Via,
    canonical_name,
    parse_cseq,
    parse_name_addr,
    parse_uint,
    parse_via,
    split_comma,
)
from .uri import Uri, parse_uri

REASONS = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 300: "Multiple Choices",
    301: "Moved Permanently", 302: "Moved Temporarily", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    406: "Not Acceptable", 407: "Proxy Authentication Required", 408: "Request Timeout",
    410: "Gone", 413: "Request Entity Too Large", 415: "Unsupported Media Type",
    416: "Unsupported URI Scheme", 420: "Bad Extension", 421: "Extension Required",
    423: "Interval Too Brief", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    484: "Address Incomplete", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 491: "Request Pending", 500: "Server Internal Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Server Time-out", 505: "Version Not Supported", 513: "Message Too Large",
    600: "Busy Everywhere", 603: "Decline", 604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}


_CL_NAMES = frozenset({"Content-Length", "l", "content-length"})


def full_name(name: str) -> str:
    """Lower-cased full header name for any spelling or compact form."""
    lname = name.lower()
    if len(lname) == 1:
        return COMPACT.get(lname, lname)
    return lname


class Message:
    """Common part of :class:`Request` and :class:`Response`."""

    __slots__ = ("headers", "body", "_index", "_cache")

    def __init__(self, headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> None:
        self.headers: list[tuple[str, str]] = headers if headers is not None else []
        """Header lines in order: (name as written, raw value)."""
        self.body: bytes = body
        """The message body (exactly Content-Length bytes)."""
        self._index: dict[str, list[str]] | None = None
        self._cache: dict[str, Any] = {}

    # -- raw access ---------------------------------------------------------------------------
    def _idx(self) -> dict[str, list[str]]:
        idx = self._index
        if idx is None:
            idx = {}
            for name, value in self.headers:
                lname = full_name(name)
                lst = idx.get(lname)
                if lst is None:
                    idx[lname] = [value]
                else:
                    lst.append(value)
            self._index = idx
        return idx

    def get(self, name: str) -> str | None:
        """The first raw value of header ``name`` (any case, compact form allowed)."""
        idx = self._idx()
        lst = idx.get(name)  # fast path: the core asks with lower-cased full names
        if lst is None:
            lst = idx.get(full_name(name))
        return lst[0] if lst else None

    def get_all(self, name: str) -> list[str]:
        """All raw header-line values of ``name``, in order."""
        return list(self._idx().get(full_name(name), ()))

    def values(self, name: str) -> list[str]:
        """All values of a list header, comma-split across lines (RFC 3261 §7.3.1)."""
        lname = full_name(name)
        lines = self._idx().get(lname, ())
        if lname not in LIST_HEADERS:
            return list(lines)
        out: list[str] = []
        for line in lines:
            out.extend(split_comma(line))
        return out

    def has(self, name: str) -> bool:
        """Whether header ``name`` is present."""
        return full_name(name) in self._idx()

    def _changed(self) -> None:
        self._index = None
        self._cache.clear()

    def shrink(self) -> None:
        """Drop the index and parsed fields (rebuilt on demand): a message kept only in case
        it is needed again should not weigh on memory and the garbage collector."""
        self._index = None
        self._cache.clear()

    def add(self, name: str, value: str) -> None:
        """Append a header line."""
        self.headers.append((name, value))
        self._changed()

    def add_first(self, name: str, value: str) -> None:
        """Insert a header line before every other one (a new top Via)."""
        self.headers.insert(0, (name, value))
        self._changed()

    def remove(self, name: str) -> None:
        """Remove every line of header ``name``."""
        lname = full_name(name)
        self.headers = [(n, v) for n, v in self.headers if full_name(n) != lname]
        self._changed()

    def set(self, name: str, value: str) -> None:
        """Replace all lines of ``name`` by one (in the place of the first, else at the end)."""
        lname = full_name(name)
        out: list[tuple[str, str]] = []
        done = False
        for n, v in self.headers:
            if full_name(n) == lname:
                if not done:
                    out.append((n, value))
                    done = True
            else:
                out.append((n, v))
        if not done:
            out.append((name, value))
        self.headers = out
        self._changed()

    # -- structured fields (parsed on demand, cached) ---------------------------------------
    def _cached(self, key: str, make: Any) -> Any:
        cache = self._cache
        try:
            return cache[key]
        except KeyError:
            v = cache[key] = make()
            return v

    def _required(self, name: str) -> str:
        v = self.get(name)
        if v is None:
            raise ParseError(f"Missing {canonical_name(name)} header")
        return v

    @property
    def call_id(self) -> str:
        """The Call-ID value."""
        return self._required("call-id")

    @property
    def cseq(self) -> CSeq:
        """The parsed CSeq."""
        return self._cached("cseq", lambda: parse_cseq(self._required("cseq")))

    @property
    def from_(self) -> NameAddr:
        """The parsed From."""
        return self._cached("from", lambda: parse_name_addr(self._required("from")))

    @property
    def to(self) -> NameAddr:
        """The parsed To."""
        return self._cached("to", lambda: parse_name_addr(self._required("to")))

    @property
    def vias(self) -> list[Via]:
        """All Via values, top first."""
        return self._cached("vias", lambda: [parse_via(v) for v in self.values("via")])

    @property
    def top_via(self) -> Via:
        """The topmost Via."""
        return self._cached("top_via", self._parse_top_via)

    def _parse_top_via(self) -> Via:
        first = self._required("via")
        return parse_via(split_comma(first)[0] if "," in first else first.strip())

    @property
    def contacts(self) -> list[NameAddr] | None:
        """Contact values parsed, or ``None`` for ``Contact: *``."""
        return self._cached("contacts", self._parse_contacts)

    def _parse_contacts(self) -> list[NameAddr] | None:
        vals = self.values("contact")
        if len(vals) == 1 and vals[0] == "*":
            return None
        if "*" in vals:
            raise ParseError("Contact: * mixed with other contacts")
        return [parse_name_addr(v) for v in vals]

    @property
    def max_forwards(self) -> int | None:
        """Max-Forwards (0..255) or ``None`` when absent."""
        v = self.get("max-forwards")
        return None if v is None else parse_uint(v, "Max-Forwards", 255)

    @property
    def expires(self) -> int | None:
        """The Expires header (delta-seconds) or ``None``."""
        v = self.get("expires")
        return None if v is None else parse_uint(v, "Expires")

    @property
    def content_type(self) -> str | None:
        """Media type of the body, lower-cased, parameters dropped."""
        v = self.get("content-type")
        return None if v is None else v.split(";", 1)[0].strip().lower()

    @property
    def sdp_body(self) -> bytes | None:
        """The SDP the body carries: all of it, or the ``application/sdp`` part of a
        ``multipart/mixed`` (RFC 5621; :func:`.body.sdp_of`); ``None`` for none."""
        return sdp_of(self.get("content-type"), self.body)

    def _head_lines(self) -> list[str]:
        raise NotImplementedError

    def serialize(self) -> bytes:
        """The message as bytes; Content-Length is made to match the body."""
        out = self._head_lines()
        body = self.body
        seen_cl = False
        for name, value in self.headers:
            if name in _CL_NAMES or (len(name) in (1, 14) and full_name(name) == "content-length"):
                if seen_cl:
                    continue
                seen_cl = True
                out.append(f"{name}: {len(body)}\r\n")
            else:
                out.append(f"{name}: {value}\r\n")
        if not seen_cl:
            out.append(f"Content-Length: {len(body)}\r\n")
        out.append("\r\n")
        return "".join(out).encode("utf-8", "surrogateescape") + body

    __bytes__ = serialize


class Request(Message):
    """A SIP request."""

    __slots__ = ("method", "uri_text")

    def __init__(self, method: str, uri: str | Uri, headers: list[tuple[str, str]] | None = None,
                 body: bytes = b"") -> None:
        super().__init__(headers, body)
        self.method = method
        """The method token, case-sensitive (RFC 3261 §7.1)."""
        self.uri_text = str(uri)
        """The Request-URI as written."""
        if isinstance(uri, Uri):
            self._cache["uri"] = uri

    @property
    def uri(self) -> Uri:
        """The parsed Request-URI."""
        return self._cached("uri", lambda: parse_uri(self.uri_text))

    def _head_lines(self) -> list[str]:
        return [f"{self.method} {self.uri_text} SIP/2.0\r\n"]

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri_text}>"


class Response(Message):
    """A SIP response."""

    __slots__ = ("status", "reason")

    def __init__(self, status: int, reason: str | None = None,
                 headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> None:
        super().__init__(headers, body)
        self.status = status
        """Status code 100..699."""
        self.reason = reason if reason is not None else REASONS.get(status, "Unknown")
        """Reason phrase."""

    def _head_lines(self) -> list[str]:
        return [f"SIP/2.0 {self.status} {self.reason}\r\n"]

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


def make_response(request: Request, status: int, reason: str | None = None, *,
                  to_tag: str | None = None,
                  headers: list[tuple[str, str]] | None = None,
                  body: bytes = b"") -> Response:
    """Build a response to ``request`` (RFC 3261 §8.2.6.2): Via, From, To, Call-ID, CSeq
    copied; a To tag added when given and the request's To has none."""
    idx = request._idx()
    out: list[tuple[str, str]] = [("Via", v) for v in idx.get("via", ())]
    for v in idx.get("from", ()):
        out.append(("From", v))
    for v in idx.get("to", ()):
        if to_tag is not None and status > 100 and "tag" not in request.to.params:
            v = f"{v};tag={to_tag}"
        out.append(("To", v))
    for v in idx.get("call-id", ()):
        out.append(("Call-ID", v))
    for v in idx.get("cseq", ()):
        out.append(("CSeq", v))
    if headers:
        out.extend(headers)
    return Response(status, reason, out, body)
