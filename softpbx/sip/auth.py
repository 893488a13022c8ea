"""HTTP digest authentication for SIP (RFC 3261 §22, RFC 2617, RFC 7616, RFC 8760).

* Challenges offer every configured algorithm (only ``MD5`` by default, as Asterisk and
  FreeSWITCH do: libre-based phones such as baresip walk every challenge and give up on the
  first algorithm they do not know), one ``WWW-Authenticate`` value each, most preferred first
  (RFC 8760 §2.4), all with the same nonce, ``qop="auth"``. An extension may have its own list
  (``SHA-256`` opt-in per phone): its challenge is chosen by the request's From/To user, which
  tells that this extension exists; only extensions that opt in are told apart that way.
* Credentials with an algorithm not offered to their user are answered with a new challenge
  (as credentials for another realm are, RFC 3261 §22.4), after the same hashing as any other
  answer: a phone that cached SHA-256 credentials before the operator removed it recovers.
* Nonces are stateless: ``<issued-at hex>.<salt>.<HMAC(secret, issued-at.salt)>``. An expired nonce whose
  response is otherwise right gets a new challenge with ``stale=true``.
* ``nc`` replays are refused: the highest ``nc`` seen per nonce is kept until the nonce expires.
* RFC 2069 responses (no ``qop``) are accepted, as many phones send them, but nothing in such a
  response changes from one request to the next, so its nonce is good for one request: a second
  use is answered ``stale=true`` (a fresh nonce), which phones follow.
* The digest ``uri`` must designate the Request-URI's resource (RFC 2617 §3.2.2.5), compared
  semantically (see :func:`digest_uri_matches`): otherwise credentials sniffed from one INVITE
  would dial any other number.
* Comparisons are constant-time, and an unknown user costs the same hashing as a known one.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from .errors import ParseError
from .message import Response
from .uri import Uri, parse_uri

_HASHES = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}

ALGORITHMS = tuple(_HASHES)
"""Every digest algorithm this module knows (RFC 2617 MD5, RFC 8760 SHA-256)."""


def _wire(text: str) -> bytes:
    """A header's text back as the bytes that came in (the parser decoded them so)."""
    return text.encode("utf-8", "surrogateescape")


def h(algorithm: str, text: str) -> str:
    """The algorithm's hex digest of ``text`` (UTF-8)."""
    return _HASHES[algorithm](text.encode("utf-8", "surrogateescape")).hexdigest()


def ha1(algorithm: str, user: str, realm: str, password: str) -> str:
    """RFC 2617 §3.2.2.2 ``H(username:realm:password)``."""
    return h(algorithm, f"{user}:{realm}:{password}")


# auth-param = token "=" ( token / quoted-string ), separated by commas (RFC 2617 §1.2)
_AUTH_PARAM_RE = re.compile(r'\s*,?\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))')
_QUOTED_PAIR_RE = re.compile(r"\\(.)")


def parse_credentials(value: str) -> tuple[str, dict[str, str]]:
    """Parse ``Authorization``/``WWW-Authenticate`` value: (scheme, params with quotes removed).

    ``credentials = auth-scheme LWS auth-param *(COMMA auth-param)``
    """
    s = value.strip()
    scheme, _, rest = s.partition(" ")
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    n = len(rest)
    match = _AUTH_PARAM_RE.match
    while pos < n:
        m = match(rest, pos)
        if m is None or m.end() == pos:
            if rest[pos:].strip(" \t,") == "":
                break
            raise ParseError("Bad auth-param")
        quoted = m.group(2)
        if quoted is not None:
            params[m.group(1).lower()] = _QUOTED_PAIR_RE.sub(r"\1", quoted) if "\\" in quoted else quoted
        else:
            params[m.group(1).lower()] = m.group(3)
        pos = m.end()
    return scheme, params


class AuthOutcome(Enum):
    """What checking credentials concluded."""

    OK = "ok"
    MISSING = "missing"
    """No usable credentials for our realm: challenge."""
    STALE = "stale"
    """Right response, expired nonce: challenge with ``stale=true``."""
    BAD_NONCE = "bad_nonce"
    """A nonce we did not issue: challenge."""
    REPLAY = "replay"
    """``nc`` not above the last one seen for this nonce."""
    UNKNOWN_USER = "unknown_user"
    WRONG_PASSWORD = "wrong_password"
    MALFORMED = "malformed"
    URI_MISMATCH = "uri_mismatch"
    """Right response, but for another resource than the Request-URI (a replay to another
    number, RFC 2617 §3.2.2.5)."""


FAILURES = frozenset({AuthOutcome.REPLAY, AuthOutcome.UNKNOWN_USER, AuthOutcome.WRONG_PASSWORD,
                      AuthOutcome.MALFORMED, AuthOutcome.URI_MISMATCH})
"""Outcomes that count as an authentication failure (answered 403, counted per source)."""


_SPENT = 1 << 32
"""``nc`` table mark of a nonce used without qop: above any 8-hex-digit ``nc``, so it is spent."""


def _host_key(uri: Uri) -> str:
    """The host compared case-insensitively, IPv6 brackets dropped and the address normalised
    (``[::1]`` and ``[0:0::1]`` are one host), a root label's trailing dot dropped."""
    host = uri.host_bare
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host).compressed
        except ValueError:
            return host
    return host.rstrip(".")


def digest_uri_matches(digest_uri: str, request_uri: str | Uri, method: str = "") -> bool:
    """Whether the digest ``uri`` designates the same resource as the Request-URI
    (RFC 2617 §3.2.2.5, RFC 3261 §22.4).

    Phones hash other forms of the Request-URI than the one on the Request-Line, so the two are
    compared as resources, not as strings:

    * the same scheme (``sip`` and ``sips`` never designate the same resource, §19.1.4);
    * the same user after unescaping (case-sensitive, §19.1.4), when the digest uri names one:
      credentials for ``sip:8999...@`` do not dial another number. Only a REGISTER, whose
      Request-URI has no user part (§10.2), may hash a user (the AOR, as SIPp and some phones
      do): the registrar binds only the authenticated user's own AOR anyway. A digest uri
      with no user at all (pyVoIP hashes ``sip:<server>;transport=UDP`` for its INVITEs) names
      this server and is accepted: what keeps such credentials from being replayed for
      another call is that each nonce serves one request (qop-less) or one nc (qop=auth);
    * the same host, case-insensitive, IPv6 brackets and forms normalised;
    * the port is compared only when both name one: a port on one side only is tolerated,
      because phones add or drop our listening port (which need not be 5060) and host:port
      both designate this switch either way; it is the user a replay would change;
    * URI parameters (``;transport=UDP``) and headers are ignored.

    Non-SIP URIs must be equal as written (scheme case-insensitive).
    """
    if isinstance(request_uri, str):
        if digest_uri == request_uri:
            return True
        try:
            ruri = parse_uri(request_uri)
        except ParseError:
            return False
    else:
        ruri = request_uri
    try:
        duri = parse_uri(digest_uri)
    except ParseError:
        return False
    if duri.scheme != ruri.scheme:
        return False
    if not ruri.is_sip:
        return duri.opaque == ruri.opaque
    ruser, duser = ruri.unescaped_user, duri.unescaped_user
    if duser and duser != ruser and not (method == "REGISTER" and not ruser):
        return False
    if _host_key(duri) != _host_key(ruri):
        return False
    return duri.port is None or ruri.port is None or duri.port == ruri.port


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The outcome of :meth:`DigestAuthenticator.check`."""

    outcome: AuthOutcome
    username: str = ""
    """The username the credentials claimed (for logs), even when they failed."""


class DigestAuthenticator:
    """Issues challenges and verifies digest credentials for one realm."""

    def __init__(self, *, realm: str, secret: bytes | None = None, nonce_ttl: float = 300.0,
                 algorithms: tuple[str, ...] = ("MD5",)) -> None:
        self.realm = realm
        self.nonce_ttl = nonce_ttl
        self.algorithms = tuple(algorithms)
        """Algorithms offered to users without a list of their own, in this order."""
        self._user_algorithms: dict[str, tuple[str, ...]] = {}
        self._secret = secret or secrets.token_bytes(32)
        self._nc: dict[str, int] = {}
        self._nc_order: deque[tuple[float, str]] = deque()
        # HA1 per (user, algorithm), computed once: the hot path hashes only HA2 and the response.
        self._ha1: dict[tuple[str, str], str] = {}
        self._dummy_ha1 = {alg: ha1(alg, "-", realm, secrets.token_hex(16)) for alg in _HASHES}

    def set_users(self, passwords: dict[str, str],
                  algorithms: dict[str, tuple[str, ...]] | None = None) -> None:
        """Install the user -> password table (precomputes HA1 for every algorithm) and the
        users' own algorithm lists (``algorithms``; a user not in it, or with an empty list,
        gets :attr:`algorithms`)."""
        table: dict[tuple[str, str], str] = {}
        for user, pw in passwords.items():
            for alg in _HASHES:
                table[(user, alg)] = ha1(alg, user, self.realm, pw)
        self._ha1 = table
        self._user_algorithms = {u: tuple(a) for u, a in (algorithms or {}).items()
                                 if a and u in passwords}

    def algorithms_for(self, user: str | None) -> tuple[str, ...]:
        """The algorithms offered to ``user`` (the global list for an unknown or no user)."""
        if user is None:
            return self.algorithms
        return self._user_algorithms.get(user, self.algorithms)

    # -- challenges ---------------------------------------------------------------------------
    def nonce(self, now: float) -> str:
        """A fresh stateless nonce for time ``now``: ``<ms hex>.<salt>.<mac>``.

        The random salt keeps two challenges issued in the same millisecond apart, so that
        ``nc`` replay tracking per nonce never mistakes two phones for one.
        """
        stamp = f"{int(now * 1000):x}.{secrets.token_hex(6)}"
        mac = hmac.new(self._secret, stamp.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{stamp}.{mac}"

    def challenge(self, now: float, *, stale: bool = False, user: str | None = None) -> list[str]:
        """``WWW-Authenticate`` values, one per algorithm offered to ``user`` (the request's
        From/To user; ``None``: the global list), most preferred first (RFC 8760 §2.4)."""
        nonce = self.nonce(now)
        extra = ", stale=true" if stale else ""
        return [f'Digest realm="{self.realm}", nonce="{nonce}", algorithm={alg}, qop="auth"{extra}'
                for alg in self.algorithms_for(user)]

    def _nonce_age(self, nonce: str, now: float) -> float | None:
        """Age of one of our nonces, or ``None`` when we did not issue it."""
        stamp, dot, mac = nonce.rpartition(".")
        if not dot or not stamp or len(stamp) > 40:
            return None
        want = hmac.new(self._secret, _wire(stamp), hashlib.sha256).hexdigest()[:32]
        # compare bytes: compare_digest refuses non-ASCII str (a TypeError a peer could send)
        if not hmac.compare_digest(want.encode(), _wire(mac)):
            return None
        try:
            issued = int(stamp.partition(".")[0], 16) / 1000.0
        except ValueError:
            return None
        return now - issued

    # -- verification -------------------------------------------------------------------------
    def check(self, method: str, authorization: list[str], now: float, *,
              request_uri: str | Uri | None = None) -> AuthResult:
        """Verify the ``Authorization`` values of a request against our realm.

        Credentials for another realm or another scheme are ignored (RFC 3261 §22.4), so
        they lead to a challenge, not a failure. ``request_uri``: the request's Request-URI,
        which the digest ``uri`` must designate (:func:`digest_uri_matches`); the switch
        always passes it, ``None`` skips that check (tools, and credentials for a request
        this code did not receive).
        """
        creds = None
        for value in authorization:
            try:
                scheme, params = parse_credentials(value)
            except ParseError:
                return AuthResult(AuthOutcome.MALFORMED)
            if scheme.lower() == "digest" and params.get("realm") == self.realm:
                creds = params
                break
        if creds is None:
            return AuthResult(AuthOutcome.MISSING)
        user = creds.get("username", "")
        nonce = creds.get("nonce", "")
        uri = creds.get("uri", "")
        response = creds.get("response", "").lower()
        alg = creds.get("algorithm", "MD5").upper()
        if alg not in _HASHES or not user or not uri or not response:
            return AuthResult(AuthOutcome.MALFORMED, user)
        age = self._nonce_age(nonce, now)
        if age is None or age < -5.0:
            return AuthResult(AuthOutcome.BAD_NONCE, user)
        qop = creds.get("qop")
        stored = self._ha1.get((user, alg))
        known = stored is not None
        key_ha1 = stored if stored is not None else self._dummy_ha1[alg]
        # RFC 2617 §3.2.2.3 (qop=auth): HA2 = H(method:digest-uri). The digest-uri is the one
        # the client hashed, which may differ in form from the Request-URI (phones do that).
        ha2 = h(alg, f"{method}:{uri}")
        if qop is None:
            expected = h(alg, f"{key_ha1}:{nonce}:{ha2}")  # RFC 2069
            nc_val = None
        elif qop.lower() == "auth":
            nc = creds.get("nc", "")
            cnonce = creds.get("cnonce", "")
            if len(nc) != 8 or not cnonce:
                return AuthResult(AuthOutcome.MALFORMED, user)
            try:
                nc_val = int(nc, 16)
            except ValueError:
                return AuthResult(AuthOutcome.MALFORMED, user)
            expected = h(alg, f"{key_ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")
        else:
            return AuthResult(AuthOutcome.MALFORMED, user)
        matches = hmac.compare_digest(expected.encode(), _wire(response))
        if alg not in self.algorithms_for(user):
            # Not offered to this user (checked after the hashing, so the answer's timing says
            # nothing about the user): a new challenge, as for credentials of another realm.
            return AuthResult(AuthOutcome.MISSING, user)
        if not (known and matches):
            return AuthResult(AuthOutcome.UNKNOWN_USER if not known else AuthOutcome.WRONG_PASSWORD, user)
        # Checked before staleness: a replay to another number is a failure, not a retry.
        if request_uri is not None and not digest_uri_matches(uri, request_uri, method):
            return AuthResult(AuthOutcome.URI_MISMATCH, user)
        if age > self.nonce_ttl:
            return AuthResult(AuthOutcome.STALE, user)
        last = self._nc.get(nonce)
        if nc_val is None:
            # RFC 2069: the same request gives the same response for the nonce's whole life,
            # so a nonce is good for one request only. A second use is STALE (401 with a fresh
            # nonce, stale=true): compliant phones retry without asking the user.
            if last is not None:
                return AuthResult(AuthOutcome.STALE, user)
            nc_val = _SPENT  # any later qop=auth use of this nonce is a replay too
        elif last is not None and nc_val <= last:
            return AuthResult(AuthOutcome.REPLAY, user)
        if last is None:
            self._nc_order.append((now, nonce))
        self._nc[nonce] = nc_val
        self._prune(now)
        return AuthResult(AuthOutcome.OK, user)

    def _prune(self, now: float) -> None:
        # An entry outlives its nonce (first use + TTL + 10 s > issue + TTL + 5 s of allowed
        # clock skew), so forgetting it never re-opens a replay: the nonce is STALE by then.
        # Only valid credentials add entries, so the table is bounded by the rate of
        # successful authentications times the TTL.
        order = self._nc_order
        horizon = now - self.nonce_ttl - 10.0
        while order and order[0][0] < horizon:
            _, nonce = order.popleft()
            self._nc.pop(nonce, None)


class Credentials(NamedTuple):
    """What we answer a peer's challenges with (UAC side): a gateway's account."""

    username: str
    password: str
    algorithms: tuple[str, ...] = ALGORITHMS
    """The digest algorithms we accept to answer (the gateway's ``auth_algorithms``)."""


def client_authorization(challenge: str, *, method: str, uri: str, username: str, password: str,
                         cnonce: str, nc: int = 1,
                         algorithms: tuple[str, ...] = ALGORITHMS) -> str | None:
    """Credentials answering one ``WWW-Authenticate``/``Proxy-Authenticate`` value (UAC side).

    Returns ``None`` for a challenge we cannot answer (not Digest, an algorithm not in
    ``algorithms`` or unknown, an unknown qop).
    """
    try:
        scheme, p = parse_credentials(challenge)
    except ParseError:
        return None
    alg = p.get("algorithm", "MD5").upper()
    if scheme.lower() != "digest" or alg not in _HASHES or alg not in algorithms:
        return None
    realm = p.get("realm", "")
    nonce = p.get("nonce", "")
    qops = [q.strip().lower() for q in p.get("qop", "").split(",") if q.strip()]
    key = ha1(alg, username, realm, password)
    ha2 = h(alg, f"{method}:{uri}")
    parts = [f'username="{username}"', f'realm="{realm}"', f'nonce="{nonce}"', f'uri="{uri}"']
    if qops:
        if "auth" not in qops:
            return None
        ncs = f"{nc:08x}"
        resp = h(alg, f"{key}:{nonce}:{ncs}:{cnonce}:auth:{ha2}")
        parts += [f'response="{resp}"', f"algorithm={alg}", f'cnonce="{cnonce}"', "qop=auth",
                  f"nc={ncs}"]
    else:
        resp = h(alg, f"{key}:{nonce}:{ha2}")
        parts += [f'response="{resp}"', f"algorithm={alg}"]
    if "opaque" in p:
        parts.append(f'opaque="{p["opaque"]}"')
    return "Digest " + ", ".join(parts)


def answer_challenge(challenge: Response, *, method: str, uri: str, username: str,
                     password: str, algorithms: tuple[str, ...] = ALGORITHMS
                     ) -> tuple[str, str] | None:
    """The header answering a ``401``/``407`` (RFC 3261 §22.2, §22.3): ``("Authorization",
    value)`` or ``("Proxy-Authorization", value)`` for the first challenge we can answer, or
    ``None`` when there is none.

    ``algorithms``: those we accept to answer (a gateway's ``auth_algorithms``). The
    challenges are taken in the provider's order, its most preferred first (RFC 8760 §2.4),
    skipping the others (RFC 7616 §3.7: a client uses the first challenge it supports)."""
    if challenge.status == 401:
        header, answer = "www-authenticate", "Authorization"
    else:
        header, answer = "proxy-authenticate", "Proxy-Authorization"
    for value in challenge.get_all(header):
        credentials = client_authorization(value, method=method, uri=uri, username=username,
                                           password=password, cnonce=secrets.token_hex(8),
                                           algorithms=algorithms)
        if credentials is not None:
            return answer, credentials
    return None
