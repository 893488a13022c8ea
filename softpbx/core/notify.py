"""The CRM contract as call-state side effects (crm-telephony-api.md §1-§4).

The one module that turns call state changes into ``NOTIFY_*`` events (ARCHITECTURE.md:
"NOTIFY_* come from state changes and nowhere else"), and the CRM's answer to
``NOTIFY_START`` into a typed :class:`CrmAnswer`. Sans-IO: the call feeds it with ``now``;
it queues :class:`~.events.SendWebhook` actions for the shell's outbox.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from zoneinfo import ZoneInfo

from ..config.schema import CrmSettings
from .events import SendWebhook

log = logging.getLogger("softpbx.notify")

MAX_CALLER_NAME = 64
"""Code points of a CRM ``caller_name`` kept (phones show far fewer; a From header stays sane)."""


@dataclass(frozen=True, slots=True)
class CrmAnswer:
    """What the CRM answered to ``NOTIFY_START`` (crm-telephony-api.md §2, and Zadarma's keys).

    A failed attempt (HTTP error, timeout, unreadable body) is an answer too: ``problem``
    says what went wrong, and the call routes normally at once."""

    caller_name: str = ""
    """Display name for the phones that ring ("" = keep the caller's own)."""
    redirect: str = ""
    """Extension or ``group:<name>`` to ring instead of the dial plan's destination."""
    hangup: bool = False
    """Reject the call (``{"hangup": 1}`` or ``{"redirect": "blacklist"}``): 486 to the trunk."""
    return_timeout: float = 0.0
    """Seconds to ring ``redirect`` before going on with the normal route (0 = no return)."""
    problem: str = ""
    """Why the answer could not be used, for the log ("" = a usable answer, maybe empty)."""

    @classmethod
    def failed(cls, problem: str) -> CrmAnswer:
        """An attempt that gave no answer (``problem``: ``HTTP 500``, ``timeout`` ...)."""
        return cls(problem=problem)


def clean_caller_name(text: str) -> str:
    """A CRM's caller name as a display name: control characters (C0, DEL, C1, and Unicode
    format/line separators) removed, whitespace runs folded, capped at
    :data:`MAX_CALLER_NAME` code points. Quoting for the header is the leg builder's job."""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch.isspace():
            out.append(" ")
        elif cat in ("Cc", "Cf", "Cs", "Zl", "Zp", "Co", "Cn"):
            continue
        else:
            out.append(ch)
    return " ".join("".join(out).split())[:MAX_CALLER_NAME].strip()


def parse_answer(body: bytes) -> CrmAnswer:
    """The CRM's answer body to ``NOTIFY_START`` (any 2xx). An empty body means "route
    normally"; anything unusable is an answer with ``problem`` set (routes normally)."""
    text = body.strip()
    if not text:
        return CrmAnswer()
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        return CrmAnswer.failed(f"answer is not JSON: {exc}")
    if not isinstance(doc, dict):
        return CrmAnswer.failed(f"answer is JSON {type(doc).__name__}, not an object")
    problems: list[str] = []
    name = doc.get("caller_name", "")
    if not isinstance(name, str):
        problems.append("caller_name is not a string")
        name = ""
    redirect = doc.get("redirect", "")
    if isinstance(redirect, int) and not isinstance(redirect, bool):
        redirect = str(redirect)  # {"redirect": 101}: CRMs built in JavaScript send numbers
    if not isinstance(redirect, str):
        problems.append("redirect is not a string")
        redirect = ""
    redirect = redirect.strip()
    hangup_value = doc.get("hangup", 0)
    hangup = hangup_value in (1, "1", True)
    if redirect.lower() == "blacklist":
        hangup, redirect = True, ""
    rt = doc.get("return_timeout", 0)
    if isinstance(rt, str) and rt.strip().isdigit():
        rt = int(rt)
    if isinstance(rt, bool) or not isinstance(rt, int | float) or rt < 0:
        problems.append("return_timeout is not a number of seconds")
        rt = 0
    return CrmAnswer(caller_name=clean_caller_name(name), redirect=redirect, hangup=hangup,
                     return_timeout=float(min(rt, 3600)), problem="; ".join(problems))


# -- events from call state changes ----------------------------------------------------------
_Q850 = {200: 16, 486: 17, 600: 17, 603: 21, 480: 19, 408: 19, 404: 1, 484: 28, 410: 22,
         487: 16, 503: 34, 502: 38, 500: 41, 403: 21, 488: 65}
"""SIP status -> ISDN cause (RFC 3398 §7.2.4.1 in reverse, as Zadarma's ``status_code``)."""


def q850_cause(sip_code: int) -> int:
    """The Q.850 cause reported for a call that ended with ``sip_code``."""
    return _Q850.get(sip_code, 31)  # 31: normal, unspecified


class NotifiedCall(Protocol):
    """What the notifier reads of a call (:class:`~.call.Call`)."""

    pbx_call_id: str
    call_start: str
    caller_number: str


@dataclass(slots=True)
class _CallEvents:
    seq: int = 0
    recorded: bool = False


class Notifier:
    """Makes every ``NOTIFY_*`` of every call, numbered per call, filtered by
    ``[crm] events``; the one emitter of :class:`~.events.SendWebhook`."""

    def __init__(self, *, settings: CrmSettings, timezone: str,
                 emit: Callable[[SendWebhook], None]) -> None:
        self.settings = settings
        self.zone = ZoneInfo(timezone)
        self.enabled = frozenset(settings.events)
        self._emit = emit
        self._calls: dict[str, _CallEvents] = {}
        """Calls whose events are being numbered: from their first event to their
        recording's outcome (or their end, when not recorded)."""

    def wants(self, event: str) -> bool:
        """Whether ``event`` is sent at all."""
        return event in self.enabled

    def call_start(self, wall: float) -> str:
        """``call_start`` of a call created at Unix time ``wall``, in ``global.timezone``."""
        return datetime.fromtimestamp(wall, self.zone).strftime("%Y-%m-%d %H:%M:%S")

    def _send(self, pbx_call_id: str, event: str, fields: list[tuple[str, str]],
              *, wants_answer: bool = False) -> bool:
        if event not in self.enabled:
            return False
        log_ = self._calls.setdefault(pbx_call_id, _CallEvents())
        log_.seq += 1
        self._emit(SendWebhook(event_id=f"{pbx_call_id}.{log_.seq}", pbx_call_id=pbx_call_id,
                               seq=log_.seq, event=event,
                               fields=(("event", event), *fields), wants_answer=wants_answer))
        return True

    @staticmethod
    def _common(call: NotifiedCall) -> list[tuple[str, str]]:
        return [("call_start", call.call_start), ("pbx_call_id", call.pbx_call_id)]

    def start(self, call: NotifiedCall, did: str, *, wait: bool) -> bool:
        """An inbound call entered: ``NOTIFY_START``; whether it was sent (and so, with
        ``wait``, whether the call waits for the answer)."""
        return self._send(call.pbx_call_id, "NOTIFY_START",
                          [*self._common(call), ("caller_id", call.caller_number),
                           ("called_did", did)], wants_answer=wait)

    def internal(self, call: NotifiedCall, did: str, extension: str) -> None:
        """``extension`` started ringing for an inbound (or internal) call."""
        self._send(call.pbx_call_id, "NOTIFY_INTERNAL",
                   [*self._common(call), ("caller_id", call.caller_number),
                    ("called_did", did), ("internal", extension)])

    def _extras(self, sip_code: int, recorded: bool) -> list[tuple[str, str]]:
        if not self.settings.extra_fields:
            return []
        return [("status_code", str(q850_cause(sip_code))), ("is_recorded", "1" if recorded else "0")]

    def end(self, call: NotifiedCall, did: str, extension: str, *, duration: int,
            disposition: str, sip_code: int, recorded: bool) -> None:
        """An inbound (or internal) call ended: ``NOTIFY_END``."""
        fields = [*self._common(call), ("caller_id", call.caller_number), ("called_did", did)]
        if extension:
            fields.append(("internal", extension))
        fields += [("duration", str(duration)), ("disposition", disposition),
                   *self._extras(sip_code, recorded)]
        self._send(call.pbx_call_id, "NOTIFY_END", fields)
        self._ended(call.pbx_call_id, recorded)

    def out_start(self, call: NotifiedCall, caller_id: str, extension: str,
                  destination: str) -> None:
        """An outbound call was routed to its gateway (or a click-to-call dials the client)."""
        fields = [*self._common(call), ("caller_id", caller_id or "0")]
        if extension:
            fields.append(("internal", extension))
        fields.append(("destination", destination))
        self._send(call.pbx_call_id, "NOTIFY_OUT_START", fields)

    def out_end(self, call: NotifiedCall, caller_id: str, extension: str, destination: str, *,
                duration: int, disposition: str, sip_code: int, recorded: bool) -> None:
        """An outbound call ended: ``NOTIFY_OUT_END``."""
        fields = [*self._common(call), ("caller_id", caller_id or "0")]
        if extension:
            fields.append(("internal", extension))
        fields += [("destination", destination), ("duration", str(duration)),
                   ("disposition", disposition), *self._extras(sip_code, recorded)]
        self._send(call.pbx_call_id, "NOTIFY_OUT_END", fields)
        self._ended(call.pbx_call_id, recorded)

    def _ended(self, pbx_call_id: str, recorded: bool) -> None:
        entry = self._calls.get(pbx_call_id)
        if entry is None:
            return
        if recorded:
            entry.recorded = True
        else:
            del self._calls[pbx_call_id]

    def record(self, pbx_call_id: str, link: str | None) -> None:
        """The recording of a call that had events is final: ``NOTIFY_RECORD`` with its
        link, or nothing when it failed (``link`` None). Always after the call's end event:
        recordings are finalised after the call ended."""
        entry = self._calls.pop(pbx_call_id, None)
        if entry is None or link is None:
            return
        self._calls[pbx_call_id] = entry
        self._send(pbx_call_id, "NOTIFY_RECORD",
                   [("pbx_call_id", pbx_call_id), ("record_link", link)])
        self._calls.pop(pbx_call_id, None)

    @property
    def tracked(self) -> int:
        """Calls whose events are still being numbered (tests check it returns to zero)."""
        return len(self._calls)
