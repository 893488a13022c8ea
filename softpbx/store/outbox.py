"""The webhook outbox table (schema.sql ``outbox``) behind its own writer thread.

Why not the store's batches: a NOTIFY_START must be committed before its first attempt, and
the call waits for that attempt's answer, so the commit is on the call's setup path. The
store batches writes for 50 ms; here a loop tick's events are committed at once by
:meth:`OutboxDb.insert_now` on the loop thread (a WAL append, never waiting for a lock), or,
when another connection holds the lock, by this writer thread, which runs each job as soon
as it is queued in a small ``BEGIN IMMEDIATE`` transaction on its own connection (WAL,
``synchronous=NORMAL``: a commit survives a killed process, a power cut may lose the last
ones). Jobs queued meanwhile are grouped into one transaction, so a burst costs one commit.

Every method is non-blocking and called on the loop's thread; results come back through the
``deliver`` callable given to the constructor (``loop.call_soon_threadsafe`` in the shell, a
plain call in tests), in the order the jobs were queued. Reads for the HTTP API use the
blocking :meth:`OutboxDb.query` / :meth:`OutboxDb.get` from an executor.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.events import SendWebhook
from .sqlite import sql_text

log = logging.getLogger("softpbx.outbox")

STATES = ("pending", "delivered", "failed", "given_up")
"""An event's states: pending until a 2xx (delivered), a non-retryable answer (failed) or
``crm.give_up_after_h`` (given_up)."""

Deliver = Callable[[Callable[[], None]], None]
_COLUMNS = ("id, event_id, pbx_call_id, seq, event, fields, state, attempts, next_attempt_at,"
            " created_at, last_status, last_error, last_latency_ms, delivered_at")


@dataclass(slots=True)
class OutboxRow:
    """One outbox event as held in memory and shown by ``GET /api/webhooks``."""

    id: int
    event_id: str
    pbx_call_id: str
    seq: int
    event: str
    fields: tuple[tuple[str, str], ...]
    state: str = "pending"
    attempts: int = 0
    next_attempt_at: float = 0.0
    created_at: float = 0.0
    last_status: int | None = None
    last_error: str = ""
    last_latency_ms: float | None = None
    delivered_at: float | None = None
    wants_answer: bool = field(default=False, compare=False)
    """In memory only: the live call waits for this NOTIFY_START's first answer."""

    def as_json(self) -> dict[str, Any]:
        """The row for the HTTP API (fields as an ordered object)."""
        return {"id": self.id, "event_id": self.event_id, "pbx_call_id": self.pbx_call_id,
                "seq": self.seq, "event": self.event, "state": self.state,
                "attempts": self.attempts, "next_attempt_at": self.next_attempt_at,
                "created_at": self.created_at, "last_status": self.last_status,
                "last_error": self.last_error, "last_latency_ms": self.last_latency_ms,
                "delivered_at": self.delivered_at, "fields": dict(self.fields)}


@dataclass(frozen=True, slots=True)
class RowUpdate:
    """The outcome of one attempt, as written back."""

    id: int
    state: str
    attempts: int
    next_attempt_at: float
    last_status: int | None
    last_error: str
    last_latency_ms: float | None
    delivered_at: float | None


def _insert(db: sqlite3.Connection, batch: list[SendWebhook], at: float) -> list[OutboxRow]:
    rows = []
    for ev in batch:
        text = json.dumps(ev.fields, ensure_ascii=False)
        cur = db.execute(
            "INSERT OR IGNORE INTO outbox (event_id, pbx_call_id, seq, event, fields,"
            " state, next_attempt_at, created_at) VALUES (?,?,?,?,?,'pending',?,?)"
            " RETURNING id",
            (sql_text(ev.event_id), sql_text(ev.pbx_call_id), ev.seq, ev.event,
             sql_text(text), at, at))
        got = cur.fetchall()
        if not got:
            log.error("outbox: event %s is already in the outbox; not sent twice", ev.event_id)
            continue
        rows.append(OutboxRow(id=got[0][0], event_id=ev.event_id, pbx_call_id=ev.pbx_call_id,
                              seq=ev.seq, event=ev.event, fields=ev.fields,
                              next_attempt_at=at, created_at=at, wants_answer=ev.wants_answer))
    return rows


def _row(r: Sequence[Any]) -> OutboxRow:
    try:
        pairs = tuple((str(k), str(v)) for k, v in json.loads(r[5]))
    except (ValueError, TypeError):
        pairs = ()  # a row this softpbx did not write: shown, sent as an empty form
    return OutboxRow(id=r[0], event_id=r[1], pbx_call_id=r[2], seq=r[3], event=r[4],
                     fields=pairs, state=r[6], attempts=r[7], next_attempt_at=r[8],
                     created_at=r[9], last_status=r[10], last_error=r[11],
                     last_latency_ms=r[12], delivered_at=r[13])


class OutboxDb:
    """The outbox table: one writer thread and connection, results handed back in order."""

    def __init__(self, *, path: str, deliver: Deliver) -> None:
        self.path = path
        self._deliver = deliver
        self._jobs: queue.SimpleQueue[Callable[[sqlite3.Connection], Callable[[], None] | None]
                                      | None] = queue.SimpleQueue()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._fast: sqlite3.Connection | None = None
        self.failures = 0
        """Jobs that failed (each one logged)."""
        self._thread = threading.Thread(target=self._run, name="softpbx-outbox", daemon=True)
        self._thread.start()

    # -- writes (non-blocking) ---------------------------------------------------------------
    def insert(self, events: Sequence[SendWebhook], *, at: float,
               then: Callable[[list[OutboxRow]], None]) -> None:
        """Commit ``events`` as pending (due at once); ``then`` gets their rows, in order.
        An ``event_id`` already in the table (a duplicate) gets no row."""
        batch = list(events)

        def job(db: sqlite3.Connection) -> Callable[[], None]:
            rows = _insert(db, batch, at)
            return lambda: then(rows)

        self._jobs.put(job)

    def insert_now(self, events: Sequence[SendWebhook], *, at: float) -> list[OutboxRow] | None:
        """Commit ``events`` on the calling (loop) thread at once, or return ``None`` without
        waiting when another connection holds the write lock (then use :meth:`insert`).

        Why: the thread hop costs a GIL hand-over each way, up to the 5 ms switch interval
        when the loop is busy, and a NOTIFY_START's call waits for this commit. A WAL append
        without fsync is tens of microseconds; this connection never waits for a lock
        (``timeout=0``) and never checkpoints (``wal_autocheckpoint=0``; the writer thread's
        and the store's connections do), so the loop is never held by the disk."""
        db = self._fast
        try:
            if db is None:
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                     timeout=0)
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA wal_autocheckpoint=0")
                self._fast = db
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            # SQLITE_BUSY (even opening can meet a lock: the schema is read under one): the
            # writer thread waits for it instead. Anything else shows up there, logged.
            return None
        try:
            rows = _insert(db, list(events), at)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if not (isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)):
                log.warning("outbox: a direct insert failed (%s); queued for the writer", exc)
            return None
        return rows

    def update(self, updates: Sequence[RowUpdate]) -> None:
        """Write the outcome of attempts (fire and forget; in order with everything else)."""
        batch = [(u.state, u.attempts, u.next_attempt_at, u.last_status, sql_text(u.last_error),
                  u.last_latency_ms, u.delivered_at, u.id) for u in updates]

        def job(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE outbox SET state=?, attempts=?, next_attempt_at=?,"
                           " last_status=?, last_error=?, last_latency_ms=?, delivered_at=?"
                           " WHERE id=?", batch)

        self._jobs.put(job)

    def page(self, *, after_id: int, limit: int, then: Callable[[list[OutboxRow]], None]) -> None:
        """The pending rows with ``id > after_id``, oldest first, at most ``limit``. Run in
        order with the writes: it sees every insert queued before it."""
        def job(db: sqlite3.Connection) -> Callable[[], None]:
            rows = [_row(r) for r in db.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE state='pending' AND id > ?"
                " ORDER BY id LIMIT ?", (after_id, limit)).fetchall()]
            return lambda: then(rows)

        self._jobs.put(job)

    def requeue(self, row_id: int, *, at: float,
                then: Callable[[OutboxRow | str], None]) -> None:
        """Make a failed or given-up event pending again (due ``at``); ``then`` gets its row,
        or the reason it could not be (``"unknown"``, or its state)."""
        def job(db: sqlite3.Connection) -> Callable[[], None]:
            got = db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id=?", (row_id,)).fetchall()
            if not got:
                return lambda: then("unknown")
            row = _row(got[0])
            if row.state not in ("failed", "given_up"):
                state = row.state
                return lambda: then(state)
            # created_at restarts too: give_up_after_h counts from the operator's retry.
            db.execute("UPDATE outbox SET state='pending', next_attempt_at=?, created_at=?"
                       " WHERE id=?", (at, at, row_id))
            row.state, row.next_attempt_at, row.created_at = "pending", at, at
            return lambda: then(row)

        self._jobs.put(job)

    def purge(self, *, delivered_before: float, settled_before: float,
              then: Callable[[int], None]) -> None:
        """Delete delivered events older than ``delivered_before`` and failed / given-up ones
        created before ``settled_before`` (Unix times); ``then`` gets how many went. Pending
        events are never deleted."""
        def job(db: sqlite3.Connection) -> Callable[[], None]:
            n = db.execute("DELETE FROM outbox WHERE state='delivered' AND delivered_at < ?",
                           (delivered_before,)).rowcount
            n += db.execute("DELETE FROM outbox WHERE state IN ('failed', 'given_up')"
                            " AND created_at < ?", (settled_before,)).rowcount
            return lambda: then(n)

        self._jobs.put(job)

    # -- reads (blocking: an executor) ---------------------------------------------------------
    def query(self, *, state: str = "", pbx_call_id: str = "", before_id: int = 0,
              limit: int = 50) -> list[OutboxRow]:
        """Newest first: rows with ``state`` / ``pbx_call_id`` (empty = any) and, for paging,
        ``id < before_id`` (0 = from the newest)."""
        where, args = [], []
        if state:
            where.append("state=?")
            args.append(state)
        if pbx_call_id:
            where.append("pbx_call_id=?")
            args.append(pbx_call_id)
        if before_id:
            where.append("id < ?")
            args.append(str(before_id))
        sql = f"SELECT {_COLUMNS} FROM outbox"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        return [_row(r) for r in self._reader().execute(sql, (*args, limit)).fetchall()]

    def counts(self) -> dict[str, int]:
        """Events per state."""
        out = dict.fromkeys(STATES, 0)
        for state, n in self._reader().execute(
                "SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall():
            out[state] = n
        return out

    def _reader(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None or db not in self._readers:  # not yet, or closed by close()
            uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
            db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                                 timeout=10.0)
            self._local.db = db
            with self._readers_lock:
                self._readers.append(db)
        return db

    # -- the thread ----------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Run what is queued, then stop the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for db in readers:
            db.close()

    def _run(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=10.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            while True:
                jobs = [self._jobs.get()]
                while len(jobs) < 500:
                    try:
                        jobs.append(self._jobs.get_nowait())
                    except queue.Empty:
                        break
                stop = None in jobs
                work = [j for j in jobs if j is not None]
                if work:
                    self._run_jobs(db, work)
                if stop:
                    return
        finally:
            db.close()

    def _run_jobs(self, db: sqlite3.Connection,
                  jobs: list[Callable[[sqlite3.Connection], Callable[[], None] | None]]) -> None:
        """One transaction for the group; when it fails, one job at a time (a bad job costs
        only itself). Results are handed back only after the commit."""
        results: list[Callable[[], None]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for job in jobs:
                done = job(db)
                if done is not None:
                    results.append(done)
            db.execute("COMMIT")
        # Anything: this thread is the outbox's only writer; if it died, every later event
        # would be lost without a word. Logged with its traceback, then retried one by one.
        except Exception:
            log.exception("outbox: a group of %d jobs failed; running them one by one",
                          len(jobs))
            if db.in_transaction:
                db.execute("ROLLBACK")
            results = []
            for job in jobs:
                try:
                    db.execute("BEGIN IMMEDIATE")
                    done = job(db)
                    db.execute("COMMIT")
                except Exception:  # as above
                    self.failures += 1
                    log.exception("outbox: a job failed")
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    continue
                if done is not None:
                    results.append(done)
        for done in results:
            self._deliver(done)
