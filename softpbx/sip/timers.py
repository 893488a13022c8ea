"""A timer heap for many owners (STYLE.md habit 2): the SIP stack keeps one for all its
transactions, the switch one for every call, leg and provider registration.

Owners keep a ``timers`` dict (name -> entry id); re-arming or cancelling just replaces or
drops the entry, and stale heap entries are skipped when they surface (and compacted away,
so that a cancelled long timer does not keep its owner alive).
"""

from __future__ import annotations

import heapq
import itertools
from typing import Protocol


class TimerOwner(Protocol):
    """Anything with named timers."""

    timers: dict[str, int]

    def on_timer(self, name: str, now: float) -> None: ...


class TimerQueue:
    """A heap of (when, entry, owner, name)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerOwner, str]] = []
        self._seq = itertools.count()
        self._compact_at = 1024

    def schedule(self, owner: TimerOwner, name: str, when: float) -> None:
        """Arm (or re-arm) ``owner``'s timer ``name`` at ``when``."""
        entry = next(self._seq)
        owner.timers[name] = entry
        heap = self._heap
        heapq.heappush(heap, (when, entry, owner, name))
        if len(heap) >= self._compact_at:
            self._compact()

    def _compact(self) -> None:
        # Cancelled entries stay in the heap until they surface, and with them their owner:
        # a cancelled 4-hour max-duration timer would keep its finished call alive for 4
        # hours, a cancelled 3-minute Timer C its INVITE transaction (at 300 calls/s, tens of
        # thousands of them for every collection to walk). Drop them all whenever the heap
        # has doubled (amortised O(1) per schedule).
        # In place: fire() may be walking this very list when a timer re-arms.
        heap = self._heap
        heap[:] = [e for e in heap if e[2].timers.get(e[3]) == e[1]]
        heapq.heapify(heap)
        self._compact_at = max(1024, 2 * len(heap))

    def __len__(self) -> int:
        return len(self._heap)

    @staticmethod
    def cancel(owner: TimerOwner, name: str) -> None:
        """Disarm one timer."""
        owner.timers.pop(name, None)

    @staticmethod
    def cancel_all(owner: TimerOwner) -> None:
        """Disarm every timer of ``owner``."""
        owner.timers.clear()

    def next(self) -> float | None:
        """When the earliest live timer is due."""
        heap = self._heap
        while heap:
            when, entry, owner, name = heap[0]
            if owner.timers.get(name) == entry:
                return when
            heapq.heappop(heap)
        return None

    def fire(self, now: float) -> None:
        """Run every timer due by ``now``, in order."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, entry, owner, name = heapq.heappop(heap)
            if owner.timers.get(name) != entry:
                continue
            del owner.timers[name]
            owner.on_timer(name, now)
