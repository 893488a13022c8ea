"""The B2BUA call: one caller leg, the callee legs it forks to, the media relay between them.

The call reads no SIP: legs hand it neutral events (:mod:`.events`) and it commands them.
Legal state changes live in :data:`TRANSITIONS` beside the one :meth:`Call._set_state`, which
logs ``old -> new`` and carries out the side effects (timers, media, the CDR).
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
from ..media.relay import RelaySession, RelaySide
from ..sip import sdp as sdpmod
from ..sip.auth import Credentials
from ..sip.events import Flow
from ..sip.message import Request
from ..sip.sdp import Direction as MediaDirection
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
    LegOfferCancelled,
    LegRefreshAnswered,
    LegRinging,
    RecordingCodecs,
    StartRecording,
    StopRecording,
    WriteCdr,
)
from .leg import InboundLeg, Leg, LegHost, OutboundLeg
from .registrar import Registrar
from .routing import Direction, ExtensionTarget, GatewayTarget, Route, Router
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

    def gateway(self, name: str) -> Gateway: ...
    def gateway_calls(self, name: str) -> int: ...
    def gateway_flow(self, gateway: Gateway) -> Flow: ...
    def call_ended(self, call: Call, action: WriteCdr) -> None: ...
    def call_action(self, action: StartRecording | RecordingCodecs | StopRecording) -> None: ...


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


@dataclass(slots=True)
class _Renegotiation:
    """A re-INVITE/UPDATE in progress between the two parties."""

    origin: Leg | None
    """The leg whose party offered; ``None`` for our own offer (a restore)."""
    target: Leg
    """The leg the offer was sent on."""
    offer: SessionDescription | None
    """The originator's offer, applied to the relay only once the answer is a 2xx."""
    cancelled: bool = False
    """The originator CANCELled its re-INVITE."""


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
        if from_gateway:
            gw = host.gateway(from_gateway)
            if gw.username:  # for the trunk's challenges to our BYE or re-INVITE
                self.a.credentials = Credentials(gw.username, gw.password, gw.auth_algorithms)
        self.b_legs: list[OutboundLeg] = []
        """Callee legs of the current stage still in play."""
        self.answered: OutboundLeg | None = None
        self.stage = -1
        self._leg_count = 0
        self._failures: list[int] = []
        self.last_rang: OutboundLeg | None = None
        self.media: RelaySession | None = None
        self._sdp_a: SessionDescription | None = None
        """The caller's SDP in force (its offer in the INVITE, then each re-negotiation's)."""
        self._sdp_b: SessionDescription | None = None
        """The callee's SDP in force (early media's, the answer's, then re-negotiations')."""
        self._origin_a: LocalOrigin | None = None
        self._origin_b: LocalOrigin | None = None
        self._pending: _Renegotiation | None = None
        self._silent_since = {"a": 0.0, "b": 0.0}
        """Per side, when it last started being expected to send RTP (answer, resume): the
        RTP timeout counts from there when the relay saw nothing later."""
        self._recorded = False
        self._gateway_used = ""
        """The gateway of the latest trunk leg tried (the CDR of a failed outbound call)."""
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
            self._sdp_a = sdpmod.parse_sdp(offer)
            if not any(m.is_rtp for m in self._sdp_a.media):
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
        self._set_remote(self.media.a, self._sdp_a)
        max_duration = self.host.config.calls.max_duration
        if max_duration:
            self.host.timers.schedule(self, "max_duration", now + max_duration)
        self._next_stage(now)

    def _rewrite_for(self, side: RelaySide, sdp: SessionDescription, origin: LocalOrigin) -> bytes:
        ip = self.host.relay.advertised_ip
        relayed = _first_rtp(sdp)  # only the first RTP stream is relayed; the rest get port 0
        addrs = [(ip, side.rtp_port if i == relayed else 0) for i in range(len(sdp.media))]
        out = sdpmod.rewrite(sdp, addrs, drop_attributes=sdpmod.ICE_ATTRIBUTES)
        return origin.stamp(out).to_bytes()

    @staticmethod
    def _set_remote(side: RelaySide, sdp: SessionDescription) -> None:
        idx = _first_rtp(sdp)
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
        self._gateway_used = gw.name
        if gw.max_calls and self.host.gateway_calls(gw.name) >= gw.max_calls:
            log.warning("gateway %s is at its %d-call limit", gw.name, gw.max_calls)
            self._failures.append(503)
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
                  account: str | None = None) -> OutboundLeg:
        """``account``: the From user is this trunk account, and the caller ID goes in
        ``P-Asserted-Identity`` (RFC 3325; a gateway with ``caller_id_in_from = false``)."""
        self._leg_count += 1
        number, name = caller if caller is not None else (self.caller_number, self.caller_name)
        number = _user(number or self.caller_number or "anonymous")
        from_host = host or self.host.config.global_.domain
        disp = f'"{_quote(name)}" ' if name else ""
        identity: list[tuple[str, str]] = []
        if account is not None:
            identity = [("P-Asserted-Identity", f"{disp}<sip:{number}@{from_host}>")]
            number = _user(account)
        assert self._sdp_a is not None and self.media is not None and self._origin_b is not None
        body = self._rewrite_for(self.media.b, self._sdp_a, self._origin_b)
        mf = self.a.request.max_forwards
        headers = [
            ("Max-Forwards", str(max(0, (mf if mf is not None else 70) - 1))),
            ("From", f"{disp}<sip:{number}@{from_host}>;tag={new_tag()}"),
            ("To", to),
            ("Call-ID", f"{secrets.token_hex(16)}@{self.host.config.global_.domain}"),
            ("CSeq", "1 INVITE"),
            ("Contact", self.host.contact_for(flow)),
            *identity,
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
                self._failures.append(caller_status(event.status, trunk=bool(leg.gateway)))
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
        elif isinstance(event, LegOffer):
            self._on_offer(leg, event.sdp, now)
        elif isinstance(event, LegOfferAnswered):
            self._on_offer_answered(leg, event.status, event.sdp, now)
        elif isinstance(event, LegOfferCancelled):
            self._on_offer_cancelled(leg, now)
        elif isinstance(event, LegRefreshAnswered):
            self._on_refresh_answered(leg, event.sdp, now)

    @property
    def recorded(self) -> bool:
        """Whether this call is recorded: decided at the answer (:meth:`Router.records`)."""
        return self._recorded

    @property
    def _codecs(self) -> dict[int, str]:
        """Payload types of the negotiated SDP (the callee's over the caller's), for the
        recorder: both sides' maps merged (:class:`RecordingCodecs` has them per side)."""
        out = _codec_map(self._sdp_a)
        out.update(_codec_map(self._sdp_b))
        return out

    def _recording_codecs(self) -> RecordingCodecs:
        # RFC 3264 §5.1/§6.1: each party sends with the payload types of the other's SDP.
        return RecordingCodecs(self.id, caller=_codec_map(self._sdp_b),
                               callee=_codec_map(self._sdp_a))

    def _callee_answer(self, raw: bytes) -> bytes | None:
        """The callee's SDP, remembered for the relay and rewritten for the caller."""
        assert self.media is not None and self._origin_a is not None
        try:
            answer = sdpmod.parse_sdp(raw)
        except SdpError as exc:
            log.warning("call %s: bad SDP from callee: %s", self.id, exc)
            return None
        self._sdp_b = answer
        self._set_remote(self.media.b, answer)
        return self._rewrite_for(self.media.a, answer, self._origin_a)

    def _on_answer(self, leg: OutboundLeg, raw: bytes | None, now: float) -> None:
        self.answered = leg
        for other in self.b_legs:
            if other is not leg:
                other.cancel(now, answered_elsewhere=True)
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
        """Hold/resume and other re-negotiation: pass it to the other party through the relay.
        Nothing changes on the relay until the answer is a 2xx (a 488/491 leaves the
        session as it was, RFC 3264 §8)."""
        if (self.state is not CallState.ANSWERED or self.answered is None or self.media is None
                or self._pending is not None):
            leg.answer_offer(491, None, now)
            return
        if not raw:  # legs answer re-INVITEs and UPDATEs without SDP themselves
            leg.answer_offer(488, None, now)
            return
        try:
            offer = sdpmod.parse_sdp(raw)
        except SdpError:
            leg.answer_offer(488, None, now)
            return
        other: Leg = self.answered if leg is self.a else self.a
        other_side, origin = self._facing(other)
        self._pending = _Renegotiation(origin=leg, target=other, offer=offer)
        other.offer(self._rewrite_for(other_side, offer, origin), now)

    def _on_offer_answered(self, leg: Leg, status: int, raw: bytes | None, now: float) -> None:
        p = self._pending
        if p is None or p.target is not leg or self.media is None:
            return
        self._pending = None
        answer = None
        if 200 <= status < 300 and raw:
            try:
                answer = sdpmod.parse_sdp(raw)
            except SdpError:
                log.warning("call %s: bad SDP in the answer of %s", self.id, leg.label)
        if p.cancelled or p.origin is None:
            # Nobody waits for this answer. The answering party now has the session it
            # accepted; after a withdrawn offer, it is offered back the one its peer kept.
            if answer is not None:
                self._adopt({leg: answer}, now)
            if p.cancelled and 200 <= status < 300:
                self._restore(leg, now)
            return
        origin_leg = p.origin
        if answer is None:
            origin_leg.answer_offer(status if status >= 300 else 488, None, now)
            return
        assert p.offer is not None
        self._adopt({origin_leg: p.offer, leg: answer}, now)
        origin_side, origin = self._facing(origin_leg)
        origin_leg.answer_offer(200, self._rewrite_for(origin_side, answer, origin), now)

    def _facing(self, leg: Leg) -> tuple[RelaySide, LocalOrigin]:
        """The relay side and our SDP origin that ``leg``'s party sees."""
        assert self.media is not None and self._origin_a is not None
        assert self._origin_b is not None
        if leg is self.a:
            return self.media.a, self._origin_a
        return self.media.b, self._origin_b

    def _on_offer_cancelled(self, leg: Leg, now: float) -> None:
        """The originator withdrew its re-INVITE: withdraw ours; its relay address was
        never applied, and an answer that still comes is not passed on."""
        p = self._pending
        if p is None or p.origin is not leg:
            return
        p.cancelled = True
        p.target.cancel_offer(now)

    def _restore(self, leg: Leg, now: float) -> None:
        """Offer ``leg``'s party the session its peer still has (after a 2xx that crossed
        the CANCEL of the offer it answered), so that the two agree again."""
        peer_sdp = self._sdp_b if leg is self.a else self._sdp_a
        if self.media is None or peer_sdp is None:
            return
        side, origin = self._facing(leg)
        self._pending = _Renegotiation(origin=None, target=leg, offer=None)
        leg.offer(self._rewrite_for(side, peer_sdp, origin), now)

    def _on_refresh_answered(self, leg: Leg, raw: bytes, now: float) -> None:
        """The answer, in an ACK, to the SDP a leg offered back on a session refresh."""
        if self.state is not CallState.ANSWERED or self.media is None:
            return
        current = self._sdp_a if leg is self.a else self._sdp_b
        if current is not None and current.to_bytes() == raw:
            return  # the usual case: nothing changed
        try:
            sdp = sdpmod.parse_sdp(raw)
        except SdpError:
            log.warning("call %s: bad SDP in the ACK of %s; ignored", self.id, leg.label)
            return
        self._adopt({leg: sdp}, now)

    def _adopt(self, sdps: dict[Leg, SessionDescription], now: float) -> None:
        """New SDP in force for one or both parties: the relay sends there, the RTP timeout
        re-starts for a side that starts sending again, the recorder hears of the codecs."""
        assert self.media is not None
        before = self._sending()
        for leg, sdp in sdps.items():
            if leg is self.a:
                self._sdp_a = sdp
                self._set_remote(self.media.a, sdp)
            else:
                self._sdp_b = sdp
                self._set_remote(self.media.b, sdp)
        after = self._sending()
        for key in ("a", "b"):
            if after[key] and not before[key]:
                self._silent_since[key] = now
        self.on_hold = any(sdp is not None and sdpmod.is_hold(sdp)
                           for sdp in (self._sdp_a, self._sdp_b))
        if self._recorded:
            self.host.call_action(self._recording_codecs())

    def _sending(self) -> dict[str, bool]:
        return {"a": _sends(self._sdp_a, self._sdp_b), "b": _sends(self._sdp_b, self._sdp_a)}

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
        assert self.media is not None
        sending = self._sending()
        for key, side, who in (("a", self.media.a, "caller"), ("b", self.media.b, "callee")):
            if sending[key] and now - max(side.last_rx_at, self._silent_since[key]) > timeout:
                return who
        return ""

    def shutdown(self, now: float) -> None:
        """The switch stops: BYE the answered legs, CANCEL the ringing ones, ``487`` the
        caller of an unanswered call; the CDR is written."""
        self._hangup_all(now, "switch shut down", unanswered=487, disposition="failed")

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
        timers = self.host.timers
        if new is CallState.ANSWERED:
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
            if self._recorded and self.media is not None:
                self.host.call_action(StartRecording(self.id, self.media, self._codecs, now))
                self.host.call_action(self._recording_codecs())
        elif new is CallState.ENDED:
            self.ended_at = now
            self.timers.clear()
            if old is CallState.ANSWERED and self._recorded:
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
                gateway=(self.from_gateway or (answered_leg.gateway if answered_leg else "")
                         or self._gateway_used),
                started_at=self.created_at, answered_at=self.answered_at, ended_at=now,
                disposition=self.disposition, sip_code=self.sip_code, cause=self.cause,
                caller_extension=self.caller_extension)
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
        self._sdp_a = self._sdp_b = None
        self._pending = None

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
            self.disposition = disposition or ("cancel" if "cancel" in cause
                                               else _disposition(code))
            self.a.reject(code, None, now)
        self.sip_code = code
        log.info("call %s ended: %s (%d, %s)", self.id, self.disposition, code, cause)
        self._set_state(CallState.ENDED, now)


_PREFIX = {Direction.INBOUND: "in", Direction.OUTBOUND: "out", Direction.INTERNAL: "int"}


class _EndedCall:
    """What the legs of a finished call report to: nothing is listening any more."""

    def handle(self, event: LegEvent, now: float) -> None:
        """Late leg events (a 487 after our CANCEL, a BYE answer) need no action."""


_ENDED = _EndedCall()


def _first_rtp(sdp: SessionDescription) -> int | None:
    return next((i for i, m in enumerate(sdp.media) if m.is_rtp and m.port), None)


def _codec_map(sdp: SessionDescription | None) -> dict[int, str]:
    """Payload type -> encoding of the first RTP stream (the one relayed)."""
    if sdp is None:
        return {}
    i = _first_rtp(sdp)
    return {} if i is None else {c.payload_type: c.encoding for c in sdp.media[i].codecs()}


def _sends(own: SessionDescription | None, peer: SessionDescription | None) -> bool:
    """Whether the party whose SDP is ``own`` is expected to send RTP to the party whose SDP
    is ``peer`` (see :meth:`Call._silent_side`)."""
    if own is None or peer is None:
        return False
    i, j = _first_rtp(own), _first_rtp(peer)
    if i is None or j is None:
        return False
    if sdpmod.media_address(own, i) is None or sdpmod.media_address(peer, j) is None:
        return False
    sendrecv = MediaDirection.SENDRECV
    return sdpmod.direction(own, i) is sendrecv and sdpmod.direction(peer, j) is sendrecv


def _user(text: str) -> str:
    """``text`` as a SIP URI user part (RFC 3261 §25.1 ``user``): a number as a trunk sent it
    may hold characters (an unescaped ``@``, a space) that would break the URI we build."""
    return quote(text, safe="-_.!~*'()&=+$,;?/")


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
