"""A raw SIP client over real UDP/TCP sockets on 127.0.0.1, for integration tests.

It builds requests as text (so tests can send exactly the bytes they mean), reads responses
with a timeout, and parses them with :mod:`softpbx.sip.parser`::

    with SipClient("udp", pbx.sip_addr) as c:
        first, final = c.register("101", "secret101")
        assert final.status == 200
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterable

from softpbx.sip.message import Response
from softpbx.sip.parser import parse_message

from .digest import Challenge, authorization, parse_challenge

HOST = "127.0.0.1"
DEFAULT_TIMEOUT = 2.0


def token() -> str:
    """A random token for tags, branches and Call-IDs."""
    return secrets.token_hex(8)


def parse_response(data: bytes) -> Response:
    """Parse bytes that must be a response."""
    msg = parse_message(data)
    assert isinstance(msg, Response), f"expected a response, got {data[:200]!r}"
    return msg


class SipClient:
    """One socket to the switch: UDP (connected) or TCP (one connection)."""

    def __init__(self, transport: str, server: tuple[str, int], *,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        assert transport in ("udp", "tcp"), transport
        assert server[0] == HOST, "tests only talk to 127.0.0.1"
        self.transport = transport
        self.server = server
        self.timeout = timeout
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.bind((HOST, 0))
        if transport == "tcp":
            self.sock.settimeout(timeout)
            self.sock.connect(server)
        self.local: tuple[str, int] = self.sock.getsockname()[:2]
        self._buf = bytearray()
        self._eof = False
        self.cseq = 0
        self.call_id = f"{token()}@{HOST}"
        self.from_tag = token()

    def __enter__(self) -> SipClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    # -- bytes --------------------------------------------------------------------------------
    def send(self, data: bytes | str) -> None:
        """Send bytes (a string is encoded as UTF-8 with its newlines made CRLF)."""
        if isinstance(data, str):
            data = data.replace("\r\n", "\n").replace("\n", "\r\n").encode()
        if self.transport == "udp":
            self.sock.sendto(data, self.server)
        else:
            self.sock.sendall(data)

    def half_close(self) -> None:
        """TCP: shut the write side, so the server sees EOF."""
        self.sock.shutdown(socket.SHUT_WR)

    def recv_raw(self, timeout: float | None = None) -> bytes | None:
        """UDP: one datagram (from the server only). TCP: whatever arrives next.
        ``None`` on timeout or EOF."""
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                if self.transport == "udp":
                    data, addr = self.sock.recvfrom(70000)
                    if addr[:2] != self.server:
                        continue  # not from the switch: ignore, keep waiting
                    return data
                data = self.sock.recv(70000)
            except (TimeoutError, BlockingIOError):
                return None
            except ConnectionResetError:
                self._eof = True
                return None
            if not data:
                self._eof = True
                return None
            return data

    def recv_message(self, timeout: float | None = None) -> bytes | None:
        """One whole message: a datagram, or one Content-Length framed TCP message."""
        if self.transport == "udp":
            return self.recv_raw(timeout)
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        for _ in range(10_000):
            framed = self._frame()
            if framed is not None:
                return framed
            left = deadline - time.monotonic()
            if left <= 0 or self._eof:
                return None
            data = self.recv_raw(left)
            if data is None:
                return None
            self._buf += data
        return None

    def _frame(self) -> bytes | None:
        buf = self._buf
        while buf.startswith(b"\r\n"):
            del buf[:2]
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        length = 0
        for line in bytes(buf[:end]).split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() in (b"content-length", b"l"):
                length = int(value.strip())
        total = end + 4 + length
        if len(buf) < total:
            return None
        msg = bytes(buf[:total])
        del buf[:total]
        return msg

    def recv(self, timeout: float | None = None) -> Response | None:
        """The next response, parsed; ``None`` on timeout."""
        data = self.recv_message(timeout)
        return None if data is None else parse_response(data)

    def closed_by_peer(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """TCP: wait (bounded) for the server to close the connection."""
        deadline = time.monotonic() + timeout
        while not self._eof and time.monotonic() < deadline:
            data = self.recv_raw(deadline - time.monotonic())
            if data is not None:
                self._buf += data
        return self._eof

    # -- requests -----------------------------------------------------------------------------
    def via(self, branch: str | None = None, *, rport: bool = True) -> str:
        """A Via value for this socket."""
        tp = self.transport.upper()
        params = f";branch=z9hG4bK{branch or token()}" + (";rport" if rport else "")
        return f"SIP/2.0/{tp} {self.local[0]}:{self.local[1]}{params}"

    def contact(self, user: str, *, uri_params: str = "", **params: str | None) -> str:
        """``<sip:user@ip:port[;transport=tcp]uri_params>;params`` for this socket.

        ``uri_params`` go inside the brackets (``";ob"``); keyword params are contact-params
        after them (``expires="0"``; ``None`` writes a bare name).
        """
        tp = ";transport=tcp" if self.transport == "tcp" else ""
        extra = "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())
        return f"<sip:{user}@{self.local[0]}:{self.local[1]}{tp}{uri_params}>{extra}"

    def build(self, method: str, uri: str, *, from_user: str = "101", to_user: str | None = None,
              headers: Iterable[tuple[str, str]] = (), body: bytes = b"",
              via: str | None = None, cseq: int | None = None, call_id: str | None = None,
              cseq_method: str | None = None, to_tag: str | None = None) -> bytes:
        """A request with the mandatory headers; CSeq counts up per client unless given."""
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        domain = self.server[0]
        to = f"<sip:{to_user or from_user}@{domain}>" + (f";tag={to_tag}" if to_tag else "")
        lines = [f"{method} {uri} SIP/2.0",
                 f"Via: {via or self.via()}",
                 "Max-Forwards: 70",
                 f"From: <sip:{from_user}@{domain}>;tag={self.from_tag}",
                 f"To: {to}",
                 f"Call-ID: {call_id or self.call_id}",
                 f"CSeq: {cseq} {cseq_method or method}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def request(self, data: bytes | str, timeout: float | None = None) -> Response | None:
        """Send a request and return its final response (1xx skipped), ``None`` on timeout."""
        self.send(data)
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        for _ in range(100):
            resp = self.recv(max(0.0, deadline - time.monotonic()))
            if resp is None or resp.status >= 200:
                return resp
        return None

    def options(self, timeout: float | None = None) -> Response | None:
        """An OPTIONS ping to the switch; its response."""
        return self.request(self.build("OPTIONS", f"sip:{self.server[0]}:{self.server[1]}",
                                       call_id=f"{token()}@{HOST}", headers=[("Accept", "application/sdp")]),
                            timeout)

    def register(self, user: str, password: str, *, expires: int | None = 3600,
                 contacts: Iterable[str] | None = None, uri: str | None = None,
                 digest_uri: str | None = None, use_qop: bool | None = None,
                 algorithm: str = "MD5", auth_user: str | None = None,
                 extra: Iterable[tuple[str, str]] = ()) -> tuple[Response, Response]:
        """REGISTER ``user``: challenge, then credentials. Returns (first, second) response.

        When the first answer is not a 401 it is returned twice. ``algorithm`` picks which
        of the offered challenges is answered.
        """
        ruri = uri or f"sip:{self.server[0]}"
        headers = [("Contact", c) for c in (contacts if contacts is not None else [self.contact(user)])]
        if expires is not None:
            headers.append(("Expires", str(expires)))
        headers += list(extra)
        first = self.request(self.build("REGISTER", ruri, from_user=user, headers=headers))
        assert first is not None, f"no answer to REGISTER {user}"
        if first.status != 401:
            return first, first
        ch = pick_challenge(first, algorithm)
        auth = authorization(ch, username=auth_user or user, password=password, method="REGISTER",
                             uri=digest_uri or ruri, use_qop=use_qop)
        second = self.request(self.build("REGISTER", ruri, from_user=user,
                                         headers=[*headers, ("Authorization", auth)]))
        assert second is not None, f"no answer to the authenticated REGISTER {user}"
        return first, second


def challenges(resp: Response) -> list[Challenge]:
    """Every Digest challenge of a 401."""
    return [parse_challenge(v) for v in resp.get_all("www-authenticate")]


def pick_challenge(resp: Response, algorithm: str = "MD5") -> Challenge:
    """The challenge of a 401 for ``algorithm``."""
    found = challenges(resp)
    for ch in found:
        if ch.algorithm == algorithm.upper():
            return ch
    raise AssertionError(f"no {algorithm} challenge in {[c.params for c in found]}")


def header_names(resp: Response) -> list[str]:
    """Header names of a response, lower-cased, in order."""
    return [name.lower() for name, _ in resp.headers]
