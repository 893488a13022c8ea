"""The switch: the top sans-IO object the shell feeds (ARCHITECTURE.md "core/").

It owns the SIP stack, the registrar and the authenticator, dispatches requests by method,
and hands out bytes to send, actions to carry out, and one timer.
"""

from __future__ import annotations

import logging
from collections import deque

from ..config.schema import Config, Gateway
from ..sip.auth import FAILURES, AuthOutcome, DigestAuthenticator
from ..sip.errors import ParseError, SipError
from ..sip.events import (
    CancelReceived,
    Flow,
    MessageRejected,
    Outgoing,
    RequestReceived,
    ResponseReceived,
    TransactionTimeout,
)
from ..sip.message import Request
from ..sip.stack import SipStack, new_tag
from ..sip.transaction import ServerTransaction
from ..sip.uri import split_hostport
from .events import Action, Binding
from .registrar import IntervalTooBrief, Registrar
from .security import FailureTracker

log = logging.getLogger("softpbx.switch")
auth_log = logging.getLogger("softpbx.auth")

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER"
"""Methods softpbx implements (RFC 3261 §20.5)."""
KNOWN_METHODS = frozenset({"INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REGISTER", "INFO",
                           "UPDATE", "PRACK", "SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE",
                           "REFER"})
"""Methods softpbx knows of: the ones it does not implement get 405, unknown ones 501."""
SUPPORTED = frozenset({"path", "outbound"})
"""Option tags softpbx accepts in ``Require`` (RFC 3261 §8.2.2.3)."""


def gateway_matcher(gateways: tuple[Gateway, ...]) -> dict[tuple[str, int | None], Gateway]:
    """(ip, port or None) -> gateway, from ``inbound_addresses`` or the proxy address."""
    table: dict[tuple[str, int | None], Gateway] = {}
    for gw in gateways:
        addrs = gw.inbound_addresses or (gw.proxy,)
        for a in addrs:
            if a.count(":") > 1 and not a.startswith("["):
                table[(a.lower(), None)] = gw  # bare IPv6
                continue
            host, port = split_hostport(a)
            table[(host.strip("[]").lower(), port)] = gw
    return table


class Switch:
    """Routes SIP requests to the registrar and (later) to calls."""

    def __init__(self, *, config: Config, auth_secret: bytes | None = None) -> None:
        self.config = config
        self.stack = SipStack(settings=config.sip, server_name=config.global_.user_agent)
        secret = auth_secret or (config.auth.secret.encode() if config.auth.secret else None)
        self.auth = DigestAuthenticator(realm=config.global_.domain, secret=secret,
                                        nonce_ttl=config.auth.nonce_ttl,
                                        algorithms=config.auth.algorithms)
        self.extensions = {e.id: e for e in config.extensions if e.enabled}
        self.auth.set_users({e.id: e.password for e in self.extensions.values()})
        self.registrar = Registrar(settings=config.registrar)
        self.failures = FailureTracker(max_failures=config.auth.max_failures,
                                       window=config.auth.failure_window,
                                       ban_time=config.auth.ban_time)
        self.gateways = gateway_matcher(config.gateways)
        self._actions: deque[Action] = deque()

    # -- shell API ----------------------------------------------------------------------------
    def receive(self, data: bytes, flow: Flow, now: float, *, framing_error: str | None = None) -> None:
        """A datagram or framed stream message arrived."""
        self.stack.receive(data, flow, now, framing_error=framing_error)
        self._drain(now)

    def handle_timer(self, now: float) -> None:
        """The shell's one timer fired."""
        self.stack.handle_timer(now)
        self._actions.extend(self.registrar.expire(now))
        self._drain(now)

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is due next."""
        a = self.stack.get_timer()
        b = self.registrar.next_expiry()
        if a is None:
            return b
        return a if b is None else min(a, b)

    def datagrams_to_send(self) -> list[Outgoing]:
        """Bytes for the transports."""
        return self.stack.datagrams_to_send()

    def next_action(self) -> Action | None:
        """The next store action, or ``None``."""
        return self._actions.popleft() if self._actions else None

    def load_bindings(self, bindings: list[Binding]) -> None:
        """Bindings read back from the store (their ``expires_at`` already in our clock)."""
        self.registrar.load(bindings)

    def gateway_for(self, flow: Flow) -> Gateway | None:
        """The gateway a request from ``flow`` belongs to (address and port, or address)."""
        ip, port = flow.remote
        ip = ip.lower()
        return self.gateways.get((ip, port)) or self.gateways.get((ip, None))

    # -- dispatch -----------------------------------------------------------------------------
    def _drain(self, now: float) -> None:
        stack = self.stack
        while (ev := stack.next_event()) is not None:
            if isinstance(ev, RequestReceived):
                if ev.tx is None:
                    continue  # ACK for a 2xx: no dialogs yet in this layer
                try:
                    self._on_request(ev.request, ev.tx, ev.flow, now)
                except SipError as exc:
                    self._refuse(ev.tx, exc, now)
            elif isinstance(ev, MessageRejected):
                log.warning("rejected message from %s: %s (%s)", ev.flow, ev.reason,
                            ev.status if ev.status else "dropped")
            elif isinstance(ev, CancelReceived):
                stack.reply(ev.invite_tx, 487, now=now, to_tag=new_tag())
            elif isinstance(ev, (ResponseReceived, TransactionTimeout)):
                pass  # no client transactions are started by this layer yet

    def _refuse(self, tx: ServerTransaction, exc: SipError, now: float) -> None:
        """The one place the core turns a SipError into a response."""
        headers: list[tuple[str, str]] = []
        if isinstance(exc, IntervalTooBrief):
            headers.append(("Min-Expires", str(self.config.registrar.min_expires)))
        log.info("refused %s from %s: %d %s", tx.method, tx.flow, exc.status_hint, exc.reason)
        self.stack.reply(tx, exc.status_hint, exc.reason if exc.status_hint == 400 else None,
                         now=now, to_tag=new_tag(), headers=headers)

    def _on_request(self, req: Request, tx: ServerTransaction, flow: Flow, now: float) -> None:
        method = req.method
        reply = self.stack.reply
        # RFC 3261 §8.2.1-§8.2.3, in the RFC's order: method, URI scheme, extensions.
        if method not in KNOWN_METHODS:
            reply(tx, 501, now=now, to_tag=new_tag(), headers=[("Allow", ALLOW)])
            return
        if not req.uri.is_sip:
            reply(tx, 416, now=now, to_tag=new_tag())
            return
        unsupported = [t for t in (x.lower() for x in req.values("require")) if t not in SUPPORTED]
        if unsupported and method not in ("CANCEL", "ACK"):
            reply(tx, 420, now=now, to_tag=new_tag(), headers=[("Unsupported", ", ".join(unsupported))])
            return
        if method == "REGISTER":
            self._on_register(req, tx, flow, now)
        elif method == "OPTIONS":
            reply(tx, 200, now=now, to_tag=new_tag(), headers=[
                ("Allow", ALLOW), ("Accept", "application/sdp"),
                ("Supported", ", ".join(sorted(SUPPORTED))), ("Accept-Language", "en")])
        elif method == "INVITE":
            self._on_invite(req, tx, flow, now)
        elif method in ("BYE", "CANCEL", "INFO", "UPDATE", "PRACK"):
            reply(tx, 481, now=now, to_tag=new_tag())
        else:
            reply(tx, 405, now=now, to_tag=new_tag(), headers=[("Allow", ALLOW)])

    # -- authentication -----------------------------------------------------------------------
    def authenticate(self, req: Request, tx: ServerTransaction, flow: Flow, now: float) -> str | None:
        """Check digest credentials; answer 401/403 and return ``None`` unless they are good.

        An unknown user and a wrong password get the same 403, and both count towards the
        source's failure limit (no extension enumeration, RFC 3261 §26.3.2.4 spirit).
        """
        ip = flow.remote[0]
        if self.failures.is_banned(ip, now):
            self.stack.reply(tx, 403, now=now, to_tag=new_tag())
            return None
        result = self.auth.check(req.method, req.get_all("authorization"), now)
        outcome = result.outcome
        if outcome is AuthOutcome.OK:
            return result.username
        if outcome in FAILURES:
            auth_log.warning(
                'softpbx auth failure: ip=%s port=%d transport=%s method=%s user="%s" reason=%s',
                ip, flow.remote[1], flow.transport.value, req.method,
                result.username.replace('"', "'")[:64], outcome.value)
            if self.failures.record_failure(ip, now):
                auth_log.warning("softpbx auth ban: ip=%s for %ds after %d failures", ip,
                                 self.config.auth.ban_time, self.config.auth.max_failures)
            self.stack.reply(tx, 403, now=now, to_tag=new_tag())
            return None
        headers = [("WWW-Authenticate", v)
                   for v in self.auth.challenge(now, stale=outcome is AuthOutcome.STALE)]
        self.stack.reply(tx, 401, now=now, to_tag=new_tag(), headers=headers)
        return None

    def _on_register(self, req: Request, tx: ServerTransaction, flow: Flow, now: float) -> None:
        to_uri = req.to.uri
        if not to_uri.is_sip:
            raise ParseError("To is not a SIP AOR")
        user = self.authenticate(req, tx, flow, now)
        if user is None:
            return
        aor = to_uri.unescaped_user
        if aor != user or aor not in self.extensions:
            # Credentials of one extension cannot register another: same answer as a bad password.
            auth_log.warning(
                'softpbx auth failure: ip=%s port=%d transport=%s method=REGISTER user="%s" reason=aor_mismatch',
                flow.remote[0], flow.remote[1], flow.transport.value, user[:64])
            self.failures.record_failure(flow.remote[0], now)
            self.stack.reply(tx, 403, now=now, to_tag=new_tag())
            return
        headers, actions = self.registrar.register(req, aor, flow, now)
        self._actions.extend(actions)
        self.stack.reply(tx, 200, now=now, to_tag=new_tag(), headers=headers)

    def _on_invite(self, req: Request, tx: ServerTransaction, flow: Flow, now: float) -> None:
        ct = req.content_type
        if req.body and ct is not None and ct != "application/sdp":
            self.stack.reply(tx, 415, now=now, to_tag=new_tag(), headers=[("Accept", "application/sdp")])
            return
        if self.gateway_for(flow) is None and self.authenticate(req, tx, flow, now) is None:
            return
        # Calls (B2BUA legs, routing, media) are the next layer; until it exists no INVITE
        # is routed anywhere.
        self.stack.reply(tx, 480, now=now, to_tag=new_tag())
