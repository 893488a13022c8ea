"""Attended (consultative) transfer: joining the far parties of two calls of one phone.

The transferor's phone holds call 1 (with party R), places call 2 (with party Y), then sends,
in either dialog, ``REFER`` with ``Refer-To: <...?Replaces=<call-id>;to-tag=..;from-tag=..>``
naming the other dialog (RFC 5589 §7, RFC 3891). :mod:`.refer` authenticates it and finds
both dialogs; here the two remote parties are joined and both of the transferor's legs end:

- one call survives (the one the CRM follows: the REFER's call, unless only the other one
  makes CRM events), keeping its ``pbx_call_id``, relay session, recording and CDR; the
  other call ends (its own CDR, cause ``joined to <id> by an attended transfer``);
- the moved party Y takes the transferor's place in the surviving call: the relay side that
  faced the transferor is pointed at Y (with Y's SDP ``o=`` carried over: RFC 3264 §8 wants
  one origin per session) and Y is re-INVITEd to that side; R is re-INVITEd first when what
  it talks to changes (it was on hold, other payload types);
- the transferor gets ``SIP/2.0 200 OK`` in a sipfrag NOTIFY and a BYE on both dialogs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import unquote

from ..sip import sdp as sdpmod
from ..sip.sdp import SessionDescription
from .events import LegEvent, LegOfferAnswered
from .negotiation import first_rtp
from .transfer import Progress, _needs_reoffer, log_event, party_extension, start_chain

if TYPE_CHECKING:
    from .call import Call
    from .leg import Leg

log = logging.getLogger("softpbx.call")


def parse_replaces(uri_headers: str) -> tuple[str, str, str] | None:
    """(call-id, to-tag, from-tag) of a ``Replaces`` in a URI's ``?headers`` (RFC 3891 §6.1,
    escaped as RFC 3261 §19.1.1 requires), ``None`` when there is none or it is malformed."""
    for part in uri_headers.split("&"):
        name, _, value = part.partition("=")
        if name.strip().lower() != "replaces":
            continue
        fields = [f.strip() for f in unquote(value).split(";")]
        params = dict(f.partition("=")[::2] for f in fields[1:])
        call_id, to_tag, from_tag = fields[0], params.get("to-tag", ""), params.get("from-tag", "")
        if call_id and to_tag and from_tag:
            return call_id, to_tag, from_tag
        return None
    return None


def other_party(call: Call, leg: Leg) -> Leg | None:
    """The party of ``call`` that is not ``leg``."""
    return call.answered if leg is call.a else call.a


def _sendrecv(sdp: SessionDescription) -> SessionDescription:
    idx = first_rtp(sdp)
    if idx is not None and sdpmod.direction(sdp, idx) is not sdpmod.Direction.SENDRECV:
        return sdpmod.set_direction(sdp, sdpmod.Direction.SENDRECV, idx)
    return sdp


def join(first: tuple[Call, Leg], second: tuple[Call, Leg], *, by: str, progress: Progress,
         now: float) -> None:
    """Join the far parties of ``first`` (the REFER's call and the transferor's leg in it)
    and ``second`` (the call its Replaces names); both calls are answered."""
    from .call import _ENDED

    (s, ls), (o, lo) = first, second
    if o._events and not s._events:  # the CRM follows the call it knows
        (s, ls), (o, lo) = second, first
    r, y = other_party(s, ls), other_party(o, lo)
    start_chain(s)  # who answered each, before the parties move
    start_chain(o)
    assert r is not None and y is not None and s.neg is not None and o.neg is not None
    y_ext = party_extension(o, y)
    y.extension = y_ext  # the caller's leg of an extension's call names it only on the call
    y_is_a_in_o = y is o.a
    y_sdp = o.neg.sdp_a if y_is_a_in_o else o.neg.sdp_b
    y_origin = o.neg.origin_a if y_is_a_in_o else o.neg.origin_b
    assert y_sdp is not None
    # The other call lets go of Y and ends (its CDR, its relay session, its recording).
    if y_is_a_in_o:
        o.caller_call_id = o.caller_call_id or o.a.request.call_id
        o.a = lo  # type: ignore[assignment]
    else:
        o.answered = None
        o.b_legs = []
    log_event(o, now, "attended", by=by, joined=s.pbx_call_id)
    progress(200, True, now)  # before the BYEs: the REFER came in one of these dialogs
    lo.hangup(now)
    lo.call = _ENDED
    o._end(now, 200, f"joined to {s.id} by an attended transfer")
    # Y takes the transferor's place in the surviving call.
    ls_is_a = ls is s.a
    y.call = s
    if ls_is_a:
        s.caller_call_id = s.caller_call_id or s.a.request.call_id
        s.a = y  # type: ignore[assignment]
        s.caller_extension = y_ext
    else:
        s.answered = y  # type: ignore[assignment]
        s.b_legs = [y]  # type: ignore[list-item]
    neg = s.neg
    before = neg.sdp_a if ls_is_a else neg.sdp_b
    if ls_is_a:
        neg.origin_a, neg.source_a = y_origin, y.flow.remote[0]
    else:
        neg.origin_b, neg.source_b = y_origin, y.flow.remote[0]
    started = neg.adopt({ls_is_a: _sendrecv(y_sdp)})
    ls.hangup(now)
    ls.call = _ENDED
    log_event(s, now, "attended", by=by, to=y_ext or "-")
    log.info("call %s: %s joined it to the party of call %s (%s)", s.id, by, o.id, y_ext or "-")
    if y_ext:  # the CRM card follows the call to Y
        if y_ext in s.alerted:
            s.alerted.remove(y_ext)
        s._alerting(y, now)
    s._adopted(started, now, bridged=True)
    queue = [(y, ls_is_a)]
    if _needs_reoffer(before, y_sdp):
        queue.insert(0, (r, not ls_is_a))  # R first: Y is then offered R's fresh session
    s.transfer = Reoffers(s, queue)  # type: ignore[assignment]
    s.transfer.next(now)  # type: ignore[union-attr]


class Reoffers:
    """The re-INVITEs that move the media after a join, one at a time (one offer/answer in
    progress per call, RFC 3264 §4): each party is offered its new peer's session through
    :meth:`MediaNegotiation._restore`; its answer is adopted by the negotiation."""

    def __init__(self, call: Call, queue: list[tuple[Leg, bool]]) -> None:
        self.call = call
        self.queue = queue
        self.current: Leg | None = None
        self.timers: dict[str, int] = {}

    def next(self, now: float) -> None:
        """Offer the next party its peer's session, or finish."""
        call, neg = self.call, self.call.neg
        self.current = None
        while self.queue and neg is not None:
            leg, is_a = self.queue.pop(0)
            if leg.ended:
                continue
            if neg.pending is not None:
                log.warning("call %s: a re-negotiation is in progress; %s is not re-INVITEd "
                            "after the transfer", call.id, leg.label)
                continue
            self.current = leg
            neg._restore(leg, is_a, now)
            return
        if call.transfer is self:
            call.transfer = None

    def handle(self, event: LegEvent, now: float) -> bool:
        """The answer to one of our re-INVITEs: adopted, then the next one goes out."""
        if not isinstance(event, LegOfferAnswered) or event.leg is not self.current:
            return False
        call, neg = self.call, self.call.neg
        assert neg is not None
        started = neg.on_offer_answered(event.leg, event.leg is call.a, event.status,
                                        event.sdp, now, call.id)
        if started is not None:
            call._adopted(started, now)
        if event.status >= 300:
            log.warning("call %s: %s refused the re-INVITE after the transfer (%d)", call.id,
                        event.leg.label, event.status)
        self.next(now)
        return True

    def on_timer(self, name: str, now: float) -> None:
        """No timers of its own (the re-INVITE's transaction times out by itself)."""

    def abort(self, now: float) -> None:
        """The call ended: nothing to stop."""
        self.queue = []
