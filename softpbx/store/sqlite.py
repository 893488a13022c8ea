"""SQLite state, written off the event loop (ARCHITECTURE.md "Store").

Writes are queued and applied by one writer thread in batched transactions, so the event
loop never waits on the disk. Reads run in executor threads (the HTTP side, retention) or at
start-up; each thread keeps one read-only connection, so a link lookup is one indexed SELECT,
not a connect and two PRAGMAs. The store speaks the core's actions (:mod:`softpbx.core.events`)
so another engine can sit behind the same small interface later.

Text from the wire may hold lone surrogates (header bytes decoded with ``surrogateescape``):
sqlite3 cannot encode them, so such strings are stored with the undecodable bytes spelled as
``\\xNN`` (see :func:`sql_text`). The writer thread survives any failing write: it logs it
and applies the rest of its batch one write at a time.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
import urllib.parse
import zoneinfo
from datetime import datetime
from importlib import resources

from ..config.schema import Transport
from ..core.events import (
    Action,
    Binding,
    DeleteBinding,
    RecordingCodecs,
    SaveBinding,
    SendWebhook,
    StartRecording,
    StopRecording,
    WriteCdr,
)
from ..sip.events import Flow

log = logging.getLogger("softpbx.store")

SCHEMA_VERSION = 5
_STOP = object()
_NOT_STORE_ACTIONS = (StartRecording, StopRecording, RecordingCodecs, SendWebhook)
"""Actions the shell carries out elsewhere (recorder, outbox): one reaching the store is a
wiring bug, logged as such."""


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


_ADDED_COLUMNS = (
    ("cdr", "caller_extension", "TEXT NOT NULL DEFAULT ''"),
    ("cdr", "pbx_call_id", "TEXT NOT NULL DEFAULT ''"),
    ("cdr", "sent_number", "TEXT NOT NULL DEFAULT ''"),
    ("cdr", "transfers", "TEXT NOT NULL DEFAULT ''"),
)
"""Columns added since the first schema: databases made before get them at start-up."""


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a database made by an older softpbx to the current schema (columns only grow)."""
    for table, column, decl in _ADDED_COLUMNS:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")


def cdr_local_times(row: dict[str, object], tz: zoneinfo.ZoneInfo) -> dict[str, object]:
    """CDR ``row`` with ``<x>_local`` next to each epoch ``<x>_at``: the same instant in
    ``tz`` (``global.timezone``), ISO 8601 with its UTC offset (``2026-12-02T18:16:14+03:00``)."""
    for key in ("started_at", "answered_at", "ended_at"):
        t = row.get(key)
        row[f"{key}_local"] = (None if not isinstance(t, int | float) else
                               datetime.fromtimestamp(t, tz).isoformat(timespec="seconds"))
    return row


def _connect_reader(path: str) -> sqlite3.Connection:
    # WAL is a property of the database file (set by the writer's connection), so a reader
    # needs no PRAGMA; mode=ro makes a bug that writes through it fail loudly.
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                           timeout=10.0)


def sql_text(value: str) -> str:
    """``value`` as text sqlite3 can bind: lone surrogates (``surrogateescape``-decoded bytes
    of a peer's header) become ``\\xNN`` escapes; anything else is returned as is."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate outside U+DC80..U+DCFF: not from bytes
        return value.encode("utf-8", "backslashreplace").decode("ascii")


def _sql_args(args: tuple[object, ...]) -> tuple[object, ...]:
    return tuple(sql_text(a) if isinstance(a, str) else a for a in args)


def _execute(db: sqlite3.Connection, sql: str, args: tuple[object, ...]) -> None:
    try:
        db.execute(sql, args)
    except UnicodeEncodeError:
        # Rare (a peer sent non-UTF-8 bytes): made safe only then, so the common path pays
        # nothing. sqlite3 refuses the binding before running the statement.
        db.execute(sql, _sql_args(args))


class SqliteStore:
    """Registrations, CDRs and the recordings index (implements :class:`~.api.Store`; the
    webhook outbox has its own connection and thread: :class:`~.outbox.OutboxDb`)."""

    def __init__(self, *, path: str, timezone: str = "UTC") -> None:
        self.path = path
        self.tz = zoneinfo.ZoneInfo(timezone)
        """``global.timezone``: CDR times are also given in it (ISO 8601 with its offset)."""
        db = _connect(path)
        db.executescript(resources.files("softpbx.store").joinpath("schema.sql").read_text())
        _migrate(db)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.close()
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._buffer: list[tuple[str, tuple[object, ...]]] = []
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self.write_failures = 0
        """Writes the writer thread could not apply (each one is logged)."""
        self._thread = threading.Thread(target=self._writer, name="softpbx-store", daemon=True)
        self._thread.start()

    # -- reads ----------------------------------------------------------------------------------
    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection (opened on its first read)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = _connect_reader(self.path)
            self._local.db = db
            with self._readers_lock:
                self._readers.append(db)
        return db

    def load_bindings(self, *, now: float, wall: float) -> list[Binding]:
        """Unexpired bindings, with ``expires_at`` moved onto the monotonic clock ``now``."""
        db = _connect(self.path)
        try:
            rows = db.execute(
                "SELECT aor, key, contact, params, expires_at, call_id, cseq, transport, remote_ip,"
                " remote_port, local_ip, local_port, q, user_agent FROM registrations"
                " WHERE expires_at > ?", (wall,)).fetchall()
            db.execute("DELETE FROM registrations WHERE expires_at <= ?", (wall,))
        finally:
            db.close()
        out = []
        for (aor, key, contact, params, exp, call_id, cseq, transport, rip, rport, lip, lport,
             q, ua) in rows:
            try:
                tr = Transport(transport)
            except ValueError:
                continue
            flow = Flow(tr, (rip, int(rport)), (lip, int(lport)))
            out.append(Binding(aor=aor, contact=contact, key=key, expires_at=now + (exp - wall),
                               call_id=call_id, cseq=int(cseq), flow=flow, q=q, user_agent=ua,
                               params=params))
        return out

    def recent_cdrs(self, limit: int = 50) -> list[dict[str, object]]:
        """The newest CDRs as dicts (operator API, tests). Blocking: run in an executor."""
        cur = self._reader().execute("SELECT * FROM cdr ORDER BY started_at DESC LIMIT ?",
                                     (limit,))
        names = [d[0] for d in cur.description]
        return [cdr_local_times(dict(zip(names, r, strict=True)), self.tz)
                for r in cur.fetchall()]

    # -- writes (queued) ----------------------------------------------------------------------
    def apply(self, action: Action, *, wall_offset: float) -> None:
        """Queue an action; ``wall_offset`` = wall time minus the monotonic ``now``."""
        if isinstance(action, SaveBinding):
            b = action.binding
            f = b.flow
            self._write((
                "INSERT OR REPLACE INTO registrations (aor, key, contact, params, expires_at,"
                " call_id, cseq, transport, remote_ip, remote_port, local_ip, local_port, q,"
                " user_agent, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (b.aor, b.key, b.contact, b.params, b.expires_at + wall_offset, b.call_id, b.cseq,
                 f.transport.value, f.remote[0], f.remote[1], f.local[0], f.local[1], b.q,
                 b.user_agent, time.time())))
        elif isinstance(action, WriteCdr):
            r = action.record
            self._write((
                "INSERT OR REPLACE INTO cdr (call_id, sip_call_id, direction, caller, callee, did,"
                " extension, caller_extension, gateway, started_at, answered_at, ended_at,"
                " duration, disposition, sip_code, cause, pbx_call_id, sent_number, transfers)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (r.call_id, r.sip_call_id, r.direction, r.caller, r.callee, r.did, r.extension,
                 r.caller_extension, r.gateway, r.started_at + wall_offset,
                 None if r.answered_at is None else r.answered_at + wall_offset,
                 r.ended_at + wall_offset, r.duration, r.disposition, r.sip_code, r.cause,
                 r.pbx_call_id, r.sent_number, r.transfers)))
        elif isinstance(action, DeleteBinding):
            self._write(("DELETE FROM registrations WHERE aor=? AND key=?",
                             (action.aor, action.key)))
        elif isinstance(action, _NOT_STORE_ACTIONS):
            log.error("store: %s reached the store; the shell should have handled it (bug)",
                      type(action).__name__)
        else:
            # A new action kind the store does not know: never dropped without a word.
            raise TypeError(f"store: unknown action {type(action).__name__}")

    # -- recordings index ---------------------------------------------------------------------
    def recording_started(self, call_id: str, *, token_hash: str, path: str, at: float) -> None:
        """A call's recording began (its link answers 404 until it is ready)."""
        self.execute("INSERT OR REPLACE INTO recordings (call_id, token_hash, path, status,"
                     " created_at) VALUES (?,?,?,'recording',?)", (call_id, token_hash, path, at))

    def recording_ready(self, call_id: str, *, duration: float, size: int, at: float,
                        token_hash: str | None = None, reason: str = "") -> None:
        """The MP3 is complete: the link serves it (``token_hash``: a fresh link, recovery)."""
        if token_hash is None:
            self.execute("UPDATE recordings SET status='ready', duration=?, size=?,"
                         " finished_at=? WHERE call_id=?", (duration, size, at, call_id))
        else:
            self.execute("UPDATE recordings SET status='ready', token_hash=?, duration=?,"
                         " size=?, finished_at=?, reason=? WHERE call_id=?",
                         (token_hash, duration, size, at, reason, call_id))

    def recording_found(self, call_id: str, *, token_hash: str, path: str, duration: float,
                        size: int, created_at: float, at: float, reason: str) -> None:
        """Index a complete file that had no row (recovery after a crash)."""
        self.execute("INSERT INTO recordings (call_id, token_hash, path, status, reason,"
                     " duration, size, created_at, finished_at) VALUES (?,?,?,'ready',?,?,?,?,?)",
                     (call_id, token_hash, path, reason, duration, size, created_at, at))

    def recording_failed(self, call_id: str, *, reason: str, at: float) -> None:
        """The call could not be recorded (or its recording was lost to a restart)."""
        self.execute("UPDATE recordings SET status='failed', reason=?, finished_at=?"
                     " WHERE call_id=?", (reason, at, call_id))

    def recording_deleted(self, call_id: str, *, at: float) -> None:
        """Retention is removing the file: the link answers 410 from now on."""
        self.execute("UPDATE recordings SET status='deleted', finished_at=? WHERE call_id=?",
                     (at, call_id))

    def execute(self, sql: str, args: tuple[object, ...]) -> None:
        """Queue one raw write: the typed methods above go through here (tests seed rows
        with it too); the shell itself only calls the typed methods."""
        self._write((sql, args))

    def _write(self, item: tuple[str, tuple[object, ...]]) -> None:
        # Buffered on the event loop's thread and handed to the writer in batches
        # (hand_over): one thread wake-up per batch, not per registration.
        self._buffer.append(item)

    @property
    def buffered(self) -> int:
        """Writes waiting to be handed to the writer thread."""
        return len(self._buffer)

    def hand_over(self) -> None:
        """Give the buffered writes to the writer thread (the shell calls this every ~50 ms)."""
        if self._buffer:
            batch, self._buffer = self._buffer, []
            self._queue.put(batch)

    def recording_by_hash(self, token_hash: str) -> tuple[str, str, str] | None:
        """(path, status, call_id) of the recording whose token hashes to ``token_hash``.

        Blocking (an indexed SELECT on this thread's connection): run in an executor."""
        # fetchall: the statement completes at once, so no read snapshot stays open.
        rows = self._reader().execute(
            "SELECT path, status, call_id FROM recordings WHERE token_hash = ?",
            (token_hash,)).fetchall()
        return (rows[0][0], rows[0][1], rows[0][2]) if rows else None

    def recordings(self, *, status: str) -> list[tuple[str, str, float, int]]:
        """(call_id, path, created_at, size) of recordings with ``status``, oldest first."""
        return [(r[0], r[1], r[2], r[3] or 0) for r in self._reader().execute(
            "SELECT call_id, path, created_at, size FROM recordings WHERE status = ?"
            " ORDER BY created_at", (status,)).fetchall()]

    def recording_index(self) -> list[tuple[str, str, str, str]]:
        """(call_id, path, status, reason) of every recording row (start-up recovery)."""
        return [(r[0], r[1], r[2], r[3]) for r in self._reader().execute(
            "SELECT call_id, path, status, reason FROM recordings").fetchall()]

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything queued so far is written (tests, shutdown)."""
        done = threading.Event()
        self.notify_written(done)
        return done.wait(timeout)

    def notify_written(self, done: threading.Event) -> None:
        """Hand the buffered writes over; ``done`` is set once they (and every write before
        them) have been applied. Non-blocking: for the loop thread."""
        self.hand_over()
        self._queue.put(done)

    def close(self) -> None:
        """Write what is queued, stop the writer, close the readers."""
        self.hand_over()
        self._queue.put(_STOP)
        self._thread.join(timeout=10.0)
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for db in readers:
            db.close()

    def _writer(self) -> None:
        db = _connect(self.path)
        q = self._queue
        try:
            while True:
                batch = [q.get()]
                # Group whatever else is already queued into one transaction.
                while len(batch) < 1000:
                    try:
                        batch.append(q.get_nowait())
                    except queue.Empty:
                        break
                stop = False
                events = []
                writes: list[tuple[str, tuple[object, ...]]] = []
                for it in batch:
                    if it is _STOP:
                        stop = True
                    elif isinstance(it, threading.Event):
                        events.append(it)
                    elif isinstance(it, list):
                        writes.extend(it)
                    else:
                        writes.append(it)  # type: ignore[arg-type]
                if writes:
                    self._apply(db, writes)
                for ev in events:
                    ev.set()
                if stop:
                    return
        finally:
            db.close()

    def _apply(self, db: sqlite3.Connection, writes: list[tuple[str, tuple[object, ...]]]) -> None:
        """Apply ``writes`` in one transaction; when that fails, one at a time, so one bad
        write costs only itself."""
        try:
            db.execute("BEGIN")
            for sql, args in writes:
                _execute(db, sql, args)
            db.execute("COMMIT")
            return
        # Anything at all: this thread is the only writer, and if it died every later write of
        # the process (registrations, CDRs, recordings) would be lost without a word. Logged
        # with its traceback, so a bug is not hidden.
        except Exception:
            log.exception("store: a batch of %d writes failed; applying them one by one",
                          len(writes))
            self._rollback(db)
        failed = 0
        for sql, args in writes:
            try:
                _execute(db, sql, args)
            except Exception:  # as above: log, count, carry on with the next write
                failed += 1
                if failed == 1:
                    log.exception("store: write dropped: %s", sql[:60])
        if failed:
            self.write_failures += failed
            log.error("store: %d of %d writes dropped", failed, len(writes))

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        try:
            if db.in_transaction:
                db.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("store: rollback failed")
