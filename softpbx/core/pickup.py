"""Call pickup: ``*8`` (a call ringing anyone of the caller's pickup group) and ``**<ext>``
(directed: a call ringing that extension), the feature codes of Asterisk's ``features.conf``.

The picker's INVITE becomes the answer of the ringing call: the phones still ringing get a
CANCEL with ``Reason: SIP;cause=200`` (RFC 3326: answered elsewhere, no missed call), the
picker's leg takes the place of the callee (the same :class:`~.call.Call`, so one
``pbx_call_id`` and one CDR; ``NOTIFY_INTERNAL``/``NOTIFY_END`` and the CDR name the picker,
the extension that really answered). Two SDP offers meet here (the caller's, still
unanswered, and the picker's): each party is answered with the other party's offer
restricted to the codecs it offered itself (RFC 3264 §6.1: an answer lists a subset of the
offer's codecs), at its relay side. The payload type numbers are the other party's: the
static ones (PCMU 0, PCMA 8 ...) agree by definition, a dynamic one (telephone-event) may
not. Nothing to pick up: ``404``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..sip import sdp as sdpmod
from ..sip.events import Flow
from ..sip.sdp import SdpError, SessionDescription
from ..sip.stack import new_tag
from ..sip.transaction import ServerTransaction
from .call import Call, CallState
from .leg import InboundLeg
from .negotiation import first_rtp
from .timers import TimerQueue
from .transfer import log_event

if TYPE_CHECKING:
    from .switch import Switch

log = logging.getLogger("softpbx.call")

GROUP_PICKUP = "*8"
DIRECTED_PICKUP = "**"


def wanted(dialled: str) -> bool:
    """Whether ``dialled`` is a pickup feature code."""
    return dialled == GROUP_PICKUP or (dialled.startswith(DIRECTED_PICKUP)
                                       and len(dialled) > len(DIRECTED_PICKUP))


def pick(sw: Switch, picker: str, dialled: str, tx: ServerTransaction, flow: Flow,
         now: float) -> None:
    """Extension ``picker`` (authenticated) dialled a pickup code: answer with its INVITE
    the oldest call ringing a phone it may pick up, or ``404``."""
    if dialled == GROUP_PICKUP:
        group = sw.extensions[picker].pickup_group
        members = {e.id for e in sw.extensions.values()
                   if group and e.pickup_group == group and e.id != picker}
    else:
        members = {dialled[len(DIRECTED_PICKUP):]} - {picker}
    found = _ringing(sw, members, picker)
    if found is None:
        log.info("pickup by %s (%s): no call to pick up", picker, dialled)
        sw.stack.reply(tx, 404, "No Call To Pick Up", now=now, to_tag=new_tag())
        return
    call, rung = found
    leg = InboundLeg(host=sw, call=call, tx=tx, flow=flow)
    leg.extension = picker
    call.leg_count += 1
    leg.label = f"b{call.leg_count}"  # it stands for a callee (logs, the CDR's cause)
    neg = call.neg
    assert neg is not None and neg.sdp_a is not None
    try:
        offer = sdpmod.parse_sdp(leg.initial_sdp or b"")
        for_caller = _restrict(offer, neg.sdp_a)
        for_picker = _restrict(neg.sdp_a, offer)
    except SdpError as exc:
        log.info("pickup by %s: unusable SDP: %s", picker, exc)
        leg.reject(488, None, now)
        return
    log.info("call %s: picked up by %s (ringing %s)", call.id, picker, rung)
    for b in call.b_legs:
        b.cancel(now, answered_elsewhere=True)
    TimerQueue.cancel(call, "no_answer")
    call.b_legs = [leg]  # type: ignore[list-item]
    log_event(call, now, "pickup", by=picker, ringing=rung)
    call._alerting(leg, now)  # the CRM hears of the picker before the answer's effects
    call.answered = leg  # type: ignore[assignment]
    sdp_out = neg.callee_answer(for_caller.to_bytes(), call.id, flow.remote[0])
    assert sdp_out is not None
    leg.answer(neg.rewrite(neg.media.b, for_picker, neg.origin_b), now)
    call._caller_answer(sdp_out, now)
    call._set_state(CallState.ANSWERED, now)


def _ringing(sw: Switch, members: set[str], picker: str) -> tuple[Call, str] | None:
    """The oldest call ringing one of ``members`` (and the extension it rings)."""
    for call in sw.calls.values():  # insertion order: the oldest first
        if (call.originated or call.state not in (CallState.ROUTING, CallState.RINGING)
                or call.caller_extension == picker or call.neg is None
                or call.neg.sdp_a is None):
            continue
        for b in call.b_legs:
            if b.extension in members and not b.ended:
                return call, b.extension
    return None


def _restrict(own: SessionDescription, other: SessionDescription) -> SessionDescription:
    """``own`` (an offer) as an answer to it: its relayed stream keeps only the formats whose
    encoding ``other`` offers too (RFC 3264 §6.1); :class:`SdpError` when no audio codec is
    common."""
    i, j = first_rtp(own), first_rtp(other)
    if i is None or j is None:
        raise SdpError("no RTP stream")
    theirs = {(c.encoding.lower(), c.clock_rate) for c in other.media[j].codecs()}
    out = own.copy()
    m = out.media[i]
    keep = {c.payload_type for c in m.codecs() if (c.encoding.lower(), c.clock_rate) in theirs}
    if not any(c.payload_type in keep and c.encoding.lower() != "telephone-event"
               for c in m.codecs()):
        raise SdpError("no codec in common")
    m.formats = [f for f in m.formats if f.isdigit() and int(f) in keep]
    lines = []
    for line in m.lines:
        name, value = line.attribute if line.type == "a" else ("", None)
        if name in ("rtpmap", "fmtp"):
            pt = (value or "").split(" ", 1)[0]
            if not (pt.isdigit() and int(pt) in keep):
                continue
        lines.append(line)
    m.lines = lines
    if sdpmod.direction(out, i) is not sdpmod.Direction.SENDRECV:
        out = sdpmod.set_direction(out, sdpmod.Direction.SENDRECV, i)
    return out
