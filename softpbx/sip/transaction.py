"""RFC 3261 §17 transactions (with the RFC 6026 ``Accepted`` states), sans-IO.

Each transaction is a small state machine; its legal transitions are listed in one table
beside the one ``_set_state``. Timers are named after the RFC (A..M) and kept in the stack's
single heap; a transaction only asks its host to (re)arm or cancel them.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Protocol

from .events import Flow, TransactionTimeout
from .message import Request, Response

log = logging.getLogger("softpbx.sip.transaction")

TIMER_C = 180.0
"""RFC 3261 §16.6 step 11 Timer C, "greater than 3 minutes": how long an INVITE client
transaction waits in Proceeding for its final response, restarted by each provisional other
than 100 (§16.7 step 2). ``SipSettings`` has no key for it."""


class TxState(Enum):
    """Transaction states of RFC 3261 §17 and RFC 6026."""

    CALLING = "calling"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    ACCEPTED = "accepted"
    TERMINATED = "terminated"


S = TxState
# Legal transitions per transaction kind (RFC 3261 figures 5-8, RFC 6026 figures 3-4).
TRANSITIONS: dict[str, dict[TxState, frozenset[TxState]]] = {
    "ict": {
        S.CALLING: frozenset({S.PROCEEDING, S.COMPLETED, S.ACCEPTED, S.TERMINATED}),
        S.PROCEEDING: frozenset({S.COMPLETED, S.ACCEPTED, S.TERMINATED}),
        S.COMPLETED: frozenset({S.TERMINATED}),
        S.ACCEPTED: frozenset({S.TERMINATED}),
    },
    "nict": {
        S.TRYING: frozenset({S.PROCEEDING, S.COMPLETED, S.TERMINATED}),
        S.PROCEEDING: frozenset({S.COMPLETED, S.TERMINATED}),
        S.COMPLETED: frozenset({S.TERMINATED}),
    },
    "ist": {
        S.PROCEEDING: frozenset({S.COMPLETED, S.ACCEPTED, S.TERMINATED}),
        S.COMPLETED: frozenset({S.CONFIRMED, S.TERMINATED}),
        S.CONFIRMED: frozenset({S.TERMINATED}),
        S.ACCEPTED: frozenset({S.TERMINATED}),
    },
    "nist": {
        S.TRYING: frozenset({S.PROCEEDING, S.COMPLETED, S.TERMINATED}),
        S.PROCEEDING: frozenset({S.COMPLETED, S.TERMINATED}),
        S.COMPLETED: frozenset({S.TERMINATED}),
    },
}


class TxHost(Protocol):
    """What a transaction needs from the stack that owns it."""

    t1: float
    t2: float
    t4: float

    def _send(self, flow: Flow, data: bytes) -> None: ...
    def _schedule(self, tx: Transaction, name: str, when: float) -> None: ...
    def _cancel_timers(self, tx: Transaction) -> None: ...
    def _emit(self, event: object) -> None: ...
    def _send_cancel(self, tx: ClientTransaction, now: float) -> ClientTransaction: ...
    def _terminated(self, tx: Transaction) -> None: ...
    def _absorb_retransmissions(self, tx: ServerTransaction, now: float) -> None: ...


class Transaction:
    """Common part of client and server transactions."""

    __slots__ = ("key", "kind", "request", "flow", "state", "host", "timers", "_interval",
                 "user_data")

    def __init__(self, *, key: tuple, request: Request, flow: Flow, host: TxHost,
                 state: TxState) -> None:
        self.kind = ""
        """``ict``, ``nict``, ``ist`` or ``nist``."""
        self.key = key
        """Matching key in the stack's table (RFC 3261 §17.1.3 / §17.2.3)."""
        self.request = request
        """The request that created the transaction."""
        self.flow = flow
        """Where the request came from (server) or goes to (client)."""
        self.host = host
        self.state = state
        """Current :class:`TxState`."""
        self.timers: dict[str, int] = {}
        """Armed timers: name -> heap entry id (managed by the host)."""
        self._interval = 0.0
        self.user_data: object = None
        """Slot for the transaction user (a leg) to find its context again."""

    @property
    def method(self) -> str:
        """The request method."""
        return self.request.method

    def _set_state(self, new: TxState) -> None:
        old = self.state
        if new is old:
            return
        allowed = TRANSITIONS[self.kind].get(old, frozenset())
        if new not in allowed:
            raise RuntimeError(f"{self.kind} {old.value} -> {new.value} is not a legal transition")
        self.state = new
        if log.isEnabledFor(logging.DEBUG):
            # The branch and Call-ID tie the line to the messages in a SIP capture.
            key = self.key[0] if isinstance(self.key, tuple) and self.key else "-"
            log.debug("%s %s %s -> %s (branch %s, Call-ID %s)", self.kind, self.method,
                      old.value, new.value, key, self.request.get("call-id"))
        if new is S.TERMINATED:
            self.host._cancel_timers(self)
            self.host._terminated(self)

    def _arm(self, name: str, now: float, delay: float) -> None:
        self.host._schedule(self, name, now + delay)

    def on_timer(self, name: str, now: float) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.method} {self.state.value}>"


class ServerTransaction(Transaction):
    """INVITE (``ist``) or non-INVITE (``nist``) server transaction (RFC 3261 §17.2)."""

    __slots__ = ("last_response", "_last_bytes")

    def __init__(self, *, key: tuple, request: Request, flow: Flow, host: TxHost) -> None:
        invite = request.method == "INVITE"
        super().__init__(key=key, request=request, flow=flow, host=host,
                         state=S.PROCEEDING if invite else S.TRYING)
        self.kind = "ist" if invite else "nist"
        self.last_response: Response | None = None
        """The last response sent (re-sent on request retransmissions)."""
        self._last_bytes: bytes | None = None

    @property
    def is_invite(self) -> bool:
        """Whether this is an INVITE server transaction."""
        return self.kind == "ist"

    @property
    def final_sent(self) -> bool:
        """Whether a final response went out already."""
        return self.last_response is not None and self.last_response.status >= 200

    def on_retransmission(self) -> None:
        """The request arrived again: re-send the last response (absorbed otherwise)."""
        if self._last_bytes is not None and self.state in (S.PROCEEDING, S.COMPLETED):
            self.host._send(self.flow, self._last_bytes)

    def on_ack(self, now: float) -> None:
        """ACK for a non-2xx final response (RFC 3261 §17.2.1)."""
        if self.state is S.COMPLETED:
            self._set_state(S.CONFIRMED)
            self.host._cancel_timers(self)
            if self.flow.reliable:
                self._set_state(S.TERMINATED)
            else:
                self._arm("I", now, self.host.t4)

    def respond(self, response: Response, now: float) -> None:
        """Send ``response`` from the transaction user."""
        if self.state is S.TERMINATED:
            return
        if self.state in (S.COMPLETED, S.CONFIRMED):
            return  # a final response was sent already: nothing more may follow
        if self.state is S.ACCEPTED and response.status // 100 != 2:
            return
        data = response.serialize()
        self.last_response = response
        self._last_bytes = data
        self.host._send(self.flow, data)
        status = response.status
        if status < 200:
            if self.kind == "nist" and self.state is S.TRYING:
                self._set_state(S.PROCEEDING)
            return
        reliable = self.flow.reliable
        if self.kind == "ist":
            if status < 300:
                # RFC 6026 §7.1: Accepted, Timer L; 2xx retransmission is the TU's job, and
                # the TU no longer needs to hear from this transaction (no CANCEL can apply).
                if self.state is S.PROCEEDING:
                    self._set_state(S.ACCEPTED)
                    self.user_data = None
                    self._arm("L", now, 64 * self.host.t1)
                return
            self._set_state(S.COMPLETED)
            if not reliable:
                self._interval = self.host.t1
                self._arm("G", now, self._interval)
            self._arm("H", now, 64 * self.host.t1)
        else:
            self._set_state(S.COMPLETED)
            if reliable:
                self._set_state(S.TERMINATED)
            else:
                # Timer J (64*T1) only absorbs retransmissions: the host keeps the final
                # response's bytes for that long and this object can go now (tens of
                # thousands of completed transactions live at high registration rates).
                self.host._absorb_retransmissions(self, now)

    def on_timer(self, name: str, now: float) -> None:
        """A timer of this transaction fired."""
        if name == "G" and self.state is S.COMPLETED:
            # RFC 3261 §17.2.1: retransmit the final response, doubling up to T2.
            if self._last_bytes is not None:
                self.host._send(self.flow, self._last_bytes)
            self._interval = min(2 * self._interval, self.host.t2)
            self._arm("G", now, self._interval)
        elif name == "H" and self.state is S.COMPLETED:
            owner = self.user_data
            self._set_state(S.TERMINATED)
            self.host._emit(TransactionTimeout(self, owner))
        elif name in ("I", "J", "L"):
            self._set_state(S.TERMINATED)


class ClientTransaction(Transaction):
    """INVITE (``ict``) or non-INVITE (``nict``) client transaction (RFC 3261 §17.1)."""

    __slots__ = ("_bytes", "ack", "cancel_pending", "cancel_reason", "cancel_sent",
                 "last_response", "_c_deadline", "_timed_out")

    def __init__(self, *, key: tuple, request: Request, flow: Flow, host: TxHost) -> None:
        invite = request.method == "INVITE"
        super().__init__(key=key, request=request, flow=flow, host=host,
                         state=S.CALLING if invite else S.TRYING)
        self.kind = "ict" if invite else "nict"
        self._bytes = request.serialize()
        self.ack: bytes | None = None
        self.cancel_pending = False
        """A CANCEL was asked for before any provisional response (RFC 3261 §9.1)."""
        self.cancel_reason: str | None = None
        """``Reason`` header value for that CANCEL (RFC 3326), if any."""
        self.cancel_sent = False
        """A CANCEL for this INVITE went out (by the TU, or on Timer C)."""
        self.last_response: Response | None = None
        """The last response received."""
        self._c_deadline = 0.0
        # Timer C is re-armed lazily: a provisional only moves the deadline, and the armed
        # entry re-arms itself for the rest when it fires early (one heap entry, not one per
        # 180/183).
        self._timed_out = False

    def start(self, now: float) -> None:
        """Send the request and arm Timers A/B or E/F."""
        self.host._send(self.flow, self._bytes)
        t1 = self.host.t1
        if not self.flow.reliable:
            self._interval = t1
            self._arm("A" if self.kind == "ict" else "E", now, t1)
        self._arm("B" if self.kind == "ict" else "F", now, 64 * t1)

    def on_response(self, response: Response, now: float) -> bool:
        """A matching response arrived; return whether it goes up to the TU."""
        status = response.status
        state = self.state
        if self.kind == "ict":
            if state in (S.CALLING, S.PROCEEDING):
                self.last_response = response
                if status < 200:
                    if state is S.CALLING:
                        self._cancel("A")
                        self._cancel("B")
                        self._set_state(S.PROCEEDING)
                        self._c_deadline = now + TIMER_C
                        self._arm("C", now, TIMER_C)
                    elif status != 100 and not self.cancel_sent:
                        self._c_deadline = now + TIMER_C  # RFC 3261 §16.7 step 2
                elif status < 300:
                    self.host._cancel_timers(self)
                    self._set_state(S.ACCEPTED)
                    self._arm("M", now, 64 * self.host.t1)
                else:
                    self.host._cancel_timers(self)
                    self.ack = self._build_ack(response).serialize()
                    self.host._send(self.flow, self.ack)
                    self._set_state(S.COMPLETED)
                    if self.flow.reliable:
                        self._set_state(S.TERMINATED)
                    else:
                        self._arm("D", now, max(32.0, 64 * self.host.t1))
                return True
            if state is S.COMPLETED and status >= 300:
                if self.ack is not None:
                    self.host._send(self.flow, self.ack)  # the final response was retransmitted
                return False
            # RFC 6026: 2xx retransmissions in Accepted go to the TU (it re-sends the ACK).
            return state is S.ACCEPTED and 200 <= status < 300
        # non-INVITE
        if state in (S.TRYING, S.PROCEEDING):
            self.last_response = response
            if status < 200:
                if state is S.TRYING:
                    self._set_state(S.PROCEEDING)
                return True
            self.host._cancel_timers(self)
            self._set_state(S.COMPLETED)
            if self.flow.reliable:
                self._set_state(S.TERMINATED)
            else:
                self._arm("K", now, self.host.t4)
            return True
        return False

    def _cancel(self, name: str) -> None:
        self.timers.pop(name, None)

    def on_cancel_sent(self, now: float) -> None:
        """A CANCEL for this INVITE went out: RFC 3261 §9.1, if no final response arrives in
        64*T1 the INVITE is over (Timer C no longer restarts on provisionals)."""
        self.cancel_sent = True
        self._c_deadline = now + 64 * self.host.t1
        self._arm("C", now, 64 * self.host.t1)

    def _build_ack(self, response: Response) -> Request:
        """ACK for a non-2xx final response (RFC 3261 §17.1.1.3): same branch and R-URI."""
        req = self.request
        headers: list[tuple[str, str]] = [("Via", req.get_all("via")[0])]
        for name in ("route",):
            for v in req.get_all(name):
                headers.append(("Route", v))
        headers += [
            ("Max-Forwards", "70"),
            ("From", req.get("from") or ""),
            ("To", response.get("to") or ""),
            ("Call-ID", req.call_id),
            ("CSeq", f"{req.cseq.number} ACK"),
            ("Content-Length", "0"),
        ]
        return Request("ACK", req.uri_text, headers)

    def on_timer(self, name: str, now: float) -> None:
        """A timer of this transaction fired."""
        state = self.state
        if name in ("A", "E") and state in (S.CALLING, S.TRYING, S.PROCEEDING):
            self.host._send(self.flow, self._bytes)
            if name == "A":
                self._interval = 2 * self._interval
            elif state is S.PROCEEDING:
                self._interval = self.host.t2  # RFC 3261 §17.1.2.2
            else:
                self._interval = min(2 * self._interval, self.host.t2)
            self._arm(name, now, self._interval)
        elif name in ("B", "F") and state in (S.CALLING, S.TRYING, S.PROCEEDING):
            owner = self.user_data
            self._set_state(S.TERMINATED)
            self.host._emit(TransactionTimeout(self, owner))
        elif name == "C" and state is S.PROCEEDING:
            if now < self._c_deadline:
                self._arm("C", now, self._c_deadline - now)  # a provisional moved it
                return
            owner = self.user_data
            if self.cancel_sent:
                # RFC 3261 §9.1: no final response 64*T1 after our CANCEL: give up.
                self._set_state(S.TERMINATED)
                if not self._timed_out:
                    self.host._emit(TransactionTimeout(self, owner))
                return
            # RFC 3261 §16.6 step 11: Timer C after a provisional: CANCEL the INVITE, and the
            # TU hears of it now (a 408). The transaction stays in Proceeding for the §9.1
            # wait, to ACK the 487 (or hand a crossing 2xx to the TU, which BYEs it).
            self._timed_out = True
            self.host._emit(TransactionTimeout(self, owner))
            self.host._send_cancel(self, now)
        elif name in ("D", "K", "M"):
            self._set_state(S.TERMINATED)

