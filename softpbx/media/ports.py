"""RTP/RTCP port pair allocation over ``[rtp_start_port, rtp_end_port]``.

RFC 3550 §11: RTP on an even port, RTCP on the next (odd) one. Pairs are handed out
round-robin -- a released pair goes to the back of the line -- so a port is not reused while
late packets of the call that had it may still be in flight. Allocation and release are O(1).
Sans-IO: binding is the shell's job; when a bind fails it releases the pair and asks for the
next one.
"""

from __future__ import annotations

from collections import deque

from softpbx.config.schema import MediaSettings

__all__ = ["PortAllocator", "PortRangeExhausted"]


class PortRangeExhausted(RuntimeError):
    """Every RTP port pair of the range is in use; a call needing media gets ``503``."""

    status_hint: int = 503


class PortAllocator:
    """Even/odd RTP/RTCP port pairs from a range, round-robin, O(1) allocate and release."""

    __slots__ = ("_free", "_in_use", "end", "start")

    def __init__(self, *, start: int, end: int) -> None:
        """Pairs ``(p, p + 1)`` with ``p`` even and ``start <= p``, ``p + 1 <= end``."""
        first = start + (start & 1)
        if not 0 < first < end <= 65535:
            raise ValueError(f"bad RTP port range {start}..{end}")
        self.start = first
        self.end = end
        self._free: deque[int] = deque(range(first, end, 2))
        self._in_use: set[int] = set()

    @classmethod
    def from_settings(cls, settings: MediaSettings) -> PortAllocator:
        """An allocator over ``settings.rtp_start_port .. settings.rtp_end_port``."""
        return cls(start=settings.rtp_start_port, end=settings.rtp_end_port)

    @property
    def capacity(self) -> int:
        """Number of pairs in the range."""
        return len(self._free) + len(self._in_use)

    @property
    def free_count(self) -> int:
        """Pairs available now."""
        return len(self._free)

    @property
    def in_use_count(self) -> int:
        """Pairs allocated and not yet released."""
        return len(self._in_use)

    def allocate(self) -> int:
        """The RTP (even) port of a free pair; RTCP is that port + 1.

        Raises :class:`PortRangeExhausted` when none is free.
        """
        if not self._free:
            raise PortRangeExhausted(f"no free RTP port pair in {self.start}..{self.end}")
        port = self._free.popleft()
        self._in_use.add(port)
        return port

    def release(self, port: int) -> None:
        """Give the pair of RTP port ``port`` back; it is reused after every other free pair.

        Releasing a port that is not allocated is a bug and raises ``ValueError``.
        """
        try:
            self._in_use.remove(port)
        except KeyError:
            raise ValueError(f"RTP port {port} is not allocated") from None
        self._free.append(port)
