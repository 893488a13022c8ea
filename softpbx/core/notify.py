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
from dataclasses import dataclass

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
