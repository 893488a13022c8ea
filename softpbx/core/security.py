"""Counting authentication failures per source address and banning noisy sources.

The log line written for each failure is meant for fail2ban (see README "Security")::

    softpbx auth failure: ip=203.0.113.7 port=5060 transport=udp method=REGISTER user="101" reason=wrong_password
"""

from __future__ import annotations

from collections import deque


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
