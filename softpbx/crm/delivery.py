"""When each outbox event may be sent, and what an attempt's answer means. Pure: the shell's
worker (:mod:`softpbx.aio.outbox`) does the IO and passes ``now`` in.

- Order per call: only the oldest held event of a call is ever eligible, and only once the
  one before it is settled (delivered, failed or given up). Different calls never wait for
  each other.
- Retries: network errors, timeouts, 408, 429 and 5xx are retried with exponential backoff
  and jitter between ``retry_min_s`` and ``retry_max_s``, until ``give_up_after_h`` after the
  event was created; any other answer that is not a 2xx fails the event at once.
"""

from __future__ import annotations

import collections
import heapq
import itertools
from dataclasses import dataclass
from enum import StrEnum

from ..store.outbox import OutboxRow, RowUpdate


class Verdict(StrEnum):
    """What one attempt's outcome means for its event."""

    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"


def classify(status: int | None) -> Verdict:
    """``status`` None: no answer (network error, timeout). A 2xx is final; 408 Request
    Timeout, 429 Too Many Requests and 5xx are the server saying "later" (RFC 9110 §15.5.9,
    RFC 6585 §4, §15.6); other answers (3xx, 4xx) will not change by sending again."""
    if status is None or status in (408, 429) or 500 <= status <= 599:
        return Verdict.RETRY
    if 200 <= status <= 299:
        return Verdict.DELIVERED
    return Verdict.FAILED


def backoff(attempts: int, *, min_s: float, max_s: float, rand: float) -> float:
    """Seconds before the retry after ``attempts`` failed attempts: ``min_s`` doubled per
    attempt, capped at ``max_s``, then jittered down to half (``rand`` in [0, 1)) so that
    events that failed together (a CRM outage) do not all come back together; never below
    ``min_s``."""
    base = min(max_s, min_s * 2.0 ** min(max(attempts - 1, 0), 60))
    return max(min_s, base * (0.5 + 0.5 * rand))


@dataclass(frozen=True, slots=True)
class Policy:
    """``[crm]`` delivery settings, in seconds."""

    retry_min_s: float
    retry_max_s: float
    give_up_s: float


def settle(row: OutboxRow, *, status: int | None, error: str, latency_ms: float | None,
           now: float, policy: Policy, rand: float) -> tuple[Verdict, RowUpdate]:
    """Record one attempt's outcome on ``row`` and decide its new state.

    A retry is never scheduled past the give-up time: the last attempt happens at it, and
    an event still failing then is given up."""
    row.attempts += 1
    row.last_status = status
    row.last_error = error
    row.last_latency_ms = latency_ms
    verdict = classify(status)
    if verdict is Verdict.DELIVERED:
        row.state, row.delivered_at = "delivered", now
    elif verdict is Verdict.FAILED:
        row.state = "failed"
    else:
        deadline = row.created_at + policy.give_up_s
        if now >= deadline:
            row.state = "given_up"
        else:
            delay = backoff(row.attempts, min_s=policy.retry_min_s,
                            max_s=policy.retry_max_s, rand=rand)
            row.next_attempt_at = min(now + delay, deadline)
    return verdict, RowUpdate(id=row.id, state=row.state, attempts=row.attempts,
                              next_attempt_at=row.next_attempt_at, last_status=status,
                              last_error=error, last_latency_ms=latency_ms,
                              delivered_at=row.delivered_at)


class DeliveryQueue:
    """The held events, per call in outbox order, and which call's head is due when."""

    def __init__(self) -> None:
        self._calls: dict[str, list[OutboxRow]] = {}
        self._busy: set[str] = set()
        self._due: list[tuple[float, int, str, int]] = []
        self._urgent: collections.deque[OutboxRow] = collections.deque()
        self._order = itertools.count()
        self.held = 0
        """Events held (all calls, in flight included)."""
        self._ids: set[int] = set()

    def __contains__(self, row_id: int) -> bool:
        return row_id in self._ids

    @property
    def in_flight(self) -> int:
        """Calls with an attempt under way (one each at most)."""
        return len(self._busy)

    def add(self, row: OutboxRow) -> None:
        """Hold ``row`` (pending; due at ``row.next_attempt_at``) behind the earlier events
        of its call."""
        if row.id in self._ids:
            return
        self._ids.add(row.id)
        self.held += 1
        queue = self._calls.setdefault(row.pbx_call_id, [])
        pos = len(queue)
        while pos > 0 and queue[pos - 1].id > row.id:
            pos -= 1
        if pos == 0 and queue and row.pbx_call_id in self._busy:
            pos = 1  # a re-queued older event goes after the attempt under way
        queue.insert(pos, row)
        if pos == 0:
            self._schedule(row)

    def _schedule(self, row: OutboxRow) -> None:
        if row.wants_answer:
            # A live call waits for this NOTIFY_START's answer: it goes before every other
            # due event (after an outage thousands may be due; the call cannot wait for them).
            self._urgent.append(row)
            return
        heapq.heappush(self._due, (row.next_attempt_at, next(self._order), row.pbx_call_id,
                                   row.id))

    def _urgent_head(self) -> OutboxRow | None:
        urgent = self._urgent
        while urgent:
            row = urgent[0]
            queue = self._calls.get(row.pbx_call_id)
            if queue and queue[0] is row and row.pbx_call_id not in self._busy:
                return row
            urgent.popleft()  # stale
        return None

    def next_due(self) -> float | None:
        """When the earliest waiting head is due (``None``: nothing waits)."""
        urgent = self._urgent_head()
        if urgent is not None:
            return urgent.next_attempt_at
        due = self._due
        while due:
            at, _, call, row_id = due[0]
            queue = self._calls.get(call)
            if (queue and queue[0].id == row_id and call not in self._busy
                    and queue[0].next_attempt_at == at):
                return at
            heapq.heappop(due)  # stale: settled, re-scheduled or overtaken
        return None

    def pop_due(self, now: float) -> OutboxRow | None:
        """The next event to send now (its call is then busy until :meth:`done` or
        :meth:`later`), or ``None``."""
        urgent = self._urgent_head()
        if urgent is not None:
            self._urgent.popleft()
            self._busy.add(urgent.pbx_call_id)
            return urgent
        at = self.next_due()
        if at is None or at > now:
            return None
        _, _, call, _ = heapq.heappop(self._due)
        self._busy.add(call)
        return self._calls[call][0]

    def done(self, row: OutboxRow) -> None:
        """``row`` (its call's head, just attempted) is settled: the next event of the call
        becomes eligible."""
        call = row.pbx_call_id
        self._busy.discard(call)
        queue = self._calls.get(call, [])
        if queue and queue[0] is row:
            queue.pop(0)
            self._ids.discard(row.id)
            self.held -= 1
        if queue:
            self._schedule(queue[0])
        else:
            self._calls.pop(call, None)

    def later(self, row: OutboxRow) -> None:
        """``row`` stays its call's head, due again at ``row.next_attempt_at``."""
        self._busy.discard(row.pbx_call_id)
        queue = self._calls.get(row.pbx_call_id, [])
        if queue:
            self._schedule(queue[0])
