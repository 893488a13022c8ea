"""Read-only queries of the console (issue 11): CDRs with filters and paging, the recording of
a call by its id, a change mark and the store's size. Blocking: run in an executor.

Its own read-only connections (one per thread, ``mode=ro``), beside
:class:`~.sqlite.SqliteStore`'s writer: WAL lets them read while the writer writes."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import zoneinfo
from dataclasses import dataclass

from .sqlite import _connect_reader, cdr_local_times

MAX_PAGE = 500


@dataclass(frozen=True, slots=True)
class CdrFilter:
    """What the CDR page asks for; empty/None fields do not filter."""

    since: float | None = None
    """Unix time: calls started at or after it."""
    until: float | None = None
    """Unix time: calls started before it."""
    extension: str = ""
    """The extension that placed, answered or last rang the call."""
    number: str = ""
    """A substring of the caller's number or of the number dialled."""
    direction: str = ""
    disposition: str = ""
    limit: int = 50
    offset: int = 0


def _like(text: str) -> str:
    """``text`` as a LIKE substring pattern with its own ``%``/``_`` escaped."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class CdrSearch:
    """The console's read-only view of ``softpbx.db``."""

    def __init__(self, *, path: str, timezone: str = "UTC") -> None:
        self.path = path
        self.tz = zoneinfo.ZoneInfo(timezone)
        """``global.timezone``: each row's times are also given in it (``*_local``)."""
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = _connect_reader(self.path)
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    def search(self, **filters: object) -> dict[str, object]:
        """``{"cdr": [...], "total": n}`` for :class:`CdrFilter`'s fields: newest first, each
        row with its recording's ``recording_status`` and ``recording_duration`` (``None``
        without a recording)."""
        f = CdrFilter(**filters)  # type: ignore[arg-type]
        where, args = [], []  # type: tuple[list[str], list[object]]
        if f.since is not None:
            where.append("c.started_at >= ?")
            args.append(f.since)
        if f.until is not None:
            where.append("c.started_at < ?")
            args.append(f.until)
        if f.extension:
            where.append("(c.extension = ? OR c.caller_extension = ?)")
            args += [f.extension, f.extension]
        if f.number:
            where.append("(c.caller LIKE ? ESCAPE '\\' OR c.callee LIKE ? ESCAPE '\\')")
            args += [_like(f.number)] * 2
        if f.direction:
            where.append("c.direction = ?")
            args.append(f.direction)
        if f.disposition:
            where.append("c.disposition = ?")
            args.append(f.disposition)
        cond = (" WHERE " + " AND ".join(where)) if where else ""
        db = self._db()
        total = db.execute(f"SELECT count(*) FROM cdr c{cond}", args).fetchone()[0]
        cur = db.execute(
            "SELECT c.*, r.status AS recording_status, r.duration AS recording_duration"
            f" FROM cdr c LEFT JOIN recordings r ON r.call_id = c.call_id{cond}"
            " ORDER BY c.started_at DESC LIMIT ? OFFSET ?",
            [*args, max(1, min(f.limit, MAX_PAGE)), max(0, f.offset)])
        names = [d[0] for d in cur.description]
        rows = [cdr_local_times(dict(zip(names, r, strict=True)), self.tz)
                for r in cur.fetchall()]
        return {"cdr": rows, "total": total}

    def recording(self, call_id: str) -> tuple[str, str] | None:
        """``(path, status)`` of the recording of ``call_id`` (or of the call whose
        ``pbx_call_id`` it is), ``None`` when the call has none."""
        rows = self._db().execute(
            "SELECT path, status FROM recordings WHERE call_id = ? UNION ALL "
            "SELECT r.path, r.status FROM cdr c JOIN recordings r ON r.call_id = c.call_id"
            " WHERE c.pbx_call_id = ? LIMIT 1", (call_id, call_id)).fetchall()
        return (rows[0][0], rows[0][1]) if rows else None

    def mark(self) -> tuple[int, float]:
        """Changes when a CDR is written or a recording finishes (the console's refresh)."""
        db = self._db()
        cdr = db.execute("SELECT coalesce(max(rowid), 0) FROM cdr").fetchone()[0]
        rec = db.execute("SELECT coalesce(max(finished_at), 0) FROM recordings").fetchone()[0]
        return int(cdr), float(rec)

    def size(self) -> int:
        """Bytes of the database with its WAL."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(self.path + suffix).st_size
        return total

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            dbs, self._all = self._all, []
        for db in dbs:
            db.close()
