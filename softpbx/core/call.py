"""The B2BUA call: one caller leg, the callee legs it forks to, the media relay between them.

The call reads no SIP: legs hand it neutral events (:mod:`.events`) and it commands them.
Legal state changes live in :data:`TRANSITIONS` beside the one :meth:`Call._set_state`, which
logs ``old -> new`` and carries out the side effects (timers, media, the CDR, the CRM events
of :mod:`.notify`). SDP offer/answer through the relay is :mod:`.negotiation`'s.

Two ways in: a call *offered* to us (an INVITE from a phone or a trunk: the ``a`` leg is the
caller's :class:`InboundLeg`) and a call we *originate* (click-to-call: the ``a`` leg is an
:class:`OutboundLeg` to the employee's phones with our own offer; the client is dialled
once the employee answers).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from enum import Enum
from typing import Protocol
from urllib.parse import quote

from ..config.schema import Config, Gateway
from ..media.ports import PortRangeExhausted
from ..media.relay import RelaySession
from ..sip import sdp as sdpmod
from ..sip.auth import Credentials
from ..sip.events import Flow
from ..sip.message import Request
from ..sip.sdp import SdpError
from ..sip.stack import new_tag
from ..sip.transaction import ServerTransaction
from .events import (
    CallRecord,
    LegAnswered,
    LegEvent,
    LegFailed,
    LegHungUp,
    LegOffer,
    LegOfferAnswered,
    LegOfferCancelled,
    LegRefreshAnswered,
    LegRinging,
    RecordingCodecs,
    StartRecording,
    StopRecording,
    WriteCdr,
)
from .leg import InboundLeg, Leg, LegHost, OutboundLeg
from .negotiation import MediaNegotiation, Started, build_offer, codec_map
from .notify import CrmAnswer, Notifier
from .registrar import Registrar
from .routing import Direction, ExtensionTarget, GatewayTarget, Route, Router, Stage
from .timers import TimerQueue

log = logging.getLogger("softpbx.call")


class MediaRelay(Protocol):
    """The relay the shell runs (``aio.rtp_transport.RtpRelay``; a socket-free fake in tests)."""

    advertised_ip: str

    def open_session(self) -> RelaySession: ...
    def close_session(self, session: RelaySession) -> None: ...


class CallHost(LegHost, Protocol):
    """What a call needs from the switch besides what its legs need."""

    config: Config
    registrar: Registrar
    relay: MediaRelay
    router: Router
    notifier: Notifier
    wall_offset: float

    def gateway(self, name: str) -> Gateway: ...
    def gateway_calls(self, name: str) -> int: ...
    def gateway_flow(self, gateway: Gateway) -> Flow: ...
    def call_ended(self, call: Call, action: WriteCdr) -> None: ...
    def call_action(self, action: StartRecording | RecordingCodecs | StopRecording) -> None: ...


class CallState(Enum):
    """Where a call is."""

    NEW = "new"                  # created, not started
    OFFERED = "offered"          # inbound: waiting for the CRM's answer to NOTIFY_START
    ORIGINATING = "originating"  # click-to-call: the employee's phones ring
    ROUTING = "routing"          # callee legs placed, none alerting yet
    RINGING = "ringing"          # some callee is alerting
    ANSWERED = "answered"
    ENDED = "ended"


S = CallState
TRANSITIONS: dict[CallState, frozenset[CallState]] = {
    S.NEW: frozenset({S.OFFERED, S.ORIGINATING, S.ROUTING, S.ENDED}),
    S.OFFERED: frozenset({S.ROUTING, S.ENDED}),
    S.ORIGINATING: frozenset({S.ROUTING, S.ENDED}),
    S.ROUTING: frozenset({S.RINGING, S.ANSWERED, S.ENDED}),
    S.RINGING: frozenset({S.ANSWERED, S.ENDED}),
    S.ANSWERED: frozenset({S.ENDED}),
    S.ENDED: frozenset(),
}

# How a set of callee failures is reported to the caller, best first (RFC 3261 §16.7 spirit).
_FAIL_ORDER = (486, 600, 603, 480, 408, 404, 484, 604, 403, 503, 502, 500)

# Final answers a callee leg's code may be passed on to the caller as: they say something
# about the callee or the number, which the caller can act on.
_FORWARDABLE = frozenset({403, 404, 408, 410, 480, 482, 483, 484, 485, 486, 487, 488, 503})


def caller_status(status: int, *, trunk: bool) -> int:
    """The code a callee leg's failure ``status`` is reported to the caller as.

    Codes about *our* request to the callee are not the caller's business and would
    mislead it (RFC 3261 §16.7 step 6 spirit; a B2BUA is the UAC of that request): a trunk's
    401/407 challenge we could not answer (forwarding it would make the caller send us
    credentials for the provider's realm) or 402 is the route being unusable, ``503``; a
    redirect we do not follow (3xx) means the callee cannot be reached here, ``480``; 420,
    422, 423, 481, 491 and the other refusals of our request's form, and any 5xx but 503,
    are a failure past us, ``502``. A trunk that never answers is down (``503``), not a
    callee that did not pick up. 6xx are global answers, passed on as they are.
    """
    if trunk and status == 408:
        return 503
    if status in _FORWARDABLE or 600 <= status < 700:
        return status
    if 300 <= status < 400:
        return 480
    if status in (401, 402, 407):
        return 503
    return 502


def disposition_of(code: int) -> str:
    """The CRM/CDR disposition of a callee failure reported to the caller as ``code``:
    486/600/603 ``busy``; 408/480 ``no answer``; 487 ``cancel``; the rest ``failed``."""
    if code in (486, 600, 603):
        return "busy"
    if code in (408, 480):
        return "no answer"
    if code == 487:
        return "cancel"
    return "failed"


@dataclass(frozen=True, slots=True)
class Failure:
    """One reason nobody took the call: the code the caller is told, and what it means."""

    code: int
    disposition: str


NOT_REGISTERED = Failure(480, "failed")
"""An extension with no registered phone: the caller hears 480, the CRM sees ``failed``."""
RING_TIMEOUT = Failure(480, "no answer")
AT_CAPACITY = Failure(503, "failed")
NO_ROUTE = Failure(404, "failed")


class Call:
    """One call through the switch."""

    def __init__(self, *, host: CallHost, route: Route, now: float, caller_number: str,
                 caller_name: str, tx: ServerTransaction | None = None, flow: Flow | None = None,
                 caller_extension: str = "", from_gateway: str = "",
                 originate_from: str = "") -> None:
        """An offered call (``tx``, ``flow``: the caller's INVITE), or, with
        ``originate_from`` (the employee's extension), a call we originate."""
        self.host = host
        self.route = route
        prefix = "out" if originate_from else _PREFIX[route.direction]
        token = secrets.token_hex(20)
        self.id = f"{prefix}_{token}"
        """Permanent id of the call (CDRs)."""
        self.pbx_call_id = f"in_{token}" if prefix == "int" else self.id
        """The id the CRM knows the call by (the spec allows only ``in_``/``out_``)."""
        self.originated = bool(originate_from)
        self.state = CallState.NEW
        self.timers: dict[str, int] = {}
        self.created_at = now
        self.call_start = host.notifier.call_start(now + host.wall_offset)
        """Wall time of the call's creation in ``global.timezone`` (CRM ``call_start``)."""
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self.caller_number = caller_number
        self.caller_name = caller_name
        self.caller_extension = caller_extension
        self.from_gateway = from_gateway
        self._leg_count = 0
        self.a: InboundLeg | OutboundLeg
        self.a_forks: list[OutboundLeg] = []
        """Originated calls: the employee's phones still ringing."""
        if tx is not None:
            assert flow is not None
            self.a = InboundLeg(host=host, call=self, tx=tx, flow=flow)
            if from_gateway:
                gw = host.gateway(from_gateway)
                if gw.username:  # for the trunk's challenges to our BYE or re-INVITE
                    self.a.credentials = Credentials(gw.username, gw.password,
                                                     gw.auth_algorithms)
        self.b_legs: list[OutboundLeg] = []
        """Callee legs of the current stage still in play."""
        self.answered: OutboundLeg | None = None
        self.stage = -1
        self._failures: list[Failure] = []
        self.alerted: list[str] = []
        """Extensions that alerted (first provisional or answer), in order: each got its
        NOTIFY_INTERNAL."""
        self.last_rang: OutboundLeg | None = None
        self.media: RelaySession | None = None
        self.neg: MediaNegotiation | None = None
        self._silent_since = {"a": 0.0, "b": 0.0}
        """Per side, when it last started being expected to send RTP (answer, resume): the
        RTP timeout counts from there when the relay saw nothing later."""
        self._recorded = False
        self._gateway_used = ""
        """The gateway of the latest trunk leg tried (the CDR of a failed outbound call)."""
        self._events = False
        """Whether this call produces CRM events (inbound, outbound, internal when asked)."""
        self.on_hold = False
        self.cause = ""
        self.sip_code = 0
        self.disposition = ""

    # -- start --------------------------------------------------------------------------------
    def start(self, now: float) -> None:
        """Offered call: open the relay, tell the CRM (and wait for its answer when it has
        a say), then ring the first stage."""
        assert isinstance(self.a, InboundLeg)
        offer = self.a.initial_sdp
        if offer is None:
            self._end(now, 488, "no SDP offer in the INVITE (late offer is not supported)")
            return
        try:
            sdp = sdpmod.parse_sdp(offer)
            if not any(m.is_rtp for m in sdp.media):
                raise SdpError("no RTP media in the offer")
        except SdpError as exc:
            self._end(now, 488, f"bad SDP offer: {exc}")
            return
        if not self._open_media(now):
            return
        assert self.neg is not None
        self.neg.set_a(sdp)
        self._schedule_max_duration(now)
        direction = self.route.direction
        crm = self.host.config.crm
        self._events = (direction is not Direction.INTERNAL) or crm.internal_calls
        if direction is Direction.INBOUND:
            notifier = self.host.notifier
            if notifier.start(self, self.route.dialled, wait=True):
                self._set_state(CallState.OFFERED, now)
                self.host.timers.schedule(self, "crm_wait", now + crm.answer_timeout_ms / 1000)
                return
        self._route(now)

    def originate(self, bindings: list, now: float, *, caller_name: str = "",
                  auto_answer: bool = False) -> bool:
        """Click-to-call: ring every phone of the employee (``bindings``) with our own
        offer, showing the client's number (``route.dialled``) and ``caller_name``."""
        if not self._open_media(now):
            return False
        assert self.neg is not None
        self._events = True
        offer = self.neg.offer_for_a(build_offer(self.host.config.media.codecs))
        domain = self.host.config.global_.domain
        number = _user(self.route.dialled)
        extra = []
        if auto_answer:  # desk phones' two dialects of "answer at once"
            extra = [("Call-Info", f"<sip:{domain}>;answer-after=0"),
                     ("Alert-Info", "<http://127.0.0.1>;info=alert-autoanswer")]
        for b in bindings:
            leg = self._make_leg(flow=b.flow, ruri=b.contact,
                                 to=f"<sip:{self.caller_extension}@{domain}>", credentials=None,
                                 caller=(number, caller_name), body=offer, extra=extra,
                                 label="a")
            leg.extension = self.caller_extension
            self.a_forks.append(leg)
        self.a = self.a_forks[0]
        self._set_state(CallState.ORIGINATING, now)
        timeout = getattr(self.host.config.crm, "click_to_call_ring_s", 30)
        self.host.timers.schedule(self, "employee_no_answer", now + timeout)
        for leg in self.a_forks:
            leg.start(now)
        return True

    def _open_media(self, now: float) -> bool:
        try:
            self.media = self.host.relay.open_session()
        except (PortRangeExhausted, OSError) as exc:
            if self.originated:  # nothing started yet: the switch refuses the request
                log.error("call %s: no media ports: %s", self.id, exc)
            else:
                self._end(now, 503, f"no media ports: {exc}")
            return False
        self.neg = MediaNegotiation(media=self.media, advertised_ip=self.host.relay.advertised_ip)
        return True

    def _schedule_max_duration(self, now: float) -> None:
        max_duration = self.host.config.calls.max_duration
        if max_duration:
            self.host.timers.schedule(self, "max_duration", now + max_duration)

    # -- the CRM's answer ---------------------------------------------------------------------
    def on_crm_answer(self, answer: CrmAnswer, now: float) -> None:
        """The CRM answered NOTIFY_START (or the attempt failed): apply it and route. An
        answer after the deadline (the call already routed) changes nothing."""
        if self.state is not CallState.OFFERED:
            log.info("call %s: late CRM answer ignored", self.id)
            return
        TimerQueue.cancel(self, "crm_wait")
        if answer.problem:
            log.warning("call %s: CRM answer not used (%s); routing normally", self.id,
                        answer.problem)
        if answer.caller_name:
            self.caller_name = answer.caller_name
        if answer.hangup:
            log.info("call %s: the CRM rejected the call", self.id)
            self._end(now, 486, "rejected by the CRM", disposition="busy")
            return
        if answer.redirect:
            stages = self.host.router.redirect_stages(answer.redirect, answer.return_timeout)
            if stages is None:
                log.warning("call %s: CRM redirect to unknown %r; routing normally", self.id,
                            answer.redirect)
            elif not self._reachable(stages):
                log.warning("call %s: CRM redirect to %r, which has no registered phone; "
                            "routing normally", self.id, answer.redirect)
            else:
                log.info("call %s: redirected by the CRM to %s", self.id, answer.redirect)
                rest = self.route.stages if answer.return_timeout else ()
                self.route = _with_stages(self.route, (*stages, *rest))
        self._route(now)

    def _reachable(self, stages: tuple[Stage, ...]) -> bool:
        now_lookup = self.host.registrar.lookup
        for stage in stages:
            for t in stage.targets:
                if not isinstance(t, ExtensionTarget) or now_lookup(t.extension, self.created_at):
                    return True
        return False

    def _route(self, now: float) -> None:
        """Ring the route's first stage that has somebody to ring."""
        self._set_state(CallState.ROUTING, now)
        if not self.route.stages:
            self._failures.append(NO_ROUTE)
        self._next_stage(now)

    # -- stages and callee legs ---------------------------------------------------------------
    def _next_stage(self, now: float) -> None:
        stages = self.route.stages
        while self.stage + 1 < len(stages):
            self.stage += 1
            stage = stages[self.stage]
            legs = [leg for t in stage.targets for leg in self._legs_for(t, now)]
            if not legs:
                continue
            self.b_legs = legs
            timeout = stage.timeout or self.host.config.calls.no_answer_timeout
            self.host.timers.schedule(self, "no_answer", now + timeout)
            for leg in legs:
                leg.start(now)
            return
        self._give_up(now)

    def _legs_for(self, target, now: float) -> list[OutboundLeg]:
        if isinstance(target, ExtensionTarget):
            bindings = self.host.registrar.lookup(target.extension, now)
            if not bindings:
                self._failures.append(NOT_REGISTERED)
                return []
            legs = []
            for b in bindings:
                to = f"<sip:{target.extension}@{self.host.config.global_.domain}>"
                leg = self._make_leg(flow=b.flow, ruri=b.contact, to=to, credentials=None)
                leg.extension = target.extension
                legs.append(leg)
            return legs
        assert isinstance(target, GatewayTarget)
        gw = self.host.gateway(target.gateway)
        self._gateway_used = gw.name
        if gw.max_calls and self.host.gateway_calls(gw.name) >= gw.max_calls:
            log.warning("gateway %s is at its %d-call limit", gw.name, gw.max_calls)
            self._failures.append(AT_CAPACITY)
            return []
        flow = self.host.gateway_flow(gw)
        host = gw.realm or gw.proxy
        creds = Credentials(gw.username, gw.password, gw.auth_algorithms) if gw.username else None
        # A DID forwarded out (no caller ID of its own configured) shows the original caller.
        caller = (None if self.route.direction is Direction.INBOUND and not target.caller_id_number
                  else (target.caller_id_number, target.caller_id_name))
        account = None if gw.caller_id_in_from else (gw.from_user or gw.username or None)
        leg = self._make_leg(flow=flow, ruri=f"sip:{_user(target.number)}@{gw.proxy}",
                             to=f"<sip:{_user(target.number)}@{host}>", credentials=creds,
                             caller=caller, host=host, account=account)
        leg.gateway = gw.name
        return [leg]

    def _make_leg(self, *, flow: Flow, ruri: str, to: str, credentials: Credentials | None,
                  caller: tuple[str, str] | None = None, host: str | None = None,
                  account: str | None = None, body: bytes | None = None,
                  extra: list[tuple[str, str]] | None = None,
                  label: str = "b") -> OutboundLeg:
        """``account``: the From user is this trunk account, and the caller ID goes in
        ``P-Asserted-Identity`` (RFC 3325; a gateway with ``caller_id_in_from = false``).
        ``body``: the SDP offered (default: the ``a`` party's, rewritten for side B)."""
        self._leg_count += 1
        number, name = caller if caller is not None else (self.caller_number, self.caller_name)
        number = _user(number or self.caller_number or "anonymous")
        from_host = host or self.host.config.global_.domain
        disp = f'"{_quote(name)}" ' if name else ""
        identity: list[tuple[str, str]] = []
        if account is not None:
            identity = [("P-Asserted-Identity", f"{disp}<sip:{number}@{from_host}>")]
            number = _user(account)
        if body is None:
            assert self.neg is not None
            body = self.neg.offer_for_b()
        mf = getattr(self.a, "request", None)
        mf = mf.max_forwards if isinstance(mf, Request) and not self.originated else None
        headers = [
            ("Max-Forwards", str(max(0, (mf if mf is not None else 70) - 1))),
            ("From", f"{disp}<sip:{number}@{from_host}>;tag={new_tag()}"),
            ("To", to),
            ("Call-ID", f"{secrets.token_hex(16)}@{self.host.config.global_.domain}"),
            ("CSeq", "1 INVITE"),
            ("Contact", self.host.contact_for(flow)),
            *identity,
            *(extra or ()),
            ("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO"),
            ("Content-Type", "application/sdp"),
            ("Content-Length", str(len(body))),
        ]
        req = Request("INVITE", ruri, headers, body)
        return OutboundLeg(host=self.host, call=self, flow=flow,
                           label=f"{label}{self._leg_count}", request=req,
                           credentials=credentials)

    def _give_up(self, now: float) -> None:
        codes = [f.code for f in self._failures]
        code = next((c for c in _FAIL_ORDER if c in codes), None)
        if code is None:
            code = codes[0] if codes else 480
        disposition = next((f.disposition for f in self._failures if f.code == code),
                           disposition_of(code))
        self._end(now, code, f"no callee answered ({code})", disposition=disposition)

    # -- events from legs ---------------------------------------------------------------------
    def handle(self, event: LegEvent, now: float) -> None:
        """A leg reports something."""
        if self.state is CallState.ENDED:
            return
        leg = event.leg
        if self.state is CallState.ORIGINATING and leg in self.a_forks:
            self._employee_event(event, now)
            return
        if isinstance(event, LegRinging):
            if leg in self.b_legs:
                self.last_rang = leg  # type: ignore[assignment]
                self._alerting(leg, now)
                sdp_out = None
                if event.sdp:
                    assert self.neg is not None
                    sdp_out = self.neg.callee_answer(event.sdp, self.id)
                if isinstance(self.a, InboundLeg):
                    self.a.ring(sdp_out, now)
                if self.state is CallState.ROUTING:
                    self._set_state(CallState.RINGING, now)
        elif isinstance(event, LegAnswered):
            if leg in self.b_legs:
                self._alerting(leg, now)
                self._on_answer(leg, event.sdp, now)  # type: ignore[arg-type]
        elif isinstance(event, LegFailed):
            if leg in self.b_legs:
                self.b_legs.remove(leg)  # type: ignore[arg-type]
                code = caller_status(event.status, trunk=bool(leg.gateway))
                self._failures.append(Failure(code, disposition_of(code)))
                if 600 <= event.status < 700:
                    # A global failure (RFC 3261 §16.7 step 5 spirit): the callee said no
                    # for all its phones; the others of the stage stop ringing.
                    for other in self.b_legs:
                        other.cancel(now)
                    self.b_legs = []
                if not self.b_legs:
                    TimerQueue.cancel(self, "no_answer")
                    self._next_stage(now)
        elif isinstance(event, LegHungUp):
            self._on_hangup(leg, event.cause, now)
        elif self.neg is not None and self.answered is not None:
            self._renegotiation_event(event, now)

    def _renegotiation_event(self, event: LegEvent, now: float) -> None:
        neg, leg = self.neg, event.leg
        assert neg is not None and self.answered is not None
        is_a = leg is self.a
        started: Started | None = None
        if isinstance(event, LegOffer):
            if self.state is not CallState.ANSWERED:
                leg.answer_offer(491, None, now)
                return
            neg.on_offer(leg, self.answered if is_a else self.a, is_a, event.sdp, now)
        elif isinstance(event, LegOfferAnswered):
            started = neg.on_offer_answered(leg, is_a, event.status, event.sdp, now, self.id)
        elif isinstance(event, LegOfferCancelled):
            neg.on_offer_cancelled(leg, now)
        elif isinstance(event, LegRefreshAnswered) and self.state is CallState.ANSWERED:
            started = neg.on_refresh_answered(is_a, event.sdp, leg.label, self.id)
        if started is not None:
            self._adopted(started, now)

    def _alerting(self, leg: Leg, now: float) -> None:
        """The one place that knows an extension alerted: its NOTIFY_INTERNAL, once per
        extension and call (two phones of one extension are one event)."""
        ext = leg.extension
        if not ext or ext in self.alerted:
            return
        self.alerted.append(ext)
        if self._events and not self.originated and self.route.direction is not Direction.OUTBOUND:
            self.host.notifier.internal(self, self.route.dialled, ext)

    def _employee_event(self, event: LegEvent, now: float) -> None:
        """Click-to-call: what the employee's phones do before one answers."""
        leg = event.leg
        if isinstance(event, LegAnswered):
            self._employee_answered(leg, event.sdp, now)  # type: ignore[arg-type]
        elif isinstance(event, LegFailed):
            self.a_forks.remove(leg)  # type: ignore[arg-type]
            code = caller_status(event.status, trunk=False)
            self._failures.append(Failure(code, disposition_of(code)))
            if not self.a_forks or 600 <= event.status < 700:
                for other in self.a_forks:
                    other.cancel(now)
                self.a_forks = []
                self._give_up(now)

    def _employee_answered(self, leg: OutboundLeg, raw: bytes | None, now: float) -> None:
        assert self.neg is not None
        for other in self.a_forks:
            if other is not leg:
                other.cancel(now, answered_elsewhere=True)
        self.a_forks = []
        self.a = leg
        TimerQueue.cancel(self, "employee_no_answer")
        try:
            answer = sdpmod.parse_sdp(raw or b"")
            if not any(m.is_rtp and m.port for m in answer.media):
                raise SdpError("no RTP media")
        except SdpError as exc:
            leg.hangup(now)
            self._end(now, 488, f"employee's phone answered without usable SDP: {exc}")
            return
        self.neg.set_a(answer)
        self._failures = []
        self._schedule_max_duration(now)
        log.info("call %s: employee %s answered; dialling %s", self.id, self.caller_extension,
                 self.route.dialled)
        self._route(now)

    @property
    def recorded(self) -> bool:
        """Whether this call is recorded: decided at the answer (:meth:`Router.records`)."""
        return self._recorded

    def _recording_codecs(self) -> RecordingCodecs:
        # RFC 3264 §5.1/§6.1: each party sends with the payload types of the other's SDP.
        assert self.neg is not None
        return RecordingCodecs(self.id, caller=codec_map(self.neg.sdp_b),
                               callee=codec_map(self.neg.sdp_a))

    def _on_answer(self, leg: OutboundLeg, raw: bytes | None, now: float) -> None:
        assert self.neg is not None
        self.answered = leg
        for other in self.b_legs:
            if other is not leg:
                other.cancel(now, answered_elsewhere=True)
        self.b_legs = [leg]
        sdp_out = self.neg.callee_answer(raw, self.id) if raw else None
        if sdp_out is None:
            leg.hangup(now)
            self._end(now, 488, "callee answered without usable SDP")
            return
        if isinstance(self.a, InboundLeg):
            self.a.answer(sdp_out, now)
        # An originated call's employee keeps the session it answered: the callee was offered
        # what the employee chose, so both talk the same codec through the relay.
        self._set_state(CallState.ANSWERED, now)

    def _on_hangup(self, leg: Leg, cause: str, now: float) -> None:
        if leg is self.a:
            for b in list(self.b_legs):
                b.hangup(now)
            if self.state is CallState.ANSWERED:
                self._end(now, 200, cause)
            else:
                self._end(now, 487, cause, disposition="cancel")
        elif leg is self.answered:
            self.a.hangup(now)
            self._end(now, 200, cause)

    def _adopted(self, started: Started, now: float) -> None:
        """New SDP is in force: the RTP timeout re-starts for a side that starts sending
        again, hold is re-read, the recorder hears of the codecs."""
        assert self.neg is not None
        for key in started:
            self._silent_since[key] = now
        self.on_hold = self.neg.on_hold()
        if self._recorded:
            self.host.call_action(self._recording_codecs())

    # -- timers -------------------------------------------------------------------------------
    def on_timer(self, name: str, now: float) -> None:
        """A timer of this call fired."""
        if self.state is CallState.ENDED:
            return
        if name == "crm_wait" and self.state is CallState.OFFERED:
            log.warning("call %s: no CRM answer within %d ms; routing normally", self.id,
                        self.host.config.crm.answer_timeout_ms)
            self._route(now)
        elif name == "employee_no_answer" and self.state is CallState.ORIGINATING:
            for leg in self.a_forks:
                leg.cancel(now)
            self.a_forks = []
            self._end(now, 480, "the employee did not answer", disposition="no answer")
        elif name == "no_answer" and self.state in (CallState.ROUTING, CallState.RINGING):
            for b in self.b_legs:
                b.cancel(now)
            self.b_legs = []
            self._failures.append(RING_TIMEOUT)
            self._next_stage(now)
        elif name == "max_duration":
            self._hangup_all(now, "maximum call duration reached", unanswered=408)
        elif name == "rtp_check" and self.state is CallState.ANSWERED and self.media is not None:
            timeout = self.host.config.media.rtp_timeout
            silent = self._silent_side(now, timeout)
            if silent:
                self._hangup_all(now, f"no RTP from the {silent} for {timeout} s", unanswered=408)
            else:
                self.host.timers.schedule(self, "rtp_check", now + min(timeout, 5.0))

    def _silent_side(self, now: float, timeout: float) -> str:
        """``caller``/``callee`` when that side has sent no RTP for ``timeout`` seconds while
        it is expected to send, else "".

        Each side is watched on its own: a phone gone from Wi-Fi while the trunk keeps
        sending must time out. A side is expected to send when its own SDP and its peer's
        both say ``sendrecv`` with a real address (RFC 3264 §5.1, §6.1: the answer mirrors
        the offer). So nobody is watched while the call is on hold in either direction
        (``sendonly``/``recvonly``/``inactive``, ``c=0.0.0.0``): the holding phone says it
        sends music on hold, but many send nothing at all, and a held call must not drop
        (Asterisk keeps a separate ``rtpholdtimeout``, off by default). Silence counts from
        the answer, or from when the side was last expected to start sending again (a
        resume), whichever the relay saw last.
        """
        assert self.media is not None and self.neg is not None
        sending = self.neg.sending()
        for key, side, who in (("a", self.media.a, "caller"), ("b", self.media.b, "callee")):
            if sending[key] and now - max(side.last_rx_at, self._silent_since[key]) > timeout:
                return who
        return ""

    def shutdown(self, now: float) -> None:
        """The switch stops: BYE the answered legs, CANCEL the ringing ones, ``487`` the
        caller of an unanswered call; the CDR is written."""
        self._hangup_all(now, "switch shut down", unanswered=487, disposition="failed")

    def hang_up(self, now: float, cause: str = "hung up by the operator") -> None:
        """End the call from our side (the API's hang-up)."""
        self._hangup_all(now, cause, unanswered=480, disposition="failed")

    def _hangup_all(self, now: float, cause: str, *, unanswered: int,
                    disposition: str | None = None) -> None:
        """End the call from our side: ``unanswered`` is what a caller still waiting hears."""
        for b in (*self.b_legs, *self.a_forks):
            b.hangup(now)
        if self.state is CallState.ANSWERED or self.originated:
            self.a.hangup(now)
        self._end(now, 200 if self.state is CallState.ANSWERED else unanswered, cause,
                  disposition=disposition)

    # -- state --------------------------------------------------------------------------------
    def _set_state(self, new: CallState, now: float) -> None:
        old = self.state
        if new not in TRANSITIONS[old]:
            raise RuntimeError(f"call {old.value} -> {new.value} is not a legal transition")
        self.state = new
        log.info("call %s %s -> %s", self.id, old.value, new.value)
        if new is CallState.ROUTING:
            if self._events and (self.originated or self.route.direction is Direction.OUTBOUND):
                self.host.notifier.out_start(self, self._outbound_caller_id(),
                                             self.caller_extension, self.route.dialled)
        elif new is CallState.ANSWERED:
            self._on_answered(now)
        elif new is CallState.ENDED:
            self._on_ended(old, now)

    def _outbound_caller_id(self) -> str:
        """The outside caller ID of an outbound call (the dial rule's or extension's), "" for
        none (the CRM then gets ``0``)."""
        for stage in self.route.stages:
            for t in stage.targets:
                if isinstance(t, GatewayTarget):
                    return t.caller_id_number
        return ""

    def _on_answered(self, now: float) -> None:
        timers = self.host.timers
        self.answered_at = now
        self._silent_since = {"a": now, "b": now}
        timers.cancel(self, "no_answer")
        timeout = self.host.config.media.rtp_timeout
        if timeout:
            timers.schedule(self, "rtp_check", now + min(timeout, 5.0))
        answered = self.answered
        self._recorded = self.host.router.records(
            self.route, extensions=(self.caller_extension,
                                    answered.extension if answered else ""),
            gateways=(self.from_gateway, answered.gateway if answered else ""))
        if self._recorded and self.media is not None and self.neg is not None:
            self.host.call_action(StartRecording(self.id, self.media, self.neg.codecs(), now))
            self.host.call_action(self._recording_codecs())

    def _on_ended(self, old: CallState, now: float) -> None:
        self.ended_at = now
        self.timers.clear()
        if old is CallState.ANSWERED and self._recorded:
            self.host.call_action(StopRecording(self.id, now))
        if self.media is not None:
            self.host.relay.close_session(self.media)
        answered_leg = self.answered
        extension = (answered_leg.extension if answered_leg else
                     (self.alerted[-1] if self.alerted else
                      (self.last_rang.extension if self.last_rang else "")))
        inbound = self.route.direction is Direction.INBOUND
        rec = CallRecord(
            call_id=self.id, sip_call_id=self.a.request.call_id,
            direction=self.route.direction.value, caller=self.caller_number,
            callee=self.route.dialled, did=self.route.dialled if inbound else "",
            extension=extension,
            gateway=(self.from_gateway or (answered_leg.gateway if answered_leg else "")
                     or self._gateway_used),
            started_at=self.created_at, answered_at=self.answered_at, ended_at=now,
            disposition=self.disposition, sip_code=self.sip_code, cause=self.cause,
            caller_extension=self.caller_extension, pbx_call_id=self.pbx_call_id)
        if self._events:
            notifier = self.host.notifier
            if self.originated or self.route.direction is Direction.OUTBOUND:
                notifier.out_end(self, self._outbound_caller_id(), self.caller_extension,
                                 self.route.dialled, duration=rec.duration,
                                 disposition=self.disposition, sip_code=self.sip_code,
                                 recorded=self._recorded)
            else:
                # Only extensions that alerted count as rung for the CRM ("omitted when
                # none rang"); a forwarded-out DID names none.
                ext = answered_leg.extension if answered_leg else (
                    self.alerted[-1] if self.alerted else "")
                notifier.end(self, self.route.dialled, ext, duration=rec.duration,
                             disposition=self.disposition, sip_code=self.sip_code,
                             recorded=self._recorded)
        self.host.call_ended(self, WriteCdr(rec))
        self._release()

    def _release(self) -> None:
        """Let go of what a finished call no longer needs. Its legs may live on for a few
        seconds in transactions that still absorb retransmissions; they must not keep the
        call, its SDP and its media alive (nor leave cycles for the garbage collector)."""
        legs = [self.a, *self.b_legs, *self.a_forks, *([self.answered] if self.answered else [])]
        for leg in legs:
            leg.call = _ENDED
            leg.request.shrink()
        self.b_legs = []
        self.a_forks = []
        self.media = None
        self.neg = None

    def _end(self, now: float, code: int, cause: str, *, disposition: str | None = None) -> None:
        """Finish the call: answer the caller if it is still waiting, write the CDR (with
        the code the caller got)."""
        if self.state is CallState.ENDED:
            return
        self.cause = cause
        if self.state is CallState.ANSWERED:
            self.disposition = "answered"
        else:
            code = code if code >= 300 else 480
            self.disposition = disposition or disposition_of(code)
            if isinstance(self.a, InboundLeg):
                self.a.reject(code, None, now)
            elif hasattr(self, "a"):
                self.a.hangup(now)  # the employee of a click-to-call that did not connect
        self.sip_code = code
        log.info("call %s ended: %s (%d, %s)", self.id, self.disposition, code, cause)
        self._set_state(CallState.ENDED, now)


_PREFIX = {Direction.INBOUND: "in", Direction.OUTBOUND: "out", Direction.INTERNAL: "int"}


def _with_stages(route: Route, stages: tuple[Stage, ...]) -> Route:
    return Route(route.direction, stages, route.dialled, record=route.record, rule=route.rule)


class _EndedCall:
    """What the legs of a finished call report to: nothing is listening any more."""

    def handle(self, event: LegEvent, now: float) -> None:
        """Late leg events (a 487 after our CANCEL, a BYE answer) need no action."""


_ENDED = _EndedCall()


def _user(text: str) -> str:
    """``text`` as a SIP URI user part (RFC 3261 §25.1 ``user``): a number as a trunk sent it
    may hold characters (an unescaped ``@``, a space) that would break the URI we build."""
    return quote(text, safe="-_.!~*'()&=+$,;?/")


def _quote(text: str) -> str:
    """``text`` inside a quoted-string (RFC 3261 §25.1: ``quoted-pair`` for ``"`` and ``\\``;
    control characters cannot be quoted at all and are dropped)."""
    text = "".join(ch for ch in text if ch >= " " and ch != "\x7f")
    return text.replace("\\", "\\\\").replace('"', '\\"')
