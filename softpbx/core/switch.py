"""The switch: the top sans-IO object the shell feeds (ARCHITECTURE.md "core/").

It owns the SIP stack, the registrar and the authenticator, dispatches requests by method,
and hands out bytes to send, actions to carry out, and one timer.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import deque
from email.utils import formatdate

from ..config.schema import Config, Gateway, Transport
from ..sip.auth import FAILURES, AuthOutcome, DigestAuthenticator
from ..sip.body import multipart_parts
from ..sip.dialog import Dialog
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
from .call import Call, MediaRelay
from .events import Action, Binding, OriginateRefused, WriteCdr
from .gateway_reg import GatewayRegistration
from .leg import Leg
from .notify import CrmAnswer, Notifier
from .originate import OriginatedCall
from .pickup import pick, wanted
from .reconfig import ReloadResult, diff_by_key, gateways_in_use, merged, needs_restart
from .refer import on_refer
from .registrar import IntervalTooBrief, Registrar
from .replaces import on_replaces
from .routing import Direction, NoRoute, Router
from .security import FailureTracker, RateLimitedLog, loggable
from .stats import CallStats
from .timers import TimerQueue

log = logging.getLogger("softpbx.switch")
auth_log = logging.getLogger("softpbx.auth")

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, UPDATE, INFO, REFER"
"""Methods softpbx implements (RFC 3261 §20.5)."""
KNOWN_METHODS = frozenset({"INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REGISTER", "INFO",
                           "UPDATE", "PRACK", "SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE",
                           "REFER"})
"""Methods softpbx knows of: the ones it does not implement get 405, unknown ones 501."""
REJECTED_LOG_INTERVAL = 10.0
"""Seconds between two "rejected message" warnings for one source (the rest are counted)."""
SUPPORTED = frozenset({"outbound", "replaces"})
"""Option tags softpbx accepts in ``Require`` (RFC 3261 §8.2.2.3). ``outbound`` (RFC 5626):
softpbx is the edge and the registrar, keeps each registration's flow and answers CRLF
keep-alives; ``path`` (RFC 3327) is not implemented, so it is not claimed. ``replaces``
(RFC 3891): an INVITE with Replaces takes over an answered dialog (:mod:`.replaces`)."""


def gateway_matcher(gateways: tuple[Gateway, ...]) -> dict[tuple[str, int | None], Gateway]:
    """(ip, port or None) -> gateway, from ``inbound_addresses`` or the proxy address.

    A proxy given by host name is left out here: it enters the table once the shell resolved
    it (:meth:`Switch.set_gateway_address`)."""
    table: dict[tuple[str, int | None], Gateway] = {}
    for gw in gateways:
        addrs = gw.inbound_addresses or (gw.proxy,)
        for a in addrs:
            if a.count(":") > 1 and not a.startswith("["):
                table[(a.lower(), None)] = gw  # bare IPv6
                continue
            host, port = split_hostport(a)
            host = host.strip("[]").lower()
            if _is_ip(host):
                table[(host, port)] = gw
    return table


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Switch:
    """Routes SIP requests to the registrar and (later) to calls."""

    def __init__(self, *, config: Config, auth_secret: bytes | None = None,
                 relay: MediaRelay | None = None) -> None:
        self.config = config
        self.relay = relay  # type: ignore[assignment]
        """The media relay (None: calls are refused with 503)."""
        self.timers = TimerQueue()
        self.router = Router(config=config)
        self.calls: dict[str, Call] = {}
        self._dialogs: dict[tuple[str, str, str], Leg] = {}
        self._gateways_by_name = {g.name: g for g in config.gateways}
        self._gateway_addrs: dict[str, tuple[str, int]] = {}
        self.gateway_registrations = {
            g.name: GatewayRegistration(host=self, gateway=g) for g in config.gateways if g.register}
        self.stack = SipStack(settings=config.sip, server_name=config.global_.user_agent)
        secret = auth_secret or (config.auth.secret.encode() if config.auth.secret else None)
        self.auth = DigestAuthenticator(realm=config.global_.domain, secret=secret,
                                        nonce_ttl=config.auth.nonce_ttl,
                                        algorithms=config.auth.algorithms)
        self.extensions = {e.id: e for e in config.extensions if e.enabled}
        self.auth.set_users({e.id: e.password for e in self.extensions.values()},
                            {e.id: e.auth_algorithms for e in self.extensions.values()})
        self.registrar = Registrar(settings=config.registrar)
        self.failures = FailureTracker(max_failures=config.auth.max_failures,
                                       window=config.auth.failure_window,
                                       ban_time=config.auth.ban_time)
        # A peer sending garbage in a loop: one warning per source per 10 s, not one per message.
        self.rejected_log = RateLimitedLog(logger=log, interval=REJECTED_LOG_INTERVAL,
                                           timers=self.timers)
        self.gateways = gateway_matcher(config.gateways)
        self.stats = CallStats()
        """Calls ended and setup times, in plain ints (read by the metrics at scrape time)."""
        self._actions: deque[Action] = deque()
        self.notifier = Notifier(settings=config.crm, timezone=config.global_.timezone,
                                 emit=self._actions.append)
        """The one maker of CRM events (NOTIFY_*)."""
        self.wall_offset = 0.0
        """Wall-clock (Unix) time minus ``now``; the shell keeps it current. The core reads no
        clock: this only dates what goes on the wire (``Date`` in a REGISTER's 200)."""

    def start(self, now: float) -> None:
        """The shell is listening: register to the providers that want it."""
        for reg in self.gateway_registrations.values():
            reg.start(now)
        self._drain(now)

    def unregister_gateways(self, now: float) -> int:
        """Shutting down: withdraw our registrations at the providers; how many went out."""
        n = sum(reg.stop(now) for reg in self.gateway_registrations.values())
        self._drain(now)
        return n

    def reload(self, config: Config, now: float) -> ReloadResult:
        """Swap in the extensions, gateways and dial plan of ``config`` (validated already)
        for every new call and registration; live calls keep the route they were given and
        registrations of extensions still there are kept. The other sections keep their
        running values and are reported in ``needs_restart`` (see :mod:`.reconfig`)."""
        old, new = self.config, merged(self.config, config)
        old_ext = {e.id: e for e in old.extensions}
        ext_added, ext_removed, ext_changed = diff_by_key(old_ext, {e.id: e for e in new.extensions})
        old_gw, new_gw = self._gateways_by_name, {g.name: g for g in new.gateways}
        gw_added, gw_removed, gw_changed = diff_by_key(old_gw, new_gw)
        self.config, self.router = new, Router(config=new)
        self.extensions = {e.id: e for e in new.extensions if e.enabled}
        self.auth.set_users({e.id: e.password for e in self.extensions.values()},
                            {e.id: e.auth_algorithms for e in self.extensions.values()})
        dropped = [a for aor in old_ext if aor not in self.extensions
                   for a in self.registrar.drop(aor)]
        self._actions.extend(dropped)
        # A live call may still ring or fall back to a gateway that is gone: its own route
        # names it, so it stays known by name (not by address) until those calls end.
        in_use = gateways_in_use(self.calls.values())
        self._gateways_by_name = {**{n: g for n, g in old_gw.items() if n in in_use}, **new_gw}
        self._gateway_addrs = {n: a for n, a in self._gateway_addrs.items()
                               if n in new_gw and new_gw[n].proxy == old_gw[n].proxy}
        self.gateways = gateway_matcher(new.gateways)
        for name, addr in list(self._gateway_addrs.items()):
            self.set_gateway_address(name, addr)
        # Registrations to providers: withdrawn for removed or changed gateways (RFC 3261
        # §10.2.2, Expires: 0), sent for added or changed ones; unchanged ones go on as they are.
        for name in (*gw_removed, *gw_changed):
            if (reg := self.gateway_registrations.pop(name, None)) is not None:
                reg.stop(now)
        for name in (*gw_added, *gw_changed):
            if new_gw[name].register:
                reg = GatewayRegistration(host=self, gateway=new_gw[name])
                self.gateway_registrations[name] = reg
                reg.start(now)
        self._drain(now)
        return ReloadResult(ext_added, ext_removed, ext_changed, gw_added, gw_removed,
                            gw_changed, old.dialplan != new.dialplan, len(dropped),
                            needs_restart(old, config))

    # -- shell API ----------------------------------------------------------------------------
    def receive(self, data: bytes, flow: Flow, now: float, *, framing_error: str | None = None) -> None:
        """A datagram or framed stream message arrived."""
        self.stack.receive(data, flow, now, framing_error=framing_error)
        self._drain(now)

    def handle_timer(self, now: float) -> None:
        """The shell's one timer fired."""
        self.stack.handle_timer(now)
        self._drain(now)
        self.timers.fire(now)
        self._actions.extend(self.registrar.expire(now))
        self._drain(now)

    def flow_closed(self, flow: Flow, now: float) -> None:
        """The shell: stream ``flow`` (a TCP connection) closed. Bindings registered over it
        are not offered to calls any more unless their Contact can be reached by a new
        connection (RFC 5626 §4.4.1; see :mod:`softpbx.core.registrar`), and requests still
        waiting for an answer on it fail now (RFC 3261 §17.1.4: a ringing phone whose
        connection died is given up at once)."""
        self.registrar.flow_closed(flow)
        if self.stack.flow_closed(flow, now):
            self._drain(now)

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is due next."""
        times = [t for t in (self.stack.get_timer(), self.registrar.next_expiry(),
                             self.timers.next()) if t is not None]
        return min(times) if times else None

    @property
    def dialog_count(self) -> int:
        """Live dialogs (tests assert it returns to zero)."""
        return len(self._dialogs)

    # -- LegHost / CallHost -------------------------------------------------------------------
    def contact_for(self, flow: Flow) -> str:
        """Our Contact for messages on ``flow`` (in-dialog requests must come back to us)."""
        ip, port = flow.local
        tls = flow.transport is Transport.TLS
        for profile in (self.config.internal, self.config.external):
            ours = (profile.sip_ip, profile.tls_port if tls else profile.sip_port)
            if profile.ext_sip_ip and ours == flow.local:
                ip = profile.ext_sip_ip
        host = f"[{ip}]" if ":" in ip else ip
        # RFC 5630 §3.1.3 prefers sips:, but phones that registered sip:...;transport=tls
        # (most) follow this form best; either way the dialog stays on TLS.
        tp = f";transport={flow.transport.value}" if flow.reliable else ""
        return f"<sip:softpbx@{host}:{port}{tp}>"

    def add_dialog(self, dialog: Dialog, leg: Leg) -> None:
        """Route in-dialog requests of ``dialog`` to ``leg``."""
        i = dialog.id
        self._dialogs[(i.call_id, i.local_tag, i.remote_tag)] = leg

    def remove_dialog(self, dialog: Dialog) -> None:
        """Forget a dialog."""
        i = dialog.id
        self._dialogs.pop((i.call_id, i.local_tag, i.remote_tag), None)

    def gateway(self, name: str) -> Gateway:
        """The gateway called ``name`` (the config guarantees it exists)."""
        return self._gateways_by_name[name]

    def gateway_calls(self, name: str) -> int:
        """Calls that have a live leg to or from gateway ``name``."""
        n = 0
        for call in self.calls.values():
            if call.from_gateway == name or any(b.gateway == name and not b.ended
                                                for b in call.b_legs):
                n += 1
        return n

    def set_gateway_address(self, name: str, addr: tuple[str, int]) -> None:
        """The shell resolved a gateway's proxy (a hostname) to ``addr``: requests go there,
        and, unless the gateway lists its ``inbound_addresses``, requests from that IP (and
        the proxy's port, when it names one) are the gateway's."""
        self._gateway_addrs[name] = addr
        gw = self._gateways_by_name[name]
        if not gw.inbound_addresses:
            _, port = split_hostport(gw.proxy)
            self.gateways.setdefault((addr[0].lower(), port), gw)

    def gateway_flow(self, gateway: Gateway) -> Flow:
        """Where requests to ``gateway`` go, from the external profile's address."""
        addr = self._gateway_addrs.get(gateway.name)
        tls = gateway.transport is Transport.TLS  # labelled with our TLS listener's address
        if addr is None:
            host, port = split_hostport(gateway.proxy)
            addr = (host.strip("[]"), port or (5061 if tls else 5060))
        ext = self.config.external
        return Flow(gateway.transport, addr, (ext.sip_ip, ext.tls_port if tls else ext.sip_port))

    def call_action(self, action: Action) -> None:
        """A call asks the shell for something (start/stop recording)."""
        self._actions.append(action)

    def call_ended(self, call: Call, action: WriteCdr) -> None:
        """A call finished: forget it, store its CDR."""
        self.calls.pop(call.id, None)
        self.stats.call_ended(call.route.direction.value, call.disposition, call.created_at,
                              call.answered_at)
        self._actions.append(action)

    def datagrams_to_send(self) -> list[Outgoing]:
        """Bytes for the transports."""
        return self.stack.datagrams_to_send()

    def next_action(self) -> Action | None:
        """The next store action, or ``None``."""
        return self._actions.popleft() if self._actions else None

    def load_bindings(self, bindings: list[Binding]) -> None:
        """Bindings read back from the store (their ``expires_at`` already in our clock)."""
        self.registrar.load(bindings)

    def gateway_for(self, flow: Flow, req: Request | None = None) -> Gateway | None:
        """The gateway a request from ``flow`` belongs to: by address and port, by address, or
        by the registration it holds (the unguessable ``line`` parameter softpbx put in the
        Contact it registered, which the provider sends its INVITEs to, as Asterisk's
        ``line`` option does)."""
        ip, port = flow.remote
        ip = ip.lower()
        gw = self.gateways.get((ip, port)) or self.gateways.get((ip, None))
        if gw is None and req is not None and self.gateway_registrations:
            line = req.uri.params.get("line")
            if line:
                for reg in self.gateway_registrations.values():
                    if reg.owns_line(line):
                        return reg.gateway
        return gw

    # -- dispatch -----------------------------------------------------------------------------
    def _drain(self, now: float) -> None:
        stack = self.stack
        while (ev := stack.next_event()) is not None:
            if isinstance(ev, RequestReceived):
                if ev.tx is None:
                    self._on_ack(ev.request, now)
                    continue
                try:
                    self._on_request(ev.request, ev.tx, ev.flow, now)
                except SipError as exc:
                    self._refuse(ev.tx, exc, now)
                except Exception:
                    # A bug in softpbx, not the peer's fault: log it with its traceback and
                    # still end the transaction (it has no timer before its final response
                    # and would live for ever), then go on with the other events.
                    log.exception("internal error handling %s from %s", ev.request.method,
                                  ev.flow)
                    if not ev.tx.final_sent:
                        stack.reply(ev.tx, 500, now=now, to_tag=new_tag())
            elif isinstance(ev, ResponseReceived):
                owner = ev.owner
                if isinstance(owner, (Leg, GatewayRegistration)):
                    try:
                        owner.on_response(ev.response, ev.tx, now)
                    except SipError as exc:  # a header parsed lazily, only now, was malformed
                        log.warning("dropped a %d from %s: %s", ev.response.status, ev.tx.flow,
                                    exc.reason)
            elif isinstance(ev, TransactionTimeout):
                owner = ev.owner
                if isinstance(owner, (Leg, GatewayRegistration)) and ev.tx.kind in ("ict", "nict"):
                    owner.on_timeout(ev.tx, now)  # type: ignore[arg-type]
            elif isinstance(ev, MessageRejected):
                self.rejected_log.warning(ev.flow.remote[0], now,
                                          "rejected message from %s: %s (%s)", ev.flow,
                                          ev.reason, ev.status if ev.status else "dropped")
            elif isinstance(ev, CancelReceived):
                leg = ev.invite_tx.user_data
                if isinstance(leg, Leg):
                    # The caller's INVITE, or a re-INVITE from either party (the leg
                    # answers it 487 and the call withdraws what it forwarded).
                    leg.on_cancel(ev.invite_tx, now)
                else:
                    stack.reply(ev.invite_tx, 487, now=now, to_tag=new_tag())

    def _dialog_leg(self, req: Request) -> Leg | None:
        to_tag = req.to.tag
        if not to_tag:
            return None
        return self._dialogs.get((req.call_id, to_tag, req.from_.tag or ""))

    def _on_ack(self, req: Request, now: float) -> None:
        """An ACK outside any INVITE transaction: the ACK for a 2xx (RFC 3261 §13.2.2.4)."""
        try:
            leg = self._dialog_leg(req)
        except SipError:
            return
        if leg is not None:
            leg.on_ack(req, now)

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
        if req.to.tag and method != "REGISTER":  # some phones tag their REGISTER refreshes
            leg = self._dialog_leg(req)
            if leg is None or leg.ended:
                reply(tx, 481, now=now)
            else:
                if method == "REFER":  # a transfer: authenticated and routed there
                    on_refer(self, leg, req, tx, flow, now)
                else:
                    leg.on_request(req, tx, now)
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
        result = self.auth.check(req.method, req.get_all("authorization"), now,
                                 request_uri=req.uri_text)
        outcome = result.outcome
        if outcome is AuthOutcome.OK:
            return result.username
        if outcome in FAILURES:
            auth_log.warning(
                'softpbx auth failure: ip=%s port=%d transport=%s method=%s user="%s" reason=%s',
                ip, flow.remote[1], flow.transport.value, req.method,
                loggable(result.username), outcome.value)
            if self.failures.record_failure(ip, now):
                auth_log.warning("softpbx auth ban: ip=%s for %ds after %d failures", ip,
                                 self.config.auth.ban_time, self.config.auth.max_failures)
            self.stack.reply(tx, 403, now=now, to_tag=new_tag())
            return None
        # The challenge's algorithms are those of the extension the request is about: the To
        # user of a REGISTER (the AOR, RFC 3261 §10.2), the From user of anything else.
        try:
            party = req.to if req.method == "REGISTER" else req.from_
            user = party.uri.unescaped_user if party.uri.is_sip else None
        except ParseError:  # a From the stack let through but we cannot read: global list
            user = None
        headers = [("WWW-Authenticate", v)
                   for v in self.auth.challenge(now, stale=outcome is AuthOutcome.STALE, user=user)]
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
                flow.remote[0], flow.remote[1], flow.transport.value, loggable(user))
            self.failures.record_failure(flow.remote[0], now)
            self.stack.reply(tx, 403, now=now, to_tag=new_tag())
            return
        headers, actions = self.registrar.register(req, aor, flow, now)
        self._actions.extend(actions)
        # RFC 3261 §10.3 step 8: a Date header, so that phones without a clock can set one.
        headers.append(("Date", formatdate(now + self.wall_offset, usegmt=True)))
        # RFC 5626 §6: an outbound registration (reg-id, Supported: outbound) is confirmed.
        if (any("reg-id" in c.params for c in req.contacts or ())
                and "outbound" in (t.lower() for t in req.values("supported"))):
            headers.append(("Require", "outbound"))
        self.stack.reply(tx, 200, now=now, to_tag=new_tag(), headers=headers)

    def _on_invite(self, req: Request, tx: ServerTransaction, flow: Flow, now: float) -> None:
        """A new call: authenticate its source, route it, hand it to a :class:`Call`."""
        reply = self.stack.reply
        ct = req.content_type
        if req.body and ct is not None and ct not in ("application/sdp", "multipart/mixed"):
            reply(tx, 415, now=now, to_tag=new_tag(),
                  headers=[("Accept", "application/sdp, multipart/mixed")])
            return
        if req.body and ct == "multipart/mixed":  # RFC 5621: only its SDP part is read
            multipart_parts(req.get("content-type") or "", req.body)  # ParseError: 400
        dialled = req.uri.unescaped_user
        gateway = self.gateway_for(flow, req)
        if gateway is not None:
            if gateway.register and (dialled in ("", gateway.username, gateway.from_user)
                                     or "line" in req.uri.params):
                # A provider we register to sends calls to the Contact we registered (our
                # account name): the number dialled is then in To.
                dialled = req.to.uri.unescaped_user
            route = self.router.from_gateway(gateway, dialled)
            if isinstance(route, NoRoute):
                # The CRM still hears of the call and may redirect it; else it fails (404).
                log.info("no inbound route for %r from %s", dialled, flow)
                route = self.router.unrouted(Direction.INBOUND, dialled)
            frm = req.from_
            caller_number, caller_name = frm.uri.unescaped_user, frm.display or ""
            caller_ext = ""
        else:
            # Toll-fraud guard: only a digest-authenticated extension gets past this point.
            user = self.authenticate(req, tx, flow, now)
            if user is None:
                return
            if user not in self.extensions:
                reply(tx, 403, now=now, to_tag=new_tag())
                return
            ext = self.extensions[user]
            route = self.router.from_extension(user, dialled)
            caller_number = ext.effective_caller_id_number or ext.id
            caller_name = ext.effective_caller_id_name
            caller_ext = user
        # RFC 3261 §8.1.1.8: a call needs exactly one Contact. Checked only once the source is
        # trusted, so that an unauthenticated RFC 2543 INVITE (no Contact) is still challenged
        # like any other (RFC 4475 §3.4.1 wants it processed, not refused as malformed).
        contacts = req.contacts
        if not contacts or len(contacts) != 1:
            raise ParseError("INVITE needs exactly one Contact")
        if caller_ext and req.get("replaces") is not None:  # RFC 3891
            on_replaces(self, caller_ext, req, tx, flow, now)
            return
        if caller_ext and wanted(dialled):  # *8, **<ext>: call pickup
            pick(self, caller_ext, dialled, tx, flow, now)
            return
        if isinstance(route, NoRoute):
            log.info("no route for %r from %s: %d", dialled, flow, route.status)
            reply(tx, route.status, route.reason, now=now, to_tag=new_tag())
            return
        mf = req.max_forwards
        if mf is not None and mf <= 0:
            reply(tx, 483, now=now, to_tag=new_tag())
            return
        if self.relay is None:
            reply(tx, 503, now=now, to_tag=new_tag())
            return
        call = Call(host=self, tx=tx, flow=flow, route=route, now=now,
                    caller_number=caller_number, caller_name=caller_name,
                    caller_extension=caller_ext, from_gateway=gateway.name if gateway else "")
        self.calls[call.id] = call
        log.info("call %s: %s %s -> %s from %s", call.id, route.direction.value,
                 caller_number, dialled, flow)
        call.start(now)

    # -- inputs from the CRM side -------------------------------------------------------------
    def crm_answer(self, pbx_call_id: str, answer: CrmAnswer, now: float) -> None:
        """The first attempt of a call's NOTIFY_START came back (``answer``: the parsed
        body, or :meth:`CrmAnswer.failed`). Late answers are ignored by the call."""
        call = self.calls.get(pbx_call_id)
        if call is not None:
            call.on_crm_answer(answer, now)
            self._drain(now)

    def recording_finished(self, call_id: str, link: str | None, now: float) -> None:
        """A call's recording is final: ``link`` to it, or ``None`` when it failed."""
        pbx_call_id = f"in_{call_id[4:]}" if call_id.startswith("int_") else call_id
        self.notifier.record(pbx_call_id, link)

    def originate(self, extension: str, number: str, now: float, *, caller_name: str = "",
                  auto_answer: bool = False) -> str | OriginateRefused:
        """Click-to-call (crm-telephony-api.md §5): ring ``extension``'s phones, then dial
        ``number`` (normalised already) through the dial plan and bridge the two. Returns
        the new call's ``pbx_call_id``, or why nothing was placed."""
        ext = self.extensions.get(extension)
        if ext is None:
            return OriginateRefused(404, f"from: unknown extension {extension!r}", "from")
        bindings = self.registrar.lookup(extension, now)
        if not bindings:
            return OriginateRefused(409, f"from: extension {extension} is not registered",
                                    "from")
        if self.extension_busy(extension):
            return OriginateRefused(429, f"from: extension {extension} is already in a call",
                                    "from")
        if not number or number == extension:
            return OriginateRefused(400, "to: must be another number than from", "to")
        route = self.router.from_extension(extension, number)
        if isinstance(route, NoRoute):
            return OriginateRefused(422, f"to: no route for {number!r}", "to")
        if self.relay is None:
            return OriginateRefused(503, "no media relay", "")
        call = OriginatedCall(host=self, route=route, now=now,
                              caller_number=ext.effective_caller_id_number or ext.id,
                              caller_name=ext.effective_caller_id_name,
                              caller_extension=extension)
        if not call.originate(bindings, now, caller_name=caller_name, auto_answer=auto_answer):
            return OriginateRefused(503, "no media ports free", "")
        self.calls[call.id] = call
        log.info("call %s: click-to-call %s -> %s", call.id, extension, number)
        self._drain(now)
        return call.pbx_call_id

    def extension_busy(self, extension: str) -> bool:
        """Whether ``extension`` is in a live call (placing it, ringing or talking)."""
        for call in self.calls.values():
            if call.caller_extension == extension:
                return True
            if call.answered is not None and call.answered.extension == extension:
                return True
        return False

    def hang_up(self, call_id: str, now: float) -> bool:
        """End a live call from our side (the API); whether there was such a call."""
        call = self.calls.get(call_id)
        if call is None:
            call = next((c for c in self.calls.values() if c.pbx_call_id == call_id), None)
        if call is None:
            return False
        call.hang_up(now)
        self._drain(now)
        return True

    def shutdown(self, now: float) -> None:
        """The switch is stopping: hang up every live call -- BYE to answered legs, CANCEL
        to ringing callees, ``487`` to callers still waiting -- so that each writes its CDR
        (drain :meth:`datagrams_to_send` and :meth:`next_action` afterwards). A BYE to a
        caller that has not ACKed our 2xx yet waits for the ACK (RFC 3261 §15)."""
        for call in list(self.calls.values()):
            call.shutdown(now)
        self._drain(now)
