"""The B2BUA call: one caller leg, the callee legs it forks to, the media relay between them.

The call reads no SIP: legs hand it neutral events (:mod:`.events`) and it commands them.
Legal state changes live in :data:`TRANSITIONS` beside the one :meth:`Call._set_state`, which
logs ``old -> new`` and carries out the side effects (timers, media, the CDR).
"""

from __future__ import annotations

import logging
import secrets
from enum import Enum
from typing import Protocol

from ..config.schema import Config, Gateway
from ..media.ports import PortRangeExhausted
from ..media.relay import RelaySession, RelaySide
from ..sip import sdp as sdpmod
from ..sip.events import Flow
from ..sip.message import Request
from ..sip.sdp import LocalOrigin, SdpError, SessionDescription
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
    LegRinging,
    StartRecording,
    StopRecording,
    WriteCdr,
)
from .leg import InboundLeg, Leg, LegHost, OutboundLeg
from .registrar import Registrar
from .routing import Direction, ExtensionTarget, GatewayTarget, Route
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

    def gateway(self, name: str) -> Gateway: ...
    def gateway_calls(self, name: str) -> int: ...
    def gateway_flow(self, gateway: Gateway) -> Flow: ...
    def call_ended(self, call: Call, action: WriteCdr) -> None: ...
    def call_action(self, action: StartRecording | StopRecording) -> None: ...


class CallState(Enum):
    """Where a call is."""

    TRYING = "trying"      # routed, callee legs being placed
    RINGING = "ringing"    # some callee is alerting
    ANSWERED = "answered"
    ENDED = "ended"


S = CallState
TRANSITIONS: dict[CallState, frozenset[CallState]] = {
    S.TRYING: frozenset({S.RINGING, S.ANSWERED, S.ENDED}),
    S.RINGING: frozenset({S.ANSWERED, S.ENDED}),
    S.ANSWERED: frozenset({S.ENDED}),
    S.ENDED: frozenset(),
}

# How a set of callee failures is reported to the caller, best first (RFC 3261 §16.7 spirit).
_FAIL_ORDER = (486, 600, 603, 480, 408, 404, 484, 604, 403, 503, 502, 500)


def _disposition(code: int) -> str:
    if code in (486, 600, 603):
        return "busy"
    if code in (408, 480):
        return "no answer"
    if code == 487:
        return "cancel"
    return "failed"


class Call:
    """One call through the switch."""

    def __init__(self, *, host: CallHost, tx: ServerTransaction, flow: Flow, route: Route, now: float,
                 caller_number: str, caller_name: str, caller_extension: str = "",
                 from_gateway: str = "") -> None:
        self.host = host
        self.route = route
        self.id = f"{_PREFIX[route.direction]}_{secrets.token_hex(20)}"
        """Permanent id of the call (CDRs, CRM ``pbx_call_id``)."""
        self.state = CallState.TRYING
        self.timers: dict[str, int] = {}
        self.created_at = now
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self.caller_number = caller_number
        self.caller_name = caller_name
        self.caller_extension = caller_extension
        self.from_gateway = from_gateway
        self.a = InboundLeg(host=host, call=self, tx=tx, flow=flow)
        self.b_legs: list[OutboundLeg] = []
        """Callee legs of the current stage still in play."""
        self.answered: OutboundLeg | None = None
        self.stage = -1
        self._leg_count = 0
        self._failures: list[int] = []
        self.last_rang: OutboundLeg | None = None
        self.media: RelaySession | None = None
        self._offer: SessionDescription | None = None
        self._answer: SessionDescription | None = None
        self._origin_a: LocalOrigin | None = None
        self._origin_b: LocalOrigin | None = None
        self._pending_offer_from: Leg | None = None
        self.on_hold = False
        self.cause = ""
        self.sip_code = 0
        self.disposition = ""

    # -- start --------------------------------------------------------------------------------
    def start(self, now: float) -> None:
        """Open the media relay, send the callee legs of the first stage."""
        offer = self.a.initial_sdp
        if offer is None:
            self._end(now, 488, "no SDP offer in the INVITE (late offer is not supported)")
            return
        try:
            self._offer = sdpmod.parse_sdp(offer)
            if not any(m.is_rtp for m in self._offer.media):
                raise SdpError("no RTP media in the offer")
        except SdpError as exc:
            self._end(now, 488, f"bad SDP offer: {exc}")
            return
        try:
            self.media = self.host.relay.open_session()
        except (PortRangeExhausted, OSError) as exc:
            self._end(now, 503, f"no media ports: {exc}")
            return
        ip = self.host.relay.advertised_ip
        sid = secrets.randbelow(2**62)
        self._origin_a = LocalOrigin(session_id=sid, address=ip)
        self._origin_b = LocalOrigin(session_id=sid + 1, address=ip)
        self._set_remote(self.media.a, self._offer)
        max_duration = self.host.config.calls.max_duration
        if max_duration:
            self.host.timers.schedule(self, "max_duration", now + max_duration)
        self._next_stage(now)

    def _rewrite_for(self, side: RelaySide, sdp: SessionDescription, origin: LocalOrigin) -> bytes:
        ip = self.host.relay.advertised_ip
        addrs = []
        first = True
        for m in sdp.media:
            if first and m.is_rtp and m.port:
                addrs.append((ip, side.rtp_port))
                first = False
            else:
                addrs.append((ip, 0))  # only the first RTP stream is relayed
        out = sdpmod.rewrite(sdp, addrs, drop_attributes=sdpmod.ICE_ATTRIBUTES)
        return origin.stamp(out).to_bytes()

    @staticmethod
    def _set_remote(side: RelaySide, sdp: SessionDescription) -> None:
        idx = next((i for i, m in enumerate(sdp.media) if m.is_rtp and m.port), None)
        if idx is None:
            side.set_remote(None)
            return
        side.set_remote(sdpmod.media_address(sdp, idx), sdpmod.rtcp_address(sdp, idx))

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
                self._failures.append(480)  # not registered
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
        if gw.max_calls and self.host.gateway_calls(gw.name) >= gw.max_calls:
            log.warning("gateway %s is at its %d-call limit", gw.name, gw.max_calls)
            self._failures.append(503)
            return []
        flow = self.host.gateway_flow(gw)
        host = gw.realm or gw.proxy
        ruri = f"sip:{target.number}@{gw.proxy}"
        to = f"<sip:{target.number}@{host}>"
        creds = (gw.username, gw.password) if gw.username else None
        leg = self._make_leg(flow=flow, ruri=ruri, to=to, credentials=creds,
                             caller=(target.caller_id_number, target.caller_id_name), host=host)
        leg.gateway = gw.name
        return [leg]

    def _make_leg(self, *, flow: Flow, ruri: str, to: str, credentials: tuple[str, str] | None,
                  caller: tuple[str, str] | None = None, host: str | None = None) -> OutboundLeg:
        self._leg_count += 1
        number, name = caller if caller is not None else (self.caller_number, self.caller_name)
        number = number or self.caller_number or "anonymous"
        from_host = host or self.host.config.global_.domain
        disp = f'"{_quote(name)}" ' if name else ""
        assert self._offer is not None and self.media is not None and self._origin_b is not None
        body = self._rewrite_for(self.media.b, self._offer, self._origin_b)
        mf = self.a.request.max_forwards
        headers = [
            ("Max-Forwards", str(max(0, (mf if mf is not None else 70) - 1))),
            ("From", f"{disp}<sip:{number}@{from_host}>;tag={new_tag()}"),
            ("To", to),
            ("Call-ID", f"{secrets.token_hex(16)}@{self.host.config.global_.domain}"),
            ("CSeq", "1 INVITE"),
            ("Contact", self.host.contact_for(flow)),
            ("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO"),
            ("Content-Type", "application/sdp"),
            ("Content-Length", str(len(body))),
        ]
        req = Request("INVITE", ruri, headers, body)
        return OutboundLeg(host=self.host, call=self, flow=flow, label=f"b{self._leg_count}",
                           request=req, credentials=credentials)

    def _give_up(self, now: float) -> None:
        code = next((c for c in _FAIL_ORDER if c in self._failures), None)
        if code is None:
            code = self._failures[0] if self._failures else 480
        self._end(now, code, f"no callee answered ({code})")

    # -- events from legs ---------------------------------------------------------------------
    def handle(self, event: LegEvent, now: float) -> None:
        """A leg reports something."""
        if self.state is CallState.ENDED:
            return
        leg = event.leg
        if isinstance(event, LegRinging):
            if leg in self.b_legs:
                self.last_rang = leg  # type: ignore[assignment]
                sdp_out = None
                if event.sdp:
                    sdp_out = self._callee_answer(event.sdp)
                self.a.ring(sdp_out, now)
                if self.state is CallState.TRYING:
                    self._set_state(CallState.RINGING, now)
        elif isinstance(event, LegAnswered):
            if leg in self.b_legs:
                self._on_answer(leg, event.sdp, now)  # type: ignore[arg-type]
        elif isinstance(event, LegFailed):
            if leg in self.b_legs:
                self.b_legs.remove(leg)  # type: ignore[arg-type]
                # A trunk that never answers is down (503), not a callee that did not pick up.
                self._failures.append(503 if leg.gateway and event.status == 408 else event.status)
                if not self.b_legs:
                    TimerQueue.cancel(self, "no_answer")
                    self._next_stage(now)
        elif isinstance(event, LegHungUp):
            self._on_hangup(leg, event.cause, now)
        elif isinstance(event, LegOffer):
            self._on_offer(leg, event.sdp, now)
        elif isinstance(event, LegOfferAnswered):
            self._on_offer_answered(leg, event.status, event.sdp, now)

    @property
    def recorded(self) -> bool:
        """Whether this call is recorded (switch-wide setting and the route's)."""
        return self.host.config.recording.enabled and self.route.record

    @property
    def _codecs(self) -> dict[int, str]:
        """Payload types of the negotiated SDP (answer over offer), for the recorder."""
        out: dict[int, str] = {}
        for sdp in (self._offer, self._answer):
            if sdp is None:
                continue
            for m in sdp.media:
                if m.is_rtp:
                    for c in m.codecs():
                        out[c.payload_type] = c.encoding
                    break
        return out

    def _callee_answer(self, raw: bytes) -> bytes | None:
        """The callee's SDP, remembered for the relay and rewritten for the caller."""
        assert self.media is not None and self._origin_a is not None
        try:
            answer = sdpmod.parse_sdp(raw)
        except SdpError as exc:
            log.warning("call %s: bad SDP from callee: %s", self.id, exc)
            return None
        self._answer = answer
        self._set_remote(self.media.b, answer)
        return self._rewrite_for(self.media.a, answer, self._origin_a)

    def _on_answer(self, leg: OutboundLeg, raw: bytes | None, now: float) -> None:
        self.answered = leg
        for other in self.b_legs:
            if other is not leg:
                other.cancel(now)
        self.b_legs = [leg]
        sdp_out = self._callee_answer(raw) if raw else None
        if sdp_out is None:
            leg.hangup(now)
            self._end(now, 488, "callee answered without usable SDP")
            return
        self.a.answer(sdp_out, now)
        self._set_state(CallState.ANSWERED, now)

    def _on_hangup(self, leg: Leg, cause: str, now: float) -> None:
        if leg is self.a:
            for b in list(self.b_legs):
                b.hangup(now)
            if self.state is CallState.ANSWERED:
                self._end(now, 200, cause)
            else:
                self._end(now, 487, cause)
        elif leg is self.answered:
            self.a.hangup(now)
            self._end(now, 200, cause)

    def _on_offer(self, leg: Leg, raw: bytes | None, now: float) -> None:
        """Hold/resume and other re-negotiation: pass it to the other party through the relay."""
        if self.state is not CallState.ANSWERED or self.answered is None or self.media is None:
            leg.answer_offer(491, None, now)
            return
        assert self._origin_a is not None and self._origin_b is not None
        other: Leg = self.answered if leg is self.a else self.a
        own_side, other_side = ((self.media.a, self.media.b) if leg is self.a
                                else (self.media.b, self.media.a))
        origin = self._origin_b if leg is self.a else self._origin_a
        sdp_out = None
        if raw:
            try:
                offer = sdpmod.parse_sdp(raw)
            except SdpError:
                leg.answer_offer(488, None, now)
                return
            self._set_remote(own_side, offer)
            self.on_hold = sdpmod.is_hold(offer)
            sdp_out = self._rewrite_for(other_side, offer, origin)
        self._pending_offer_from = leg
        other.offer(sdp_out, now)

    def _on_offer_answered(self, leg: Leg, status: int, raw: bytes | None, now: float) -> None:
        origin_leg = self._pending_offer_from
        self._pending_offer_from = None
        if origin_leg is None or self.media is None:
            return
        assert self._origin_a is not None and self._origin_b is not None
        if status >= 300 or not raw:
            origin_leg.answer_offer(status if status >= 300 else 488, None, now)
            return
        try:
            answer = sdpmod.parse_sdp(raw)
        except SdpError:
            origin_leg.answer_offer(488, None, now)
            return
        answering_side, origin_side = ((self.media.b, self.media.a) if origin_leg is self.a
                                       else (self.media.a, self.media.b))
        self._set_remote(answering_side, answer)
        origin = self._origin_a if origin_leg is self.a else self._origin_b
        origin_leg.answer_offer(200, self._rewrite_for(origin_side, answer, origin), now)

    # -- timers -------------------------------------------------------------------------------
    def on_timer(self, name: str, now: float) -> None:
        """A timer of this call fired."""
        if self.state is CallState.ENDED:
            return
        if name == "no_answer" and self.state is not CallState.ANSWERED:
            for b in self.b_legs:
                b.cancel(now)
            self.b_legs = []
            self._failures.append(480)
            self._next_stage(now)
        elif name == "max_duration":
            self._hangup_all(now, "maximum call duration reached")
        elif name == "rtp_check" and self.state is CallState.ANSWERED and self.media is not None:
            timeout = self.host.config.media.rtp_timeout
            if not self.on_hold and now - self.media.last_media_at > timeout:
                self._hangup_all(now, f"no RTP for {timeout} s")
            else:
                self.host.timers.schedule(self, "rtp_check", now + min(timeout, 5.0))

    def _hangup_all(self, now: float, cause: str) -> None:
        self.a.hangup(now)
        for b in self.b_legs:
            b.hangup(now)
        self._end(now, 200 if self.state is CallState.ANSWERED else 408, cause)

    # -- state --------------------------------------------------------------------------------
    def _set_state(self, new: CallState, now: float) -> None:
        old = self.state
        if new not in TRANSITIONS[old]:
            raise RuntimeError(f"call {old.value} -> {new.value} is not a legal transition")
        self.state = new
        log.info("call %s %s -> %s", self.id, old.value, new.value)
        timers = self.host.timers
        if new is CallState.ANSWERED:
            self.answered_at = now
            timers.cancel(self, "no_answer")
            timeout = self.host.config.media.rtp_timeout
            if timeout:
                timers.schedule(self, "rtp_check", now + min(timeout, 5.0))
            if self.recorded and self.media is not None:
                self.host.call_action(StartRecording(self.id, self.media, self._codecs, now))
        elif new is CallState.ENDED:
            self.ended_at = now
            self.timers.clear()
            if old is CallState.ANSWERED and self.recorded:
                self.host.call_action(StopRecording(self.id, now))
            if self.media is not None:
                self.host.relay.close_session(self.media)
            answered_leg = self.answered
            rec = CallRecord(
                call_id=self.id, sip_call_id=self.a.request.call_id,
                direction=self.route.direction.value, caller=self.caller_number,
                callee=self.route.dialled,
                did=self.route.dialled if self.route.direction is Direction.INBOUND else "",
                extension=(answered_leg.extension if answered_leg else
                           (self.last_rang.extension if self.last_rang else "")),
                gateway=self.from_gateway or next((b.gateway for b in [answered_leg] if b), ""),
                started_at=self.created_at, answered_at=self.answered_at, ended_at=now,
                disposition=self.disposition, sip_code=self.sip_code, cause=self.cause)
            self.host.call_ended(self, WriteCdr(rec))
            self._release()

    def _release(self) -> None:
        """Let go of what a finished call no longer needs. Its legs may live on for a few
        seconds in transactions that still absorb retransmissions; they must not keep the
        call, its SDP and its media alive (nor leave cycles for the garbage collector)."""
        for leg in (self.a, *self.b_legs, *([self.answered] if self.answered else [])):
            leg.call = _ENDED
            leg.request.shrink()
        self.b_legs = []
        self.media = None
        self._offer = self._answer = None

    def _end(self, now: float, code: int, cause: str) -> None:
        """Finish the call: answer the caller if it is still waiting, write the CDR."""
        if self.state is CallState.ENDED:
            return
        self.sip_code = code
        self.cause = cause
        if self.state is CallState.ANSWERED:
            self.disposition = "answered"
        else:
            self.disposition = "cancel" if "cancel" in cause else _disposition(code)
            self.a.reject(code if code >= 300 else 480, None, now)
        log.info("call %s ended: %s (%d, %s)", self.id, self.disposition, code, cause)
        self._set_state(CallState.ENDED, now)


_PREFIX = {Direction.INBOUND: "in", Direction.OUTBOUND: "out", Direction.INTERNAL: "int"}


class _EndedCall:
    """What the legs of a finished call report to: nothing is listening any more."""

    def handle(self, event: LegEvent, now: float) -> None:
        """Late leg events (a 487 after our CANCEL, a BYE answer) need no action."""


_ENDED = _EndedCall()


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
