"""An INVITE with ``Replaces`` from a phone (RFC 3891): the new dialog takes the place of one
of ours in an answered call.

The other way phones move a call: a second device of the extension takes over its call
(``Replaces`` naming the first device's dialog with softpbx), or a phone completes a transfer
by replacing a dialog it knows. Only an authenticated extension may replace, and only a
dialog whose party is the same extension or one of its pickup group (RFC 3891 §7: the
replacing party must be authorised for the dialog); an unknown, unanswered or finished
dialog is ``481`` (RFC 3891 §3; early dialogs are picked up with ``*8``/``**<ext>``).

The new party is answered with the remaining party's SDP restricted to the codecs it
offered, at the relay side that faced the replaced party (so the remaining party's media
stays where it is); the side is pointed at the new party; the remaining party is re-INVITEd
when what it talks to changes (hold, other payload types); the replaced leg gets a BYE. Same
call: one ``pbx_call_id``, recording and CDR; ``NOTIFY_END`` names the new extension.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..sip import sdp as sdpmod
from ..sip.events import Flow
from ..sip.sdp import SdpError
from ..sip.stack import new_tag
from ..sip.transaction import ServerTransaction
from .attended import Reoffers, _sendrecv, other_party
from .call import _ENDED, Call, CallState
from .leg import InboundLeg
from .pickup import _restrict
from .refer import find_dialog_leg
from .transfer import _needs_reoffer, log_event, party_extension, start_chain

if TYPE_CHECKING:
    from ..sip.message import Request
    from .switch import Switch

log = logging.getLogger("softpbx.call")


def parse_replaces_header(value: str) -> tuple[str, str, str] | None:
    """(call-id, to-tag, from-tag) of a ``Replaces`` header value (RFC 3891 §6.1)."""
    fields = [f.strip() for f in value.split(";")]
    params = {k.strip().lower(): v.strip() for k, _, v in (f.partition("=") for f in fields[1:])}
    call_id, to_tag, from_tag = fields[0], params.get("to-tag", ""), params.get("from-tag", "")
    return (call_id, to_tag, from_tag) if call_id and to_tag and from_tag else None


def on_replaces(sw: Switch, ext: str, req: Request, tx: ServerTransaction, flow: Flow,
                now: float) -> None:
    """Authenticated extension ``ext`` sent an INVITE with ``Replaces``."""
    reply = sw.stack.reply
    values = req.get_all("replaces")
    parsed = parse_replaces_header(values[0]) if len(values) == 1 else None
    if parsed is None:
        reply(tx, 400, "Bad Replaces", now=now, to_tag=new_tag())
        return
    old = find_dialog_leg(sw, *parsed)
    call = old.call if old is not None else None
    if (old is None or old.ended or not isinstance(call, Call)
            or call.state is not CallState.ANSWERED or call.transfer is not None
            or old not in (call.a, call.answered)):
        log.info("INVITE with Replaces from %s names no answered dialog of ours", ext)
        reply(tx, 481, now=now, to_tag=new_tag())
        return
    owner = party_extension(call, old)
    mine = sw.extensions[ext]
    theirs = sw.extensions.get(owner)
    if not owner or not (owner == ext or (mine.pickup_group and theirs is not None
                                          and theirs.pickup_group == mine.pickup_group)):
        log.warning("call %s: %s may not replace the dialog of %s", call.id, ext, owner or "a trunk")
        reply(tx, 403, now=now, to_tag=new_tag())
        return
    remaining = other_party(call, old)
    neg = call.neg
    assert remaining is not None and neg is not None
    new = InboundLeg(host=sw, call=call, tx=tx, flow=flow)
    new.extension = ext
    old_is_a = old is call.a
    peer_sdp = neg.sdp_b if old_is_a else neg.sdp_a
    assert peer_sdp is not None
    try:
        offer = sdpmod.parse_sdp(new.initial_sdp or b"")
        for_new = _restrict(_sendrecv(peer_sdp), offer)
        as_peer = _restrict(offer, peer_sdp)
    except SdpError as exc:
        log.info("call %s: INVITE with Replaces from %s: unusable SDP: %s", call.id, ext, exc)
        new.reject(488, None, now)
        return
    start_chain(call)
    call.leg_count += 1
    new.label = "a" if old_is_a else f"b{call.leg_count}"
    before = neg.sdp_a if old_is_a else neg.sdp_b
    if old_is_a:
        neg.source_a = flow.remote[0]
    else:
        neg.source_b = flow.remote[0]
    started = neg.adopt({old_is_a: as_peer})
    side, origin = neg.facing(old_is_a)
    new.answer(neg.rewrite(side, for_new, origin), now)
    if old_is_a:
        call.caller_call_id = call.caller_call_id or call.a.request.call_id
        call.a = new
        call.caller_extension = ext
    else:
        call.answered = new  # type: ignore[assignment]
        call.b_legs = [new]  # type: ignore[list-item]
    old.hangup(now)
    old.call = _ENDED
    log_event(call, now, "replaced", by=ext, replaced=owner)
    log.info("call %s: %s's dialog replaced by %s (RFC 3891)", call.id, owner, ext)
    if ext != owner:
        if ext in call.alerted:
            call.alerted.remove(ext)
        call._alerting(new, now)
    call._adopted(started, now, bridged=True)
    if _needs_reoffer(before, as_peer):
        call.transfer = Reoffers(call, [(remaining, not old_is_a)])  # type: ignore[assignment]
        call.transfer.next(now)  # type: ignore[union-attr]
