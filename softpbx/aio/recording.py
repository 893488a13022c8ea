"""Call recording, the IO half: tap the relay, flush the recorder, encode MP3 off the loop.

The sans-IO :class:`~softpbx.media.recorder.CallRecorder` does the RTP -> PCM work; this module
owns what touches time, threads and files:

* ``start``: the relay's tap feeds the recorder (one list append per packet, with the loop
  time); an ``Mp3Writer`` opens ``<dir>/<call_id>.mp3.part`` in a worker thread;
* every ``flush_seconds``: ``recorder.flush(now)`` on the loop, the PCM written in a worker
  thread; writes of one call run in order, one at a time;
* ``stop``: ``finish``, the last write, ``close()`` renames the file into place; the index row
  becomes ``ready`` and one log line gives the call id and the public link.

Links are ``<public_base_url>/rec/<token>.mp3`` with a 192-bit token from :mod:`secrets`; the
index keeps only the token's SHA-256.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..config.schema import RecordingSettings
from ..core.events import StartRecording
from ..media.mp3 import Mp3Writer, recover_partials
from ..media.recorder import CallRecorder, Side
from ..media.relay import RelaySession
from ..media.relay import Side as RelaySide
from ..store.sqlite import SqliteStore

log = logging.getLogger("softpbx.recording")


def token_hash(token: str) -> str:
    """The index key of a link token."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class FinishedRecording:
    """What :class:`RecordingManager` reports when a call's recording is final."""

    call_id: str
    link: str | None
    """The public link, or ``None`` when the call could not be recorded."""
    duration: float = 0.0
    size: int = 0
    reason: str = ""
    """Why it was not recorded."""


@dataclass
class _Active:
    call_id: str
    recorder: CallRecorder
    media: RelaySession
    writer: Mp3Writer | None = None
    lane: asyncio.Future[None] | None = None
    """The last write queued for this call: the next one waits for it."""
    token: str = ""
    path: str = ""
    flush_handle: asyncio.TimerHandle | None = None
    failed: str | None = None
    stopped: bool = False
    """``stop`` ran: the file is being finalised (a second stop must not finalise it again)."""
    pending: int = 0
    tasks: set[asyncio.Future[None]] = field(default_factory=set)


class RecordingManager:
    """Every recording in progress, and the recordings index."""

    def __init__(self, *, settings: RecordingSettings, directory: str, public_base_url: str,
                 store: SqliteStore, loop: asyncio.AbstractEventLoop,
                 on_finished: Callable[[FinishedRecording], None] | None = None,
                 workers: int = 2) -> None:
        self.settings = settings
        self.directory = directory
        self.base_url = public_base_url.rstrip("/")
        self.store = store
        self.loop = loop
        self.on_finished = on_finished
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="softpbx-mp3")
        self._active: dict[str, _Active] = {}
        self.backlog = 0
        """MP3 writes queued or running (a growing number means encoding cannot keep up)."""

    @property
    def active_count(self) -> int:
        """Calls being recorded."""
        return len(self._active)

    async def recover(self) -> None:
        """Start-up: finalise or drop ``.part`` files, settle index rows left ``recording``."""
        os.makedirs(self.directory, exist_ok=True)
        results = await self.loop.run_in_executor(self._pool, recover_partials, self.directory)
        by_path = {r.path or r.part_path[: -len(".part")]: r for r in results}
        rows = await self.loop.run_in_executor(None, lambda: self.store.recordings(status="recording"))
        for call_id, path, _, _ in rows:
            r = by_path.get(path)
            if r is not None and r.finalised:
                self.store.execute(
                    "UPDATE recordings SET status='ready', duration=?, size=?, finished_at=?,"
                    " reason='recovered after a restart' WHERE call_id=?",
                    (r.duration_seconds, r.size_bytes, time.time(), call_id))
                self.store.hand_over()
                log.info("recording of %s recovered after a restart", call_id)
            else:
                self.store.execute(
                    "UPDATE recordings SET status='failed', reason='interrupted by a restart',"
                    " finished_at=? WHERE call_id=?", (time.time(), call_id))
                self.store.hand_over()
                log.warning("recording of %s lost to a restart", call_id)

    # -- per call -----------------------------------------------------------------------------
    def start(self, action: StartRecording) -> None:
        """A recorded call was answered."""
        rec = CallRecorder.from_settings(self.settings, start=action.start, codecs=action.codecs)
        act = _Active(call_id=action.call_id, recorder=rec, media=action.media)
        act.token = secrets.token_urlsafe(24)
        act.path = os.path.join(self.directory, f"{action.call_id}.mp3")
        self._active[action.call_id] = act
        loop_time = self.loop.time
        feed = rec.feed
        caller, callee = Side.CALLER, Side.CALLEE
        a_side = RelaySide.A

        def tap(side: RelaySide, data: bytes) -> None:
            feed(caller if side is a_side else callee, data, loop_time())

        action.media.tap = tap
        self.store.execute(
            "INSERT OR REPLACE INTO recordings (call_id, token_hash, path, status, created_at)"
            " VALUES (?,?,?,'recording',?)",
            (act.call_id, token_hash(act.token), act.path, time.time()))
        self.store.hand_over()
        channels = rec.channels
        level = self.settings.compression_level
        mode = self.settings.bitrate_mode

        def open_writer() -> None:
            act.writer = Mp3Writer(act.path, channels=channels, compression_level=level,
                                   bitrate_mode=mode)

        self._queue(act, open_writer)
        act.flush_handle = self.loop.call_later(self.settings.flush_seconds, self._flush, act)

    def _flush(self, act: _Active) -> None:
        act.flush_handle = self.loop.call_later(self.settings.flush_seconds, self._flush, act)
        if act.failed is not None:
            return
        pcm = act.recorder.flush(self.loop.time())
        if act.recorder.failure is not None:
            self._fail(act, act.recorder.failure)
            return
        if len(pcm):
            self._queue(act, lambda: act.writer.write(pcm))  # type: ignore[union-attr]

    def _fail(self, act: _Active, reason: str) -> None:
        act.failed = reason
        act.media.tap = None
        log.warning("call %s not recorded: %s", act.call_id, reason)

    def stop(self, call_id: str, at: float) -> None:
        """The recorded call ended at loop time ``at``."""
        act = self._active.get(call_id)
        if act is None or act.stopped:
            # Shutdown (aclose) stops every call still here, including one whose file is
            # already being finalised: closing it twice would race two threads on one file.
            return
        act.stopped = True
        if act.flush_handle is not None:
            act.flush_handle.cancel()
        act.media.tap = None
        pcm = act.recorder.finish(at) if act.failed is None else None
        if act.failed is None and act.recorder.failure is not None:
            self._fail(act, act.recorder.failure)
        if act.failed is None and pcm is not None and len(pcm):
            self._queue(act, lambda: act.writer.write(pcm))  # type: ignore[union-attr]
        task = self.loop.create_task(self._finalise(act))
        act.tasks.add(task)

    async def _finalise(self, act: _Active) -> None:
        # Wait for every write of this call, then publish or drop the file.
        while act.lane is not None and not act.lane.done():
            await asyncio.shield(act.lane)
        writer = act.writer
        result: FinishedRecording
        if act.failed is None and writer is not None:
            try:
                f = await self.loop.run_in_executor(self._pool, writer.close)
            except OSError as exc:
                act.failed = f"could not write the MP3: {exc}"
            else:
                link = f"{self.base_url}/rec/{act.token}.mp3"
                self.store.execute(
                    "UPDATE recordings SET status='ready', duration=?, size=?, finished_at=?"
                    " WHERE call_id=?", (f.duration_seconds, f.size_bytes, time.time(), act.call_id))
                self.store.hand_over()
                log.info("recording ready: call %s %.1f s %d bytes %s", act.call_id,
                         f.duration_seconds, f.size_bytes, link)
                result = FinishedRecording(act.call_id, link, f.duration_seconds, f.size_bytes)
        if act.failed is not None or writer is None:
            reason = act.failed or "the MP3 file could not be opened"
            if writer is not None:
                await self.loop.run_in_executor(self._pool, writer.abort)
            self.store.execute("UPDATE recordings SET status='failed', reason=?, finished_at=?"
                               " WHERE call_id=?", (reason, time.time(), act.call_id))
            self.store.hand_over()
            result = FinishedRecording(act.call_id, None, reason=reason)
        self._active.pop(act.call_id, None)
        if self.on_finished is not None:
            self.on_finished(result)

    def _queue(self, act: _Active, job: Callable[[], None]) -> None:
        """Run ``job`` in a worker thread after the call's previous job."""
        prev = act.lane
        self.backlog += 1

        async def run() -> None:
            try:
                if prev is not None:
                    await asyncio.shield(prev)
                if act.failed is None:
                    await self.loop.run_in_executor(self._pool, job)
            except Exception as exc:  # an encoder or disk error: this call is not recorded
                log.debug("MP3 job of %s failed", act.call_id, exc_info=True)
                if act.failed is None:
                    self._fail(act, f"MP3 encoding failed: {exc}")
            finally:
                self.backlog -= 1

        act.lane = self.loop.create_task(run())

    # -- retention ----------------------------------------------------------------------------
    def enforce_retention(self) -> int:
        """Delete recordings past ``max_age_days`` / ``max_total_mb`` (oldest first); their
        links then answer 410. Blocking: run in a worker thread. Returns how many went."""
        s = self.settings
        if not s.max_age_days and not s.max_total_mb:
            return 0
        rows = self.store.recordings(status="ready")
        victims = []
        now = time.time()
        if s.max_age_days:
            horizon = now - s.max_age_days * 86400
            victims = [r for r in rows if r[2] < horizon]
        if s.max_total_mb:
            aged = {r[0] for r in victims}
            keep = [r for r in rows if r[0] not in aged]
            total = sum(r[3] for r in keep)
            limit = s.max_total_mb * 1024 * 1024
            for r in keep:
                if total <= limit:
                    break
                victims.append(r)
                total -= r[3]
        for _, path, _, _ in victims:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if victims:
            # The store buffers writes on the loop's thread and is not thread-safe: a write
            # queued from here could be lost in a concurrent hand-over. Mark them on the loop.
            # (A loop already closed at shutdown: the rows stay 'ready' without a file, which
            # serves 404, and the next start's retention marks them.)
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._mark_deleted, [r[0] for r in victims], now)
            log.info("retention: %d recordings deleted", len(victims))
        return len(victims)

    def _mark_deleted(self, call_ids: list[str], at: float) -> None:
        """Retention removed these recordings' files: their links answer 410 from now on."""
        for call_id in call_ids:
            self.store.execute("UPDATE recordings SET status='deleted', finished_at=?"
                               " WHERE call_id=?", (at, call_id))
        self.store.hand_over()

    async def aclose(self) -> None:
        """Finish what is in flight (calls still up are finalised at shutdown time)."""
        now = self.loop.time()
        for call_id in list(self._active):
            self.stop(call_id, now)
        tasks = [t for a in list(self._active.values()) for t in a.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=10.0)
        self._pool.shutdown(wait=True)
