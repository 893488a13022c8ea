"""SQLite state, written off the event loop (ARCHITECTURE.md "Store").

Writes are queued and applied by one writer thread in batched transactions, so the event
loop never waits on the disk; reads happen at start-up, before the loop serves traffic.
The store speaks the core's actions (:mod:`softpbx.core.events`) so another engine can sit
behind the same small interface later.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from importlib import resources

from ..config.schema import Transport
from ..core.events import Action, Binding, DeleteBinding, SaveBinding, WriteCdr
from ..sip.events import Flow

log = logging.getLogger("softpbx.store")

SCHEMA_VERSION = 3
_STOP = object()


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


class SqliteStore:
    """Registrations (and, as the switch grows, CDRs, recordings, the webhook outbox)."""

    def __init__(self, *, path: str) -> None:
        self.path = path
        db = _connect(path)
        db.executescript(resources.files("softpbx.store").joinpath("schema.sql").read_text())
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.close()
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._buffer: list[tuple[str, tuple[object, ...]]] = []
        self._thread = threading.Thread(target=self._writer, name="softpbx-store", daemon=True)
        self._thread.start()

    # -- reads (start-up) ---------------------------------------------------------------------
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
        """The newest CDRs as dicts (operator API, tests)."""
        db = _connect(self.path)
        try:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM cdr ORDER BY started_at DESC LIMIT ?", (limit,))
            return [dict(r) for r in rows]
        finally:
            db.close()

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
                " extension, gateway, started_at, answered_at, ended_at, duration, disposition,"
                " sip_code, cause) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (r.call_id, r.sip_call_id, r.direction, r.caller, r.callee, r.did, r.extension,
                 r.gateway, r.started_at + wall_offset,
                 None if r.answered_at is None else r.answered_at + wall_offset,
                 r.ended_at + wall_offset, r.duration, r.disposition, r.sip_code, r.cause)))
        elif isinstance(action, DeleteBinding):
            self._write(("DELETE FROM registrations WHERE aor=? AND key=?",
                             (action.aor, action.key)))

    # -- recordings index ---------------------------------------------------------------------
    def execute(self, sql: str, args: tuple[object, ...]) -> None:
        """Queue one write (for the shell's own tables: the recordings index)."""
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
        """(path, status, call_id) of the recording whose token hashes to ``token_hash``."""
        db = _connect(self.path)
        try:
            row = db.execute("SELECT path, status, call_id FROM recordings WHERE token_hash = ?",
                             (token_hash,)).fetchone()
        finally:
            db.close()
        return None if row is None else (row[0], row[1], row[2])

    def recordings(self, *, status: str) -> list[tuple[str, str, float, int]]:
        """(call_id, path, created_at, size) of recordings with ``status``, oldest first."""
        db = _connect(self.path)
        try:
            return [(r[0], r[1], r[2], r[3] or 0) for r in db.execute(
                "SELECT call_id, path, created_at, size FROM recordings WHERE status = ?"
                " ORDER BY created_at", (status,))]
        finally:
            db.close()

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything queued so far is written (tests, shutdown)."""
        self.hand_over()
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self) -> None:
        """Write what is queued and stop the writer."""
        self.hand_over()
        self._queue.put(_STOP)
        self._thread.join(timeout=10.0)

    def _writer(self) -> None:
        db = _connect(self.path)
        q = self._queue
        try:
            while True:
                item = q.get()
                batch = [item]
                # Group whatever else is already queued into one transaction.
                while len(batch) < 1000:
                    try:
                        batch.append(q.get_nowait())
                    except queue.Empty:
                        break
                stop = False
                events = []
                try:
                    db.execute("BEGIN")
                    for it in batch:
                        if it is _STOP:
                            stop = True
                        elif isinstance(it, threading.Event):
                            events.append(it)
                        elif isinstance(it, list):
                            for sql, args in it:
                                db.execute(sql, args)
                        else:
                            sql, args = it  # type: ignore[misc]
                            db.execute(sql, args)
                    db.execute("COMMIT")
                except sqlite3.Error:
                    log.exception("store write failed; batch of %d dropped", len(batch))
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                for ev in events:
                    ev.set()
                if stop:
                    return
        finally:
            db.close()
