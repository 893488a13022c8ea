"""What the switch core asks its shell to carry out (STYLE.md habit 3: the shell drains them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..sip.events import Flow

if TYPE_CHECKING:
    from ..media.relay import RelaySession
    from .leg import Leg


@dataclass(slots=True)
class Binding:
    """One registered contact of an extension (RFC 3261 §10.3)."""

    aor: str
    """The extension id the contact is bound to."""
    contact: str
    """The Contact URI as the phone sent it."""
    key: str
    """Identity of the binding: ``+sip.instance``/``reg-id`` when given, else the normalised URI."""
    expires_at: float
    """Monotonic ``now`` at which it lapses."""
    call_id: str
    """Call-ID of the REGISTER that made it (RFC 3261 §10.3 step 7 ordering)."""
    cseq: int
    """CSeq of that REGISTER."""
    flow: Flow
    """Where the REGISTER really came from: requests to the phone go there (NAT)."""
    q: str | None = None
    """The ``q`` preference, as sent."""
    user_agent: str = ""
    """The phone's User-Agent, for the operator."""
    params: str = ""
    """Contact header parameters other than ``expires`` (``+sip.instance``, ``reg-id`` ...)."""

    def expires_in(self, now: float) -> int:
        """Whole seconds left at ``now`` (never negative)."""
        return max(0, int(self.expires_at - now + 0.5))


@dataclass(frozen=True, slots=True)
class SaveBinding:
    """Persist a new or refreshed binding."""

    binding: Binding
    """The binding; its ``expires_at`` is monotonic: the store converts it to wall time."""


@dataclass(frozen=True, slots=True)
class DeleteBinding:
    """Forget a binding (unregistered or expired)."""

    aor: str
    """Extension id."""
    key: str
    """``Binding.key``."""


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One CDR row, written when a call ends."""

    call_id: str
    """softpbx's id of the call (``in_``/``out_``/``int_`` + 40 hex)."""
    sip_call_id: str
    """Call-ID of the caller's leg."""
    direction: str
    """``inbound``, ``outbound`` or ``internal``."""
    caller: str
    """Caller's number (extension or the trunk's caller ID)."""
    callee: str
    """The number dialled."""
    did: str
    """The DID for inbound calls, else ""."""
    extension: str
    """Extension that answered (or last rang), else ""."""
    gateway: str
    """Gateway used, else ""."""
    started_at: float
    """Monotonic time the INVITE arrived (the store turns it into wall time)."""
    answered_at: float | None
    ended_at: float
    disposition: str
    """``answered``, ``busy``, ``cancel``, ``no answer`` or ``failed``."""
    sip_code: int
    """Final SIP status of the call (200 when answered)."""
    cause: str
    """Why it ended, in words (``caller hung up``, ``RTP timeout`` ...)."""
    caller_extension: str = ""
    """The calling extension for outbound and internal calls, else ""."""
    pbx_call_id: str = ""
    """The id the CRM knows the call by (``in_``/``out_`` + 40 hex; an internal call's
    ``int_`` id spelled ``in_``), the same as in every NOTIFY_* of the call."""
    sent_number: str = ""
    """The number sent to the gateway (after the dial rule's rewrites), else "";
    ``callee`` keeps the number as dialled."""
    transfers: str = ""
    """The call's transfer chain as JSON (who answered, who transferred to whom, pickups,
    each with ``at``: seconds since the call started), "" when there was none."""

    @property
    def duration(self) -> int:
        """Talk time in whole seconds (0 when not answered)."""
        if self.answered_at is None:
            return 0
        return max(0, int(self.ended_at - self.answered_at + 0.5))


@dataclass(frozen=True, slots=True)
class WriteCdr:
    """Store a finished call's CDR."""

    record: CallRecord


@dataclass(frozen=True, slots=True)
class StartRecording:
    """Record a call that was just answered (the shell taps the relay, opens the MP3)."""

    call_id: str
    media: RelaySession
    """The call's relay session: side A is the caller (left), side B the callee (right)."""
    codecs: dict[int, str]
    """Payload type -> encoding name negotiated in SDP (dynamic types, DTMF)."""
    start: float
    """Monotonic answer time: sample 0 of the recording."""


@dataclass(frozen=True, slots=True)
class RecordingCodecs:
    """The payload types each side of a recorded call sends with (RFC 3264 §5.1/§6.1: a party
    sends with the payload type numbers of the *other* party's SDP). Emitted right after
    :class:`StartRecording` and again after every successful re-negotiation."""

    call_id: str
    """The recorded call."""
    caller: dict[int, str]
    """Payload type -> encoding name of the caller's packets (side A): the callee's SDP."""
    callee: dict[int, str]
    """Payload type -> encoding name of the callee's packets (side B): the caller's SDP."""


@dataclass(frozen=True, slots=True)
class StopRecording:
    """The recorded call ended at ``at``: finalise the file."""

    call_id: str
    at: float


@dataclass(frozen=True, slots=True)
class SendWebhook:
    """Deliver one CRM event (``NOTIFY_*``, crm-telephony-api.md §1) through the durable
    outbox. Made by :mod:`.notify` only; the shell writes it to the outbox before sending."""

    event_id: str
    """Unique and stable across retries (``X-Event-Id``): ``<pbx_call_id>.<seq>``."""
    pbx_call_id: str
    """The call's ``pbx_call_id`` (``in_``/``out_`` + 40 hex)."""
    seq: int
    """Order of this event within its call, from 1: an event is sent only once the earlier
    ones of its call are delivered or given up."""
    event: str
    """``NOTIFY_START``, ``NOTIFY_INTERNAL``, ``NOTIFY_END``, ``NOTIFY_OUT_START``,
    ``NOTIFY_OUT_END`` or ``NOTIFY_RECORD``."""
    fields: tuple[tuple[str, str], ...]
    """The form fields, in order, exactly as POSTed (``event`` first)."""
    wants_answer: bool = False
    """A ``NOTIFY_START`` whose call waits for the CRM: the shell hands the first attempt's
    outcome to ``Switch.crm_answer`` (a parsed body, or a failure)."""


Action = (SaveBinding | DeleteBinding | WriteCdr | StartRecording | RecordingCodecs
          | StopRecording | SendWebhook)


# -- neutral call-control events: what legs tell their call (no SIP in here) -----------------
@dataclass(frozen=True, slots=True)
class LegRinging:
    """The far end is alerting; ``sdp`` is early media's answer, if any."""

    leg: Leg
    sdp: bytes | None


@dataclass(frozen=True, slots=True)
class LegAnswered:
    """The far end answered; ``sdp`` is its answer (or offer, for a late-offer call)."""

    leg: Leg
    sdp: bytes | None


@dataclass(frozen=True, slots=True)
class LegFailed:
    """The leg ended before being answered."""

    leg: Leg
    status: int
    """SIP-style code: 486 busy, 480/408 no answer, 404, 487 cancelled, 503 ..."""
    reason: str


@dataclass(frozen=True, slots=True)
class LegHungUp:
    """The party on this leg ended the call (BYE, or CANCEL before the answer)."""

    leg: Leg
    cause: str
    """In words, for the CDR."""


@dataclass(frozen=True, slots=True)
class LegOffer:
    """The party on this leg re-negotiates media (re-INVITE/UPDATE): the call must answer it."""

    leg: Leg
    sdp: bytes | None


@dataclass(frozen=True, slots=True)
class LegOfferAnswered:
    """The answer to an offer the call sent on this leg (``status`` >= 300: refused)."""

    leg: Leg
    status: int
    sdp: bytes | None


@dataclass(frozen=True, slots=True)
class LegOfferCancelled:
    """The party on this leg withdrew its re-INVITE (CANCEL, already answered ``487``): the
    call must not answer it, and undoes what it started on the other leg."""

    leg: Leg


@dataclass(frozen=True, slots=True)
class LegRefreshAnswered:
    """The party answered, in its ACK, the SDP offer the leg put in its 2xx to a re-INVITE
    without SDP (a session refresh, RFC 4028 / RFC 3261 §14.2)."""

    leg: Leg
    sdp: bytes
    """The party's answer."""


@dataclass(frozen=True, slots=True)
class LegLateAnswer:
    """The caller answered, in its ACK, the offer our 2xx made to its INVITE without SDP
    (a late offer, RFC 3261 §13.2.1); ``None``: the ACK had no SDP, the session failed."""

    leg: Leg
    sdp: bytes | None


@dataclass(frozen=True, slots=True)
class LegInfo:
    """The party sent a DTMF ``INFO`` (already answered ``200``): the call passes the same
    body to the other party."""

    leg: Leg
    content_type: str
    """``application/dtmf-relay`` or ``application/dtmf``, as received (parameters kept)."""
    body: bytes


LegEvent = (LegRinging | LegAnswered | LegFailed | LegHungUp | LegOffer | LegOfferAnswered
            | LegOfferCancelled | LegRefreshAnswered | LegLateAnswer | LegInfo)


@dataclass(frozen=True, slots=True)
class OriginateRefused:
    """Why ``Switch.originate`` (click-to-call, ``POST /api/calls``) placed no call."""

    status: int
    """HTTP-style status: 404 unknown extension, 409 extension not registered, 429 extension
    already in a call, 422 no route for the number, 400 a malformed number, 503 no media."""
    error: str
    """Human-readable reason, naming the field (``from``/``to``)."""
    field: str = ""
    """The request field at fault (``from`` or ``to``), "" when neither."""
