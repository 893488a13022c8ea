"""Counting authentication failures per source address and banning noisy sources.

The log line written for each failure is meant for fail2ban (see README "Security")::

    softpbx auth failure: ip=203.0.113.7 port=5060 transport=udp method=REGISTER user="101" reason=wrong_password
"""

from __future__ import annotations

import logging
from collections import deque

from .timers import TimerQueue


def loggable(text: str, limit: int = 64) -> str:
    """``text`` from a peer, safe inside a quoted log field: at most ``limit`` characters,
    control and non-ASCII characters escaped, no double quote. A username with a newline must
    not forge a second failure line that bans someone else's address (fail2ban reads them)."""
    return ascii(text[:limit])[1:-1].replace('"', "'")


class FailureTracker:
    """Sliding-window failure counter with temporary bans, keyed by source IP."""

    def __init__(self, *, max_failures: int, window: float, ban_time: float,
                 max_sources: int = 100_000) -> None:
        self.max_failures = max_failures
        self.window = window
        self.ban_time = ban_time
        self.max_sources = max_sources
        self._fails: dict[str, deque[float]] = {}
        self._banned: dict[str, float] = {}
        self.failures_total = 0
        """Failures recorded since start (metrics)."""
        self.bans_total = 0
        """Bans started since start (metrics)."""

    @property
    def banned_count(self) -> int:
        """Sources banned now or until their next look-up (an expired ban lapses lazily)."""
        return len(self._banned)

    def is_banned(self, ip: str, now: float) -> bool:
        """Whether ``ip`` is banned at ``now``."""
        until = self._banned.get(ip)
        if until is None:
            return False
        if now >= until:
            del self._banned[ip]
            return False
        return True

    def record_failure(self, ip: str, now: float) -> bool:
        """Count a failure; return True when this failure starts a ban."""
        self.failures_total += 1
        if self.max_failures <= 0:
            return False
        q = self._fails.get(ip)
        if q is None:
            if len(self._fails) >= self.max_sources:
                self._evict(now)
            q = self._fails[ip] = deque()
        q.append(now)
        horizon = now - self.window
        while q and q[0] < horizon:
            q.popleft()
        if len(q) >= self.max_failures:
            del self._fails[ip]
            self._banned[ip] = now + self.ban_time
            self.bans_total += 1
            return True
        return False

    def _evict(self, now: float) -> None:
        horizon = now - self.window
        for ip in [ip for ip, q in self._fails.items() if not q or q[-1] < horizon]:
            del self._fails[ip]
        if len(self._fails) >= self.max_sources:
            # Still full of live sources: forget the oldest half rather than grow without bound.
            for ip in list(self._fails)[: len(self._fails) // 2]:
                del self._fails[ip]


class RateLimitedLog:
    """Per-source rate limit for a repeated warning (sans-IO: every call takes ``now``).

    The first line for a source is written; more within ``interval`` seconds are only
    counted, and when the interval ends one summary line says how many were left out (then a
    new interval starts while they keep coming). A peer sending garbage in a loop costs one
    line per ``interval``, not one per message. Summaries are written by the switch's timer
    (``timers``); without one, when the next line for any source is offered. At most
    ``max_sources`` sources are tracked: the oldest interval is closed early past that.
    """

    def __init__(self, *, logger: logging.Logger, interval: float, timers: TimerQueue | None = None,
                 what: str = "messages", max_sources: int = 10_000) -> None:
        self.logger = logger
        self.interval = interval
        self.what = what
        self.max_sources = max_sources
        self.timers: dict[str, int] = {}
        """Our entry in ``timers`` (TimerOwner)."""
        self._queue = timers
        self._armed_at: float | None = None
        self._suppressed: dict[str, int] = {}
        """Source -> lines left out in its current interval."""
        self._ends: deque[tuple[float, str]] = deque()
        """(end of interval, source), in time order: intervals all last ``interval``."""

    def warning(self, source: str, now: float, msg: str, *args: object) -> bool:
        """Log ``msg % args`` for ``source`` unless one was logged in its current interval;
        return whether it was written."""
        self._close_due(now)
        n = self._suppressed.get(source)
        if n is not None:
            self._suppressed[source] = n + 1
            return False
        if len(self._suppressed) >= self.max_sources:
            self._close(*self._ends.popleft(), now)
        self.logger.warning(msg, *args)
        self._open(source, now)
        return True

    def on_timer(self, name: str, now: float) -> None:
        """The switch's timer: write the summaries that are due."""
        self._armed_at = None
        self._close_due(now)
        self._arm()

    @property
    def tracked(self) -> int:
        """Sources with an open interval."""
        return len(self._suppressed)

    def _open(self, source: str, now: float) -> None:
        self._suppressed[source] = 0
        self._ends.append((now + self.interval, source))
        self._arm()

    def _close_due(self, now: float) -> None:
        ends = self._ends
        while ends and ends[0][0] <= now:
            self._close(*ends.popleft(), now)

    def _close(self, end: float, source: str, now: float) -> None:
        n = self._suppressed.pop(source, 0)
        if n:
            self.logger.warning("%d more rejected %s from %s not logged in %g s", n, self.what,
                                source, self.interval)
            self._open(source, now)  # still at it: keep counting rather than log the next

    def _arm(self) -> None:
        q = self._queue
        if q is None or not self._ends:
            return
        when = self._ends[0][0]
        if when != self._armed_at:
            q.schedule(self, "summary", when)
            self._armed_at = when
