"""B2BUA legs: one SIP dialog each, translated into neutral call-control events.

A :class:`Call` commands legs (``ring``, ``answer``, ``reject``, ``cancel``, ``hangup``,
``offer``, ``answer_offer``, ``cancel_offer``) and receives :mod:`.events` ``Leg*`` events
from them; it never sees a SIP message. What needs no decision of the call stays here:
session refreshes without SDP, answers to a trunk's challenges, forks upstream. Legs talk SIP through the :class:`LegHost` (the switch): the stack, the
dialog table, the timer queue.
"""

from __future__ import annotations

import logging
import secrets
from enum import Enum
from typing import Protocol

from ..sip.auth import Credentials, answer_challenge
from ..sip.dialog import Dialog
from ..sip.errors import SipError
from ..sip.events import Flow
from ..sip.message import Request, Response, full_name
from ..sip.stack import SipStack, new_tag
from ..sip.transaction import ClientTransaction, ServerTransaction
from .events import (
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
)
from .timers import TimerQueue


class LegOwner(Protocol):
    """What a leg reports to (a :class:`~.call.Call`; a finished call's stand-in)."""

    def handle(self, event: LegEvent, now: float) -> None: ...

log = logging.getLogger("softpbx.leg")

SDP = "application/sdp"
DTMF_INFO = ("application/dtmf-relay", "application/dtmf")
"""INFO bodies passed between the legs (the de-facto SIP INFO DTMF, as Asterisk reads it)."""
ANSWERED_ELSEWHERE = 'SIP;cause=200;text="Call completed elsewhere"'
"""RFC 3326 ``Reason`` of the CANCEL sent to the forks that lost the race."""
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, REFER, NOTIFY"
_AUTH_HEADERS = ("authorization", "proxy-authorization")


def with_credentials(request: Request, challenge: Response, credentials: Credentials,
                     cseq: int) -> Request | None:
    """``request`` again, answering ``challenge`` (a 401/407 to it) with ``credentials`` and
    carrying CSeq ``cseq`` (RFC 3261 §22.2, §8.1.3.5); ``None`` when no challenge can be
    answered. The stack adds a new Via (a new branch: it is a new transaction)."""
    answer = answer_challenge(challenge, method=request.method, uri=request.uri_text,
                              username=credentials.username, password=credentials.password,
                              algorithms=credentials.algorithms)
    if answer is None:
        return None
    headers = [(n, v) for n, v in request.headers
               if full_name(n) not in ("via", "cseq", *_AUTH_HEADERS)]
    headers.insert(0, ("CSeq", f"{cseq} {request.method}"))
    headers.insert(0, answer)
    return Request(request.method, request.uri_text, headers, request.body)


def _credentials_of(request: Request) -> list[tuple[str, str]]:
    """The request's Authorization/Proxy-Authorization lines (an ACK repeats them)."""
    return [(n, v) for n, v in request.headers if full_name(n) in _AUTH_HEADERS]


class LegHost(Protocol):
    """What legs need from the switch."""

    stack: SipStack
    timers: TimerQueue

    def contact_for(self, flow: Flow) -> str: ...
    def add_dialog(self, dialog: Dialog, leg: Leg) -> None: ...
    def remove_dialog(self, dialog: Dialog) -> None: ...


class LegState(Enum):
    """Where a leg is in its life."""

    CALLING = "calling"        # INVITE sent / received, no answer yet
    EARLY = "early"            # a provisional with a To tag
    ANSWERED = "answered"      # 2xx sent/received
    ENDED = "ended"


class Leg:
    """Common part of both leg kinds."""

    def __init__(self, *, host: LegHost, call: LegOwner, flow: Flow, label: str) -> None:
        self.host = host
        self.call = call
        self.flow = flow
        """Where this leg's SIP goes (NAT-real address of the phone, or the trunk)."""
        self.label = label
        """``a`` for the caller's leg, ``b1``, ``b2`` ... for the callee forks."""
        self.state = LegState.CALLING
        self.dialog: Dialog | None = None
        self.timers: dict[str, int] = {}
        self._offer_tx: ClientTransaction | None = None
        self._offer_from_peer: ServerTransaction | None = None
        self._pending_2xx: bytes | None = None
        """A 2xx to an INVITE of this leg's party, re-sent until its ACK (UDP only)."""
        self._pending_2xx_cseq = -1
        """CSeq of the INVITE that 2xx answers (-1: no ACK awaited)."""
        self._interval = 0.0
        self.extension = ""
        """Extension behind this leg, when it is a phone."""
        self.gateway = ""
        """Gateway behind this leg, when it is a trunk."""
        self.credentials: Credentials | None = None
        """(username, password) for the far end's 401/407 challenges (trunks), also on
        in-dialog requests (BYE, re-INVITE)."""
        self.local_sdp: bytes | None = None
        """The SDP this leg's party last accepted from us: what a re-INVITE without SDP
        (a session refresh) gets in our 2xx."""
        self._sent_offer: bytes | None = None
        """The SDP of our re-INVITE in progress (``local_sdp`` once it succeeds)."""
        self._offer_in_2xx = False
        """The 2xx whose ACK we await carries an offer: the ACK carries the answer."""
        self._late_answer = False
        """That offer is the first of the dialog (a late offer): no ACK answer, no call."""
        self._bye_after_ack = False
        """The leg is hung up but its party has not ACKed our 2xx yet: the BYE waits for the
        ACK, or its timeout (RFC 3261 §15)."""

    @property
    def ended(self) -> bool:
        """Whether the leg is over."""
        return self.state is LegState.ENDED

    def _emit(self, event: LegEvent, now: float) -> None:
        self.call.handle(event, now)

    def _finish(self) -> None:
        if self.state is LegState.ENDED:
            return
        self.state = LegState.ENDED
        self.timers.clear()
        self._bye_after_ack = False
        if self.dialog is not None:
            self.host.remove_dialog(self.dialog)

    def _end_dialog(self, now: float) -> None:
        """Hang up the answered leg. A re-INVITE/UPDATE its party sent and nobody answered
        yet gets ``487`` (RFC 3261 §15.1.2) first; while our 2xx to an INVITE of its party
        still waits for the ACK, the BYE waits too (RFC 3261 §15), for at most 64*T1."""
        self._drop_peer_offer(now)
        if self._pending_2xx_cseq != -1:
            self._bye_after_ack = True
            return
        self._send_bye(now)
        self._finish()

    def _drop_peer_offer(self, now: float) -> None:
        tx = self._offer_from_peer
        if tx is not None:
            self._offer_from_peer = None
            self.host.stack.reply(tx, 487, now=now)

    def _send_bye(self, now: float) -> None:
        if self.dialog is None:
            return
        bye = self.dialog.request("BYE")
        tx = self.host.stack.send_request(bye, self.flow, now)
        tx.user_data = self

    # -- in-dialog requests from the party on this leg -------------------------------------
    def on_request(self, req: Request, tx: ServerTransaction, now: float) -> None:
        """An in-dialog request from this leg's party."""
        stack = self.host.stack
        assert self.dialog is not None
        self.dialog.accept_request(req)
        method = req.method
        if method == "BYE":
            stack.reply(tx, 200, now=now)
            self._drop_peer_offer(now)
            self._finish()
            # The CDR's cause in an operator's words (the leg label is "a" for the caller).
            self._emit(LegHungUp(self, "caller hung up" if self.label == "a"
                                 else "callee hung up"), now)
        elif self._bye_after_ack:
            stack.reply(tx, 481, now=now)  # the call is over; our BYE follows the ACK
        elif method == "UPDATE" and not req.sdp_body:
            # RFC 3311 / RFC 4028: an UPDATE without SDP (a session refresh) changes no
            # media: answered here, the other party need not hear of it.
            stack.reply(tx, 200, now=now, headers=[("Contact", self.host.contact_for(self.flow))])
        elif method in ("INVITE", "UPDATE"):
            if self._offer_from_peer is not None or self._offer_tx is not None:
                stack.reply(tx, 491, now=now)  # RFC 3261 §14.2 glare
                return
            if not req.sdp_body:
                self._answer_refresh(tx, now)
                return
            self._offer_from_peer = tx
            tx.user_data = self
            self._emit(LegOffer(self, req.sdp_body), now)
        elif method == "INFO":
            self._on_info(req, tx, now)
        elif method in ("OPTIONS", "NOTIFY"):
            stack.reply(tx, 200, now=now)
        else:
            stack.reply(tx, 405, now=now, headers=[("Allow", ALLOW)])

    def _on_info(self, req: Request, tx: ServerTransaction, now: float) -> None:
        """An ``INFO`` of this leg's party. DTMF (``application/dtmf-relay``, Cisco's
        ``Signal=5\r\nDuration=160``, and ``application/dtmf``) is answered ``200`` and
        passed to the other party (:class:`LegInfo`): a phone or trunk that signals keys so
        reaches the IVR or the other phone as it would through Asterisk. An INFO without a
        body (a keep-alive) gets ``200``; any other body (legacy INFO usage, RFC 6086 §2)
        ``415`` with the types we take (RFC 3261 §21.4.13): it fails only the transaction
        (RFC 5057 §5.1), the call goes on."""
        ctype = req.content_type
        if req.body and ctype not in DTMF_INFO:
            self.host.stack.reply(tx, 415, now=now, headers=[("Accept", ", ".join(DTMF_INFO))])
            return
        self.host.stack.reply(tx, 200, now=now)
        if req.body:
            self._emit(LegInfo(self, req.get("content-type") or "", req.body), now)

    def send_info(self, content_type: str, body: bytes, now: float) -> None:
        """Send this leg's party an ``INFO`` with ``body`` (DTMF from the other party); its
        answer needs nothing (a trunk's challenge is answered, :meth:`on_response`)."""
        if self.dialog is None or self.state is not LegState.ANSWERED:
            return
        req = self.dialog.request("INFO", body=body, content_type=content_type)
        tx = self.host.stack.send_request(req, self.flow, now)
        tx.user_data = self

    def _answer_refresh(self, tx: ServerTransaction, now: float) -> None:
        """A re-INVITE without SDP (a session refresh, RFC 4028; RFC 3261 §14.2: our 2xx must
        carry an offer): offered the SDP its party already has, unchanged (same ``o=``
        version, RFC 3264 §8), answered here. The answer comes in the ACK."""
        if self.local_sdp is None:
            self.host.stack.reply(tx, 488, now=now)
            return
        headers = [("Contact", self.host.contact_for(self.flow)), ("Content-Type", SDP)]
        resp = self.host.stack.reply(tx, 200, now=now, headers=headers, body=self.local_sdp)
        self._await_ack(resp, tx.request.cseq.number, now, offer=True)

    def on_cancel(self, tx: ServerTransaction, now: float) -> None:
        """A CANCEL matched an unanswered INVITE of this leg's party (the stack sent its 200):
        here a re-INVITE, answered ``487``; the call undoes what it started for it."""
        if tx is self._offer_from_peer:
            self._offer_from_peer = None
            self.host.stack.reply(tx, 487, now=now)
            self._emit(LegOfferCancelled(self), now)
        elif not tx.final_sent:
            self.host.stack.reply(tx, 487, now=now)

    def answer_offer(self, status: int, sdp: bytes | None, now: float) -> None:
        """Answer the re-INVITE/UPDATE this leg's party sent (see :class:`LegOffer`)."""
        tx = self._offer_from_peer
        if tx is None:
            return
        self._offer_from_peer = None
        headers = [("Contact", self.host.contact_for(self.flow))]
        if sdp:
            headers.append(("Content-Type", SDP))
        resp = self.host.stack.reply(tx, status, now=now, headers=headers, body=sdp or b"")
        if 200 <= status < 300 and sdp:
            self.local_sdp = sdp
        if tx.method == "INVITE" and 200 <= status < 300:
            self._await_ack(resp, tx.request.cseq.number, now)

    # -- 2xx to INVITE: re-sent until the ACK (RFC 3261 §13.3.1.4) ---------------------------
    def _await_ack(self, resp: Response, cseq: int, now: float, *, offer: bool = False) -> None:
        """``resp`` (a 2xx to the INVITE with CSeq ``cseq``) went out: the UAS core, not the
        transaction, re-sends it over UDP from T1 doubling to T2 until the ACK comes, and
        ends the dialog if none comes within 64*T1 (RFC 6026 §7.1 moved this out of the
        transaction). This holds for re-INVITEs (hold/resume) as much as for the first.
        ``offer``: the 2xx carries an offer, so the ACK carries the answer."""
        t1 = self.host.stack.t1
        self._pending_2xx_cseq = cseq
        self._offer_in_2xx = offer
        if not self.flow.reliable:
            self._pending_2xx = resp.serialize()
            self._interval = t1
            self.host.timers.schedule(self, "2xx", now + t1)
        self.host.timers.schedule(self, "no_ack", now + 64 * t1)

    def on_ack(self, req: Request, now: float) -> None:
        """An ACK for a 2xx this leg sent (initial INVITE or re-INVITE) arrived."""
        if req.cseq.number != self._pending_2xx_cseq:
            return  # a late duplicate ACK of an earlier INVITE
        self._pending_2xx = None
        self._pending_2xx_cseq = -1
        TimerQueue.cancel(self, "2xx")
        TimerQueue.cancel(self, "no_ack")
        if self._offer_in_2xx:
            self._offer_in_2xx = False
            if self._late_answer:  # the first answer of a late-offer call: it must be there
                self._late_answer = False
                self._emit(LegLateAnswer(self, req.sdp_body), now)
            elif req.sdp_body:
                self._emit(LegRefreshAnswered(self, req.sdp_body), now)
        if self._bye_after_ack:
            self._bye_after_ack = False
            self._send_bye(now)
            self._finish()

    def offer(self, sdp: bytes | None, now: float) -> None:
        """Send a re-INVITE to this leg's party (the other party re-negotiated)."""
        if self.dialog is None or self.state is not LegState.ANSWERED or self._offer_tx is not None:
            self._emit(LegOfferAnswered(self, 491, None), now)
            return
        req = self.dialog.request("INVITE", body=sdp or b"",
                                  extra=[("Contact", self.host.contact_for(self.flow))])
        tx = self.host.stack.send_request(req, self.flow, now)
        tx.user_data = self
        self._offer_tx = tx
        self._sent_offer = sdp

    def cancel_offer(self, now: float) -> None:
        """Withdraw the re-INVITE this leg sent (its offer's originator CANCELled its own)."""
        if self._offer_tx is not None:
            self.host.stack.cancel(self._offer_tx, now)

    def _on_offer_response(self, resp: Response, tx: ClientTransaction, now: float) -> None:
        if resp.status < 200:
            return
        if resp.status < 300:
            assert self.dialog is not None
            # RFC 3261 §12.2.1.2: a 2xx to a re-INVITE refreshes the remote target (the
            # ACK already goes there).
            self.dialog.confirm(resp)
            self.host.stack.send_stateless(self._with_via(self._ack_for(self.dialog, tx), now),
                                           self.flow)
            if self._offer_tx is not tx:
                return  # a retransmitted 2xx: the ACK above was all it needed
            if self._sent_offer:
                self.local_sdp = self._sent_offer
        if self._offer_tx is tx:
            self._offer_tx = None
            self._sent_offer = None
            self._emit(LegOfferAnswered(self, resp.status, resp.sdp_body), now)

    @staticmethod
    def _ack_for(dialog: Dialog, tx: ClientTransaction) -> Request:
        """The ACK for a 2xx to ``tx``'s INVITE, with the INVITE's credentials."""
        return dialog.ack(tx.request.cseq.number, extra=_credentials_of(tx.request))

    def _retry_challenged(self, resp: Response, tx: ClientTransaction, now: float) -> bool:
        """An in-dialog request (BYE, re-INVITE) challenged by a trunk: sent again, once, with
        the leg's credentials and the dialog's next CSeq (RFC 3261 §22.2)."""
        dialog = self.dialog
        old = tx.request
        if (self.credentials is None or dialog is None
                or any(old.has(h) for h in _AUTH_HEADERS)):  # answered once already
            return False
        cseq = max(old.cseq.number, dialog.local_cseq) + 1
        req = with_credentials(old, resp, self.credentials, cseq)
        if req is None:
            return False
        dialog.local_cseq = cseq
        new = self.host.stack.send_request(req, self.flow, now)
        new.user_data = self
        if tx is self._offer_tx:
            self._offer_tx = new
        return True

    def _with_via(self, req: Request, now: float) -> Request:
        local = self.flow.local
        host = f"[{local[0]}]" if ":" in local[0] else local[0]
        req.add_first("Via", f"SIP/2.0/{self.flow.transport.value.upper()} {host}:{local[1]};"
                             f"branch=z9hG4bK{secrets.token_hex(10)};rport")
        return req

    def on_response(self, resp: Response, tx: ClientTransaction, now: float) -> None:
        """A response to a request this leg sent (a re-INVITE; BYE answers need nothing
        unless they are a challenge)."""
        if resp.status in (401, 407) and self._retry_challenged(resp, tx, now):
            return
        if tx.method == "INVITE":
            self._on_offer_response(resp, tx, now)

    def on_timeout(self, tx: ClientTransaction, now: float) -> None:
        """A request this leg sent got no answer."""
        if tx is self._offer_tx:
            self._offer_tx = None
            self._sent_offer = None
            self._emit(LegOfferAnswered(self, 408, None), now)

    def on_timer(self, name: str, now: float) -> None:
        """A timer of this leg fired."""
        if name == "2xx" and self._pending_2xx is not None:
            self.host.stack._send(self.flow, self._pending_2xx)
            self._interval = min(2 * self._interval, self.host.stack.t2)
            self.host.timers.schedule(self, "2xx", now + self._interval)
        elif name == "no_ack" and self.state is LegState.ANSWERED:
            # RFC 3261 §13.3.1.4: no ACK within 64*T1: end the dialog with a BYE.
            TimerQueue.cancel(self, "2xx")
            self._pending_2xx = None
            self._pending_2xx_cseq = -1
            self._send_bye(now)
            self._finish()
            who = "caller" if self.label == "a" else f"callee {self.label}"
            self._emit(LegHungUp(self, f"no ACK from {who}"), now)


class InboundLeg(Leg):
    """The caller's leg: softpbx is the UAS of its INVITE."""

    def __init__(self, *, host: LegHost, call: LegOwner, tx: ServerTransaction, flow: Flow) -> None:
        super().__init__(host=host, call=call, flow=flow, label="a")
        self.tx = tx
        tx.user_data = self
        self.request = tx.request
        self.local_tag = new_tag()
        self._ringing_sent = False
        self._early_sdp_sent = False

    @property
    def initial_sdp(self) -> bytes | None:
        """The caller's SDP offer, if the INVITE had one (else a late offer)."""
        return self.request.sdp_body

    def ring(self, sdp: bytes | None, now: float) -> None:
        """Tell the caller the callee is alerting (180, or 183 with early media)."""
        if self.state is LegState.ENDED or self.tx.final_sent:
            return
        if self.initial_sdp is None:
            sdp = None  # RFC 3261 §13.2.1: no offer in an unreliable provisional (no 100rel)
        if sdp is not None and not self._early_sdp_sent:
            self._early_sdp_sent = True
            self._provisional(183, sdp, now)
        elif not self._ringing_sent and not self._early_sdp_sent:
            self._ringing_sent = True
            self._provisional(180, None, now)

    def _provisional(self, status: int, sdp: bytes | None, now: float) -> None:
        headers = [("Contact", self.host.contact_for(self.flow))]
        if sdp:
            headers.append(("Content-Type", SDP))
        self.host.stack.reply(self.tx, status, now=now, to_tag=self.local_tag, headers=headers,
                              body=sdp or b"")
        self.state = LegState.EARLY

    def answer(self, sdp: bytes | None, now: float) -> None:
        """Send the 2xx and keep re-sending it until the ACK (RFC 3261 §13.3.1.4)."""
        if self.state is LegState.ENDED or self.tx.final_sent:
            return
        headers = [("Contact", self.host.contact_for(self.flow))]
        if sdp:
            headers.append(("Content-Type", SDP))
        resp = self.host.stack.reply(self.tx, 200, now=now, to_tag=self.local_tag,
                                     headers=headers, body=sdp or b"")
        self.local_sdp = sdp
        self.dialog = Dialog.as_uas(self.request, self.local_tag)
        self.host.add_dialog(self.dialog, self)
        self.state = LegState.ANSWERED
        # A late offer: our 2xx carries the offer, the ACK the answer (RFC 3261 §13.2.1).
        late = self.initial_sdp is None
        self._await_ack(resp, self.request.cseq.number, now, offer=late)
        self._late_answer = late

    def reject(self, status: int, reason: str | None, now: float) -> None:
        """Refuse the call with a final response."""
        if self.state is LegState.ENDED:
            return
        if not self.tx.final_sent:
            self.host.stack.reply(self.tx, status, reason, now=now, to_tag=self.local_tag)
        self._finish()

    def hangup(self, now: float) -> None:
        """End the caller's leg: BYE when answered, else ``487 Request Terminated``."""
        if self.state is LegState.ANSWERED:
            self._end_dialog(now)
        else:
            self.reject(487, None, now)

    def on_cancel(self, tx: ServerTransaction, now: float) -> None:
        """The caller sent CANCEL (the stack already answered it 200): for its INVITE, or
        for a re-INVITE (:meth:`Leg.on_cancel`)."""
        if tx is not self.tx:
            super().on_cancel(tx, now)
            return
        if self.state in (LegState.ANSWERED, LegState.ENDED):
            return
        self.host.stack.reply(self.tx, 487, now=now, to_tag=self.local_tag)
        self._finish()
        self._emit(LegHungUp(self, "caller cancelled"), now)


class OutboundLeg(Leg):
    """A leg softpbx places: the UAC of an INVITE to a phone binding or a trunk."""

    def __init__(self, *, host: LegHost, call: LegOwner, flow: Flow, label: str, request: Request,
                 credentials: Credentials | None = None) -> None:
        super().__init__(host=host, call=call, flow=flow, label=label)
        self.request = request
        """The INVITE as sent (without Via; the stack adds one per transaction)."""
        self.credentials = credentials
        self.local_sdp = request.body or None
        self.invite_tx: ClientTransaction | None = None
        self._auth_tries = 0
        self._cancelled = False
        self._strays: dict[str, Dialog] = {}
        """Dialogs other forks of our INVITE made upstream (a 2xx with another To tag), by
        tag: each was ACKed and sent a BYE; kept to re-ACK their 2xx retransmissions."""

    def start(self, now: float) -> None:
        """Send the INVITE."""
        self.invite_tx = self.host.stack.send_request(self.request, self.flow, now)
        self.invite_tx.user_data = self

    def cancel(self, now: float, *, answered_elsewhere: bool = False) -> None:
        """Stop ringing this leg (a CANCEL now, or when its first provisional arrives).
        ``answered_elsewhere``: another fork took the call; the CANCEL says so (RFC 3326),
        so the phone shows no missed call."""
        if self.state in (LegState.ENDED, LegState.ANSWERED) or self._cancelled:
            return
        self._cancelled = True
        if self.invite_tx is not None:
            self.host.stack.cancel(self.invite_tx, now,
                                   reason=ANSWERED_ELSEWHERE if answered_elsewhere else None)

    def hangup(self, now: float) -> None:
        """End the leg: BYE when answered, CANCEL while ringing."""
        if self.state is LegState.ANSWERED:
            self._end_dialog(now)
        else:
            self.cancel(now)

    def on_response(self, resp: Response, tx: ClientTransaction, now: float) -> None:
        if tx is not self.invite_tx or tx.method != "INVITE":
            super().on_response(resp, tx, now)
            return
        status = resp.status
        if status < 200:
            if status == 100 or self.state is LegState.ENDED:
                return
            if resp.to.tag and self.state is LegState.CALLING:
                self.state = LegState.EARLY
            if not self._cancelled:
                self._emit(LegRinging(self, resp.sdp_body), now)
            return
        if status < 300:
            self._on_2xx(resp, tx, now)
            return
        if status in (401, 407) and self._retry_with_credentials(resp, now):
            return
        if self.state is LegState.ENDED:
            return
        self._finish()
        if not self._cancelled:  # a cancelled leg's 487 interests nobody
            self._emit(LegFailed(self, status, resp.reason), now)

    def _on_2xx(self, resp: Response, tx: ClientTransaction, now: float) -> None:
        if self.dialog is not None and resp.to.tag != self.dialog.id.remote_tag:
            self._on_stray_2xx(resp, tx, now)
            return
        fresh = self.dialog is None
        if self.dialog is None:
            try:
                self.dialog = Dialog.as_uac(tx.request, resp)
            except SipError as exc:
                # A 2xx we cannot even ACK (no To tag): the callee is broken, the leg fails.
                log.warning("call %s leg %s: unusable 2xx: %s", _call_id(self), self.label,
                            exc.reason)
                if self.state is not LegState.ENDED:
                    self._finish()
                    if not self._cancelled:
                        self._emit(LegFailed(self, 502, "Bad Gateway"), now)
                return
        ack = self._with_via(self._ack_for(self.dialog, tx), now)
        self.host.stack.send_stateless(ack, self.flow)
        if self.state is LegState.ANSWERED:
            return  # a retransmitted 2xx: re-ACKed above
        if self.state is LegState.ENDED or self._cancelled:
            # Answered after we gave up on it (a fork that lost the race, a CANCEL that
            # crossed the 200): ACK it, then end it at once (one BYE: a retransmitted 2xx
            # is only re-ACKed).
            if fresh:
                self._send_bye(now)
            self._finish()
            return
        self.state = LegState.ANSWERED
        self.host.add_dialog(self.dialog, self)
        self._emit(LegAnswered(self, resp.sdp_body), now)

    def _on_stray_2xx(self, resp: Response, tx: ClientTransaction, now: float) -> None:
        """A 2xx with another To tag than our dialog's: another fork upstream answered too.
        RFC 3261 §13.2.2.4: it is a dialog of its own, which gets its own ACK and, as we
        want one dialog only, a BYE; its retransmissions are re-ACKed."""
        tag = resp.to.tag or ""
        dialog = self._strays.get(tag)
        fresh = dialog is None
        if dialog is None:
            try:
                dialog = Dialog.as_uac(tx.request, resp)
            except SipError as exc:
                log.warning("call %s leg %s: unusable 2xx from another fork: %s",
                            _call_id(self), self.label, exc.reason)
                return
            self._strays[tag] = dialog
            log.info("call %s leg %s: a second fork answered (To tag %s): ACK and BYE",
                     _call_id(self), self.label, tag)
        self.host.stack.send_stateless(self._with_via(self._ack_for(dialog, tx), now), self.flow)
        if fresh:
            bye = self.host.stack.send_request(dialog.request("BYE"), self.flow, now)
            bye.user_data = self

    def _retry_with_credentials(self, resp: Response, now: float) -> bool:
        """Answer the trunk's challenge once (RFC 3261 §22.2)."""
        if self.credentials is None or self._auth_tries >= 1 or self._cancelled:
            return False
        old = self.request
        req = with_credentials(old, resp, self.credentials, old.cseq.number + 1)
        if req is None:
            return False
        self._auth_tries += 1
        self.request = req
        self.start(now)
        return True

    def on_timeout(self, tx: ClientTransaction, now: float) -> None:
        if tx is self.invite_tx:
            if self.state is not LegState.ENDED:
                self._finish()
                if not self._cancelled:
                    self._emit(LegFailed(self, 408, "Request Timeout"), now)
            return
        super().on_timeout(tx, now)


def _call_id(leg: Leg) -> str:
    """The id of ``leg``'s call for a log line ("-" once the call is over)."""
    return str(getattr(leg.call, "id", "-"))
