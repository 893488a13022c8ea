"""The webhook outbox: what an attempt's answer means, per-call order, retries and give-up on
an injectable clock, failures, restarts on the same SQLite file, bounded memory, the
NOTIFY_START answer and the operator's re-queue. The outbox runs for real (asyncio, its
writer thread, a temp SQLite file); only the HTTP POST is a scripted fake."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from softpbx.aio.outbox import Outbox
from softpbx.config.schema import CrmSettings
from softpbx.core.events import SendWebhook
from softpbx.core.notify import CrmAnswer
from softpbx.crm.delivery import DeliveryQueue, Policy, Verdict, backoff, classify, settle
from softpbx.crm.webhook import AttemptResult
from softpbx.store.outbox import OutboxDb, OutboxRow
from softpbx.store.sqlite import SqliteStore

FAST = CrmSettings(retry_min_s=0.01, retry_max_s=0.04, max_in_flight=4)


# -- pure: verdicts, backoff, settle, order -----------------------------------------------------
@pytest.mark.parametrize(("status", "verdict"), [
    (200, Verdict.DELIVERED), (204, Verdict.DELIVERED), (299, Verdict.DELIVERED),
    (None, Verdict.RETRY), (408, Verdict.RETRY), (429, Verdict.RETRY), (500, Verdict.RETRY),
    (503, Verdict.RETRY), (599, Verdict.RETRY),
    (400, Verdict.FAILED), (401, Verdict.FAILED), (404, Verdict.FAILED), (410, Verdict.FAILED),
    (302, Verdict.FAILED), (100, Verdict.FAILED),
])
def test_classify(status: int | None, verdict: Verdict) -> None:
    assert classify(status) is verdict


def test_backoff_doubles_within_bounds_with_jitter() -> None:
    for n, full in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (500, 60.0)]:
        lo = backoff(n, min_s=1.0, max_s=60.0, rand=0.0)
        hi = backoff(n, min_s=1.0, max_s=60.0, rand=0.999999)
        assert lo == max(1.0, full / 2) and hi == pytest.approx(full, rel=1e-5), n
    assert backoff(1, min_s=5.0, max_s=5.0, rand=0.0) == 5.0  # never below min


def row(call: str = "in_a", rid: int = 1, *, created_at: float = 0.0) -> OutboxRow:
    return OutboxRow(id=rid, event_id=f"{call}.{rid}", pbx_call_id=call, seq=rid,
                     event="NOTIFY_END", fields=(("event", "NOTIFY_END"),),
                     created_at=created_at, next_attempt_at=created_at)


def test_settle_retries_on_a_fake_clock_until_the_give_up_time() -> None:
    policy = Policy(retry_min_s=10.0, retry_max_s=100.0, give_up_s=300.0)
    r = row(created_at=1000.0)
    now = 1000.0
    schedule = []
    while r.state == "pending":
        verdict, update = settle(r, status=503, error="busy", latency_ms=1.0, now=now,
                                 policy=policy, rand=0.0)
        assert verdict is Verdict.RETRY and update.attempts == r.attempts
        if r.state == "pending":
            schedule.append(round(r.next_attempt_at - now, 3))
            now = r.next_attempt_at
    # Jitter 0 halves 10*2^k (capped at 100) but never goes below retry_min_s: 10, 10, 20,
    # 40, 50...; the last retry is pulled in to created_at + 300 s exactly; then given up.
    assert schedule == [10.0, 10.0, 20.0, 40.0, 50.0, 50.0, 50.0, 50.0, 20.0]
    assert now == 1300.0 and r.state == "given_up" and r.attempts == 10
    assert r.last_status == 503 and r.last_error == "busy"


def test_settle_2xx_is_final_and_4xx_fails_at_once() -> None:
    policy = Policy(retry_min_s=1.0, retry_max_s=2.0, give_up_s=10.0)
    ok = row()
    assert settle(ok, status=200, error="", latency_ms=2.5, now=5.0, policy=policy,
                  rand=0.5)[1].state == "delivered"
    assert ok.delivered_at == 5.0 and ok.last_latency_ms == 2.5
    bad = row()
    assert settle(bad, status=422, error="no such field", latency_ms=1.0, now=5.0,
                  policy=policy, rand=0.5)[1].state == "failed"


def test_queue_keeps_order_per_call_and_calls_independent() -> None:
    q = DeliveryQueue()
    for rid, call in [(1, "A"), (2, "B"), (3, "A"), (4, "A"), (5, "B")]:
        q.add(row(call, rid))
    first = [q.pop_due(0.0), q.pop_due(0.0)]
    assert [r.id for r in first if r] == [1, 2]
    assert q.pop_due(0.0) is None  # A3 waits for A1, B5 for B2
    a1, b2 = first
    assert a1 is not None and b2 is not None
    a1.next_attempt_at = 10.0
    q.later(a1)  # A1 failed: it stays A's head, so A3 still waits
    q.done(b2)
    nxt = q.pop_due(0.0)
    assert nxt is not None and nxt.id == 5
    assert q.pop_due(9.9) is None and q.next_due() == 10.0
    again = q.pop_due(10.0)
    assert again is a1
    q.done(a1)
    assert [q.pop_due(10.0).id] == [3]  # type: ignore[union-attr]
    assert q.held == 3


def test_a_waiting_notify_start_goes_before_a_backlog() -> None:
    """After an outage thousands of events are due; a live call's NOTIFY_START cannot wait
    behind them for its answer."""
    q = DeliveryQueue()
    for rid in range(1, 101):
        q.add(row(f"in_old{rid}", rid))
    start = row("in_live", 500)
    start.wants_answer = True
    q.add(start)
    assert q.pop_due(0.0) is start
    assert q.pop_due(0.0).id == 1  # type: ignore[union-attr]
    start.wants_answer = False  # its first attempt failed: an ordinary retry from now on
    start.next_attempt_at = 5.0
    q.later(start)
    assert [q.pop_due(1.0).id for _ in range(99)] == list(range(2, 101))  # type: ignore[union-attr]
    assert q.pop_due(1.0) is None and q.pop_due(5.0) is start


# -- the worker ---------------------------------------------------------------------------------
class FakeCrm:
    """Scripted answers per attempt; records every POST (event_id) in order."""

    def __init__(self, answer: Callable[[str, int], tuple[int | None, bytes]]) -> None:
        self.answer = answer
        self.posts: list[str] = []
        self.attempts: dict[str, int] = {}
        self.gate: asyncio.Event | None = None
        self.on_post: Callable[[], None] | None = None

    async def post(self, *, event_id: str, event: str,
                   fields: tuple[tuple[str, str], ...]) -> AttemptResult:
        n = self.attempts[event_id] = self.attempts.get(event_id, 0) + 1
        self.posts.append(event_id)
        if self.on_post is not None:
            self.on_post()
        if self.gate is not None and event_id.startswith("in_slow"):
            await self.gate.wait()
        status, body = self.answer(event_id, n)
        await asyncio.sleep(0)
        return AttemptResult(status, body, "" if status else "connection refused", 1.0)

    async def close(self) -> None:
        pass


def ev(call: str, seq: int, event: str = "NOTIFY_END", *, wants_answer: bool = False
       ) -> SendWebhook:
    return SendWebhook(event_id=f"{call}.{seq}", pbx_call_id=call, seq=seq, event=event,
                       fields=(("event", event), ("pbx_call_id", call)),
                       wants_answer=wants_answer)


class Rig:
    def __init__(self, db_path: Path, crm: FakeCrm, settings: CrmSettings = FAST,
                 clock: Callable[[], float] = time.time, window: int = 100) -> None:
        self.loop = asyncio.get_running_loop()
        self.answers: list[tuple[str, CrmAnswer]] = []
        self.crm = crm
        self.db = OutboxDb(path=str(db_path), deliver=self.loop.call_soon_threadsafe)
        self.outbox = Outbox(settings=settings, db=self.db, sender=crm, loop=self.loop,
                             on_answer=lambda c, a: self.answers.append((c, a)), clock=clock,
                             window=window)
        self.outbox.start()

    async def until(self, pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                o = self.outbox
                raise AssertionError(f"not within {timeout}s: {what}; posts {self.crm.posts}; "
                                     f"outbox overflow={o._overflow} paging={o._paging} "
                                     f"paged_upto={o._paged_upto} held={o.held} "
                                     f"max_unheld={o._max_unheld} queued={o._queued_inserts}")
            await asyncio.sleep(0.002)

    def states(self) -> dict[str, str]:
        return {r.event_id: r.state for r in self.db.query(limit=1000)}


def outbox_db(tmp_path: Path) -> Path:
    path = tmp_path / "softpbx.db"
    SqliteStore(path=str(path)).close()  # the schema, as the server makes it
    return path


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(scenario())


def test_every_event_is_committed_before_its_first_attempt(tmp_path: Path) -> None:
    path = outbox_db(tmp_path)
    seen_in_db: list[bool] = []

    def check() -> None:
        with sqlite3.connect(path) as db:
            seen_in_db.append(bool(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]))

    async def scenario() -> None:
        rig = Rig(path, FakeCrm(lambda e, n: (200, b"")))
        rig.crm.on_post = check
        rig.outbox.submit(ev("in_a", 1))
        await rig.until(lambda: rig.outbox.delivered == 1, "delivered")
        await rig.outbox.stop()
        assert rig.states() == {"in_a.1": "delivered"}

    run(scenario)
    assert seen_in_db == [True]


def test_order_per_call_and_a_slow_call_does_not_hold_others(tmp_path: Path) -> None:
    async def scenario() -> None:
        crm = FakeCrm(lambda e, n: (500, b"down") if e == "in_b.2" and n < 3 else (200, b""))
        crm.gate = asyncio.Event()
        rig = Rig(outbox_db(tmp_path), crm)
        for seq in (1, 2, 3):
            rig.outbox.submit(ev("in_slow", seq))
            rig.outbox.submit(ev("in_b", seq))
        await rig.until(lambda: rig.outbox.delivered == 3, "in_b delivered while in_slow hangs")
        assert [p for p in crm.posts if p.startswith("in_b")] == \
            ["in_b.1", "in_b.2", "in_b.2", "in_b.2", "in_b.3"]
        assert [p for p in crm.posts if p.startswith("in_slow")] == ["in_slow.1"]
        crm.gate.set()
        await rig.until(lambda: rig.outbox.delivered == 6, "all delivered")
        assert [p for p in crm.posts if p.startswith("in_slow")] == \
            ["in_slow.1", "in_slow.2", "in_slow.3"]
        await rig.outbox.stop()

    run(scenario)


def test_4xx_fails_at_once_logs_the_answer_and_the_call_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> dict[str, str]:
        crm = FakeCrm(lambda e, n: (422, b"bad field pbx_call_id") if e == "in_a.1"
                      else (200, b""))
        rig = Rig(outbox_db(tmp_path), crm)
        rig.outbox.submit(ev("in_a", 1))
        rig.outbox.submit(ev("in_a", 2))
        await rig.until(lambda: rig.outbox.delivered == 1, "the second event delivered")
        await rig.outbox.stop()
        assert crm.posts == ["in_a.1", "in_a.2"]
        return rig.states()

    with caplog.at_level(logging.INFO, "softpbx.webhook"):
        assert run(scenario) == {"in_a.1": "failed", "in_a.2": "delivered"}
    lines = [r.getMessage() for r in caplog.records]
    assert any("NOTIFY_END in_a attempt 1: 422" in m and "bad field" in m for m in lines), lines
    assert sum("attempt" in m for m in lines) == 2  # one line per attempt


def test_retries_then_gives_up_on_an_injected_clock(tmp_path: Path) -> None:
    """The clock runs, and jumps an hour per attempt: give_up_after_h=3 ends it after the
    attempt at the deadline, with no real waiting."""
    offset = [1_000_000.0]

    async def scenario() -> dict[str, str]:
        crm = FakeCrm(lambda e, n: (None, b"") if e == "in_a.1" else (200, b""))
        crm.on_post = lambda: offset.__setitem__(0, offset[0] + 3600.0)
        settings = CrmSettings(retry_min_s=0.01, retry_max_s=0.02, give_up_after_h=3)
        rig = Rig(outbox_db(tmp_path), crm, settings,
                  clock=lambda: offset[0] + time.monotonic())
        rig.outbox.submit(ev("in_a", 1))
        rig.outbox.submit(ev("in_a", 2))
        await rig.until(lambda: rig.outbox.delivered == 1, "the next event after the give-up")
        await rig.outbox.stop()
        assert crm.attempts["in_a.1"] == 3 and rig.outbox.given_up == 1
        return rig.states()

    assert run(scenario) == {"in_a.1": "given_up", "in_a.2": "delivered"}


def test_notify_start_answer_comes_from_the_first_attempt_only(tmp_path: Path) -> None:
    async def scenario() -> list[tuple[str, CrmAnswer]]:
        crm = FakeCrm(lambda e, n: (500, b"") if e.startswith("in_b") and n == 1
                      else (200, b'{"caller_name": "Ivanov", "redirect": "102"}'))
        rig = Rig(outbox_db(tmp_path), crm)
        rig.outbox.submit(ev("in_a", 1, "NOTIFY_START", wants_answer=True))
        rig.outbox.submit(ev("in_b", 1, "NOTIFY_START", wants_answer=True))
        await rig.until(lambda: rig.outbox.delivered == 2, "both delivered")
        await rig.outbox.stop()
        return sorted(rig.answers, key=lambda a: a[0])

    answers = run(scenario)
    assert answers == [("in_a", CrmAnswer(caller_name="Ivanov", redirect="102")),
                       ("in_b", CrmAnswer.failed("HTTP 500"))]


def test_events_not_in_crm_events_are_not_sent(tmp_path: Path) -> None:
    async def scenario() -> None:
        crm = FakeCrm(lambda e, n: (200, b""))
        rig = Rig(outbox_db(tmp_path), crm, CrmSettings(events=("NOTIFY_END",)))
        rig.outbox.submit(ev("in_a", 1, "NOTIFY_START", wants_answer=True))
        rig.outbox.submit(ev("in_a", 2, "NOTIFY_END"))
        await rig.until(lambda: rig.outbox.delivered == 1, "END delivered")
        await rig.outbox.stop()
        assert crm.posts == ["in_a.2"]
        assert rig.answers == [("in_a", CrmAnswer.failed("NOTIFY_START not in crm.events"))]

    run(scenario)


def test_restart_sends_every_unconfirmed_event_and_no_confirmed_one(tmp_path: Path) -> None:
    path = outbox_db(tmp_path)

    async def first_run() -> None:
        crm = FakeCrm(lambda e, n: (200, b"") if e.startswith("in_ok") else (503, b""))
        rig = Rig(path, crm)
        for call in ("in_ok", "in_down"):
            for seq in (1, 2):
                rig.outbox.submit(ev(call, seq))
        await rig.until(lambda: rig.outbox.delivered == 2 and crm.attempts.get("in_down.1", 0)
                        >= 2, "in_ok delivered, in_down retried")
        await rig.outbox.stop()
        assert "in_down.2" not in crm.posts  # never before in_down.1

    async def second_run() -> list[str]:
        crm = FakeCrm(lambda e, n: (200, b""))
        rig = Rig(path, crm)
        await rig.until(lambda: rig.outbox.delivered == 2, "the pending ones delivered")
        await asyncio.sleep(0.05)  # nothing else comes
        await rig.outbox.stop()
        assert rig.states() == dict.fromkeys(["in_ok.1", "in_ok.2", "in_down.1", "in_down.2"],
                                             "delivered")
        return crm.posts

    run(first_run)
    assert run(second_run) == ["in_down.1", "in_down.2"]


def test_memory_stays_bounded_through_a_long_outage(tmp_path: Path) -> None:
    """600 events of 300 calls with the CRM down and a window of 20: never more than 20
    held; once the CRM is back every event arrives exactly once, in order per call."""
    up = [False]

    async def scenario() -> None:
        crm = FakeCrm(lambda e, n: (200, b"") if up[0] else (None, b""))
        rig = Rig(outbox_db(tmp_path), crm, window=20)
        peak = [0]
        crm.on_post = lambda: peak.__setitem__(0, max(peak[0], rig.outbox.held))
        for i in range(300):
            rig.outbox.submit(ev(f"in_{i:03}", 1))
            rig.outbox.submit(ev(f"in_{i:03}", 2))
            if i % 50 == 0:
                await asyncio.sleep(0)
        await rig.until(lambda: rig.outbox.committed == 600, "all committed")
        await rig.until(lambda: rig.outbox.attempts >= 40, "some failed attempts")
        assert rig.outbox.held <= 20
        up[0] = True
        mark = len(crm.posts)
        await rig.until(lambda: rig.outbox.delivered == 600, "all delivered", timeout=20)
        await rig.outbox.stop()
        assert peak[0] <= 20
        after = crm.posts[mark:]
        # Posts in flight when the CRM came back may have failed once more: at most one per
        # in-flight slot is sent twice; every event is delivered once.
        assert len(after) - len(set(after)) <= FAST.max_in_flight
        assert set(after) == {f"in_{i:03}.{s}" for i in range(300) for s in (1, 2)}
        firsts: dict[str, int] = {}
        for i, e in enumerate(crm.posts):
            firsts.setdefault(e, i)
        for i in range(300):
            assert firsts[f"in_{i:03}.1"] < firsts[f"in_{i:03}.2"]
        assert set(rig.states().values()) == {"delivered"}

    run(scenario)


def test_operator_requeues_a_failed_event(tmp_path: Path) -> None:
    async def scenario() -> None:
        crm = FakeCrm(lambda e, n: (404, b"") if n == 1 else (200, b""))
        rig = Rig(outbox_db(tmp_path), crm)
        rig.outbox.submit(ev("in_a", 1))
        await rig.until(lambda: rig.outbox.failed == 1, "failed")
        rid = rig.db.query(limit=1)[0].id
        assert await rig.outbox.requeue(rid + 100) == "unknown"
        got = await rig.outbox.requeue(rid)
        assert isinstance(got, dict) and got["state"] == "pending"
        await rig.until(lambda: rig.outbox.delivered == 1, "delivered after the retry")
        assert await rig.outbox.requeue(rid) == "delivered"
        await rig.outbox.stop()
        assert crm.posts == ["in_a.1", "in_a.1"]
        counts = rig.outbox.counts()
        assert counts["delivered"] == 1 and counts["failed"] == 0

    run(scenario)


def test_a_locked_database_sends_the_insert_through_the_writer_thread(tmp_path: Path) -> None:
    """Another connection holds the write lock (the store's batch): the loop does not wait
    for it; the writer thread does, and the events still go out once, in order."""
    path = outbox_db(tmp_path)

    async def scenario() -> None:
        crm = FakeCrm(lambda e, n: (200, b""))
        rig = Rig(path, crm)
        await asyncio.sleep(0.05)  # the start-up page is read
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        t = time.monotonic()
        rig.outbox.submit(ev("in_a", 1))
        rig.outbox.submit(ev("in_a", 2))
        await asyncio.sleep(0.1)
        assert time.monotonic() - t < 0.5 and crm.posts == []  # the loop ran on; not sent
        rig.outbox.submit(ev("in_a", 3))  # behind the queued batch, not beside it
        other.execute("COMMIT")
        other.close()
        await rig.until(lambda: rig.outbox.delivered == 3, "delivered after the lock")
        await rig.outbox.stop()
        assert crm.posts == ["in_a.1", "in_a.2", "in_a.3"]

    run(scenario)
