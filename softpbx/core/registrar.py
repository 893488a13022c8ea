"""The registrar and location service (RFC 3261 §10.3), sans-IO.

It is called only for a REGISTER whose credentials were already checked by the switch; it
updates the bindings of that extension and says what to persist. Bindings live in memory (the
switch reads them on every call) and are written behind to the store.

Flows (RFC 5626): a phone registered over TCP is reached on the connection its REGISTER came
in on -- behind NAT it cannot accept a new one. When the shell reports that connection closed
(:meth:`Registrar.flow_closed`), the binding's flow is known dead:

* an outbound binding (``;ob`` in the Contact, or ``reg-id``; RFC 5626 §4.4.1: such a phone
  notices the failure and registers again over a new flow at once) is no longer offered;
* any other binding whose Contact names the very IP the REGISTER came from (a phone not behind
  NAT) is reached by a new TCP connection to its Contact's port, as RFC 3261 §18.1.1 says;
* a binding whose Contact names another address (a private one behind NAT, or anybody's) is
  not offered either: softpbx never connects to an address a peer only wrote into a message.

A binding not offered keeps its row (the store, the expiry heap) until it expires or the phone
registers again, which revives it; a call to an extension left with no binding offered fails
at once with ``480`` instead of waiting 32 s for Timer B.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections.abc import Iterable

from ..config.schema import RegistrarSettings, Transport
from ..sip.errors import ParseError, SipError
from ..sip.events import Flow
from ..sip.headers import NameAddr, format_params, parse_params
from ..sip.message import Request
from ..sip.uri import parse_uri
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
        self._by_flow: dict[Flow, set[tuple[str, str]]] = {}
        """Stream flow -> (aor, key) of the bindings registered over it (possibly stale:
        checked against the binding's flow when the flow closes, and dropped then)."""
        self._dead: set[tuple[str, str]] = set()
        """(aor, key) of bindings whose flow closed since they were last registered."""

    # -- queries ------------------------------------------------------------------------------
    def lookup(self, aor: str, now: float) -> list[Binding]:
        """Bindings of extension ``aor`` a call can reach, newest first (see the module
        docstring for those whose connection closed)."""
        live = self._live(aor, now)
        if not self._dead:
            return live
        out = []
        for b in live:
            if (aor, b.key) in self._dead:
                b = _reachable_after_close(b)  # type: ignore[assignment]
                if b is None:
                    continue
            out.append(b)
        return out

    def flow_dead(self, aor: str, key: str) -> bool:
        """Whether the connection binding ``key`` of ``aor`` registered over has closed."""
        return (aor, key) in self._dead

    def holds_binding(self, flow: Flow, now: float) -> bool:
        """Whether stream ``flow`` carries a binding that has not lapsed: the shell keeps
        such a connection open past its idle timeout (the phone is reached over it only)."""
        for aor, key in self._by_flow.get(flow, ()):
            b = self._bindings.get(aor, {}).get(key)
            if b is not None and b.flow == flow and b.expires_at > now:
                return True
        return False

    def _live(self, aor: str, now: float) -> list[Binding]:
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

    def flow_closed(self, flow: Flow) -> int:
        """The shell says stream ``flow`` closed: the bindings registered over it have a dead
        flow (RFC 5626 §4.4.1 / §5.3). Returns how many bindings that concerned."""
        refs = self._by_flow.pop(flow, None)
        if not refs:
            return 0
        n = 0
        for aor, key in refs:
            b = self._bindings.get(aor, {}).get(key)
            if b is None or b.flow != flow:
                continue  # gone, or registered again over another connection since
            self._dead.add((aor, key))
            n += 1
            how = ("reached by a new connection to its Contact"
                   if _reachable_after_close(b) is not None else "not offered to calls")
            log.info("binding %s %s: connection %s closed; %s until it registers again",
                     aor, b.contact, flow, how)
        return n

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
            self._dead.discard((aor, key))
            if not table:
                del self._bindings[aor]
            log.info("binding expired: %s %s", aor, b.contact)
            actions.append(DeleteBinding(aor, key))
        return actions

    def drop(self, aor: str) -> list[Action]:
        """Forget every binding of ``aor`` (its extension was removed by a reload)."""
        table = self._bindings.pop(aor, None) or {}
        for key in table:
            self._dead.discard((aor, key))
        # Heap and flow index entries are stale now and skipped where they are read.
        return [DeleteBinding(aor, key) for key in table]

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
                self._dead.discard((aor, key))
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
                self._dead.discard((aor, key))
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
            self._dead.discard((aor, key))  # registered again: over a live flow
            self._index(b)
            if old_b is None or b.expires_at < old_b.expires_at:
                heapq.heappush(self._expiry, (b.expires_at, aor, key))
            actions.append(SaveBinding(b))
            if is_new:
                log.info("registered: %s %s via %s expires %ds", aor, b.contact, flow, expires)
        # Keep at most max_contacts: the bindings closest to lapsing go first.
        while len(table) > s.max_contacts:
            victim = min(table.values(), key=lambda b: b.expires_at)
            del table[victim.key]
            self._dead.discard((aor, victim.key))
            actions.append(DeleteBinding(aor, victim.key))
        if table:
            self._bindings[aor] = table
        else:
            self._bindings.pop(aor, None)
        return self._contact_headers(aor, now), actions

    def _contact_headers(self, aor: str, now: float) -> list[tuple[str, str]]:
        # RFC 3261 §10.3 step 8: every current binding, reachable at the moment or not.
        return [("Contact", f"<{b.contact}>{b.params};expires={b.expires_in(now)}")
                for b in self._live(aor, now)]

    def _put(self, b: Binding) -> None:
        self._bindings.setdefault(b.aor, {})[b.key] = b
        heapq.heappush(self._expiry, (b.expires_at, b.aor, b.key))
        self._index(b)

    def _index(self, b: Binding) -> None:
        if b.flow.reliable:
            self._by_flow.setdefault(b.flow, set()).add((b.aor, b.key))


def is_outbound(b: Binding) -> bool:
    """RFC 5626 §4.2: the phone asked for outbound (``ob`` in its Contact URI, or a
    ``reg-id`` contact parameter): its flow is the only way to reach it."""
    try:
        return "reg-id" in parse_params(b.params) or "ob" in parse_uri(b.contact).params
    except SipError:
        return True  # unreadable: do not guess an address to connect to


def _reachable_after_close(b: Binding) -> Binding | None:
    """Where a binding whose connection closed can still be reached, if anywhere: RFC 3261
    §18.1.1 opens a new connection to the Contact, which is safe only when the Contact names
    the IP the REGISTER came from (not behind NAT; nobody else's address)."""
    if is_outbound(b):
        return None
    try:
        uri = parse_uri(b.contact)
    except SipError:
        return None
    host = uri.host_bare.lower()
    if host != b.flow.remote[0].lower():
        return None
    tls = b.flow.transport is Transport.TLS
    port = uri.port or (5061 if tls or uri.scheme == "sips" else 5060)
    # The same transport it registered over: a TLS phone is reconnected over TLS.
    return dataclasses.replace(b, flow=Flow(b.flow.transport, (host, port), b.flow.local))
