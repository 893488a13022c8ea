"""POSTs one webhook to the CRM (aiohttp client): the only IO in ``crm/``.

One attempt = one POST of the event's form (:mod:`.forms`) with ``X-Event-Id`` (and
``Signature`` when a secret is set); the outcome is an :class:`AttemptResult`, never an
exception, so the outbox decides everything from one value.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import aiohttp

from .forms import encode_form, signature

MAX_ANSWER_BYTES = 64 * 1024
"""Bytes of a CRM answer read (a NOTIFY_START answer is a small JSON object)."""


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one POST got."""

    status: int | None
    """HTTP status, or ``None`` when there was no answer (``error`` says why)."""
    body: bytes
    """The answer body (at most :data:`MAX_ANSWER_BYTES`)."""
    error: str
    """``timeout``, the network error, or "" when an answer came."""
    latency_ms: float

    @property
    def problem(self) -> str:
        """Why this attempt gave no usable answer, for ``CrmAnswer.failed`` ("" on 2xx)."""
        if self.status is None:
            return self.error
        return "" if 200 <= self.status <= 299 else f"HTTP {self.status}"


class WebhookSender:
    """POSTs to one URL through one connection pool of at most ``max_in_flight`` sockets."""

    def __init__(self, *, url: str, timeout_s: float, max_in_flight: int,
                 secret: str = "") -> None:
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.secret = secret
        self._max = max_in_flight
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Created on first use, inside the running loop (aiohttp binds it to the loop).
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max, ttl_dns_cache=60),
                timeout=self.timeout, auto_decompress=True, skip_auto_headers=("User-Agent",),
                headers={"User-Agent": "softpbx"})
        return self._session

    async def post(self, *, event_id: str, event: str,
                   fields: tuple[tuple[str, str], ...]) -> AttemptResult:
        """One attempt. Redirects are not followed: a CRM URL that moved is a configuration
        error, reported as its 3xx (and the event fails)."""
        body, content_type = encode_form(fields)
        headers = {"Content-Type": content_type, "X-Event-Id": event_id}
        if self.secret:
            headers["Signature"] = signature(event, fields, self.secret)
        start = time.perf_counter()
        try:
            async with self._client().post(self.url, data=body, headers=headers,
                                           allow_redirects=False) as resp:
                answer = await _read_capped(resp.content, MAX_ANSWER_BYTES)
                status = resp.status
        except TimeoutError:
            return AttemptResult(None, b"", "timeout", _ms(start))
        except aiohttp.ClientError as exc:
            return AttemptResult(None, b"", _describe(exc), _ms(start))
        except OSError as exc:  # what aiohttp does not wrap (a socket error mid-read)
            return AttemptResult(None, b"", f"network error: {exc}", _ms(start))
        return AttemptResult(status, answer, "", _ms(start))

    async def close(self) -> None:
        """Close the connection pool (attempts under way are abandoned)."""
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_capped(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to ``limit`` bytes (``read(n)`` returns what is buffered, maybe less)."""
    out = bytearray()
    while len(out) < limit:
        chunk = await stream.read(limit - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)


def _describe(exc: aiohttp.ClientError) -> str:
    text = str(exc) or type(exc).__name__
    return f"network error: {text}"[:200]
