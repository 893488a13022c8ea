"""What the SIP stack hands up to its transaction user, and down to the transport shell."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config.schema import Transport

if TYPE_CHECKING:
    from .message import Request, Response
    from .transaction import ClientTransaction, ServerTransaction


@dataclass(frozen=True, slots=True)
class Flow:
    """Where a message came from / goes to: transport, the peer's and our address."""

    transport: Transport
    """UDP or TCP."""
    remote: tuple[str, int]
    """The peer's (ip, port) as seen on the socket (NAT-real, not what the message claims)."""
    local: tuple[str, int]
    """Our listening (ip, port) the message arrived on or leaves from."""

    @property
    def reliable(self) -> bool:
        """TCP: no retransmissions, Timers D/I/J/K are zero (RFC 3261 §17)."""
        return self.transport is not Transport.UDP

    def __str__(self) -> str:
        return f"{self.transport.value}:{self.remote[0]}:{self.remote[1]}"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Bytes for the shell to put on the wire."""

    flow: Flow
    """Where to send them (a TCP flow names the connection, opened if needed)."""
    data: bytes
    """The serialized message."""
    close_after: bool = False
    """Close the (TCP) connection once sent: its framing is broken."""
    reconnect: tuple[str, int] | None = None
    """A response on a stream whose connection is gone: open a new connection here, not to
    the request's source port (RFC 3261 §18.2.2: ``received`` + the top Via's sent-by port)."""


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A new request (not a retransmission) for the transaction user."""

    request: Request
    """The parsed request."""
    tx: ServerTransaction | None
    """Its server transaction; ``None`` for an ACK to a 2xx (a transaction of its own)."""
    flow: Flow
    """Where it came from."""


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """A response matching one of our client transactions."""

    response: Response
    """The parsed response."""
    tx: ClientTransaction
    """The client transaction it belongs to."""
    owner: object = None
    """The transaction's ``user_data`` when the response arrived (the transaction may be
    terminated, and have let go of it, by the time the event is read)."""


@dataclass(frozen=True, slots=True)
class CancelReceived:
    """A CANCEL matched a pending INVITE server transaction (the stack already sent 200)."""

    invite_tx: ServerTransaction
    """The INVITE being cancelled; the TU should answer it ``487``."""
    cancel: Request
    """The CANCEL request."""


@dataclass(frozen=True, slots=True)
class TransactionTimeout:
    """Timer B/F fired (no final response: treat as 408) or Timer H fired (no ACK)."""

    tx: ClientTransaction | ServerTransaction
    """The transaction that timed out."""
    owner: object = None
    """The transaction's ``user_data`` when it timed out."""


@dataclass(frozen=True, slots=True)
class MessageRejected:
    """A message could not be accepted; logged once by the shell."""

    flow: Flow
    """Where it came from."""
    reason: str
    """What was wrong."""
    status: int | None
    """The response sent, or ``None`` when it was dropped."""


SipEvent = RequestReceived | ResponseReceived | CancelReceived | TransactionTimeout | MessageRejected
