"""The registrar and location service (RFC 3261 §10.3), sans-IO.

It is called only for a REGISTER whose credentials were already checked by the switch; it
updates the bindings of that extension and says what to persist. Bindings live in memory (the
switch reads them on every call) and are written behind to the store.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterable

from ..config.schema import RegistrarSettings
from ..sip.errors import ParseError, SipError
from ..sip.events import Flow
from ..sip.headers import NameAddr, format_params
from ..sip.message import Request
from .events import Action, Binding, DeleteBinding, SaveBinding

log = logging.getLogger("softpbx.registrar")


class IntervalTooBrief(SipError):
    """RFC 3261 §10.3 step 7: an expiry below Min-Expires (``423``)."""

    status_hint = 423


def binding_key(contact: NameAddr) -> str:
    """Identity of a contact: RFC 5626 instance + reg-id, else the URI without volatile params."""
    inst = contact.params.get("+sip.instance")
    if inst:
        return f"{inst}|{contact.params.get('reg-id', '')}"
    uri = contact.uri
    port = uri.port or (5061 if uri.scheme == "sips" else 5060)
    return f"{uri.scheme}:{uri.user}@{uri.host_bare}:{port};{uri.transport or ''}"


class Registrar:
    """Bindings per extension, their expiry, and the REGISTER logic."""

    def __init__(self, *, settings: RegistrarSettings) -> None:
        self.settings = settings
        self._bindings: dict[str, dict[str, Binding]] = {}
        self._expiry: list[tuple[float, str, str]] = []

    # -- queries ------------------------------------------------------------------------------
    def lookup(self, aor: str, now: float) -> list[Binding]:
        """Live bindings of extension ``aor``, newest first."""
        table = self._bindings.get(aor)
        if not table:
            return []
        return sorted((b for b in table.values() if b.expires_at > now),
                      key=lambda b: b.expires_at, reverse=True)

    @property
    def binding_count(self) -> int:
        """How many bindings are held."""
        return sum(len(t) for t in self._bindings.values())

    def next_expiry(self) -> float | None:
        """When the earliest binding may lapse (an extended one is re-checked then)."""
        heap = self._expiry
        while heap:
            when, aor, key = heap[0]
            if key in self._bindings.get(aor, {}):
                return when
            heapq.heappop(heap)
        return None

    # -- inputs -------------------------------------------------------------------------------
    def load(self, bindings: Iterable[Binding]) -> None:
        """Install bindings read back from the store at start-up."""
        for b in bindings:
            self._put(b)

    def expire(self, now: float) -> list[Action]:
        """Drop every binding that lapsed by ``now``."""
        actions: list[Action] = []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            when, aor, key = heapq.heappop(heap)
            table = self._bindings.get(aor)
            b = table.get(key) if table else None
            if b is None:
                continue
            if b.expires_at > now:
                # Refreshed since this entry was pushed: one entry per binding, re-pushed here.
                heapq.heappush(heap, (b.expires_at, aor, key))
                continue
            del table[key]  # type: ignore[union-attr]
            if not table:
                del self._bindings[aor]
            log.info("binding expired: %s %s", aor, b.contact)
            actions.append(DeleteBinding(aor, key))
        return actions

    def register(self, req: Request, aor: str, flow: Flow, now: float) -> tuple[list[tuple[str, str]], list[Action]]:
        """Apply an authenticated REGISTER for extension ``aor``.

        Returns the extra headers of the ``200`` (every current Contact with its expiry) and
        the store actions. Raises :class:`SipError` (400/423/500) when it must be refused.
        """
        s = self.settings
        contacts = req.contacts
        header_expires = req.expires
        call_id = req.call_id
        cseq = req.cseq.number
        actions: list[Action] = []
        table = self._bindings.get(aor, {})
        if contacts is None:
            # RFC 3261 §10.3 step 6: "*" only with Expires: 0.
            if header_expires != 0:
                raise ParseError("Contact: * requires Expires: 0")
            for key, b in list(table.items()):
                if b.call_id == call_id and cseq <= b.cseq:
                    continue
                del table[key]
                actions.append(DeleteBinding(aor, key))
            if not table:
                self._bindings.pop(aor, None)
            log.info("unregistered all: %s (%s)", aor, flow)
            return self._contact_headers(aor, now), actions
        # Validate all first: the request is atomic (RFC 3261 §10.3 step 6).
        plan: list[tuple[NameAddr, str, int]] = []
        for c in contacts:
            if not c.uri.is_sip:
                raise ParseError("Contact is not a SIP URI")
            exp_s = c.params.get("expires")
            if exp_s is not None:
                if not (exp_s.isascii() and exp_s.isdigit()) or len(exp_s) > 10:
                    raise ParseError("Bad Contact expires")
                expires = int(exp_s)
            elif header_expires is not None:
                expires = header_expires
            else:
                expires = s.default_expires
            if 0 < expires < s.min_expires:
                raise IntervalTooBrief("Interval Too Brief")
            expires = min(expires, s.max_expires)
            key = binding_key(c)
            old = table.get(key)
            if old is not None and old.call_id == call_id and cseq <= old.cseq:
                raise SipError("Out of order REGISTER", 500)
            plan.append((c, key, expires))
        ua = req.get("user-agent") or ""
        for c, key, expires in plan:
            if expires == 0:
                if table.pop(key, None) is not None:
                    actions.append(DeleteBinding(aor, key))
                    log.info("unregistered: %s %s (%s)", aor, c.uri, flow)
                continue
            params = {k: v for k, v in c.params.items() if k not in ("expires", "q")}
            b = Binding(aor=aor, contact=str(c.uri), key=key, expires_at=now + expires,
                        call_id=call_id, cseq=cseq, flow=flow, q=c.params.get("q"),
                        user_agent=ua, params=format_params(params))
            old_b = table.get(key)
            is_new = old_b is None
            table[key] = b
            if old_b is None or b.expires_at < old_b.expires_at:
                heapq.heappush(self._expiry, (b.expires_at, aor, key))
            actions.append(SaveBinding(b))
            if is_new:
                log.info("registered: %s %s via %s expires %ds", aor, b.contact, flow, expires)
        # Keep at most max_contacts: the bindings closest to lapsing go first.
        while len(table) > s.max_contacts:
            victim = min(table.values(), key=lambda b: b.expires_at)
            del table[victim.key]
            actions.append(DeleteBinding(aor, victim.key))
        if table:
            self._bindings[aor] = table
        else:
            self._bindings.pop(aor, None)
        return self._contact_headers(aor, now), actions

    def _contact_headers(self, aor: str, now: float) -> list[tuple[str, str]]:
        return [("Contact", f"<{b.contact}>{b.params};expires={b.expires_in(now)}")
                for b in self.lookup(aor, now)]

    def _put(self, b: Binding) -> None:
        self._bindings.setdefault(b.aor, {})[b.key] = b
        heapq.heappush(self._expiry, (b.expires_at, b.aor, b.key))
