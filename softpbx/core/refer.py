"""REFER on the SIP side (RFC 3515): who may transfer, to what, and the sipfrag NOTIFYs.

An in-dialog REFER reaches :func:`on_refer` (the switch's dispatch). Only the extension
behind the leg may transfer its call, proved by digest (a REFER is challenged as an INVITE
is; a trunk's REFER is refused at once: no transfer from the outside), and the target goes
through the transferor's own dial plan (:meth:`Router.from_extension`): a REFER to an outside
number obeys the outbound rules of a dialled call, so a transfer is no way round them. An
accepted REFER gets ``202`` and the implicit subscription's NOTIFYs (RFC 3515 §2.4.4:
``message/sipfrag`` with the target's status line, ``Event: refer;id=<CSeq>``, the last one
``Subscription-State: terminated``), unless the phone asked for none (RFC 4488
``Refer-Sub: false``). The call side is :mod:`.transfer` (blind) and :mod:`.attended`
(``Refer-To`` with ``Replaces``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..sip.errors import ParseError
from ..sip.events import Flow
from ..sip.headers import parse_name_addr
from ..sip.message import REASONS, Request
from ..sip.transaction import ServerTransaction
from .attended import join, parse_replaces
from .call import Call, CallState
from .leg import Leg
from .routing import NoRoute
from .transfer import BlindTransfer, Progress, party_extension

if TYPE_CHECKING:
    from .switch import Switch

log = logging.getLogger("softpbx.call")

SIPFRAG = "message/sipfrag;version=2.0"


def on_refer(sw: Switch, leg: Leg, req: Request, tx: ServerTransaction, flow: Flow,
             now: float) -> None:
    """An in-dialog REFER from ``leg``'s party."""
    reply = sw.stack.reply
    assert leg.dialog is not None
    call = leg.call
    if not isinstance(call, Call):
        reply(tx, 481, now=now)
        return
    extension = party_extension(call, leg)
    if not extension:
        log.warning("call %s: REFER from the trunk side refused", call.id)
        reply(tx, 403, now=now)
        return
    user = sw.authenticate(req, tx, flow, now)
    if user is None:
        return
    if user != extension:
        log.warning("call %s: REFER on %s's leg authenticated as %s: refused", call.id,
                    extension, user)
        reply(tx, 403, now=now)
        return
    leg.dialog.accept_request(req)
    values = req.get_all("refer-to")
    try:
        if len(values) != 1:
            raise ParseError("one Refer-To expected")
        uri = parse_name_addr(values[0]).uri
    except ParseError as exc:
        reply(tx, 400, f"Bad Refer-To: {exc.reason}"[:80], now=now)
        return
    if uri.headers:  # ?Replaces=...: an attended transfer (RFC 5589 §7, RFC 3891)
        _attended(sw, call, leg, extension, uri.headers, req, tx, now)
        return
    target = uri.unescaped_user if uri.is_sip else ""
    if not target:
        reply(tx, 400, "Bad Refer-To: no user", now=now)
        return
    if call.state is not CallState.ANSWERED or call.transfer is not None:
        # Only a talking call is transferred, one transfer at a time (RFC 3261 §14.1 spirit).
        reply(tx, 491, now=now)
        return
    route = sw.router.from_extension(extension, target)
    if isinstance(route, NoRoute):
        log.info("call %s: %s may not transfer to %r: %d", call.id, extension, target,
                 route.status)
        reply(tx, 403 if route.status == 403 else route.status, now=now)
        return
    quiet = (req.get("refer-sub") or "").strip().lower() == "false"
    referred_by = req.get("referred-by") or f"<sip:{extension}@{sw.config.global_.domain}>"
    xfer = BlindTransfer(call=call, transferor=leg, by=extension, route=route, target=target,
                         referred_by=referred_by,
                         progress=_progress(leg, req.cseq.number, quiet))
    headers = [("Contact", sw.contact_for(leg.flow))]
    if quiet:
        headers.append(("Refer-Sub", "false"))
    reply(tx, 202, now=now, headers=headers)
    call.transfer = xfer
    xfer.begin(now)


def _attended(sw: Switch, call: Call, leg: Leg, extension: str, uri_headers: str,
              req: Request, tx: ServerTransaction, now: float) -> None:
    """A REFER whose Refer-To names, with Replaces, another dialog of the same phone."""
    reply = sw.stack.reply
    replaces = parse_replaces(uri_headers)
    if replaces is None:
        reply(tx, 400, "Bad Refer-To: only a Replaces header is understood", now=now)
        return
    other = find_dialog_leg(sw, *replaces)
    other_call = other.call if other is not None else None
    if (other is None or not isinstance(other_call, Call) or other_call is call
            or other.ended):
        log.info("call %s: attended transfer names no dialog of ours: %s", call.id, replaces)
        reply(tx, 481, now=now)
        return
    if party_extension(other_call, other) != extension:
        # Only the transferor's own calls are joined (RFC 5589 §7.1: the dialogs are its).
        log.warning("call %s: %s named a dialog of another party: refused", call.id, extension)
        reply(tx, 403, now=now)
        return
    if (call.state is not CallState.ANSWERED or other_call.state is not CallState.ANSWERED
            or call.transfer is not None or other_call.transfer is not None):
        reply(tx, 491, now=now)
        return
    reply(tx, 202, now=now, headers=[("Contact", sw.contact_for(leg.flow))])
    quiet = (req.get("refer-sub") or "").strip().lower() == "false"
    progress = _progress(leg, req.cseq.number, quiet)
    progress(100, False, now)
    join((call, leg), (other_call, other), by=extension, progress=progress, now=now)


def find_dialog_leg(sw: Switch, call_id: str, to_tag: str, from_tag: str) -> Leg | None:
    """The leg of the dialog a Replaces names (RFC 3891 §3: its to-tag is the local tag of
    the dialog at the UA receiving it, here softpbx; both orders are tried, as phones
    differ)."""
    dialogs = sw._dialogs  # the switch's dialog table: (call-id, local tag, remote tag)
    return dialogs.get((call_id, to_tag, from_tag)) or dialogs.get((call_id, from_tag, to_tag))


def _progress(leg: Leg, refer_cseq: int, quiet: bool) -> Progress:
    """The NOTIFYs of one REFER's implicit subscription, on ``leg``'s dialog."""

    def progress(status: int, final: bool, now: float) -> None:
        if quiet or leg.ended or leg.dialog is None:
            return
        frag = f"SIP/2.0 {status} {REASONS.get(status, 'Unknown')}\r\n".encode()
        state = "terminated;reason=noresource" if final else "active;expires=60"
        req = leg.dialog.request("NOTIFY", body=frag, content_type=SIPFRAG, extra=[
            ("Event", f"refer;id={refer_cseq}"), ("Subscription-State", state),
            ("Contact", leg.host.contact_for(leg.flow))])
        tx = leg.host.stack.send_request(req, leg.flow, now)
        tx.user_data = leg

    return progress
