"""What the switch core asks its shell to carry out (STYLE.md habit 3: the shell drains them)."""

from __future__ import annotations

from dataclasses import dataclass

from ..sip.events import Flow


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


Action = SaveBinding | DeleteBinding
