"""The callee legs of a call: which INVITE goes where for a dial-plan target (an
extension's phones, a trunk), with the caller ID, credentials and SDP each one carries."""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING
from urllib.parse import quote

from ..sip.auth import Credentials
from ..sip.events import Flow
from ..sip.message import Request
from ..sip.stack import new_tag
from .leg import OutboundLeg
from .outcome import AT_CAPACITY, NOT_REGISTERED
from .routing import Direction, ExtensionTarget, GatewayTarget, Target

if TYPE_CHECKING:
    from .call import Call

log = logging.getLogger("softpbx.call")


def legs_for(call: Call, target: Target, now: float, *, body: bytes | None = None,
             caller: tuple[str, str] | None = None,
             extra: list[tuple[str, str]] | None = None) -> list[OutboundLeg]:
    """The callee legs of ``target`` (one per registered phone, or one to the trunk);
    none, with the reason noted in the call's failures, when it cannot be rung.
    ``body``, ``caller``, ``extra``: what :func:`make_leg` takes, for a transfer's target
    (the remaining party's SDP and number, ``Referred-By``)."""
    if isinstance(target, ExtensionTarget):
        bindings = call.host.registrar.lookup(target.extension, now)
        if not bindings:
            call.failures.append(NOT_REGISTERED)
            return []
        legs = []
        for b in bindings:
            to = f"<sip:{target.extension}@{call.host.config.global_.domain}>"
            leg = make_leg(call, flow=b.flow, ruri=b.contact, to=to, credentials=None,
                           caller=caller, body=body, extra=extra)
            leg.extension = target.extension
            legs.append(leg)
        return legs
    assert isinstance(target, GatewayTarget)
    gw = call.host.gateway(target.gateway)
    call.gateway_used = gw.name
    if gw.max_calls and call.host.gateway_calls(gw.name) >= gw.max_calls:
        log.warning("gateway %s is at its %d-call limit", gw.name, gw.max_calls)
        call.failures.append(AT_CAPACITY)
        return []
    flow = call.host.gateway_flow(gw)
    host = gw.realm or gw.proxy
    creds = Credentials(gw.username, gw.password, gw.auth_algorithms) if gw.username else None
    # A DID forwarded out (no caller ID of its own configured) shows the original caller.
    if target.caller_id_number or call.route.direction is not Direction.INBOUND:
        caller = (target.caller_id_number, target.caller_id_name)
    account = None if gw.caller_id_in_from else (gw.from_user or gw.username or None)
    leg = make_leg(call, flow=flow, ruri=f"sip:{_user(target.number)}@{gw.proxy}",
                         to=f"<sip:{_user(target.number)}@{host}>", credentials=creds,
                         caller=caller, host=host, account=account, body=body, extra=extra)
    leg.gateway = gw.name
    return [leg]

def make_leg(call: Call, *, flow: Flow, ruri: str, to: str, credentials: Credentials | None,
              caller: tuple[str, str] | None = None, host: str | None = None,
              account: str | None = None, body: bytes | None = None,
              extra: list[tuple[str, str]] | None = None,
              label: str = "b") -> OutboundLeg:
    """``account``: the From user is this trunk account, and the caller ID goes in
    ``P-Asserted-Identity`` (RFC 3325; a gateway with ``caller_id_in_from = false``).
    ``body``: the SDP offered (default: the ``a`` party's, rewritten for side B)."""
    call.leg_count += 1
    number, name = caller if caller is not None else (call.caller_number, call.caller_name)
    number = _user(number or call.caller_number or "anonymous")
    from_host = host or call.host.config.global_.domain
    disp = f'"{_quote(name)}" ' if name else ""
    identity: list[tuple[str, str]] = []
    if account is not None:
        identity = [("P-Asserted-Identity", f"{disp}<sip:{number}@{from_host}>")]
        number = _user(account)
    if body is None:
        assert call.neg is not None
        body = call.neg.offer_for_b()
    mf = call.max_forwards()
    headers = [
        ("Max-Forwards", str(max(0, (mf if mf is not None else 70) - 1))),
        ("From", f"{disp}<sip:{number}@{from_host}>;tag={new_tag()}"),
        ("To", to),
        ("Call-ID", f"{secrets.token_hex(16)}@{call.host.config.global_.domain}"),
        ("CSeq", "1 INVITE"),
        ("Contact", call.host.contact_for(flow)),
        *identity,
        *(extra or ()),
        ("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, REFER, NOTIFY"),
        ("Content-Type", "application/sdp"),
        ("Content-Length", str(len(body))),
    ]
    req = Request("INVITE", ruri, headers, body)
    return OutboundLeg(host=call.host, call=call, flow=flow,
                       label=f"{label}{call.leg_count}", request=req,
                       credentials=credentials)


def _user(text: str) -> str:
    """``text`` as a SIP URI user part (RFC 3261 §25.1 ``user``): a number as a trunk sent it
    may hold characters (an unescaped ``@``, a space) that would break the URI we build."""
    return quote(text, safe="-_.!~*'()&=+$,;?/")


def _quote(text: str) -> str:
    """``text`` inside a quoted-string (RFC 3261 §25.1: ``quoted-pair`` for ``"`` and ``\\``;
    control characters cannot be quoted at all and are dropped)."""
    text = "".join(ch for ch in text if ch >= " " and ch != "\x7f")
    return text.replace("\\", "\\\\").replace('"', '\\"')
