"""Helpers for driving the sans-IO SIP core in unit tests: raw bytes, a fake clock, no sockets."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from softpbx.config.schema import Transport
from softpbx.sip.events import Flow
from softpbx.sip.parser import parse_message

LOCAL = ("127.0.0.1", 5060)
PHONE = ("127.0.0.1", 5062)


def crlf(text: str) -> bytes:
    """Write test messages with \\n; the wire wants CRLF."""
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def udp(remote: tuple[str, int] = PHONE) -> Flow:
    return Flow(Transport.UDP, remote, LOCAL)


def tcp(remote: tuple[str, int] = PHONE) -> Flow:
    return Flow(Transport.TCP, remote, LOCAL)


@dataclass
class FakeClock:
    """Monotonic time the test moves by hand."""

    now: float = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def run_until(core, clock: FakeClock, until: float) -> None:
    """Fire the core's timers in order up to ``until`` (``core`` has get_timer/handle_timer)."""
    for _ in range(100_000):
        when = core.get_timer()
        if when is None or when > until:
            break
        clock.now = max(clock.now, when)
        core.handle_timer(clock.now)
    clock.now = max(clock.now, until)


def sent(core) -> list:
    """Parsed messages the core queued for sending (keep-alive pongs come back as bytes)."""
    out = []
    for o in core.datagrams_to_send():
        out.append(parse_message(o.data) if o.data.strip() else o.data)
    return out


def md5(s: str) -> str:
    return hashlib.md5(s.encode()).hexdigest()


def sha256(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def digest(*, user: str, password: str, realm: str, nonce: str, method: str, uri: str,
           qop: str | None = "auth", nc: str = "00000001", cnonce: str = "0a4f113b",
           algorithm: str = "MD5") -> str:
    """An Authorization value computed independently of softpbx.sip.auth."""
    hf = md5 if algorithm == "MD5" else sha256
    ha1 = hf(f"{user}:{realm}:{password}")
    ha2 = hf(f"{method}:{uri}")
    if qop:
        resp = hf(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
        return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
                f'response="{resp}", algorithm={algorithm}, qop={qop}, nc={nc}, cnonce="{cnonce}"')
    resp = hf(f"{ha1}:{nonce}:{ha2}")
    return (f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{resp}", algorithm={algorithm}')


def challenge_params(value: str) -> dict[str, str]:
    """Parse a WWW-Authenticate value into its params (quotes removed), independently."""
    import re

    assert value.startswith("Digest ")
    return {k.lower(): v1 or v2 for k, v1, v2 in
            re.findall(r'(\w+)\s*=\s*(?:"([^"]*)"|([^,\s]+))', value[7:])}
