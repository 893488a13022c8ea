"""Plain-integer counters the switch keeps for the metrics (``GET /metrics``).

The hot paths count here in ints and dicts -- no metrics library, no lock, no clock -- and the
shell's collector (:mod:`softpbx.aio.metrics`) turns them into Prometheus families at scrape
time, so a call or a packet costs what it did before metrics existed.
"""

from __future__ import annotations

from bisect import bisect_left

SETUP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
"""Call setup time bounds in seconds: from the caller's INVITE to the answer (a phone rings for
seconds, so the buckets reach a minute, where the no-answer timers usually end it)."""


class Histogram:
    """Cumulative-at-scrape histogram in plain ints: ``observe`` adds to one bucket."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        """Upper bounds, ascending; a value above the last one counts in ``+Inf`` only."""
        self.counts = [0] * (len(bounds) + 1)
        """Per bucket (not cumulative): ``counts[i]`` holds values in ``(bounds[i-1],
        bounds[i]]``, the last slot those above every bound."""
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count one observation."""
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus "le").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, count of values <= it)`` for every bound, then ``(inf, count)``."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class CallStats:
    """Calls ended, by direction and disposition, and their setup times."""

    __slots__ = ("ended", "setup")

    def __init__(self) -> None:
        self.ended: dict[tuple[str, str], int] = {}
        """(direction, disposition) -> calls ended so (``answered``, ``busy``, ...)."""
        self.setup = Histogram(SETUP_BUCKETS)
        """Seconds from the call's creation (its INVITE, or the click) to the answer."""

    def call_ended(self, direction: str, disposition: str, created_at: float,
                   answered_at: float | None) -> None:
        """One call is over (its CDR is being written)."""
        key = (direction, disposition)
        self.ended[key] = self.ended.get(key, 0) + 1
        if answered_at is not None:
            self.setup.observe(max(0.0, answered_at - created_at))
