"""Click-to-call requests from the CRM, sans-IO (``crm-telephony-api.md`` §5).

The HTTP side (``softpbx/http/click_to_call.py``) decodes the body (urlencoded, multipart or
JSON) into a plain mapping and asks this module what the request means:

- :func:`token_matches`: the ``x-pbx-authentication`` check, in constant time;
- :func:`parse_request`: the ``from``/``to``/``name`` fields, validated and normalised, or
  the :class:`Refusal` naming the field at fault;
- :class:`RepeatLimiter`: one click per extension per ``crm.click_to_call_min_interval_s``
  (a CRM user double-clicking, or a CRM retrying a request it thinks was lost, must not ring
  the employee twice).

Nothing here reads a clock or touches a socket: ``now`` is an argument.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

MAX_NUMBER_DIGITS = 20
"""Longest ``to`` accepted, in digits. E.164 allows 15 (ITU-T E.164 §6.1); the national and
international prefixes a CRM user may type (``8 10 ...``, ``00 ...``) need a few more."""
MAX_NAME_LENGTH = 64
"""Longest caller name kept; the rest is cut (it only becomes a display name)."""

# What a person or a CRM writes around the digits of a phone number: spaces (also the
# no-break and thin spaces pasted from documents), dashes of every kind, dots, brackets, and
# slashes. They carry no dialling meaning, so they are dropped before the dial plan sees it.
_DECORATION_RE = re.compile(r"[\s\-\u2010-\u2015\u2212.()\[\]/]+")
# number = [ "+" ] 1*DIGIT   (ASCII digits only: str.isdigit() would take "٣" as well)
_NUMBER_RE = re.compile(r"\+?[0-9]+\Z")
# An extension id as the config allows it (``config/loader.py`` ``_NAME_RE``).
_EXTENSION_RE = re.compile(r"[A-Za-z0-9._+-]{1,64}\Z")
# C0/C1 controls and the Unicode line/paragraph separators: a display name must not be able
# to break a SIP header or a log line.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass(frozen=True, slots=True)
class ClickToCall:
    """A valid click-to-call request: whom to ring first, whom to dial after the answer."""

    extension: str
    """The employee's extension (``from``): rung first."""
    number: str
    """The client's number (``to``), normalised: ``[+]digits``, dialled after the answer."""
    caller_name: str = ""
    """The CRM's name for the client (``name``), shown on the employee's phone; may be ""."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a click-to-call request is not carried out; ``status`` is the HTTP status that
    fits (the endpoint may still answer 200 when ``crm.click_to_call_error_codes`` is off)."""

    status: int
    """HTTP status: 400 missing or malformed field, 401 token, 403 disabled, 429 repeated."""
    error: str
    """Human-readable reason, naming the field at fault."""
    field: str = ""
    """The request field at fault (``from``, ``to``, ``name``), "" when none is."""


def token_matches(given: str | None, expected: str) -> bool:
    """Whether the ``x-pbx-authentication`` value ``given`` is ``expected``.

    ``hmac.compare_digest`` on bytes takes a time that depends on the lengths only, never on
    how many leading characters match, so the token cannot be guessed one byte at a time.
    A missing header is compared as "" (the same work and the same answer as a wrong one).
    An empty ``expected`` never matches: an empty token means the endpoint is disabled.
    """
    # surrogateescape: a header with bytes that are not UTF-8 is still compared, not a crash.
    given_b = (given or "").encode("utf-8", "surrogateescape")
    ok = hmac.compare_digest(given_b, expected.encode("utf-8", "surrogateescape"))
    return ok and bool(expected)


def normalise_number(text: str) -> str | None:
    """``text`` as the dial plan expects it, or ``None`` when it is no phone number.

    Spaces, dashes, dots, brackets and slashes go; a leading ``+`` stays (the outbound
    rewrites handle ``+7``/``8`` prefixes); anything else but ASCII digits, a ``+`` elsewhere,
    no digit at all or more than :data:`MAX_NUMBER_DIGITS` digits make it malformed.
    ``"+7 (916) 123-45-67"`` -> ``"+79161234567"``; an internal extension (``"101"``) passes
    unchanged, and the second leg then rings that extension.
    """
    number = _DECORATION_RE.sub("", text)
    if not _NUMBER_RE.match(number) or len(number.lstrip("+")) > MAX_NUMBER_DIGITS:
        return None
    return number


def _field(fields: Mapping[str, object], name: str) -> str | Refusal | None:
    """The text of field ``name``: ``None`` when absent or blank, a :class:`Refusal` when it is
    not text. JSON bodies may carry numbers (``"to": 79161234567``); those are taken as text."""
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return Refusal(400, f"field '{name}' must be a string", name)
    value = value.strip()
    return value or None


def parse_request(fields: Mapping[str, object]) -> ClickToCall | Refusal:
    """Validate the decoded body of a click-to-call request (``from``, ``to``, ``name``).

    Fields the spec does not name are ignored (CRMs add their own). A field that is missing or
    blank is a 400 naming it, ``from`` first; so is a ``from`` that cannot be an extension id
    and a ``to`` that is no phone number. Whether the extension exists, is registered or free
    and whether ``to`` has a route is the switch's to say (404/409/429/422).
    """
    extension = _field(fields, "from")
    if isinstance(extension, Refusal):
        return extension
    if extension is None:
        return Refusal(400, "missing field 'from' (the extension to ring first)", "from")
    if not _EXTENSION_RE.match(extension):
        return Refusal(400, "malformed field 'from': not an extension number", "from")
    raw_number = _field(fields, "to")
    if isinstance(raw_number, Refusal):
        return raw_number
    if raw_number is None:
        return Refusal(400, "missing field 'to' (the number to call)", "to")
    number = normalise_number(raw_number)
    if number is None:
        return Refusal(400, "malformed field 'to': not a phone number (digits, optionally "
                            "a leading +, spaces, dashes, dots and brackets)", "to")
    name = _field(fields, "name")
    if isinstance(name, Refusal):
        return name
    caller_name = _CONTROL_RE.sub(" ", name or "").strip()[:MAX_NAME_LENGTH].strip()
    return ClickToCall(extension=extension, number=number, caller_name=caller_name)


class RepeatLimiter:
    """At most one click per extension every ``min_interval`` seconds.

    Within the interval a second click of the same extension is refused with 429, whether it
    repeats the same number (a double click, a CRM retrying) or names another one (the
    employee's phone is about to ring for the first). Only clicks that placed a call count
    (:meth:`record` after the switch accepted it): a refused click may be retried at once.
    ``min_interval`` 0 turns the limiter off. Memory is bounded by ``max_entries``.
    """

    def __init__(self, *, min_interval: float, max_entries: int = 10_000) -> None:
        self.min_interval = min_interval
        self.max_entries = max_entries
        self._last: dict[str, float] = {}

    def check(self, extension: str, now: float) -> Refusal | None:
        """The 429 refusal when ``extension`` clicked less than ``min_interval`` ago."""
        last = self._last.get(extension)
        if last is None or now - last >= self.min_interval:
            return None
        wait = max(1, round(self.min_interval - (now - last)))
        return Refusal(429, f"repeated click for extension 'from' = {extension}: wait {wait} s "
                            f"(one click per {self.min_interval:g} s)", "from")

    def record(self, extension: str, now: float) -> None:
        """Note that ``extension``'s click placed a call at ``now``."""
        if self.min_interval <= 0:
            return
        if extension not in self._last and len(self._last) >= self.max_entries:
            self._forget(now)
        self._last.pop(extension, None)  # re-inserted: the dict stays oldest-first
        self._last[extension] = now

    def _forget(self, now: float) -> None:
        horizon = now - self.min_interval
        for ext in [e for e, t in self._last.items() if t <= horizon]:
            del self._last[ext]
        if len(self._last) >= self.max_entries:
            # Still full of recent clicks (more extensions than max_entries clicking within
            # one interval): drop the oldest half rather than grow without bound.
            for ext in list(self._last)[: len(self._last) // 2]:
                del self._last[ext]
