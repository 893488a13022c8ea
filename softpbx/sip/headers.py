"""Header names and the structured header values softpbx reads (RFC 3261 §7.3, §20, §25.1).

Values are kept raw in the message; these parsers run only when the switch asks for a field
(lazy parsing), and they are tolerant of the LWS that RFC 3261 allows almost everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import ParseError
from .uri import Uri, parse_uri, split_hostport

# RFC 3261 §7.3.3 compact forms, plus RFC 3515 (r), RFC 3891/3892 (b), RFC 4028 (x),
# RFC 3841 (a, j, d), RFC 3265 (o, u).
COMPACT = {
    "i": "call-id", "m": "contact", "e": "content-encoding", "l": "content-length",
    "c": "content-type", "f": "from", "s": "subject", "k": "supported", "t": "to", "v": "via",
    "r": "refer-to", "b": "referred-by", "x": "session-expires", "o": "event",
    "u": "allow-events", "a": "accept-contact", "j": "reject-contact", "d": "request-disposition",
    "y": "identity", "n": "identity-info",
}

# Canonical spelling used when softpbx writes a header.
CANONICAL = {
    "call-id": "Call-ID", "cseq": "CSeq", "www-authenticate": "WWW-Authenticate",
    "mime-version": "MIME-Version", "rack": "RAck", "rseq": "RSeq",
}

# Headers whose value is a comma-separated list (RFC 3261 §7.3.1); others never split.
LIST_HEADERS = frozenset({
    "via", "contact", "route", "record-route", "allow", "supported", "require",
    "proxy-require", "unsupported", "accept", "accept-encoding", "accept-language",
    "allow-events", "content-encoding", "path", "service-route",
})

# Headers of which a request may carry only one value (RFC 3261 §7.3.1, RFC 4475 §3.3.8).
SINGLE_HEADERS = ("call-id", "cseq", "from", "to", "max-forwards", "content-length",
                  "content-type", "expires")

# token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~" )
TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+\Z")


def canonical_name(lname: str) -> str:
    """``content-length`` -> ``Content-Length`` (with the RFC's odd spellings)."""
    c = CANONICAL.get(lname)
    if c is not None:
        return c
    return "-".join(p[:1].upper() + p[1:] for p in lname.split("-"))


def split_comma(value: str) -> list[str]:
    """Split a list header value on commas that are outside quotes and ``<...>``."""
    if "," not in value:
        v = value.strip()
        return [v] if v else []
    out: list[str] = []
    depth_q = False
    depth_a = False
    start = 0
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if depth_q:
            if ch == "\\":
                i += 1
            elif ch == '"':
                depth_q = False
        elif ch == '"':
            depth_q = True
        elif ch == "<":
            depth_a = True
        elif ch == ">":
            depth_a = False
        elif ch == "," and not depth_a:
            part = value[start:i].strip()
            if part:
                out.append(part)
            start = i + 1
        i += 1
    if depth_q:
        raise ParseError("Unterminated quoted string")
    part = value[start:].strip()
    if part:
        out.append(part)
    return out


def parse_quoted(s: str, i: int) -> tuple[str, int]:
    """Parse the quoted-string starting at ``s[i] == '"'``; return (unescaped text, index after)."""
    out = []
    i += 1
    n = len(s)
    while i < n:
        ch = s[i]
        if ch == "\\":
            if i + 1 >= n:
                break
            out.append(s[i + 1])
            i += 2
            continue
        if ch == '"':
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise ParseError("Unterminated quoted string")


def quote(text: str) -> str:
    """Make a quoted-string (RFC 3261 §25.1 quoted-pair for ``"`` and ``\\``)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_params(s: str) -> dict[str, str | None]:
    """Parse ``*( SEMI generic-param )`` with LWS anywhere; names lower-cased.

    ``s`` is the text from the first ``;`` (or empty). Quoted values keep their quotes so
    that the parameter re-serializes as it came.
    """
    params: dict[str, str | None] = {}
    i = 0
    n = len(s)
    while i < n:
        while i < n and s[i] in " \t":
            i += 1
        if i >= n:
            break
        if s[i] != ";":
            raise ParseError("Junk in header parameters")
        i += 1
        while i < n and s[i] in " \t":
            i += 1
        j = i
        while j < n and s[j] not in "=; \t":
            j += 1
        name = s[i:j]
        if not name or not TOKEN_RE.match(name):
            raise ParseError("Bad header parameter")
        i = j
        while i < n and s[i] in " \t":
            i += 1
        value: str | None = None
        if i < n and s[i] == "=":
            i += 1
            while i < n and s[i] in " \t":
                i += 1
            if i < n and s[i] == '"':
                _, k = parse_quoted(s, i)
                value = s[i:k]
                i = k
            else:
                j = i
                while j < n and s[j] not in "; \t":
                    j += 1
                value = s[i:j]
                if not value:
                    raise ParseError("Empty header parameter value")
                i = j
        params[name.lower()] = value
    return params


def format_params(params: dict[str, str | None]) -> str:
    """Inverse of :func:`parse_params`."""
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


@dataclass(slots=True)
class NameAddr:
    """A From/To/Contact/Route value: ``[display] <uri>;params`` or ``uri;params``."""

    uri: Uri
    display: str | None = None
    """Display name, unescaped; ``None`` when absent."""
    params: dict[str, str | None] = field(default_factory=dict)
    """Header parameters (``tag``, ``expires``, ``q``, ``+sip.instance`` ...)."""
    angle: bool = True
    """Whether the URI was (and will be) written inside ``<>``."""

    @property
    def tag(self) -> str | None:
        """The ``tag`` parameter."""
        return self.params.get("tag")

    def __str__(self) -> str:
        if self.angle or self.display is not None:
            d = f"{quote(self.display)} " if self.display else ""
            head = f"{d}<{self.uri}>"
        else:
            head = str(self.uri)
        return head + format_params(self.params)


# display-name = *(token LWS) / quoted-string
_DISPLAY_TOKENS_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~ \t]*\Z")


def parse_name_addr(value: str) -> NameAddr:
    """Parse a name-addr / addr-spec header value (RFC 3261 §20.10, §20.20, §20.39)."""
    s = value.strip()
    if not s:
        raise ParseError("Empty address")
    display: str | None = None
    if s[0] == '"':
        display, i = parse_quoted(s, 0)
        rest = s[i:].lstrip()
        if not rest.startswith("<"):
            raise ParseError("Display name without <URI>")
        s = rest
    lt = s.find("<")
    if lt >= 0:
        if lt > 0:
            d = s[:lt].strip()
            if not _DISPLAY_TOKENS_RE.match(d):
                raise ParseError("Bad display name")
            display = " ".join(d.split()) if d else None
        gt = s.find(">", lt)
        if gt < 0:
            raise ParseError("Unterminated <URI>")
        # RFC 4475 §3.1.2.14 tolerates nothing inside <>; being liberal here costs nothing.
        uri = parse_uri(s[lt + 1 : gt].strip())
        return NameAddr(uri=uri, display=display, params=parse_params(s[gt + 1 :]), angle=True)
    # addr-spec: the URI ends at the first ';' and cannot carry '?' or ',' (RFC 3261 §20).
    semi = s.find(";")
    uri_text = s if semi < 0 else s[:semi]
    uri_text = uri_text.rstrip()
    if any(c in uri_text for c in "?, \t"):
        raise ParseError("URI with ?, comma or space must be enclosed in <>")
    uri = parse_uri(uri_text)
    return NameAddr(uri=uri, display=None, params=parse_params(s[semi:] if semi >= 0 else ""),
                    angle=False)


@dataclass(slots=True)
class Via:
    """One Via value (RFC 3261 §20.42): ``SIP/2.0/UDP host:port;branch=...;rport``."""

    transport: str
    """Upper-cased transport token (``UDP``, ``TCP``, ``TLS``, ``SCTP``, or unknown)."""
    host: str
    port: int | None
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def branch(self) -> str | None:
        """The ``branch`` parameter."""
        return self.params.get("branch")

    @property
    def sent_by(self) -> str:
        """``host[:port]`` as a matching key."""
        return f"{self.host.lower()}:{self.port or 5060}"

    def __str__(self) -> str:
        hp = self.host if self.port is None else f"{self.host}:{self.port}"
        return f"SIP/2.0/{self.transport} {hp}{format_params(self.params)}"


# Via = SIP SLASH 2.0 SLASH transport LWS sent-by *( SEMI via-params ); LWS around SLASH/COLON.
_VIA_FAST = re.compile(r"SIP/2\.0/([A-Za-z]+) ([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::([0-9]{1,5}))?(;.*)?\Z")
_VIA_SLOW = re.compile(
    r"\s*([A-Za-z0-9\-.!%*_+`'~]+)\s*/\s*([A-Za-z0-9\-.!%*_+`'~]+)\s*/\s*([A-Za-z0-9\-.!%*_+`'~]+)"
    r"\s+(\[[0-9A-Fa-f:.]+\]|[^\s;:]+)(?:\s*:\s*([0-9]{1,5}))?\s*(;.*)?\Z",
    re.S,
)


def parse_via(value: str) -> Via:
    """Parse one Via value; the fast path covers what phones send."""
    m = _VIA_FAST.match(value)
    if m is not None:
        port = int(m.group(3)) if m.group(3) else None
        if port is not None and port > 65535:
            raise ParseError("Bad Via port")
        return Via(m.group(1).upper(), m.group(2), port, parse_params(m.group(4) or ""))
    m = _VIA_SLOW.match(value)
    if m is None:
        raise ParseError("Bad Via")
    if m.group(1).upper() != "SIP" or m.group(2) != "2.0":
        raise ParseError("Bad Via protocol")
    host, _ = split_hostport(m.group(4))
    port = None
    if m.group(5):
        port = int(m.group(5))
        if port > 65535:
            raise ParseError("Bad Via port")
    return Via(m.group(3).upper(), host, port, parse_params(m.group(6) or ""))


@dataclass(frozen=True, slots=True)
class CSeq:
    """``CSeq: 1*DIGIT LWS Method`` (RFC 3261 §20.16); the number is below 2**31."""

    number: int
    method: str

    def __str__(self) -> str:
        return f"{self.number} {self.method}"


def parse_cseq(value: str) -> CSeq:
    """Parse a CSeq value; a number over 2**31-1 or a bad method is a 400."""
    parts = value.split()
    if len(parts) != 2 or not (parts[0].isascii() and parts[0].isdigit()) or not TOKEN_RE.match(parts[1]):
        raise ParseError("Bad CSeq")
    if len(parts[0]) > 10 or int(parts[0]) >= 2**31:
        raise ParseError("CSeq number too large")
    return CSeq(int(parts[0]), parts[1])


def parse_uint(value: str, what: str, limit: int = 2**32 - 1) -> int:
    """A ``1*DIGIT`` header value bounded by ``limit`` (Max-Forwards, Expires, Content-Length)."""
    v = value.strip()
    if not (v.isascii() and v.isdigit()) or len(v) > 10:
        raise ParseError(f"Bad {what}")
    n = int(v)
    if n > limit:
        raise ParseError(f"{what} too large")
    return n
