"""Registering softpbx to a provider (``register = true`` gateways), RFC 3261 §10.2, sans-IO.

REGISTER, answer one 401/407 with the gateway's credentials, refresh before the granted
expiry runs out, and retry after ``retry_seconds`` when the provider refuses or is silent.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from enum import Enum
from typing import Protocol

from ..config.schema import Gateway
from ..sip.auth import answer_challenge
from ..sip.events import Flow
from ..sip.message import Request, Response
from ..sip.stack import SipStack, new_tag
from ..sip.transaction import ClientTransaction
from ..sip.uri import split_hostport
from .timers import TimerQueue

log = logging.getLogger("softpbx.gateway")


class RegHost(Protocol):
    """What a gateway registration needs from the switch."""

    stack: SipStack
    timers: TimerQueue

    def contact_for(self, flow: Flow) -> str: ...
    def gateway_flow(self, gateway: Gateway) -> Flow: ...


class RegState(Enum):
    """Where a gateway registration is."""

    IDLE = "idle"
    REGISTERING = "registering"
    REGISTERED = "registered"
    FAILED = "failed"


class GatewayRegistration:
    """One provider registration."""

    def __init__(self, *, host: RegHost, gateway: Gateway) -> None:
        self.host = host
        self.gateway = gateway
        self.state = RegState.IDLE
        self.timers: dict[str, int] = {}
        self.call_id = f"{secrets.token_hex(12)}@softpbx"
        self.tag = new_tag()
        self.cseq = 0
        self.expires_at: float | None = None
        self.last_status = 0
        self._auth_tried = False
        self._stopping = False
        self._expires = gateway.expire_seconds
        """Expiry asked for (raised to the provider's Min-Expires after a 423)."""
        self._last_expires = self._expires
        self._tx: ClientTransaction | None = None
        domain = gateway.realm or split_hostport(gateway.proxy)[0]
        user = gateway.from_user or gateway.username
        self.aor = f"sip:{user}@{domain}"
        self.request_uri = f"sip:{domain}"
        self.line = secrets.token_hex(12)
        """Random ``line`` parameter of the Contact we register: the provider's INVITEs to that
        Contact carry it, which identifies the gateway wherever they come from."""

    @property
    def unregistering(self) -> bool:
        """An un-REGISTER (see :meth:`stop`) is still waiting for the provider's answer."""
        return self._stopping and self._tx is not None

    def owns_line(self, line: str) -> bool:
        """Whether ``line`` (a Request-URI parameter) is this registration's."""
        return hmac.compare_digest(line.encode("utf-8", "surrogateescape"), self.line.encode())

    def start(self, now: float) -> None:
        """Send a REGISTER (first time, refresh or retry)."""
        self._auth_tried = False
        self._stopping = False
        self._send(now, None, self._expires)

    def stop(self, now: float) -> bool:
        """Shutting down: remove our binding at the provider (REGISTER with ``Expires: 0``).
        Returns whether a request went out (the shell may wait a moment for it)."""
        TimerQueue.cancel(self, "refresh")
        was_registered = self.state is RegState.REGISTERED
        self._stopping = True
        self.state = RegState.IDLE
        if not was_registered:
            return False
        self._auth_tried = False
        self._send(now, None, 0)
        return True

    def _contact(self, flow: Flow) -> str:
        uri = self.host.contact_for(flow)[1:-1].replace("sip:softpbx@",
                                                          f"sip:{self.gateway.username}@")
        return f"<{uri};line={self.line}>"

    def _send(self, now: float, authorization: tuple[str, str] | None,
              expires: int | None = None) -> None:
        self.cseq += 1
        flow = self.host.gateway_flow(self.gateway)
        headers = [
            ("Max-Forwards", "70"),
            ("From", f"<{self.aor}>;tag={self.tag}"),
            ("To", f"<{self.aor}>"),
            ("Call-ID", self.call_id),
            ("CSeq", f"{self.cseq} REGISTER"),
            ("Contact", self._contact(flow)),
            ("Expires", str(self._expires if expires is None else expires)),
        ]
        if authorization is not None:
            headers.append(authorization)
        headers.append(("Content-Length", "0"))
        req = Request("REGISTER", self.request_uri, headers)
        if not self._stopping and self.state is not RegState.REGISTERED:
            self.state = RegState.REGISTERING
        self._last_expires = self._expires if expires is None else expires
        self._tx = self.host.stack.send_request(req, flow, now)
        self._tx.user_data = self

    def on_response(self, resp: Response, tx: ClientTransaction, now: float) -> None:
        """The provider answered a REGISTER."""
        if tx is not self._tx or resp.status < 200:
            return
        self.last_status = resp.status
        if resp.status in (401, 407) and not self._auth_tried:
            self._auth_tried = True
            answer = answer_challenge(resp, method="REGISTER", uri=self.request_uri,
                                      username=self.gateway.username,
                                      password=self.gateway.password,
                                      algorithms=self.gateway.auth_algorithms)
            if answer is not None:
                self._send(now, answer, self._last_expires)
                return
        if self._stopping:
            log.info("gateway %s unregistered (%d)", self.gateway.name, resp.status)
            self._tx = None
            return
        if resp.status == 423:
            # RFC 3261 §10.2.8: ask again with at least the provider's Min-Expires.
            floor = _seconds(resp.get("min-expires"))
            if floor is not None and self._expires < floor <= 86400:
                self._expires = floor
                self._auth_tried = False
                self._send(now, None)
                return
        if 200 <= resp.status < 300:
            granted = self._granted(resp)
            if granted <= 0:
                self._failed(now, "the provider kept no binding (expires 0)")
                return
            self.state = RegState.REGISTERED
            self.expires_at = now + granted
            # Refresh well before the binding lapses (half-way for short ones).
            refresh = max(granted - 60, granted / 2, 1)
            self.host.timers.schedule(self, "refresh", now + refresh)
            log.info("gateway %s registered (%ds)", self.gateway.name, granted)
            return
        self._failed(now, f"{resp.status} {resp.reason}")

    def _granted(self, resp: Response) -> int:
        """The expiry the provider granted our Contact (found by its ``line`` parameter; the
        200 lists every binding of the account, RFC 3261 §10.3 step 8)."""
        want = self._expires
        contacts = resp.contacts or []
        ours = [c for c in contacts if c.uri.params.get("line") == self.line] or [
            c for c in contacts if c.uri.user == self.gateway.username]
        for c in ours:
            granted = _seconds(c.params.get("expires"))
            if granted is not None:
                return granted
        granted = _seconds(resp.get("expires"))
        return want if granted is None else granted

    def on_timeout(self, tx: ClientTransaction, now: float) -> None:
        """The provider did not answer."""
        if tx is not self._tx:
            return
        if self._stopping:
            self._tx = None
        else:
            self._failed(now, "timeout")

    def _failed(self, now: float, why: str) -> None:
        self.state = RegState.FAILED
        log.warning("gateway %s registration failed: %s; retry in %ds", self.gateway.name, why,
                    self.gateway.retry_seconds)
        self.host.timers.schedule(self, "refresh", now + self.gateway.retry_seconds)

    def on_timer(self, name: str, now: float) -> None:
        """Refresh or retry."""
        if name == "refresh":
            self.start(now)


def _seconds(text: str | None) -> int | None:
    """A provider's ``expires`` value (``1*DIGIT``), or ``None`` when absent or not a number."""
    if text is None:
        return None
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        return None
    return int(text)
