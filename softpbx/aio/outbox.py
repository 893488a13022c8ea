"""The durable webhook outbox worker: every ``SendWebhook`` is committed to the outbox table
before its first attempt, then POSTed until the CRM confirms it (2xx), refuses it (4xx) or
``crm.give_up_after_h`` passes (crm-telephony-api.md §1; issue 9 "a durable outbox").

- Commit first: events submitted during one loop tick are inserted in one small
  transaction (directly, or by the outbox's writer thread when the database is locked:
  :class:`~softpbx.store.outbox.OutboxDb`); an event is attempted only once its row is
  committed, so a ``kill -9`` at any moment loses nothing that was handed over. A 2xx is
  written back as ``delivered`` within 20 ms; an event confirmed but killed before that
  write is sent again after the restart (``X-Event-Id`` lets the CRM drop the copy):
  at-least-once, never "maybe never".
- Bounded memory: at most ``window`` events are held in memory (plus the NOTIFY_STARTs of
  live calls waiting for their answer); the rest stay in SQLite and are paged back in, in
  outbox order, as the held ones settle. A day-long outage costs disk, not RAM.
- Order and concurrency: :class:`~softpbx.crm.delivery.DeliveryQueue` (one event per call
  at a time, oldest first; calls independent) and ``crm.max_in_flight`` requests at most.
- The NOTIFY_START answer: the first attempt's outcome of an event with ``wants_answer``
  is handed to ``on_answer`` (parsed body on 2xx, else a failure), once.

Times in the table are wall-clock (``clock``, injectable), so backoff and give-up survive
restarts; after a restart every pending event is due at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Protocol

from ..config.schema import CrmSettings
from ..core.events import SendWebhook
from ..core.notify import CrmAnswer, parse_answer
from ..crm.delivery import DeliveryQueue, Policy, Verdict, settle
from ..crm.webhook import AttemptResult
from ..store.outbox import OutboxDb, OutboxRow, RowUpdate

log = logging.getLogger("softpbx.webhook")

WINDOW = 2000
"""Events held in memory by default (the rest wait in SQLite)."""
UPDATE_BATCH_S = 0.02
"""Seconds attempt outcomes are gathered before they are written."""
KEEP_DELIVERED_S = 7 * 86400.0
"""Delivered events stay visible in /api/webhooks this long, then are deleted."""
KEEP_SETTLED_S = 30 * 86400.0
"""Failed and given-up events stay this long (an operator may re-queue them meanwhile)."""
PURGE_EVERY_S = 3600.0
DIRECT_INSERT_MAX = 32
"""Events of one tick committed on the loop thread at most (more go to the writer thread)."""


class Sender(Protocol):
    """What posts one attempt (:class:`~softpbx.crm.webhook.WebhookSender`; fakes in tests)."""

    async def post(self, *, event_id: str, event: str,
                   fields: tuple[tuple[str, str], ...]) -> AttemptResult:
        """One POST; never raises for network trouble (it is in the result)."""

    async def close(self) -> None:
        """Release connections."""


class Outbox:
    """The worker: submit events from the loop thread, ``await start()`` / ``await stop()``."""

    def __init__(self, *, settings: CrmSettings, db: OutboxDb, sender: Sender,
                 loop: asyncio.AbstractEventLoop,
                 on_answer: Callable[[str, CrmAnswer], None],
                 clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random, window: int = WINDOW) -> None:
        self.settings = settings
        self.db = db
        self.sender = sender
        self.loop = loop
        self.on_answer = on_answer
        self.clock = clock
        self.rand = rand
        self.window = max(2, window)
        self.policy = Policy(retry_min_s=settings.retry_min_s, retry_max_s=settings.retry_max_s,
                             give_up_s=settings.give_up_after_h * 3600.0)
        self._events = frozenset(settings.events)
        self._queue = DeliveryQueue()
        self._inserts: list[SendWebhook] = []
        self._updates: list[RowUpdate] = []
        self._flush_soon = False
        # Paging (see _inserted/_paged): rows with id <= _paged_upto are held or settled;
        # while _overflow, newer rows wait in SQLite unless held as _extra (id > _paged_upto).
        self._overflow = True
        self._paged_upto = 0
        self._paging = False
        self._extra: set[int] = set()
        self._max_unheld = 0
        """The newest row left in SQLite by _inserted (overflow): paging must reach it."""
        self._queued_inserts = 0
        """Insert batches on the writer thread, not back yet (direct inserts wait for them:
        rows must be committed in submission order)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._update_timer: asyncio.TimerHandle | None = None
        self._purge_timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.attempts = 0
        self.delivered = 0
        self.failed = 0
        self.given_up = 0
        self.committed = 0
        """Counters since start (benchmarks, status)."""

    # -- the loop thread's API ----------------------------------------------------------------
    @property
    def held(self) -> int:
        """Events held in memory now."""
        return self._queue.held

    @property
    def in_flight(self) -> int:
        """Attempts under way."""
        return self._queue.in_flight

    def start(self) -> None:
        """Page in what an earlier run left pending (delivered as soon as it is read); purge
        old settled events now and hourly (the table would otherwise only grow)."""
        self._page_in()
        self._purge()

    def _purge(self) -> None:
        if self._closed:
            return
        now = self.clock()

        def purged(n: int) -> None:
            if n:
                log.info("outbox: %d old delivered/failed events deleted", n)

        self.db.purge(delivered_before=now - KEEP_DELIVERED_S,
                      settled_before=now - KEEP_SETTLED_S, then=purged)
        self._purge_timer = self.loop.call_later(PURGE_EVERY_S, self._purge)

    def submit(self, action: SendWebhook) -> None:
        """Commit ``action`` to the outbox (this tick's batch), then deliver it."""
        if self._closed or action.event not in self._events:
            if action.wants_answer:  # nothing will be asked: the call routes normally now
                why = "outbox stopped" if self._closed else f"{action.event} not in crm.events"
                self.loop.call_soon(self.on_answer, action.pbx_call_id, CrmAnswer.failed(why))
            return
        self._inserts.append(action)
        self._flush_later()

    def retry(self, row_id: int) -> asyncio.Future[OutboxRow | str]:
        """``POST /api/webhooks/<id>/retry``: re-queue a failed or given-up event; the future
        gets its row, or why not (``unknown``, or its state)."""
        fut: asyncio.Future[OutboxRow | str] = self.loop.create_future()

        def requeued(result: OutboxRow | str) -> None:
            if isinstance(result, OutboxRow) and not self._closed:
                if result.id > self._paged_upto:
                    self._extra.add(result.id)
                self._queue.add(result)
                log.info("webhook %s %s (id %d) re-queued by the operator", result.event,
                         result.pbx_call_id, result.id)
                self._pump()
            if not fut.done():
                fut.set_result(result)

        self._flush()  # outcomes not yet written go first: the requeue sees the real state
        self.db.requeue(row_id, at=self.clock(), then=requeued)
        return fut

    # -- the HTTP API (softpbx.http.webhooks.WebhookOutbox) ----------------------------------
    def rows(self, *, state: str, pbx_call_id: str, before_id: int,
             limit: int) -> list[dict[str, object]]:
        """Blocking (an executor): outbox rows, newest first."""
        return [r.as_json() for r in self.db.query(state=state, pbx_call_id=pbx_call_id,
                                                   before_id=before_id, limit=limit)]

    def counts(self) -> dict[str, int]:
        """Blocking: events per state, and how many are held in memory / in flight."""
        return {**self.db.counts(), "held_in_memory": self.held, "in_flight": self.in_flight}

    async def requeue(self, row_id: int) -> dict[str, object] | str:
        """Re-queue a failed or given-up event: its row, or why not."""
        result = await self.retry(row_id)
        return result.as_json() if isinstance(result, OutboxRow) else result

    async def stop(self) -> None:
        """Stop sending: attempts under way are abandoned (their events stay pending);
        events submitted so far are committed before the writer stops."""
        self._closed = True
        for timer in (self._timer, self._update_timer, self._purge_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._update_timer = self._purge_timer = None
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._flush()
        await self.loop.run_in_executor(None, self.db.close)
        await self.sender.close()

    # -- commit ---------------------------------------------------------------------------------
    def _flush_later(self) -> None:
        if not self._flush_soon:
            self._flush_soon = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        if self._inserts:
            batch, self._inserts = self._inserts, []
            rows = None
            # A big batch (a burst of hang-ups at shutdown) goes to the writer thread: the
            # loop is not held for more than a few tens of microseconds.
            if not self._queued_inserts and len(batch) <= DIRECT_INSERT_MAX:
                try:
                    rows = self.db.insert_now(batch, at=self.clock())
                except Exception:  # a bug: logged; the batch still goes through the writer
                    log.exception("outbox: direct insert failed")
            if rows is not None:
                self._inserted(rows)
            else:
                self._queued_inserts += 1
                self.db.insert(batch, at=self.clock(), then=self._inserted_queued)
        if self._updates:
            updates, self._updates = self._updates, []
            self.db.update(updates)

    def _inserted_queued(self, rows: list[OutboxRow]) -> None:
        self._queued_inserts -= 1
        self._inserted(rows)

    def _inserted(self, rows: list[OutboxRow]) -> None:
        """Rows committed: hold them, unless memory is full (then they wait in SQLite)."""
        self.committed += len(rows)
        if self._closed:
            return
        for row in rows:
            if not self._overflow and self._queue.held < self.window:
                self._paged_upto = row.id
                self._queue.add(row)
            elif row.wants_answer:
                # Its call waits for the answer now: held even past the window (one per
                # live call at most), and remembered so that paging does not take it twice.
                self._extra.add(row.id)
                self._queue.add(row)
            else:
                self._overflow = True
                self._max_unheld = max(self._max_unheld, row.id)
        self._pump()

    def _page_in(self) -> None:
        if self._closed or self._paging or not self._overflow:
            return
        room = self.window - self._queue.held
        if room < self.window // 2:
            return
        self._paging = True
        self.db.page(after_id=self._paged_upto, limit=room,
                     then=lambda rows: self._paged(rows, room))

    def _paged(self, rows: list[OutboxRow], limit: int) -> None:
        # A row committed after the page was read (a direct insert while it was under way)
        # and left in SQLite has an id past the page: overflow stays on until a page gets
        # past every such row.
        self._paging = False
        if self._closed:
            return
        now = self.clock()
        for row in rows:
            if row.id not in self._extra:
                row.next_attempt_at = min(row.next_attempt_at, now)  # a restart retries now
                self._queue.add(row)
        if rows:
            self._paged_upto = max(self._paged_upto, rows[-1].id)
        if len(rows) < limit and self._max_unheld <= self._paged_upto:
            self._overflow = False
        self._extra = {i for i in self._extra if i > self._paged_upto}
        if rows:
            log.info("outbox: %d pending events read back (%s)", len(rows),
                     "more wait in the outbox" if self._overflow else "none left behind")
        self._pump()

    # -- delivery -------------------------------------------------------------------------------
    def _pump(self) -> None:
        """Start every attempt that is due and allowed; re-arm the one timer."""
        if self._closed:
            return
        now = self.clock()
        limit = self.settings.max_in_flight
        queue = self._queue
        while queue.in_flight < limit:
            row = queue.pop_due(now)
            if row is None:
                break
            task = self.loop.create_task(self._attempt(row))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._page_in()
        at = queue.next_due() if queue.in_flight < limit else None
        if at != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = at
            if at is not None:
                self._timer = self.loop.call_later(max(0.0, at - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._pump()

    async def _attempt(self, row: OutboxRow) -> None:
        try:
            result = await self.sender.post(event_id=row.event_id, event=row.event,
                                            fields=row.fields)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in a sender: logged, the event is retried like a timeout
            log.exception("webhook %s: the sender failed", row.event_id)
            result = AttemptResult(None, b"", "internal error", 0.0)
        self._settled(row, result)

    def _settled(self, row: OutboxRow, result: AttemptResult) -> None:
        self.attempts += 1
        error = result.error
        if result.status is not None and not 200 <= result.status <= 299:
            error = _snippet(result.body)
        verdict, update = settle(row, status=result.status, error=error,
                                 latency_ms=result.latency_ms, now=self.clock(),
                                 policy=self.policy, rand=self.rand())
        status = str(result.status) if result.status is not None else result.error
        line = (f"webhook {row.event} {row.pbx_call_id} attempt {row.attempts}: {status} in "
                f"{result.latency_ms:.1f} ms -> {row.state}")
        if verdict is Verdict.RETRY and row.state == "pending":
            line += f", next in {row.next_attempt_at - self.clock():.1f} s"
        if verdict is Verdict.FAILED:
            log.warning("%s; answer began %r", line, result.body[:200])
        elif row.state == "given_up":
            log.warning("%s after %.1f h", line, self.policy.give_up_s / 3600.0)
        else:
            log.info("%s", line)
        if row.wants_answer:
            row.wants_answer = False
            answer = (parse_answer(result.body) if verdict is Verdict.DELIVERED
                      else CrmAnswer.failed(result.problem))
            self.on_answer(row.pbx_call_id, answer)
        if row.state == "pending":
            self._queue.later(row)
        else:
            self.delivered += row.state == "delivered"
            self.failed += row.state == "failed"
            self.given_up += row.state == "given_up"
            self._queue.done(row)
        self._updates.append(update)
        if self._update_timer is None:
            # Outcomes are written in 20 ms batches (one writer wake-up for many attempts
            # during a drain); a kill -9 inside those 20 ms sends a confirmed event again
            # after the restart, which X-Event-Id lets the CRM drop.
            self._update_timer = self.loop.call_later(UPDATE_BATCH_S, self._flush_updates)
        self._pump()

    def _flush_updates(self) -> None:
        self._update_timer = None
        self._flush()


def _snippet(body: bytes) -> str:
    """The first bytes of an error answer, for the row's ``last_error``."""
    return body[:200].decode("utf-8", "replace")
