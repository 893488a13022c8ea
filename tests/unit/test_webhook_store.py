"""The store's CRM side: the outbox table (insert, page, update, requeue, query), the CDR's
pbx_call_id column (new and migrated databases), and the exhaustive action dispatch."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from softpbx.core.events import CallRecord, SendWebhook, StopRecording, WriteCdr
from softpbx.store.api import Store
from softpbx.store.outbox import OutboxDb, OutboxRow, RowUpdate
from softpbx.store.sqlite import SqliteStore


def ev(call: str, seq: int, event: str = "NOTIFY_END", **fields: str) -> SendWebhook:
    return SendWebhook(event_id=f"{call}.{seq}", pbx_call_id=call, seq=seq, event=event,
                       fields=(("event", event), *fields.items()))


class Sync:
    """OutboxDb results, waited for on the test thread."""

    def __init__(self, path: Path) -> None:
        # Results are delivered on the writer thread here (the server hops to the loop).
        self.db = OutboxDb(path=str(path), deliver=lambda fn: fn())

    def call(self, start: Callable[[Callable[[Any], None]], None]) -> Any:
        done = threading.Event()
        box: list[Any] = []

        def then(result: Any) -> None:
            box.append(result)
            done.set()

        start(then)
        assert done.wait(5)
        return box[0]


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Sync]:
    path = tmp_path / "softpbx.db"
    SqliteStore(path=str(path)).close()
    s = Sync(path)
    yield s
    s.db.close()


def test_outbox_rows_round_trip_in_order_with_utf8_fields(outbox: Sync) -> None:
    rows = outbox.call(lambda then: outbox.db.insert(
        [ev("in_a", 1, "NOTIFY_START", caller_id="79161234567"),
         ev("in_a", 2, note="Иванов <script>"), ev("in_b", 1)], at=100.0, then=then))
    assert [(r.event_id, r.state, r.created_at) for r in rows] == \
        [("in_a.1", "pending", 100.0), ("in_a.2", "pending", 100.0), ("in_b.1", "pending", 100.0)]
    assert rows[0].id < rows[1].id < rows[2].id
    # A duplicate event id gets no second row.
    assert outbox.call(lambda then: outbox.db.insert([ev("in_a", 1)], at=101.0, then=then)) == []
    paged = outbox.call(lambda then: outbox.db.page(after_id=rows[0].id, limit=10, then=then))
    assert [r.event_id for r in paged] == ["in_a.2", "in_b.1"]
    assert paged[0].fields == (("event", "NOTIFY_END"), ("note", "Иванов <script>"))
    outbox.db.update([RowUpdate(id=rows[0].id, state="delivered", attempts=2,
                                next_attempt_at=100.0, last_status=200, last_error="",
                                last_latency_ms=3.5, delivered_at=102.0)])
    # Updates run in order with the rest: the next read sees them.
    assert [r.event_id for r in outbox.call(lambda then: outbox.db.page(
        after_id=0, limit=10, then=then))] == ["in_a.2", "in_b.1"]
    got = outbox.db.query(state="delivered")
    assert len(got) == 1 and got[0].as_json()["last_latency_ms"] == 3.5
    assert got[0].as_json()["fields"] == {"event": "NOTIFY_START", "caller_id": "79161234567"}
    assert [r.event_id for r in outbox.db.query(pbx_call_id="in_a")] == ["in_a.2", "in_a.1"]
    assert [r.event_id for r in outbox.db.query(before_id=rows[2].id, limit=1)] == ["in_a.2"]
    assert outbox.db.counts() == {"pending": 2, "delivered": 1, "failed": 0, "given_up": 0}


def test_requeue_only_failed_or_given_up(outbox: Sync) -> None:
    rows = outbox.call(lambda then: outbox.db.insert([ev("in_a", 1), ev("in_a", 2)], at=1.0,
                                                     then=then))
    outbox.db.update([RowUpdate(id=rows[0].id, state="failed", attempts=1, next_attempt_at=1.0,
                                last_status=404, last_error="nope", last_latency_ms=1.0,
                                delivered_at=None)])
    assert outbox.call(lambda then: outbox.db.requeue(rows[1].id, at=5.0, then=then)) == \
        "pending"
    assert outbox.call(lambda then: outbox.db.requeue(999, at=5.0, then=then)) == "unknown"
    again = outbox.call(lambda then: outbox.db.requeue(rows[0].id, at=5.0, then=then))
    assert isinstance(again, OutboxRow)
    assert (again.state, again.attempts, again.next_attempt_at, again.created_at) == \
        ("pending", 1, 5.0, 5.0)
    assert outbox.db.counts()["pending"] == 2


def cdr(pbx_call_id: str = "in_" + "a" * 40) -> CallRecord:
    return CallRecord(call_id="in_" + "a" * 40, sip_call_id="x@y", direction="inbound",
                      caller="79161234567", callee="74950000000", did="74950000000",
                      extension="101", gateway="carrier", started_at=10.0, answered_at=12.0,
                      ended_at=20.0, disposition="answered", sip_code=200, cause="caller hung up",
                      pbx_call_id=pbx_call_id)


def test_cdr_keeps_pbx_call_id_and_old_databases_gain_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)  # a v4 database: cdr without pbx_call_id, no outbox table
    db.execute("CREATE TABLE cdr (call_id TEXT PRIMARY KEY, sip_call_id TEXT NOT NULL,"
               " direction TEXT NOT NULL, caller TEXT NOT NULL, callee TEXT NOT NULL,"
               " did TEXT NOT NULL, extension TEXT NOT NULL, caller_extension TEXT NOT NULL"
               " DEFAULT '', gateway TEXT NOT NULL, started_at REAL NOT NULL, answered_at REAL,"
               " ended_at REAL NOT NULL, duration INTEGER NOT NULL, disposition TEXT NOT NULL,"
               " sip_code INTEGER NOT NULL, cause TEXT NOT NULL)")
    db.commit()
    db.close()
    store = SqliteStore(path=str(path))
    store.apply(WriteCdr(cdr()), wall_offset=1000.0)
    assert store.flush() and store.write_failures == 0
    row = store.recent_cdrs(1)[0]
    assert row["pbx_call_id"] == "in_" + "a" * 40 and row["started_at"] == 1010.0
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM outbox").fetchone() == (0,)


def test_apply_refuses_what_is_not_a_store_action(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    store = SqliteStore(path=str(tmp_path / "s.db"))
    try:
        with pytest.raises(TypeError, match="unknown action"):
            store.apply(object(), wall_offset=0.0)  # type: ignore[arg-type]
        with caplog.at_level(logging.ERROR, "softpbx.store"):
            store.apply(StopRecording(call_id="x", at=1.0), wall_offset=0.0)
        assert "StopRecording reached the store" in caplog.text
        assert store.buffered == 0
    finally:
        store.close()


def test_sqlite_store_implements_the_store_interface(tmp_path: Path) -> None:
    store: Store = SqliteStore(path=str(tmp_path / "s.db"))  # type-checked by mypy
    names = [n for n in dir(Store) if not n.startswith("_")]
    assert all(callable(getattr(store, n)) or n == "buffered" for n in names), names
    store.recording_started("c1", token_hash="h", path="/r/c1.mp3", at=1.0)
    store.recording_ready("c1", duration=2.0, size=100, at=3.0)
    assert store.flush()
    assert store.recording_by_hash("h") == ("/r/c1.mp3", "ready", "c1")
    store.recording_deleted("c1", at=4.0)
    assert store.flush() and store.recording_index() == [("c1", "/r/c1.mp3", "deleted", "")]
    store.close()


def test_purge_deletes_old_settled_events_never_pending_ones(outbox: Sync) -> None:
    rows = outbox.call(lambda then: outbox.db.insert(
        [ev("in_a", 1), ev("in_a", 2), ev("in_b", 1), ev("in_c", 1), ev("in_d", 1)], at=100.0,
        then=then))
    a1, a2, b1, c1, _ = rows

    def upd(r: OutboxRow, state: str, delivered_at: float | None) -> RowUpdate:
        return RowUpdate(id=r.id, state=state, attempts=1, next_attempt_at=100.0,
                         last_status=200, last_error="", last_latency_ms=1.0,
                         delivered_at=delivered_at)

    outbox.db.update([upd(a1, "delivered", 150.0), upd(a2, "delivered", 300.0),
                      upd(b1, "failed", None), upd(c1, "given_up", None)])
    n = outbox.call(lambda then: outbox.db.purge(delivered_before=200.0, settled_before=50.0,
                                                 then=then))
    assert n == 1 and {r.event_id for r in outbox.db.query()} == \
        {"in_a.2", "in_b.1", "in_c.1", "in_d.1"}
    n = outbox.call(lambda then: outbox.db.purge(delivered_before=1e12, settled_before=1e12,
                                                 then=then))
    assert n == 3 and [r.event_id for r in outbox.db.query()] == ["in_d.1"]  # pending stays
