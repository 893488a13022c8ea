"""What the shell asks of a store: the typed interface :class:`~.sqlite.SqliteStore`
implements (ARCHITECTURE.md "Store": keep it behind one small interface, so another engine
can sit behind it later).

Writes are non-blocking and called on the event loop's thread (they are buffered and
written off the loop); the methods marked "blocking" read the database and run in an
executor or at start-up. The webhook outbox is not here: it has its own connection and
writer thread (:class:`~.outbox.OutboxDb`), so a NOTIFY_START is committed in about a
millisecond instead of waiting for the store's 50 ms batches.
"""

from __future__ import annotations

import threading
from typing import Protocol

from ..core.events import Action, Binding


class Store(Protocol):
    """Registrations, CDRs and the recordings index."""

    # -- the core's actions -----------------------------------------------------------------
    def apply(self, action: Action, *, wall_offset: float) -> None:
        """Queue the write an action asks for (``SaveBinding``, ``DeleteBinding``,
        ``WriteCdr``); any other action is a bug and is refused loudly."""

    @property
    def buffered(self) -> int:
        """Writes waiting to be handed to the writer thread."""

    def hand_over(self) -> None:
        """Give the buffered writes to the writer thread (the shell calls this every ~50 ms)."""

    def flush(self, timeout: float = 10.0) -> bool:
        """Blocking: wait until everything queued so far is written."""

    def notify_written(self, done: threading.Event) -> None:
        """Hand over; ``done`` is set once every write queued so far is applied."""

    def close(self) -> None:
        """Write what is queued and stop."""

    # -- reads ------------------------------------------------------------------------------
    def load_bindings(self, *, now: float, wall: float) -> list[Binding]:
        """Blocking (start-up): unexpired bindings on the monotonic clock ``now``."""

    def recent_cdrs(self, limit: int = 50) -> list[dict[str, object]]:
        """Blocking: the newest CDRs as dicts."""

    # -- recordings index -------------------------------------------------------------------
    def recording_started(self, call_id: str, *, token_hash: str, path: str, at: float) -> None:
        """A call's recording began."""

    def recording_ready(self, call_id: str, *, duration: float, size: int, at: float,
                        token_hash: str | None = None, reason: str = "") -> None:
        """The MP3 is complete (``token_hash``: the fresh link of a recovered file)."""

    def recording_found(self, call_id: str, *, token_hash: str, path: str, duration: float,
                        size: int, created_at: float, at: float, reason: str) -> None:
        """Index a complete file that had no row (recovery)."""

    def recording_failed(self, call_id: str, *, reason: str, at: float) -> None:
        """The call was not recorded."""

    def recording_deleted(self, call_id: str, *, at: float) -> None:
        """Retention removes the file (its link answers 410)."""

    def recording_by_hash(self, token_hash: str) -> tuple[str, str, str] | None:
        """Blocking: (path, status, call_id) of the recording whose token hashes so."""

    def recordings(self, *, status: str) -> list[tuple[str, str, float, int]]:
        """Blocking: (call_id, path, created_at, size) with ``status``, oldest first."""

    def recording_index(self) -> list[tuple[str, str, str, str]]:
        """Blocking: (call_id, path, status, reason) of every recording row."""
