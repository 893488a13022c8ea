"""How a call that nobody took ended: the code its caller hears and the disposition the CDR
and the CRM get (crm-telephony-api.md §1 ``disposition``), from the callee legs' failures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .leg import OutboundLeg

# How a set of callee failures is reported to the caller, best first (RFC 3261 §16.7 spirit).
_FAIL_ORDER = (486, 600, 603, 480, 408, 404, 484, 604, 403, 503, 502, 500)

# Final answers a callee leg's code may be passed on to the caller as: they say something
# about the callee or the number, which the caller can act on.
_FORWARDABLE = frozenset({403, 404, 408, 410, 480, 482, 483, 484, 485, 486, 487, 488, 503})


def caller_status(status: int, *, trunk: bool) -> int:
    """The code a callee leg's failure ``status`` is reported to the caller as.

    Codes about *our* request to the callee are not the caller's business and would
    mislead it (RFC 3261 §16.7 step 6 spirit; a B2BUA is the UAC of that request): a trunk's
    401/407 challenge we could not answer (forwarding it would make the caller send us
    credentials for the provider's realm) or 402 is the route being unusable, ``503``; a
    redirect we do not follow (3xx) means the callee cannot be reached here, ``480``; 420,
    422, 423, 481, 491 and the other refusals of our request's form, and any 5xx but 503,
    are a failure past us, ``502``. A trunk that never answers is down (``503``), not a
    callee that did not pick up. 6xx are global answers, passed on as they are.
    """
    if trunk and status == 408:
        return 503
    if status in _FORWARDABLE or 600 <= status < 700:
        return status
    if 300 <= status < 400:
        return 480
    if status in (401, 402, 407):
        return 503
    return 502


def disposition_of(code: int) -> str:
    """The CRM/CDR disposition of a callee failure reported to the caller as ``code``:
    486/600/603 ``busy``; 408/480 ``no answer``; 487 ``cancel``; the rest ``failed``."""
    if code in (486, 600, 603):
        return "busy"
    if code in (408, 480):
        return "no answer"
    if code == 487:
        return "cancel"
    return "failed"


@dataclass(frozen=True, slots=True)
class Failure:
    """One reason nobody took the call: the code the caller is told, and what it means."""

    code: int
    disposition: str


NOT_REGISTERED = Failure(480, "failed")
"""An extension with no registered phone: the caller hears 480, the CRM sees ``failed``."""
RING_TIMEOUT = Failure(480, "no answer")
AT_CAPACITY = Failure(503, "failed")
NO_ROUTE = Failure(404, "failed")




def best_failure(failures: list[Failure]) -> Failure:
    """The failure reported when every callee failed: the most telling code first (busy
    over no answer over not found ...; RFC 3261 §16.7 spirit), with its disposition."""
    codes = [f.code for f in failures]
    code = next((c for c in _FAIL_ORDER if c in codes), None)
    if code is None:
        code = codes[0] if codes else 480
    disposition = next((f.disposition for f in failures if f.code == code),
                       disposition_of(code))
    return Failure(code, disposition)


def fork_failed(forks: list[OutboundLeg], failures: list[Failure], leg: OutboundLeg,
                status: int, now: float) -> bool:
    """``leg``, one of ``forks`` (the legs of one stage, rung together), failed with
    ``status``: it leaves the stage and its reason, as the caller is told it, joins
    ``failures``. A 6xx is a global failure (RFC 3261 §16.7 step 5 spirit: the callee said
    no for all its phones): the others of the stage stop ringing. Returns whether nobody of
    the stage is left ringing."""
    forks.remove(leg)
    code = caller_status(status, trunk=bool(leg.gateway))
    failures.append(Failure(code, disposition_of(code)))
    if 600 <= status < 700:
        for other in forks:
            other.cancel(now)
        forks.clear()
    return not forks
