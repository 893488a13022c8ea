"""Blind transfer of an answered call (RFC 3515 REFER), on the call's side.

A party of an answered call (the *transferor*, an extension) asked, with a REFER that
:mod:`.refer` authenticated, routed and accepted, that the other party (the *remaining*
party) be put through to a *target*. The target rings through the normal routing (an
extension, a ring group, an outside number through the transferor's outbound rules) while
the call goes on between the two parties as before: nothing is re-pointed before the target
answers. Then:

- answered: the relay side that faced the transferor is pointed at the target (the same
  relay session, the same :class:`~.call.Call`: one ``pbx_call_id``, one recording, one CDR),
  the remaining party is re-INVITEd only when what it was talking to changes (another codec
  map, or a hold the transferor left it in), the transferor hears ``SIP/2.0 200 OK`` in a
  ``message/sipfrag`` NOTIFY and its leg gets a BYE;
- busy, no answer, failed, while the transferor is still there: it hears the final status in
  the NOTIFY and the call stays with it (the phone resumes the held party itself: RFC 5589
  §6.1);
- the same once the transferor hung up: the remaining party is hung up, and the CDR keeps
  ``answered`` (the call was talked) with the failure in its cause and transfer chain.

The transfer chain of the CDR (``CallRecord.transfers``) is a JSON list written here and by
:mod:`.pickup`: ``{"at": <s since the call started>, "event": ..., ...}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..sip import sdp as sdpmod
from ..sip.sdp import SdpError, SessionDescription
from .callee import legs_for
from .events import LegAnswered, LegEvent, LegFailed, LegHungUp, LegRinging
from .negotiation import codec_map, first_rtp
from .outcome import RING_TIMEOUT, Failure, best_failure, fork_failed
from .routing import Route
from .timers import TimerQueue

if TYPE_CHECKING:
    from .call import Call
    from .leg import Leg, OutboundLeg

log = logging.getLogger("softpbx.call")

Progress = Callable[[int, bool, float], None]
"""Tell the transferor how the transfer goes: (SIP status, final, now) -> a sipfrag NOTIFY."""


def log_event(call: Call, now: float, event: str, **fields: str | int) -> None:
    """One entry of the call's transfer chain (the CDR's ``transfers`` column)."""
    call.transfers.append({"at": round(now - call.created_at), "event": event, **fields})


def start_chain(call: Call) -> None:
    """Open the chain of a call's first transfer with who answered it, and when."""
    if not call.transfers and call.answered_at is not None:
        first = call.answered.extension if call.answered else ""
        call.transfers.append({"at": round(call.answered_at - call.created_at),
                               "event": "answered", "by": first or "-"})


def chain_text(call: Call) -> str:
    """The CDR's ``transfers``: the chain as JSON, "" for a call without transfer or pickup."""
    return json.dumps(call.transfers, separators=(",", ":")) if call.transfers else ""


def party_extension(call: Call, leg: Leg) -> str:
    """The extension behind ``leg`` of ``call`` ("" for a trunk): a callee phone's, or the
    caller's when ``leg`` is the caller's leg of a call an extension placed."""
    if leg.extension:
        return leg.extension
    if leg is call.a and not call.from_gateway:
        return call.caller_extension
    return ""


class BlindTransfer:
    """One blind transfer in progress on ``call`` (``call.transfer``)."""

    def __init__(self, *, call: Call, transferor: Leg, by: str, route: Route, target: str,
                 referred_by: str, progress: Progress) -> None:
        self.call = call
        self.timers: dict[str, int] = {}
        self.transferor = transferor
        self.by = by
        """The transferor's extension."""
        self.transferor_is_a = transferor is call.a
        """Which relay side faced the transferor (and will face the target): A or B."""
        remaining = call.answered if self.transferor_is_a else call.a
        assert remaining is not None
        self.remaining: Leg = remaining
        self.route = route
        self.target = target
        self.referred_by = referred_by
        self.progress = progress
        self.stage = -1
        self.legs: list[OutboundLeg] = []
        """The target's legs of the current stage still ringing."""
        self.failures: list[Failure] = []
        self.gone = False
        """The transferor hung up while the target rang."""
        self._ringing_told = False
        self._alerted: set[str] = set()
        """Extensions of the target that alerted (each one NOTIFY_INTERNAL)."""

    # -- start --------------------------------------------------------------------------------
    def begin(self, now: float) -> None:
        """The REFER was accepted (202): ``100 Trying`` to the transferor, ring the target."""
        call = self.call
        start_chain(call)
        log_event(call, now, "blind", by=self.by, to=self.target)
        log.info("call %s: %s transfers the call to %s", call.id, self.by, self.target)
        self.progress(100, False, now)
        self._next_stage(now)

    def _offer(self) -> bytes:
        """The remaining party's SDP, as the target is offered it: at the relay side that
        faced the transferor, ``sendrecv`` even if the transferor had put the party on hold
        (the remaining party is re-INVITEd out of the hold once the target answers)."""
        neg = self.call.neg
        assert neg is not None
        own = neg.sdp_b if self.transferor_is_a else neg.sdp_a
        assert own is not None
        idx = first_rtp(own)
        if idx is not None and sdpmod.direction(own, idx) is not sdpmod.Direction.SENDRECV:
            own = sdpmod.set_direction(own, sdpmod.Direction.SENDRECV, idx)
        side, origin = neg.facing(self.transferor_is_a)
        return neg.rewrite(side, own, origin)

    def _caller_id(self) -> tuple[str, str]:
        """The number and name the target sees: the remaining party's."""
        call = self.call
        if self.transferor_is_a:  # the remaining party is the callee: what was dialled
            ext = self.remaining.extension
            number = ext or call.route.dialled
            e = call.host.router.extensions.get(ext) if ext else None
            if e is not None:
                return e.effective_caller_id_number or ext, e.effective_caller_id_name
            return number, ""
        return call.caller_number, call.caller_name

    def _next_stage(self, now: float) -> None:
        call = self.call
        stages = self.route.stages
        extra = [("Referred-By", self.referred_by)]
        body, caller = self._offer(), self._caller_id()
        while self.stage + 1 < len(stages):
            self.stage += 1
            stage = stages[self.stage]
            # legs_for notes why a target cannot be rung in the call's failures: here the
            # transfer's own, which must not colour the call's CDR.
            saved, gateway_used = call.failures, call.gateway_used
            call.failures = self.failures
            try:
                legs = [leg for t in stage.targets
                        for leg in legs_for(call, t, now, body=body, caller=caller, extra=extra)]
            finally:
                call.failures, call.gateway_used = saved, gateway_used
            if not legs:
                continue
            self.legs = legs
            timeout = stage.timeout or call.host.config.calls.no_answer_timeout
            call.host.timers.schedule(self, "no_answer", now + timeout)
            for leg in legs:
                leg.start(now)
            return
        self._failed(now)

    # -- events -------------------------------------------------------------------------------
    def handle(self, event: LegEvent, now: float) -> bool:
        """An event of the call: whether it was the transfer's (the target's legs, the
        transferor hanging up while the target rings)."""
        leg = event.leg
        if leg in self.legs:
            if isinstance(event, LegRinging):
                self._alerting(leg, now)
                if not self._ringing_told:
                    self._ringing_told = True
                    self.progress(180, False, now)
            elif isinstance(event, LegAnswered):
                self._alerting(leg, now)
                self._answered(leg, event.sdp, now)  # type: ignore[arg-type]
            elif isinstance(event, LegFailed) and fork_failed(
                    self.legs, self.failures, leg, event.status, now):  # type: ignore[arg-type]
                TimerQueue.cancel(self, "no_answer")
                self._next_stage(now)
            return True
        if leg is self.transferor and isinstance(event, LegHungUp) and not self.gone:
            # RFC 5589 §6.1: a transferor may hang up once its REFER is accepted; the
            # transfer goes on without it.
            self.gone = True
            log.info("call %s: transferor %s hung up; the transfer to %s goes on",
                     self.call.id, self.by, self.target)
            return True
        return False

    def _alerting(self, leg: Leg, now: float) -> None:
        """The target alerts: its NOTIFY_INTERNAL (again, if it had rung for this call
        before: the CRM card follows the call to it)."""
        call = self.call
        if leg.extension in call.alerted and leg.extension not in self._alerted:
            call.alerted.remove(leg.extension)
        self._alerted.add(leg.extension)
        call._alerting(leg, now)

    def on_timer(self, name: str, now: float) -> None:
        """The target's stage rang out."""
        if name == "no_answer" and self.legs:
            for leg in self.legs:
                leg.cancel(now)
            self.legs = []
            self.failures.append(RING_TIMEOUT)
            self._next_stage(now)

    # -- outcomes -----------------------------------------------------------------------------
    def _answered(self, leg: OutboundLeg, raw: bytes | None, now: float) -> None:
        call, neg = self.call, self.call.neg
        assert neg is not None
        for other in self.legs:
            if other is not leg:
                other.cancel(now, answered_elsewhere=True)
        self.legs = []
        TimerQueue.cancel(self, "no_answer")
        try:
            sdp = sdpmod.parse_sdp(raw or b"")
            if first_rtp(sdp) is None:
                raise SdpError("no RTP media")
        except SdpError as exc:
            log.warning("call %s: transfer target answered without usable SDP: %s", call.id, exc)
            leg.hangup(now)
            self.failures.append(Failure(488, "failed"))
            self._failed(now)
            return
        t_is_a = self.transferor_is_a
        before = neg.sdp_a if t_is_a else neg.sdp_b  # what the remaining party talked to
        if t_is_a:
            neg.source_a = leg.flow.remote[0]
        else:
            neg.source_b = leg.flow.remote[0]
        started = neg.adopt({t_is_a: sdp})
        old = self.transferor
        if t_is_a:
            call.caller_call_id = call.caller_call_id or call.a.request.call_id
            call.a = leg
            call.caller_extension = leg.extension
        else:
            call.answered = leg
            call.b_legs = [leg]
        call.transfer = None
        log_event(call, now, "answered", by=leg.extension or leg.gateway or self.target)
        log.info("call %s: transferred to %s", call.id, leg.extension or self.target)
        if not self.gone:
            self.progress(200, True, now)
            old.hangup(now)
        from .call import _ENDED  # a finished leg of a live call reports to nobody
        old.call = _ENDED
        call._adopted(started, now, bridged=True)  # the RTP timeout counts from the bridge
        if _needs_reoffer(before, sdp):
            if neg.pending is None:
                # The remaining party's SDP from us pointed at the same relay port; only
                # what it talks to changed: offer it the target's session (RFC 3264 §8).
                neg._restore(self.remaining, not t_is_a, now)
            else:
                log.warning("call %s: a re-negotiation is in progress; the remaining party "
                            "is not re-INVITEd after the transfer", call.id)

    def _failed(self, now: float) -> None:
        call = self.call
        call.transfer = None
        failure = best_failure(self.failures)
        log_event(call, now, "failed", to=self.target, code=failure.code,
                  disposition=failure.disposition)
        if not self.gone:
            log.info("call %s: transfer to %s failed (%d); the call stays with %s", call.id,
                     self.target, failure.code, self.by)
            self.progress(failure.code, True, now)
            return
        log.info("call %s: transfer to %s failed (%d) and the transferor is gone", call.id,
                 self.target, failure.code)
        call._hangup_all(now, f"transfer to {self.target} failed: {failure.disposition}",
                         unanswered=failure.code)

    def abort(self, now: float) -> None:
        """The call ended while the target rang: stop ringing it."""
        from .call import _ENDED
        self.timers.clear()
        for leg in self.legs:
            leg.cancel(now)
            leg.call = _ENDED
        self.legs = []


def _needs_reoffer(before: SessionDescription | None, after: SessionDescription) -> bool:
    """Whether the remaining party must be re-INVITEd: the session it agreed to was with a
    party on hold, or the new party's payload types differ (it would send or expect the
    wrong ones, RFC 3264 §5.1)."""
    if before is None or sdpmod.is_hold(before):
        return True
    return codec_map(before) != codec_map(after)
