"""The switch's timer queue: the same heap as the SIP stack's (:mod:`softpbx.sip.timers`)."""

from __future__ import annotations

from ..sip.timers import TimerOwner, TimerQueue

__all__ = ["TimerOwner", "TimerQueue"]
