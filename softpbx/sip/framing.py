"""Framing SIP messages on a byte stream (RFC 3261 §18.3) and CRLF keep-alives (RFC 5626 §3.5.1).

On TCP the end of a message is known only from ``Content-Length``; a message without one, or
with a negative or doubled one, cannot be framed: the framer hands that message out (so the
stack can still answer ``400``) and stops, and the connection must be closed.
"""

from __future__ import annotations

import re

from .parser import header_end

PING = b"\r\n\r\n"
"""RFC 5626 §3.5.1 keep-alive ping (double CRLF); answered with :data:`PONG`."""
PONG = b"\r\n"
"""The keep-alive pong (single CRLF)."""

_CL_RE = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(.*?)[ \t]*\r?$", re.I | re.M)


class StreamFramer:
    """Splits one connection's byte stream into messages."""

    __slots__ = ("_buf", "max_size", "broken")

    def __init__(self, *, max_size: int = 65536) -> None:
        self._buf = bytearray()
        self.max_size = max_size
        """Largest message accepted; a larger one breaks the framing (513)."""
        self.broken: str | None = None
        """Why framing stopped; once set, the connection must be closed."""

    @property
    def pending(self) -> int:
        """Bytes buffered of an incomplete message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the complete messages (and :data:`PING` for keep-alives).

        When the stream becomes unframeable the offending bytes are returned last and
        :attr:`broken` is set; later input is ignored.
        """
        if self.broken is not None:
            return []
        buf = self._buf
        buf += data
        out: list[bytes] = []
        while buf:
            # Keep-alives and stray CRLFs between messages (RFC 3261 §7.5, RFC 5626 §3.5.1).
            if buf[0] in (13, 10):
                if buf.startswith(PING):
                    out.append(PING)
                    del buf[:4]
                    continue
                if buf.startswith(b"\r\n"):
                    if len(buf) < 4 and buf[2:] == b"\r":
                        break  # "\r\n\r": wait, it could become a ping
                    del buf[:2]  # a pong, or a lone CRLF before a message (or more CRs)
                    continue
                if len(buf) == 1 and buf[0] == 13:
                    break
                del buf[:1]
                continue
            end, sep = header_end(buf)
            if end < 0:
                if len(buf) > self.max_size:
                    return self._break(out, "Message too large", bytes(buf))
                break
            head = bytes(buf[:end])
            found = _CL_RE.findall(head)
            if len(found) != 1:
                reason = "Missing Content-Length" if not found else "Multiple Content-Length values"
                return self._break(out, reason, bytes(buf))
            value = found[0]
            if not value.isdigit() or len(value) > 9:
                return self._break(out, "Bad Content-Length", bytes(buf))
            total = end + sep + int(value)
            if total > self.max_size:
                return self._break(out, "Message too large", bytes(buf[: end + sep]))
            if len(buf) < total:
                break
            out.append(bytes(buf[:total]))
            del buf[:total]
        return out

    def feed_eof(self) -> bytes | None:
        """The peer closed its side: return what is left as a last (probably broken) message."""
        if self.broken is not None or not self._buf.strip():
            self._buf.clear()
            return None
        rest = bytes(self._buf)
        self._buf.clear()
        self.broken = "Connection closed mid-message"
        return rest

    def _break(self, out: list[bytes], reason: str, data: bytes) -> list[bytes]:
        self.broken = reason
        self._buf.clear()
        out.append(data)
        return out
