"""Typed SIP protocol errors that carry their wire answer (STYLE.md habit 7).

A parse or validation problem raises :class:`SipError` with ``status_hint``; the stack turns it
into that response in exactly one place (``stack.SipStack._reject``), or drops the message when
no response is possible (a broken response, a request too broken to answer).
"""

from __future__ import annotations


class SipError(Exception):
    """A SIP message could not be accepted; ``status_hint`` is the response it deserves."""

    status_hint: int = 400

    def __init__(self, reason: str, status_hint: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if status_hint is not None:
            self.status_hint = status_hint


class ParseError(SipError):
    """The bytes are not a well-formed SIP message (RFC 3261 §25): ``400 Bad Request``."""

    status_hint = 400


class VersionError(SipError):
    """The SIP-Version is not ``SIP/2.0``: ``505 Version Not Supported``."""

    status_hint = 505


class FramingError(ParseError):
    """A stream (TCP) can no longer be framed; the connection must be closed after the answer."""
