"""A call softpbx originates: click-to-call (crm-telephony-api.md §5) and ``POST /api/calls``.

The callback model of cloud PBXes (Zadarma ``request/callback``, Asterisk ``Originate``): the
employee's phones ring first (every registered device, in parallel, with our own SDP offer
and the client's number as the caller); when one answers, the client is dialled through the
normal outbound routing with the employee's answer as the offer, and the two are bridged.
The CRM sees an outbound call (NOTIFY_OUT_START when the client is dialled, NOTIFY_OUT_END
at the end); an employee who does not take the call still gives one NOTIFY_OUT_END.
"""

from __future__ import annotations

import logging

from ..sip import sdp as sdpmod
from ..sip.sdp import SdpError
from .call import _ENDED, Call, CallState
from .callee import _user, make_leg
from .events import Binding, LegAnswered, LegEvent, LegFailed
from .leg import OutboundLeg
from .outcome import fork_failed
from .timers import TimerQueue

log = logging.getLogger("softpbx.call")


class OriginatedCall(Call):
    """A callback: the ``a`` leg is ours to the employee (``caller_extension``), the callee
    legs go to ``route.dialled``."""

    originated = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.a_forks: list[OutboundLeg] = []
        """The employee's phones still ringing."""

    def originate(self, bindings: list[Binding], now: float, *, caller_name: str = "",
                  auto_answer: bool = False) -> bool:
        """Click-to-call: ring every phone of the employee (``bindings``) with our own
        offer, showing the client's number (``route.dialled``) and ``caller_name``."""
        if not self._open_media(now):
            return False
        assert self.neg is not None
        self._events = True
        offer = self.neg.offer_for_a(self.host.config.media.codecs)
        domain = self.host.config.global_.domain
        number = _user(self.route.dialled)
        extra = []
        if auto_answer:  # desk phones' two dialects of "answer at once"
            extra = [("Call-Info", f"<sip:{domain}>;answer-after=0"),
                     ("Alert-Info", "<http://127.0.0.1>;info=alert-autoanswer")]
        for b in bindings:
            leg = make_leg(self, flow=b.flow, ruri=b.contact,
                                 to=f"<sip:{self.caller_extension}@{domain}>", credentials=None,
                                 caller=(number, caller_name), body=offer, extra=extra,
                                 label="a")
            leg.extension = self.caller_extension
            self.a_forks.append(leg)
        self.a = self.a_forks[0]
        self._set_state(CallState.ORIGINATING, now)
        timeout = self.host.config.crm.click_to_call_ring_s
        self.host.timers.schedule(self, "employee_no_answer", now + timeout)
        for leg in self.a_forks:
            leg.start(now)
        return True

    def _employee_event(self, event: LegEvent, now: float) -> None:
        """Click-to-call: what the employee's phones do before one answers."""
        leg = event.leg
        if isinstance(event, LegAnswered):
            self._employee_answered(leg, event.sdp, now)  # type: ignore[arg-type]
        elif isinstance(event, LegFailed) and fork_failed(
                self.a_forks, self.failures, leg, event.status, now):  # type: ignore[arg-type]
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
        self.neg.source_a = leg.flow.remote[0]
        self.neg.set_a(answer)
        self.failures = []
        self._schedule_max_duration(now)
        log.info("call %s: employee %s answered; dialling %s", self.id, self.caller_extension,
                 self.route.dialled)
        self._route(now)


    # -- hooks of Call ------------------------------------------------------------------------
    def handle(self, event: LegEvent, now: float) -> None:
        """Events of the employee's phones before one answers; the rest as any call."""
        if self.state is CallState.ORIGINATING and event.leg in self.a_forks:
            self._employee_event(event, now)
            return
        super().handle(event, now)

    def on_timer(self, name: str, now: float) -> None:
        if name == "employee_no_answer" and self.state is CallState.ORIGINATING:
            for leg in self.a_forks:
                leg.cancel(now)
            self.a_forks = []
            self._end(now, 480, "the employee did not answer", disposition="no answer")
            return
        super().on_timer(name, now)

    def max_forwards(self) -> int | None:
        return None  # our own request: the default 70

    def _caller_ringing(self, sdp: bytes | None, now: float) -> None:
        """The client's phone rings: the employee, already answered, hears the trunk's early
        media through the relay (side B is pointed at it by the 183's SDP)."""

    def _caller_answer(self, sdp: bytes, now: float) -> None:
        """The client answered: the employee keeps the session it answered (the client was
        offered what the employee chose, so both talk one codec through the relay)."""

    @property
    def _outbound_for_crm(self) -> bool:
        return True

    def _hangup_all(self, now: float, cause: str, *, unanswered: int,
                    disposition: str | None = None) -> None:
        for leg in self.a_forks:
            leg.hangup(now)
        self.a_forks = []
        if self.state is not CallState.ANSWERED:
            self.a.hangup(now)
        super()._hangup_all(now, cause, unanswered=unanswered, disposition=disposition)

    def _release_caller(self, code: int, now: float) -> None:
        """The client was not reached (or the employee never answered): hang up the
        employee's answered phone, stop the ringing ones."""
        for leg in self.a_forks:
            leg.cancel(now)
        self.a.hangup(now)

    def _release(self) -> None:
        for leg in self.a_forks:
            leg.call = _ENDED
        self.a_forks = []
        super()._release()

