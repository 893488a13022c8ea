"""The sans-IO SIP stack: bytes in, events and bytes out, one timer heap (RFC 3261 §17, §18).

::

    stack.receive(data, flow, now)      # a datagram, or one framed TCP message
    while (ev := stack.next_event()):   # RequestReceived, ResponseReceived, ...
        ...
    for out in stack.datagrams_to_send(): ...
    when = stack.get_timer(); ...; stack.handle_timer(now)

Every protocol error raised while reading a message is turned into its response (or a drop)
in exactly one place, :meth:`SipStack._reject`.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections import deque

from ..config.schema import SipSettings, Transport
from .errors import SipError
from .events import (
    CancelReceived,
    Flow,
    MessageRejected,
    Outgoing,
    RequestReceived,
    ResponseReceived,
    SipEvent,
    TransactionTimeout,
)
from .framing import PING, PONG
from .headers import Via
from .message import Request, Response, full_name, make_response
from .parser import parse_message
from .timers import TimerQueue
from .transaction import ClientTransaction, ServerTransaction, Transaction, TxState

log = logging.getLogger("softpbx.sip.stack")

_WAITING = frozenset({TxState.CALLING, TxState.TRYING, TxState.PROCEEDING})
"""Client transaction states still waiting for a final response."""

MAGIC_COOKIE = "z9hG4bK"
"""RFC 3261 §8.1.1.7: branches starting with it are globally unique transaction ids."""


def new_branch() -> str:
    """A fresh RFC 3261 branch."""
    return MAGIC_COOKIE + secrets.token_hex(10)


METHODS_COUNTED = 24
"""Distinct request methods counted by name (the known ones fit); more count as ``other``."""


def new_tag() -> str:
    """A fresh From/To tag (RFC 3261 §19.3: at least 32 bits of randomness)."""
    return secrets.token_hex(6)


class SipStack:
    """Transport-independent SIP transaction layer."""

    def __init__(self, *, settings: SipSettings, server_name: str = "softpbx") -> None:
        self.t1 = settings.t1_ms / 1000.0
        self.t2 = settings.t2_ms / 1000.0
        self.t4 = settings.t4_ms / 1000.0
        self.max_message_size = settings.max_message_size
        self.server_name = server_name
        self._events: deque[SipEvent] = deque()
        self._out: list[Outgoing] = []
        self._server: dict[tuple, ServerTransaction] = {}
        self._client: dict[tuple, ClientTransaction] = {}
        self._timers = TimerQueue()
        # Completed non-INVITE server transactions over UDP (RFC 3261 §17.2.2, Timer J):
        # key -> (final response bytes, flow). Timer J is the same for all, so they expire in
        # the order they completed: a FIFO replaces the heap.
        self._completed: dict[tuple, tuple[bytes, Flow]] = {}
        self._completed_fifo: deque[tuple[float, tuple]] = deque()
        self._stream_clients: dict[Flow, set[tuple]] = {}
        """Stream flow -> keys of our client transactions on it (ended when it closes)."""
        # Metrics in plain ints (read at scrape time, retransmissions included, as a SIP
        # server's statistics count messages on the wire).
        self.requests_in: dict[str, int] = {}
        """Requests received and parsed, by method (``other`` past :data:`METHODS_COUNTED`)."""
        self.responses_in = [0] * 7
        """Responses received and parsed, by status class (index 1 = 1xx ... 6 = 6xx)."""
        self.requests_out: dict[bytes, int] = {}
        """Requests sent, by method (bytes, as on the wire)."""
        self.responses_out = [0] * 7
        """Responses sent, by status class."""

    # -- inputs -------------------------------------------------------------------------------
    def receive(self, data: bytes, flow: Flow, now: float, *, framing_error: str | None = None) -> None:
        """Feed one datagram or one framed stream message.

        ``framing_error``: the stream framer gave up on these bytes (the shell closes the
        connection once the answer is sent).
        """
        if data == PING or data == b"\r\n":
            # RFC 5626 §3.5.1 keep-alive: a double CRLF ping gets a single CRLF pong.
            if data == PING:
                self._out.append(Outgoing(flow, PONG))
            return
        if framing_error is None and len(data) > self.max_message_size:
            self._emit(MessageRejected(flow, "Message too large", None))
            return
        stream = flow.reliable
        try:
            msg = parse_message(data, stream=stream)
        except SipError as exc:
            if framing_error is not None:
                exc.reason = framing_error
                if framing_error == "Message too large":
                    exc.status_hint = 513
            self._reject(exc, flow, now, close=framing_error is not None)
            return
        if framing_error is not None:
            self._reject(SipError(framing_error, 513 if "large" in framing_error else 400),
                         flow, now, close=True, msg=msg)
            return
        # Headers are parsed lazily: one the parser did not check may still be malformed.
        if isinstance(msg, Response):
            self.responses_in[min(msg.status // 100, 6)] += 1
            try:
                self._on_response(msg, flow, now)
            except SipError as exc:
                self._emit(MessageRejected(flow, exc.reason, None))  # a response: dropped
        else:
            counts = self.requests_in
            method = msg.method
            if method not in counts and len(counts) >= METHODS_COUNTED:
                method = "other"  # a peer inventing methods must not grow the table
            counts[method] = counts.get(method, 0) + 1
            try:
                self._on_request(msg, flow, now)
            except SipError as exc:
                self._reject(exc, flow, now, msg=msg)

    def flow_closed(self, flow: Flow, now: float) -> int:
        """The shell: stream ``flow`` closed. RFC 3261 §17.1.4 / §8.1.3.1: a transport failure
        ends the client transactions still waiting for an answer on it at once; their owners
        see them time out now instead of after Timer B/F, or, for an INVITE already ringing,
        the no-answer timer. Returns how many ended."""
        keys = self._stream_clients.pop(flow, None)
        if not keys:
            return 0
        n = 0
        for key in keys:
            tx = self._client.get(key)
            if tx is None or tx.flow != flow or tx.state not in _WAITING:
                continue
            owner = tx.user_data  # read first: terminating the transaction lets go of it
            tx._set_state(TxState.TERMINATED)
            self._emit(TransactionTimeout(tx, owner))
            n += 1
        return n

    def handle_timer(self, now: float) -> None:
        """Fire every timer due at ``now``."""
        fifo = self._completed_fifo
        while fifo and fifo[0][0] <= now:
            self._completed.pop(fifo.popleft()[1], None)  # Timer J
        self._timers.fire(now)

    # -- outputs ------------------------------------------------------------------------------
    def next_event(self) -> SipEvent | None:
        """The next event for the transaction user, or ``None``."""
        return self._events.popleft() if self._events else None

    def datagrams_to_send(self) -> list[Outgoing]:
        """Everything to put on the wire since the last call."""
        out = self._out
        self._out = []
        requests, responses = self.requests_out, self.responses_out
        for item in out:
            data = item.data
            if data[:8] == b"SIP/2.0 ":
                # Status-Line (RFC 3261 §7.2): "SIP/2.0 " then three digits.
                cls = data[8] - 48
                responses[cls if 1 <= cls <= 6 else 0] += 1
            elif data and data[0] != 13:  # not a CRLF keep-alive pong
                space = data.find(b" ", 0, 24)
                method = data[:space] if space > 0 else b"other"
                requests[method] = requests.get(method, 0) + 1
        return out

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must be called next (one peek at the heap and the FIFO)."""
        when = self._timers.next()
        first = self._completed_fifo[0][0] if self._completed_fifo else None
        if when is None:
            return first
        return when if first is None or when < first else first

    @property
    def transaction_count(self) -> int:
        """Live transactions, completed ones waiting out Timer J included (tests assert it
        returns to zero)."""
        return len(self._server) + len(self._client) + len(self._completed)

    # -- transaction-user API -----------------------------------------------------------------
    def respond(self, tx: ServerTransaction, response: Response, now: float) -> None:
        """Send ``response`` on server transaction ``tx``."""
        if response.get("server") is None and response.get("user-agent") is None:
            response.add("Server", self.server_name)
        tx.respond(response, now)

    def reply(self, tx: ServerTransaction, status: int, reason: str | None = None, *, now: float,
              to_tag: str | None = None, headers: list[tuple[str, str]] | None = None,
              body: bytes = b"") -> Response:
        """Build and send a response to ``tx.request``; return it."""
        resp = make_response(tx.request, status, reason, to_tag=to_tag, headers=headers, body=body)
        self.respond(tx, resp, now)
        return resp

    def send_request(self, request: Request, flow: Flow, now: float, *,
                     via_host: str | None = None) -> ClientTransaction:
        """Start a client transaction: a top Via with a fresh branch is added, then sent."""
        branch = new_branch()
        host = via_host or _hostport(flow.local)
        request.add_first("Via", f"SIP/2.0/{flow.transport.value.upper()} {host};branch={branch};rport")
        key = (branch, request.method)
        tx = ClientTransaction(key=key, request=request, flow=flow, host=self)
        self._client[key] = tx
        if flow.reliable:
            self._stream_clients.setdefault(flow, set()).add(key)
        tx.start(now)
        return tx

    def send_stateless(self, message: Request | Response, flow: Flow) -> None:
        """Send a message outside any transaction (ACK for 2xx, 2xx retransmissions)."""
        self._out.append(Outgoing(flow, message.serialize()))

    def cancel(self, tx: ClientTransaction, now: float, *,
               reason: str | None = None) -> ClientTransaction | None:
        """Cancel a pending INVITE (RFC 3261 §9.1); deferred until a provisional arrived.
        ``reason`` becomes the CANCEL's ``Reason`` header (RFC 3326)."""
        if (tx.kind != "ict" or tx.state not in (TxState.CALLING, TxState.PROCEEDING)
                or tx.cancel_sent):
            return None
        tx.cancel_reason = reason
        if tx.state is TxState.CALLING:
            tx.cancel_pending = True
            return None
        return self._send_cancel(tx, now)

    def _send_cancel(self, tx: ClientTransaction, now: float) -> ClientTransaction:
        req = tx.request
        headers: list[tuple[str, str]] = [("Via", req.get_all("via")[0])]
        for v in req.get_all("route"):
            headers.append(("Route", v))
        headers += [("Max-Forwards", "70"), ("From", req.get("from") or ""),
                    ("To", req.get("to") or ""), ("Call-ID", req.call_id),
                    ("CSeq", f"{req.cseq.number} CANCEL")]
        if tx.cancel_reason:
            headers.append(("Reason", tx.cancel_reason))
        headers.append(("Content-Length", "0"))
        cancel = Request("CANCEL", req.uri_text, headers)
        key = (req.top_via.branch, "CANCEL")
        ctx = ClientTransaction(key=key, request=cancel, flow=tx.flow, host=self)
        self._client[key] = ctx
        if tx.flow.reliable:
            self._stream_clients.setdefault(tx.flow, set()).add(key)
        ctx.start(now)
        tx.on_cancel_sent(now)
        return ctx

    # -- receiving ----------------------------------------------------------------------------
    def _on_request(self, req: Request, flow: Flow, now: float) -> None:
        via = req.top_via
        _note_source(req, via, flow)
        method = req.method
        key = _server_key(req, via)
        if method == "ACK":
            tx = self._server.get(key)
            if tx is not None and tx.is_invite:
                if tx.state is TxState.COMPLETED:
                    tx.on_ack(now)
                    return
                if tx.state is TxState.CONFIRMED:
                    return  # retransmitted ACK, absorbed
            # An ACK for a 2xx is its own transaction: straight to the TU.
            self._emit(RequestReceived(req, None, flow))
            return
        tx = self._server.get(key)
        if tx is not None:
            tx.on_retransmission()
            return
        done = self._completed.get(key)
        if done is not None:
            self._out.append(Outgoing(done[1], done[0]))  # retransmission: the final again
            return
        host: SipStack | _StreamReplies = self
        if flow.reliable:
            host = _StreamReplies(self, _reconnect_to(via, flow))
        tx = ServerTransaction(key=key, request=req, flow=flow, host=host)
        self._server[key] = tx
        if method == "CANCEL":
            self._on_cancel(tx, req, via, now)
            return
        if method == "INVITE":
            # Stop INVITE retransmissions at once (RFC 3261 §17.2.1 allows not waiting 200 ms).
            self.reply(tx, 100, now=now)
        self._emit(RequestReceived(req, tx, flow))

    def _on_cancel(self, tx: ServerTransaction, cancel: Request, via, now: float) -> None:
        # RFC 3261 §9.2: the CANCEL matches the INVITE with the same branch and sent-by.
        inv_key = _server_key(cancel, via, method="INVITE")
        inv = self._server.get(inv_key)
        if inv is None or not inv.is_invite:
            self.reply(tx, 481, now=now, to_tag=new_tag())
            return
        # RFC 3261 §9.2: the same To tag as the INVITE's response, when it had one (a 100
        # has none); §8.2.6.2: a tag in any case.
        to_tag = None
        if inv.last_response is not None:
            to_tag = inv.last_response.to.tag
        self.reply(tx, 200, now=now, to_tag=to_tag or new_tag())
        if inv.state is TxState.PROCEEDING:
            self._emit(CancelReceived(inv, cancel))

    def _on_response(self, resp: Response, flow: Flow, now: float) -> None:
        # RFC 3261 §8.1.3.3: a response with more than one Via is discarded.
        if len(resp.values("via")) != 1:
            self._emit(MessageRejected(flow, "Response with several Via values", None))
            return
        via = resp.top_via
        key = (via.branch, resp.cseq.method)
        tx = self._client.get(key)
        if tx is None:
            log.debug("response %d matches no transaction; dropped", resp.status)
            return
        owner = tx.user_data  # read first: a final response may terminate the transaction
        if tx.on_response(resp, now):
            self._emit(ResponseReceived(resp, tx, owner))
            if tx.cancel_pending and resp.status < 200:
                tx.cancel_pending = False
                self._send_cancel(tx, now)

    def _reject(self, exc: SipError, flow: Flow, now: float, *, close: bool = False,
                msg: Request | Response | None = None) -> None:
        """The one place a protocol error becomes a response (or a drop)."""
        if msg is None:
            msg = getattr(exc, "message", None)
        status: int | None = None
        if isinstance(msg, Request) and msg.method != "ACK" and msg.has("via"):
            status = exc.status_hint
            with contextlib.suppress(SipError):  # a Via we cannot read goes back as it came
                _note_source(msg, msg.top_via, flow)
            resp = _error_response(msg, status, exc.reason)
            resp.add("Server", self.server_name)
            reconnect = None
            if flow.reliable and not close:
                with contextlib.suppress(SipError):
                    reconnect = _reconnect_to(msg.top_via, flow)
            self._out.append(Outgoing(flow, resp.serialize(), close_after=close,
                                      reconnect=reconnect))
        elif close:
            self._out.append(Outgoing(flow, b"", close_after=True))
        self._emit(MessageRejected(flow, exc.reason, status))

    # -- TxHost -------------------------------------------------------------------------------
    def _send(self, flow: Flow, data: bytes) -> None:
        self._out.append(Outgoing(flow, data))

    def _schedule(self, tx: Transaction, name: str, when: float) -> None:
        self._timers.schedule(tx, name, when)

    def _cancel_timers(self, tx: Transaction) -> None:
        TimerQueue.cancel_all(tx)

    def _absorb_retransmissions(self, tx: ServerTransaction, now: float) -> None:
        data = tx._last_bytes
        if data is not None:
            self._completed[tx.key] = (data, tx.flow)
            self._completed_fifo.append((now + 64 * self.t1, tx.key))
        tx._set_state(TxState.TERMINATED)

    def _emit(self, event: SipEvent) -> None:
        self._events.append(event)

    def _terminated(self, tx: Transaction) -> None:
        table: dict = self._server if isinstance(tx, ServerTransaction) else self._client
        if table.get(tx.key) is tx:
            del table[tx.key]
            if table is self._client and tx.flow.reliable:
                keys = self._stream_clients.get(tx.flow)
                if keys is not None:
                    keys.discard(tx.key)
                    if not keys:
                        del self._stream_clients[tx.flow]
        tx.user_data = None  # legs point at their transactions: break the cycle


class _StreamReplies:
    """The host of a server transaction on a stream (TCP): the stack, except that what the
    transaction sends (its responses) carries where to reconnect when the connection the
    request came in on is gone (RFC 3261 §18.2.2). One small object per TCP transaction;
    UDP transactions use the stack itself."""

    __slots__ = ("stack", "reconnect")

    def __init__(self, stack: SipStack, reconnect: tuple[str, int]) -> None:
        self.stack = stack
        self.reconnect = reconnect

    @property
    def t1(self) -> float:
        return self.stack.t1

    @property
    def t2(self) -> float:
        return self.stack.t2

    @property
    def t4(self) -> float:
        return self.stack.t4

    def _send(self, flow: Flow, data: bytes) -> None:
        self.stack._out.append(Outgoing(flow, data, reconnect=self.reconnect))

    def _schedule(self, tx: Transaction, name: str, when: float) -> None:
        self.stack._schedule(tx, name, when)

    def _cancel_timers(self, tx: Transaction) -> None:
        TimerQueue.cancel_all(tx)

    def _emit(self, event: SipEvent) -> None:
        self.stack._emit(event)

    def _send_cancel(self, tx: ClientTransaction, now: float) -> ClientTransaction:
        return self.stack._send_cancel(tx, now)  # pragma: no cover - server transactions

    def _terminated(self, tx: Transaction) -> None:
        self.stack._terminated(tx)

    def _absorb_retransmissions(self, tx: ServerTransaction, now: float) -> None:
        self.stack._absorb_retransmissions(tx, now)


def _reconnect_to(via: Via, flow: Flow) -> tuple[str, int]:
    """RFC 3261 §18.2.2: over a reliable transport, a response whose connection failed goes
    to the ``received`` address and the sent-by port (5060 when absent) of the top Via. The
    ``received`` address is always the packet's source IP (``_note_source`` writes it when the
    sent-by host differs), so softpbx never connects to an address a peer only wrote into a
    message (a private one behind NAT, or somebody else's). RFC 3581 ``rport`` is for
    unreliable transports only: the source port of a connection is ephemeral. A TLS sent-by
    without a port means 5061 (RFC 3261 §18.2.2 / §19.1.2)."""
    default = 5061 if flow.transport is Transport.TLS else 5060
    return (flow.remote[0], via.port or default)


def _hostport(addr: tuple[str, int]) -> str:
    host, port = addr
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def _server_key(req: Request, via, method: str | None = None) -> tuple:
    """RFC 3261 §17.2.3 matching key (with the RFC 2543 fallback for old branches)."""
    m = method or req.method
    if m == "ACK":
        m = "INVITE"
    branch = via.branch
    if branch and branch.startswith(MAGIC_COOKIE) and len(branch) > len(MAGIC_COOKIE):
        return (branch, via.sent_by, m)
    return ("2543", req.call_id, req.from_.tag, req.cseq.number, via.sent_by, m)


def _note_source(req: Request, via: Via, flow: Flow) -> None:
    """RFC 3261 §18.2.1 / RFC 3581: note in the top Via where the request really came from."""
    ip, port = flow.remote
    # RFC 3581 §4: with rport, ``received`` goes in even when it equals the sent-by host.
    if "rport" in via.params:
        via.params["received"] = ip
        via.params["rport"] = str(port)
        _replace_top_via(req, str(via))
    elif via.host.strip("[]").lower() != ip:
        via.params["received"] = ip
        _replace_top_via(req, str(via))


def _replace_top_via(req: Request, value: str) -> None:
    """Rewrite the first Via value (which may share a line with others)."""
    for i, (name, line) in enumerate(req.headers):
        if full_name(name) == "via":
            rest = ""
            if "," in line:
                from .headers import split_comma

                parts = split_comma(line)
                rest = ", ".join(parts[1:])
            req.headers[i] = (name, value + (", " + rest if rest else ""))
            req._index = None
            return


def _error_response(req: Request, status: int, reason: str) -> Response:
    """A response to a request that may be too broken for :func:`make_response`; its To gets
    a tag when it had none (RFC 3261 §8.2.6.2), if it can be read at all."""
    headers: list[tuple[str, str]] = []
    for name, value in req.headers:
        lname = full_name(name)
        if lname in ("via", "from", "to", "call-id", "cseq"):
            if lname == "to":
                try:
                    tagged = "tag" in req.to.params
                except SipError:
                    tagged = True  # an unreadable To is echoed untouched
                if not tagged:
                    value = f"{value};tag={new_tag()}"
            headers.append((name, value))
    return Response(status, reason, headers)
