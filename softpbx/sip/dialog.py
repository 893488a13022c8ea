"""RFC 3261 §12 dialogs, sans-IO: identity, route set, remote target, CSeq, in-dialog requests.

A B2BUA leg owns one :class:`Dialog` (per fork, on the UAC side). The dialog builds the
requests it sends (BYE, re-INVITE, UPDATE, the ACK for a 2xx) and checks the ones it gets;
transactions stay the stack's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .errors import SipError
from .headers import parse_name_addr
from .message import Request, Response


class DialogState(Enum):
    """RFC 3261 §12: early (after a 1xx with a To tag) or confirmed (after a 2xx)."""

    EARLY = "early"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


@dataclass(frozen=True, slots=True)
class DialogId:
    """Call-ID plus local and remote tags (RFC 3261 §12)."""

    call_id: str
    local_tag: str
    remote_tag: str


@dataclass(slots=True)
class Dialog:
    """One SIP dialog seen from our side."""

    id: DialogId
    local_uri: str
    """Our From/To header value without the tag (name-addr as we write it)."""
    remote_uri: str
    """The peer's From/To header value without the tag."""
    remote_target: str
    """The peer's Contact URI: where in-dialog requests go (RFC 3261 §12.1)."""
    route_set: list[str] = field(default_factory=list)
    """Route header values, in the order in-dialog requests carry them."""
    local_cseq: int = 0
    """Last CSeq number we used."""
    remote_cseq: int | None = None
    """Last CSeq number the peer used (requests below it are out of order)."""
    state: DialogState = DialogState.EARLY
    secure: bool = False

    # -- creation -----------------------------------------------------------------------------
    @classmethod
    def as_uas(cls, request: Request, local_tag: str, *, confirmed: bool = True) -> Dialog:
        """The dialog a 2xx (or 1xx) to ``request`` creates on the UAS side (RFC 3261 §12.1.1)."""
        contacts = request.contacts or []
        if len(contacts) != 1:
            raise SipError("Dialog-creating request needs exactly one Contact", 400)
        route_set = [v for v in request.values("record-route")]
        return cls(
            id=DialogId(request.call_id, local_tag, request.from_.tag or ""),
            local_uri=_strip_tag(request.get("to") or ""),
            remote_uri=_strip_tag(request.get("from") or ""),
            remote_target=str(contacts[0].uri),
            route_set=route_set,
            local_cseq=0,
            remote_cseq=request.cseq.number,
            state=DialogState.CONFIRMED if confirmed else DialogState.EARLY,
            secure=request.uri.scheme == "sips",
        )

    @classmethod
    def as_uac(cls, request: Request, response: Response) -> Dialog:
        """The dialog ``response`` (1xx with To tag, or 2xx) creates for our ``request``
        (RFC 3261 §12.1.2): the route set is the Record-Route in reverse order."""
        contacts = response.contacts or []
        tag = response.to.tag
        if not tag:
            raise SipError("Response without To tag cannot create a dialog", 400)
        target = str(contacts[0].uri) if contacts else request.uri_text
        return cls(
            id=DialogId(request.call_id, request.from_.tag or "", tag),
            local_uri=_strip_tag(request.get("from") or ""),
            remote_uri=_strip_tag(response.get("to") or ""),
            remote_target=target,
            route_set=list(reversed(response.values("record-route"))),
            local_cseq=request.cseq.number,
            remote_cseq=None,
            state=DialogState.CONFIRMED if response.status < 300 else DialogState.EARLY,
            secure=request.uri.scheme == "sips",
        )

    # -- updates ------------------------------------------------------------------------------
    def confirm(self, response: Response | None = None) -> None:
        """A 2xx arrived (UAC) or was sent (UAS): the dialog is confirmed; a UAC refreshes
        its remote target from the 2xx's Contact."""
        self.state = DialogState.CONFIRMED
        if response is not None and response.contacts:
            self.remote_target = str(response.contacts[0].uri)

    def accept_request(self, request: Request) -> None:
        """Check an in-dialog request's CSeq (RFC 3261 §12.2.2) and refresh the target.

        Raises :class:`SipError` (500) for an out-of-order request.
        """
        n = request.cseq.number
        if request.method not in ("ACK", "CANCEL"):
            if self.remote_cseq is not None and n <= self.remote_cseq:
                raise SipError("Out of order in-dialog request", 500)
            self.remote_cseq = n
        if request.method in ("INVITE", "UPDATE") and request.contacts:
            self.remote_target = str(request.contacts[0].uri)

    def matches(self, call_id: str, local_tag: str | None, remote_tag: str | None) -> bool:
        """Whether a message with these identifiers belongs to this dialog."""
        i = self.id
        return call_id == i.call_id and local_tag == i.local_tag and remote_tag == i.remote_tag

    # -- building requests --------------------------------------------------------------------
    def request(self, method: str, *, body: bytes = b"", content_type: str | None = None,
                extra: list[tuple[str, str]] | None = None, cseq: int | None = None) -> Request:
        """An in-dialog request (RFC 3261 §12.2.1.1). The stack adds the Via.

        ``cseq``: use this number instead of the next one (the ACK for a 2xx reuses the
        INVITE's number, RFC 3261 §13.2.2.4).
        """
        if cseq is None:
            self.local_cseq += 1
            cseq = self.local_cseq
        uri, routes = self._target_and_routes()
        headers: list[tuple[str, str]] = [("Route", r) for r in routes]
        headers += [
            ("Max-Forwards", "70"),
            ("From", f"{self.local_uri};tag={self.id.local_tag}"),
            ("To", f"{self.remote_uri};tag={self.id.remote_tag}" if self.id.remote_tag
             else self.remote_uri),
            ("Call-ID", self.id.call_id),
            ("CSeq", f"{cseq} {method}"),
        ]
        if extra:
            headers += extra
        if body:
            headers.append(("Content-Type", content_type or "application/sdp"))
        headers.append(("Content-Length", str(len(body))))
        return Request(method, uri, headers, body)

    def ack(self, invite_cseq: int, *, body: bytes = b"",
            extra: list[tuple[str, str]] | None = None) -> Request:
        """The ACK for a 2xx to our INVITE with CSeq ``invite_cseq``. ``extra``: the INVITE's
        ``Authorization``/``Proxy-Authorization`` values, which the ACK must repeat
        (RFC 3261 §13.2.2.4: "the ACK MUST contain the same credentials as the INVITE")."""
        return self.request("ACK", cseq=invite_cseq, body=body, extra=extra)

    def _target_and_routes(self) -> tuple[str, list[str]]:
        # RFC 3261 §12.2.1.1: loose routing keeps the remote target as Request-URI; a strict
        # router (no ;lr) at the top takes the Request-URI and the target goes last.
        routes = self.route_set
        if routes:
            first = parse_name_addr(routes[0])
            if "lr" not in first.uri.params:
                return str(first.uri), routes[1:] + [f"<{self.remote_target}>"]
        return self.remote_target, list(routes)


def _strip_tag(value: str) -> str:
    """A From/To value without its ``tag`` parameter (to re-add our own)."""
    na = parse_name_addr(value)
    na.params.pop("tag", None)
    return str(na)
