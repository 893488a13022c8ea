"""SIP and other URIs (RFC 3261 §19.1, §25.1; RFC 3966 ``tel:`` kept opaque).

::

    SIP-URI  = "sip:" [ userinfo ] hostport uri-parameters [ headers ]
    userinfo = ( user / telephone-subscriber ) [ ":" password ] "@"
    hostport = host [ ":" port ]
    host     = hostname / IPv4address / IPv6reference
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

from .errors import ParseError

# scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*\Z")
# hostname = *( domainlabel "." ) toplabel [ "." ]; IPv4address; kept loose: any run of
# unreserved host characters. IPv6reference = "[" IPv6address "]".
_HOST_RE = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+|[A-Za-z0-9\-._~%!$&'()*+,=]+)\Z")
# user = 1*( unreserved / escaped / user-unreserved ); password likewise with ":" excluded.
_USER_CHARS = re.compile(r"[A-Za-z0-9\-_.!~*'()%&=+$,;?/:]+\Z")

SIP_SCHEMES = frozenset({"sip", "sips"})
_FORBIDDEN_RE = re.compile(r'[ \t\r\n<>"]')


@dataclass(slots=True)
class Uri:
    """A parsed URI. ``sip``/``sips`` are split into parts; others keep ``opaque``."""

    scheme: str
    """Lower-cased scheme (``sip``, ``sips``, ``tel`` ...)."""
    user: str = ""
    """User part as written (escapes kept); ``unescaped_user`` decodes it."""
    password: str = ""
    """Password part (discouraged by RFC 3261, kept for fidelity)."""
    host: str = ""
    """Host as written; IPv6 references keep their brackets."""
    port: int | None = None
    """Port, or ``None`` when absent (the transport default applies)."""
    params: dict[str, str | None] = field(default_factory=dict)
    """URI parameters, names lower-cased, in order; flag parameters map to ``None``."""
    headers: str = ""
    """The ``?h=v&...`` part, raw, without the ``?``. Never turned into real headers."""
    opaque: str = ""
    """For non-SIP schemes: everything after ``scheme:``."""

    @property
    def is_sip(self) -> bool:
        """True for ``sip:``/``sips:`` URIs."""
        return self.scheme in SIP_SCHEMES

    @property
    def unescaped_user(self) -> str:
        """The user part with %-escapes decoded (``%00`` stays a NUL, nothing truncates)."""
        return unquote(self.user, errors="surrogateescape") if "%" in self.user else self.user

    @property
    def host_bare(self) -> str:
        """The host without IPv6 brackets, lower-cased."""
        h = self.host
        if h.startswith("["):
            h = h[1:-1]
        return h.lower()

    @property
    def transport(self) -> str | None:
        """The ``transport`` parameter, lower-cased, or ``None``."""
        t = self.params.get("transport")
        return t.lower() if t else None

    def __str__(self) -> str:
        if not self.is_sip:
            return f"{self.scheme}:{self.opaque}"
        out = [self.scheme, ":"]
        if self.user:
            out.append(self.user)
            if self.password:
                out.append(":")
                out.append(self.password)
            out.append("@")
        out.append(self.host)
        if self.port is not None:
            out.append(f":{self.port}")
        for k, v in self.params.items():
            out.append(f";{k}" if v is None else f";{k}={v}")
        if self.headers:
            out.append("?")
            out.append(self.headers)
        return "".join(out)

    def aor(self) -> str:
        """``scheme:user@host`` lower-cased host: the address-of-record key (RFC 3261 §10.3)."""
        user = self.unescaped_user
        return f"{self.scheme}:{user}@{self.host.lower()}" if user else f"{self.scheme}:{self.host.lower()}"


def parse_uri(text: str) -> Uri:
    """Parse a URI; raise :class:`ParseError` (400) when it is not one.

    A URI with an unknown scheme is *syntactically* fine (``Uri.opaque`` holds it): whether it
    is acceptable (416) is the caller's decision.
    """
    colon = text.find(":")
    if colon <= 0:
        raise ParseError(f"Bad URI {text[:40]!r}")
    scheme = text[:colon]
    if not _SCHEME_RE.match(scheme):
        raise ParseError(f"Bad URI scheme {scheme[:20]!r}")
    scheme = scheme.lower()
    rest = text[colon + 1 :]
    if _FORBIDDEN_RE.search(rest):
        raise ParseError("Bad URI: whitespace or delimiter inside")
    if scheme not in SIP_SCHEMES:
        if not rest:
            raise ParseError("Empty URI")
        return Uri(scheme=scheme, opaque=rest)
    headers = ""
    at = rest.find("@")
    user = password = ""
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        if not userinfo:
            raise ParseError("Empty user part in URI")
        pc = userinfo.find(":")
        if pc >= 0:
            user, password = userinfo[:pc], userinfo[pc + 1 :]
        else:
            user = userinfo
        if not _USER_CHARS.match(user):
            raise ParseError("Bad user part in URI")
    q = rest.find("?")
    if q >= 0:
        rest, headers = rest[:q], rest[q + 1 :]
    semi = rest.find(";")
    params: dict[str, str | None] = {}
    if semi >= 0:
        hostport, ptext = rest[:semi], rest[semi + 1 :]
        for p in ptext.split(";"):
            if not p:
                raise ParseError("Empty URI parameter")
            eq = p.find("=")
            if eq >= 0:
                params[p[:eq].lower()] = p[eq + 1 :]
            else:
                params[p.lower()] = None
    else:
        hostport = rest
    host, port = split_hostport(hostport)
    return Uri(scheme=scheme, user=user, password=password, host=host, port=port,
               params=params, headers=headers)


def split_hostport(hostport: str) -> tuple[str, int | None]:
    """Split ``host[:port]`` (``[v6]:port`` too); raise :class:`ParseError` when malformed."""
    if not hostport:
        raise ParseError("Missing host")
    if hostport[0] == "[":
        end = hostport.find("]")
        if end < 0:
            raise ParseError("Unterminated IPv6 reference")
        host, tail = hostport[: end + 1], hostport[end + 1 :]
        if tail and not tail.startswith(":"):
            raise ParseError("Bad host/port")
        port_s = tail[1:] if tail else ""
    else:
        c = hostport.rfind(":")
        if c >= 0:
            host, port_s = hostport[:c], hostport[c + 1 :]
        else:
            host, port_s = hostport, ""
    if not host or not _HOST_RE.match(host):
        raise ParseError(f"Bad host {host[:40]!r}")
    if port_s or hostport.endswith(":"):
        if not (port_s.isascii() and port_s.isdigit()) or len(port_s) > 5 or int(port_s) > 65535:
            raise ParseError("Bad port")
        return host, int(port_s)
    return host, None
