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
from dataclasses import replace
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from ..config.schema import Config, Gateway
from ..media.ports import PortRangeExhausted
from ..media.relay import RelaySession
from ..sip.auth import Credentials
from ..sip.events import Flow
from ..sip.sdp import SdpError
from ..sip.transaction import ServerTransaction
from .callee import legs_for
from .events import (
    CallRecord,
    LegAnswered,
    LegEvent,
    LegFailed,
    LegHungUp,
    LegInfo,
    LegLateAnswer,
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
from .negotiation import MediaNegotiation, Started, caller_offer, codec_map
from .notify import CrmAnswer, Notifier
from .outcome import (
    NO_ROUTE,
    RING_TIMEOUT,
    Failure,
    best_failure,
    disposition_of,
    fork_failed,
)
from .registrar import Registrar
from .routing import Direction, ExtensionTarget, GatewayTarget, Route, Router, Stage
from .timers import TimerQueue
from .transfer import chain_text

if TYPE_CHECKING:
    from .transfer import BlindTransfer

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

class Call:
    """One call through the switch."""

    originated = False
    """Whether softpbx placed the call's first leg (click-to-call)."""

    def __init__(self, *, host: CallHost, route: Route, now: float, caller_number: str,
                 caller_name: str, tx: ServerTransaction | None = None, flow: Flow | None = None,
                 caller_extension: str = "", from_gateway: str = "") -> None:
        """An offered call: ``tx``, ``flow`` are the caller's INVITE (:class:`.originate.
        OriginatedCall` passes neither)."""
        self.host = host
        self.route = route
        prefix = "out" if self.originated else _PREFIX[route.direction]
        token = secrets.token_hex(20)
        self.id = f"{prefix}_{token}"
        """Permanent id of the call (CDRs)."""
        self.pbx_call_id = f"in_{token}" if prefix == "int" else self.id
        """The id the CRM knows the call by (the spec allows only ``in_``/``out_``)."""
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
        self.leg_count = 0
        self.a: InboundLeg | OutboundLeg
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
        self.failures: list[Failure] = []
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
        self.gateway_used = ""
        """The gateway of the latest trunk leg tried (the CDR of a failed outbound call)."""
        self._events = False
        """Whether this call produces CRM events (inbound, outbound, internal when asked)."""
        self.on_hold = False
        self.cause = ""
        self.sip_code = 0
        self.disposition = ""
        self.transfer: BlindTransfer | None = None
        """A blind transfer ringing its target (:mod:`.transfer`), which sees the events first."""
        self.transfers: list[dict[str, Any]] = []
        """The transfer/pickup chain of the CDR (:func:`.transfer.chain_text`)."""
        self.caller_call_id = ""
        """The Call-ID of the caller's leg once a transfer replaced that leg (the CDR's)."""

    # -- start --------------------------------------------------------------------------------
    def start(self, now: float) -> None:
        """Offered call: open the relay, tell the CRM (and wait for its answer when it has
        a say), then ring the first stage."""
        assert isinstance(self.a, InboundLeg)
        try:  # None: a late offer, we make the offers (MediaNegotiation.start_a)
            sdp = caller_offer(self.a.initial_sdp)
        except SdpError as exc:
            self._end(now, 488, f"bad SDP offer: {exc}")
            return
        if not self._open_media(now):
            return
        assert self.neg is not None
        self.neg.source_a = self.a.flow.remote[0]
        self.neg.start_a(sdp, self.host.config.media.codecs)
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
            self.failures.append(NO_ROUTE)
        self._next_stage(now)

    # -- stages and callee legs ---------------------------------------------------------------
    def _next_stage(self, now: float) -> None:
        stages = self.route.stages
        while self.stage + 1 < len(stages):
            self.stage += 1
            stage = stages[self.stage]
            legs = [leg for t in stage.targets for leg in legs_for(self, t, now)]
            if not legs:
                continue
            self.b_legs = legs
            timeout = stage.timeout or self.host.config.calls.no_answer_timeout
            self.host.timers.schedule(self, "no_answer", now + timeout)
            for leg in legs:
                leg.start(now)
            return
        self._give_up(now)

    def max_forwards(self) -> int | None:
        """The caller's Max-Forwards, which the callee legs count down (RFC 3261 §16.6)."""
        return self.a.request.max_forwards

    def _give_up(self, now: float) -> None:
        failure = best_failure(self.failures)
        self._end(now, failure.code, f"no callee answered ({failure.code})",
                  disposition=failure.disposition)

    # -- events from legs ---------------------------------------------------------------------
    def handle(self, event: LegEvent, now: float) -> None:
        """A leg reports something."""
        if self.state is CallState.ENDED:
            return
        if self.transfer is not None and self.transfer.handle(event, now):
            return
        leg = event.leg
        if isinstance(event, LegRinging):
            if leg in self.b_legs:
                self.last_rang = leg  # type: ignore[assignment]
                self._alerting(leg, now)
                sdp_out = None
                if event.sdp:
                    assert self.neg is not None
                    sdp_out = self.neg.callee_answer(event.sdp, self.id, leg.flow.remote[0])
                self._caller_ringing(sdp_out, now)
                if self.state is CallState.ROUTING:
                    self._set_state(CallState.RINGING, now)
        elif isinstance(event, LegAnswered):
            if leg in self.b_legs:
                self._alerting(leg, now)
                self._on_answer(leg, event.sdp, now)  # type: ignore[arg-type]
        elif isinstance(event, LegFailed):
            if leg in self.b_legs and fork_failed(self.b_legs, self.failures, leg,  # type: ignore[arg-type]
                                                  event.status, now):
                TimerQueue.cancel(self, "no_answer")
                self._next_stage(now)
        elif isinstance(event, LegHungUp):
            self._on_hangup(leg, event.cause, now)
        elif isinstance(event, LegInfo):  # DTMF INFO: to the other party, same body
            peer = self.answered if leg is self.a else self.a
            if self.state is CallState.ANSWERED and peer is not None and peer is not leg:
                peer.send_info(event.content_type, event.body, now)
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
        elif isinstance(event, LegLateAnswer) and self.state is CallState.ANSWERED:
            started = neg.on_late_answer(event.sdp, self.id)
            if started is None:
                self._hangup_all(now, "no usable SDP answer in the caller's ACK", unanswered=488)
                return
        if started is not None:
            self._adopted(started, now)

    def _alerting(self, leg: Leg, now: float) -> None:
        """The one place that knows an extension alerted: its NOTIFY_INTERNAL, once per
        extension and call (two phones of one extension are one event)."""
        ext = leg.extension
        if not ext or ext in self.alerted:
            return
        self.alerted.append(ext)
        if self._events and not self._outbound_for_crm:
            self.host.notifier.internal(self, self.route.dialled, ext)

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
        sdp_out = self.neg.callee_answer(raw, self.id, leg.flow.remote[0]) if raw else None
        if sdp_out is None:
            leg.hangup(now)
            self._end(now, 488, "callee answered without usable SDP")
            return
        self._caller_answer(sdp_out, now)
        self._set_state(CallState.ANSWERED, now)

    def _caller_ringing(self, sdp: bytes | None, now: float) -> None:
        """A callee alerts: the caller hears 180 (or 183 with the early media's SDP)."""
        assert isinstance(self.a, InboundLeg)
        self.a.ring(sdp, now)

    def _caller_answer(self, sdp: bytes, now: float) -> None:
        """A callee answered: the caller gets our 2xx with the relayed SDP."""
        assert isinstance(self.a, InboundLeg)
        self.a.answer(sdp, now)

    @property
    def _outbound_for_crm(self) -> bool:
        """Whether the CRM sees this call as outbound (NOTIFY_OUT_*), else inbound."""
        return self.route.direction is Direction.OUTBOUND

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

    def _adopted(self, started: Started, now: float, *, bridged: bool = False) -> None:
        """New SDP is in force: the RTP timeout re-starts for a side that starts sending
        again (for both sides when ``bridged``: a new party took over one of them, by a
        transfer or Replaces), hold is re-read, the recorder hears of the codecs."""
        assert self.neg is not None
        for key in (("a", "b") if bridged else started):
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
        elif name == "no_answer" and self.state in (CallState.ROUTING, CallState.RINGING):
            for b in self.b_legs:
                b.cancel(now)
            self.b_legs = []
            self.failures.append(RING_TIMEOUT)
            self._next_stage(now)
        elif name == "max_duration":
            self._hangup_all(now, "maximum call duration reached", unanswered=408)
        elif name == "rtp_check" and self.state is CallState.ANSWERED and self.neg is not None:
            timeout = self.host.config.media.rtp_timeout
            silent = self.neg.silent_side(now, timeout, self._silent_since)
            if silent:
                self._hangup_all(now, f"no RTP from the {silent} for {timeout} s", unanswered=408)
            else:
                self.host.timers.schedule(self, "rtp_check", now + min(timeout, 5.0))

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
        for b in self.b_legs:
            b.hangup(now)
        if self.state is CallState.ANSWERED:
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
            if self._events and self._outbound_for_crm:
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
        if self.transfer is not None:
            self.transfer.abort(now)
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
            call_id=self.id, sip_call_id=self.caller_call_id or self.a.request.call_id,
            direction=self.route.direction.value, caller=self.caller_number,
            callee=self.route.dialled, did=self.route.dialled if inbound else "",
            extension=extension,
            gateway=(self.from_gateway or (answered_leg.gateway if answered_leg else "")
                     or self.gateway_used),
            started_at=self.created_at, answered_at=self.answered_at, ended_at=now,
            disposition=self.disposition, sip_code=self.sip_code, cause=self.cause,
            caller_extension=self.caller_extension, pbx_call_id=self.pbx_call_id,
            sent_number=next((t.number for s in self.route.stages for t in s.targets if
                              isinstance(t, GatewayTarget) and t.gateway == self.gateway_used), ""))
        if self._events:
            notifier = self.host.notifier
            if self._outbound_for_crm:
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
        if self.transfers:
            rec = replace(rec, transfers=chain_text(self))
        self.host.call_ended(self, WriteCdr(rec))
        self._release()

    def _release(self) -> None:
        """Let go of what a finished call no longer needs. Its legs may live on for a few
        seconds in transactions that still absorb retransmissions; they must not keep the
        call, its SDP and its media alive (nor leave cycles for the garbage collector)."""
        legs = [self.a, *self.b_legs, *([self.answered] if self.answered else [])]
        for leg in legs:
            leg.call = _ENDED
            leg.request.shrink()
        self.b_legs = []
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
            self._release_caller(code, now)
        self.sip_code = code
        log.info("call %s ended: %s (%d, %s)", self.id, self.disposition, code, cause)
        self._set_state(CallState.ENDED, now)


    def _release_caller(self, code: int, now: float) -> None:
        """The call ends unanswered: the caller still waiting gets ``code``."""
        assert isinstance(self.a, InboundLeg)
        self.a.reject(code, None, now)


_PREFIX = {Direction.INBOUND: "in", Direction.OUTBOUND: "out", Direction.INTERNAL: "int"}


def _with_stages(route: Route, stages: tuple[Stage, ...]) -> Route:
    return Route(route.direction, stages, route.dialled, record=route.record, rule=route.rule)


class _EndedCall:
    """What the legs of a finished call report to: nothing is listening any more."""

    def handle(self, event: LegEvent, now: float) -> None:
        """Late leg events (a 487 after our CANCEL, a BYE answer) need no action."""


_ENDED = _EndedCall()
