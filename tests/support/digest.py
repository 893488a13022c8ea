"""Client-side HTTP digest (RFC 2617, RFC 2069, RFC 8760) for tests.

Written from the RFCs, independently of ``softpbx.sip.auth``, so that a bug there cannot
hide behind the same bug here. Only the standard library is used.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_HASHES = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}

# auth-param = token "=" ( token / quoted-string )   (RFC 2617 §1.2)
_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_.!%*+`\'~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


@dataclass(frozen=True)
class Challenge:
    """One parsed ``WWW-Authenticate: Digest ...`` value."""

    realm: str
    nonce: str
    algorithm: str
    qop: tuple[str, ...]
    stale: bool
    opaque: str | None
    params: dict[str, str]
    """Every auth-param, names lower-cased, quotes removed (for shape comparisons)."""


def parse_challenge(value: str) -> Challenge:
    """Parse a Digest challenge; raises ``ValueError`` when it is not one."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        raise ValueError(f"not a Digest challenge: {value!r}")
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"bad auth-param at {rest[pos:]!r} in {value!r}")
        name, val = m.group(1).lower(), m.group(2)
        if val.startswith('"'):
            val = re.sub(r"\\(.)", r"\1", val[1:-1])
        params[name] = val
        pos = m.end()
    for required in ("realm", "nonce"):
        if required not in params:
            raise ValueError(f"challenge without {required}: {value!r}")
    qop = tuple(q.strip().lower() for q in params.get("qop", "").split(",") if q.strip())
    return Challenge(realm=params["realm"], nonce=params["nonce"],
                     algorithm=params.get("algorithm", "MD5").upper(), qop=qop,
                     stale=params.get("stale", "").lower() == "true",
                     opaque=params.get("opaque"), params=params)


def hexdigest(algorithm: str, text: str) -> str:
    """``H(text)`` for ``MD5`` or ``SHA-256`` (RFC 8760 §2), lower-case hex."""
    return _HASHES[algorithm.upper()](text.encode("utf-8")).hexdigest()


def digest_response(*, algorithm: str, username: str, realm: str, password: str, method: str,
                    uri: str, nonce: str, qop: str | None = None, nc: str = "00000001",
                    cnonce: str = "") -> str:
    """The ``response`` value.

    ``qop=None`` is RFC 2069: ``H(HA1:nonce:HA2)``; ``qop="auth"`` is RFC 2617 §3.2.2.1:
    ``H(HA1:nonce:nc:cnonce:qop:HA2)``, with ``HA1 = H(user:realm:password)`` and
    ``HA2 = H(method:digest-uri)``.
    """
    ha1 = hexdigest(algorithm, f"{username}:{realm}:{password}")
    ha2 = hexdigest(algorithm, f"{method}:{uri}")
    if qop is None:
        return hexdigest(algorithm, f"{ha1}:{nonce}:{ha2}")
    return hexdigest(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def authorization(challenge: Challenge, *, username: str, password: str, method: str, uri: str,
                  use_qop: bool | None = None, nc: int = 1, cnonce: str = "0a4f113b",
                  algorithm: str | None = None) -> str:
    """An ``Authorization`` header value answering ``challenge``.

    ``use_qop``: ``None`` follows the challenge (``auth`` when offered), ``False`` forces the
    RFC 2069 form (no qop/nc/cnonce), ``True`` forces ``qop=auth``. ``algorithm`` overrides
    the challenge's algorithm (to build deliberately mismatched credentials).
    """
    alg = (algorithm or challenge.algorithm).upper()
    qop = "auth" if (use_qop if use_qop is not None else "auth" in challenge.qop) else None
    ncs = f"{nc:08x}"
    resp = digest_response(algorithm=alg, username=username, realm=challenge.realm,
                           password=password, method=method, uri=uri, nonce=challenge.nonce,
                           qop=qop, nc=ncs, cnonce=cnonce)
    parts = [f'username="{username}"', f'realm="{challenge.realm}"',
             f'nonce="{challenge.nonce}"', f'uri="{uri}"', f'response="{resp}"',
             f"algorithm={alg}"]
    if qop is not None:
        parts += [f"qop={qop}", f"nc={ncs}", f'cnonce="{cnonce}"']
    if challenge.opaque is not None:
        parts.append(f'opaque="{challenge.opaque}"')
    return "Digest " + ", ".join(parts)


def rfc_examples_hold() -> bool:
    """Self-check against the RFC 2617 §3.5 (MD5) and RFC 7616 §3.9.1 (MD5, SHA-256) examples."""
    ok = digest_response(algorithm="MD5", username="Mufasa", realm="testrealm@host.com",
                         password="Circle Of Life", method="GET", uri="/dir/index.html",
                         nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", qop="auth",
                         nc="00000001", cnonce="0a4f113b") == "6629fae49393a05397450978507c4ef1"
    rfc7616 = {"MD5": "8ca523f5e9506fed4657c9700eebdbec",
               "SHA-256": "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"}
    for alg, want in rfc7616.items():
        got = digest_response(algorithm=alg, username="Mufasa", realm="http-auth@example.org",
                              password="Circle of Life", method="GET", uri="/dir/index.html",
                              nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", qop="auth",
                              nc="00000001", cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ")
        ok = ok and got == want
    return ok
