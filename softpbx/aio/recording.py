"""Call recording, the IO half: tap the relay, flush the recorder, encode MP3 off the loop.

The sans-IO :class:`~softpbx.media.recorder.CallRecorder` does the RTP -> PCM work; this module
owns what touches time, threads and files:

* ``start``: the relay's tap feeds the recorder (one list append per packet, with the loop
  time); an ``Mp3Writer`` opens ``<dir>/<call_id>.mp3.part`` in a worker thread;
* every ``flush_seconds``: ``recorder.flush(now)`` on the loop, the PCM written in a worker
  thread; writes of one call run in order, one at a time, and at most ``max_queued_writes``
  of them wait (memory stays bounded when the disk falls behind: the call is then "not
  recorded: encoder overloaded");
* ``stop``: ``finish``, the last write, ``close()`` renames the file into place; the index row
  becomes ``ready`` and one log line gives the call id and the public link. A libsndfile or
  disk error at any step makes the call "not recorded" with the reason, in one log line.

Links are ``<public_base_url>/rec/<token>.mp3`` with a 192-bit token from :mod:`secrets`; the
index keeps only the token's SHA-256. So a recording recovered at start-up gets a fresh token
(the old one is unknowable), logged like any finished recording.

Retention marks the index rows ``deleted`` (committed) before it removes the files, so a link
answers 410 as soon as its file is gone; it runs at start-up, hourly, and after each finished
recording when ``max_total_mb`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from ..config.schema import RecordingSettings
from ..core.events import StartRecording
from ..media.mp3 import (
    ENCODER_ERRORS,
    PART_SUFFIX,
    Mp3Writer,
    RecordingFile,
    probe,
    recover_partials,
)
from ..media.recorder import CallRecorder, Side
from ..media.relay import RelaySession
from ..media.relay import Side as RelaySide
from ..store.api import Store

log = logging.getLogger("softpbx.recording")

TOKEN_BYTES: Final = 24
"""Link token size: 192 bits from :mod:`secrets`."""

MAX_QUEUED_WRITES: Final = 12
"""Default cap on one call's MP3 jobs waiting or running (12 flushes = 60 s of audio at the
default 5 s): past it the encoder is not keeping up and the call is failed rather than
buffered without bound."""

OVERLOADED: Final = "encoder overloaded"
"""The reason of a call failed by :data:`MAX_QUEUED_WRITES`."""

_RETENTION_MARK_TIMEOUT: Final = 5.0
"""How long retention waits for its ``deleted`` marks to be committed before removing files."""


def token_hash(token: str) -> str:
    """The index key of a link token."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh link token (URL-safe, :data:`TOKEN_BYTES` random bytes)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


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
    recovered: bool = False
    """Published at start-up from what a crash left (with a fresh link)."""


@dataclass(frozen=True, slots=True)
class RecordingStats:
    """Counters of a :class:`RecordingManager` since it started (status API, benchmarks)."""

    active: int
    """Calls being recorded (or finalised) now."""
    backlog: int
    """MP3 jobs queued or running, all calls."""
    recorded: int
    """Recordings published (including those recovered at start-up)."""
    failed: int
    """Calls not recorded, any reason."""
    overloaded: int
    """Of those, calls dropped because their MP3 jobs piled up (encoder overloaded)."""


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
    """This call's MP3 jobs queued or running."""
    tasks: set[asyncio.Future[None]] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class _Recovered:
    """What start-up recovery found for one recording (computed in a worker thread)."""

    call_id: str
    path: str
    outcome: str
    """``ready`` (a row to publish), ``new`` (a file without a row: index it), ``failed``."""
    file: RecordingFile | None = None
    reason: str = ""
    created_at: float = 0.0


class RecordingManager:
    """Every recording in progress, and the recordings index."""

    def __init__(self, *, settings: RecordingSettings, directory: str, public_base_url: str,
                 store: Store, loop: asyncio.AbstractEventLoop,
                 on_finished: Callable[[FinishedRecording], None] | None = None,
                 workers: int = 2, max_queued_writes: int = MAX_QUEUED_WRITES) -> None:
        self.settings = settings
        self.directory = directory
        self.base_url = public_base_url.rstrip("/")
        self.store = store
        self.loop = loop
        self.on_finished = on_finished
        self.max_queued_writes = max_queued_writes
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="softpbx-mp3")
        self._active: dict[str, _Active] = {}
        self.backlog = 0
        """MP3 writes queued or running (a growing number means encoding cannot keep up)."""
        self.recorded = 0
        """Recordings published so far."""
        self.failed = 0
        """Calls not recorded so far (any reason)."""
        self.overloaded = 0
        """Calls not recorded because the encoder fell behind (see ``max_queued_writes``)."""
        self._retention_lock = threading.Lock()
        self._retention_task: asyncio.Task[None] | None = None
        self._retention_again = False

    @property
    def active_count(self) -> int:
        """Calls being recorded."""
        return len(self._active)

    def stats(self) -> RecordingStats:
        """Counters so far."""
        return RecordingStats(active=len(self._active), backlog=self.backlog,
                              recorded=self.recorded, failed=self.failed,
                              overloaded=self.overloaded)

    def link(self, token: str) -> str:
        """The public link of ``token``."""
        return f"{self.base_url}/rec/{token}.mp3"

    # -- start-up -----------------------------------------------------------------------------
    async def recover(self) -> None:
        """Start-up: settle what a crash left behind, before any call is recorded.

        ``.part`` files are finalised (or deleted when they do not decode); a row left
        ``recording`` whose file is complete (a crash between the rename and the index update)
        or was just finalised is published with a fresh token, logged like a finished call; a
        file with no row is indexed the same way (or deleted when it does not decode); a file
        whose row says ``deleted`` (a crash inside retention) or ``failed`` (a call not
        recorded) is removed; the other ``recording`` rows are marked failed. Retention then
        sees every file in the directory.
        """
        os.makedirs(self.directory, exist_ok=True)
        index = await self.loop.run_in_executor(None, self.store.recording_index)
        plan = await self.loop.run_in_executor(self._pool, _recovery_plan, self.directory, index)
        now = time.time()
        for item in plan:
            if item.outcome == "failed":
                self.store.recording_failed(item.call_id, reason=item.reason, at=now)
                self.failed += 1
                log.warning("recording of %s lost to a restart: %s", item.call_id, item.reason)
                continue
            assert item.file is not None
            token = new_token()
            if item.outcome == "new":
                self.store.recording_found(
                    item.call_id, token_hash=token_hash(token), path=item.path,
                    duration=item.file.duration_seconds, size=item.file.size_bytes,
                    created_at=item.created_at, at=now, reason=item.reason)
            else:
                self.store.recording_ready(
                    item.call_id, duration=item.file.duration_seconds,
                    size=item.file.size_bytes, at=now, token_hash=token_hash(token),
                    reason=item.reason)
            self._report(self._published(item.call_id, token, item.file, item.reason))
        self.store.hand_over()

    # -- per call -----------------------------------------------------------------------------
    def start(self, action: StartRecording) -> None:
        """A recorded call was answered."""
        rec = CallRecorder.from_settings(self.settings, start=action.start, codecs=action.codecs)
        act = _Active(call_id=action.call_id, recorder=rec, media=action.media)
        act.token = new_token()
        act.path = os.path.join(self.directory, f"{action.call_id}.mp3")
        self._active[action.call_id] = act
        loop_time = self.loop.time
        feed = rec.feed
        caller, callee = Side.CALLER, Side.CALLEE
        a_side = RelaySide.A

        def tap(side: RelaySide, data: bytes) -> None:
            feed(caller if side is a_side else callee, data, loop_time())

        action.media.tap = tap
        self.store.recording_started(act.call_id, token_hash=token_hash(act.token),
                                     path=act.path, at=time.time())
        self.store.hand_over()
        channels = rec.channels
        level = self.settings.compression_level
        mode = self.settings.bitrate_mode

        def open_writer() -> None:
            act.writer = Mp3Writer(act.path, channels=channels, compression_level=level,
                                   bitrate_mode=mode)

        self._queue(act, open_writer, "open")
        act.flush_handle = self.loop.call_later(self.settings.flush_seconds, self._flush, act)

    def set_codecs(self, call_id: str, caller: Mapping[int, str],
                   callee: Mapping[int, str]) -> None:
        """New payload type maps for each side of a recorded call (an SDP re-negotiation);
        packets already relayed are placed with the old ones. Unknown or finished calls are
        ignored."""
        act = self._active.get(call_id)
        if act is None or act.stopped or act.failed is not None:
            return
        act.recorder.set_codecs(caller, Side.CALLER)
        act.recorder.set_codecs(callee, Side.CALLEE)

    def _flush(self, act: _Active) -> None:
        act.flush_handle = self.loop.call_later(self.settings.flush_seconds, self._flush, act)
        if act.failed is not None:
            return
        pcm = act.recorder.flush(self.loop.time())
        if act.recorder.failure is not None:
            self._fail(act, act.recorder.failure)
            return
        if len(pcm):
            self._write(act, pcm)

    def _write(self, act: _Active, pcm: npt.NDArray[np.int16]) -> None:
        """Queue one chunk of PCM for the call's writer, unless too many already wait."""
        if act.pending >= self.max_queued_writes:
            # The disk or the encoder is not keeping up: every queued chunk holds its PCM, so
            # waiting longer would grow memory without bound. Give up on this call.
            self.overloaded += 1
            self._fail(act, OVERLOADED)
            return
        self._queue(act, lambda: act.writer.write(pcm), "write")  # type: ignore[union-attr]

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
            self._write(act, pcm)
        task = self.loop.create_task(self._finalise(act))
        act.tasks.add(task)

    async def _finalise(self, act: _Active) -> None:
        try:
            result = await self._settle(act)
        # A bug (not an encoder or disk error: those are handled in _settle). Logged with its
        # traceback; the call must still leave _active, get its row and be reported, or the
        # manager would hold it (and its index row would say 'recording') for ever.
        except Exception as exc:
            log.exception("recording of %s could not be finalised", act.call_id)
            result = self._not_recorded(act.call_id, f"internal error: {exc!r}")
        self._active.pop(act.call_id, None)
        self._report(result)
        if result.link is not None and self.settings.max_total_mb:
            self._schedule_retention()

    async def _settle(self, act: _Active) -> FinishedRecording:
        """Wait for every write of this call, then publish or drop the file."""
        while act.lane is not None and not act.lane.done():
            await asyncio.shield(act.lane)
        writer = act.writer
        if act.failed is None and writer is not None:
            try:
                f = await self.loop.run_in_executor(self._pool, writer.close)
            except ENCODER_ERRORS as exc:
                self._fail(act, f"could not finish the MP3: {exc}")
            else:
                self.store.recording_ready(act.call_id, duration=f.duration_seconds,
                                           size=f.size_bytes, at=time.time())
                return self._published(act.call_id, act.token, f)
        if writer is not None:
            try:  # delete the .part (idempotent: close() already did on its error)
                await self.loop.run_in_executor(self._pool, writer.abort)
            except ENCODER_ERRORS as exc:
                log.warning("call %s: could not remove %s: %s", act.call_id, writer.part_path,
                            exc)
        if act.failed is None:
            self._fail(act, "the MP3 file could not be opened")
        return self._not_recorded(act.call_id, act.failed or "")

    def _published(self, call_id: str, token: str, f: RecordingFile,
                   note: str = "") -> FinishedRecording:
        """The index row is being made ``ready`` (queued by the caller): log the link."""
        self.store.hand_over()
        self.recorded += 1
        link = self.link(token)
        log.info("recording ready: call %s %.1f s %d bytes %s%s", call_id, f.duration_seconds,
                 f.size_bytes, link, f" ({note})" if note else "")
        return FinishedRecording(call_id, link, f.duration_seconds, f.size_bytes,
                                 recovered=bool(note))

    def _not_recorded(self, call_id: str, reason: str) -> FinishedRecording:
        self.store.recording_failed(call_id, reason=reason, at=time.time())
        self.store.hand_over()
        self.failed += 1
        return FinishedRecording(call_id, None, reason=reason)

    def _report(self, result: FinishedRecording) -> None:
        if self.on_finished is not None:
            self.on_finished(result)

    def _queue(self, act: _Active, job: Callable[[], None], what: str) -> None:
        """Run ``job`` in a worker thread after the call's previous job."""
        prev = act.lane
        self.backlog += 1
        act.pending += 1

        async def run() -> None:
            try:
                if prev is not None:
                    await asyncio.shield(prev)
                if act.failed is None:
                    await self.loop.run_in_executor(self._pool, job)
            except ENCODER_ERRORS as exc:  # libsndfile or the disk: this call is not recorded
                if act.failed is None:
                    self._fail(act, f"could not {what} the MP3: {exc}")
            # A bug in a job (a wrong PCM shape ...): logged with its traceback and the call
            # failed, so its later jobs are skipped and stop() still settles it.
            except Exception as exc:
                log.exception("MP3 %s job of %s failed", what, act.call_id)
                if act.failed is None:
                    self._fail(act, f"internal error: {exc!r}")
            finally:
                self.backlog -= 1
                act.pending -= 1

        act.lane = self.loop.create_task(run())

    # -- retention ----------------------------------------------------------------------------
    def enforce_retention(self) -> int:
        """Delete recordings past ``max_age_days`` / ``max_total_mb`` (oldest first); their
        links then answer 410. Returns how many went.

        Blocking: run it in a worker thread while the loop runs. The rows are marked
        ``deleted`` on the loop thread (the store buffers writes there, without a lock) and
        the files are removed only once that is committed, so a link never answers 404 in
        between; a file kept by a crash in between is removed by the next start's recovery.
        """
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is self.loop:
                raise AssertionError("enforce_retention blocks: run it in an executor")
        s = self.settings
        if not s.max_age_days and not s.max_total_mb:
            return 0
        with self._retention_lock:  # the hourly run and one after a recording may overlap
            victims = self._retention_victims()
            if not victims:
                return 0
            now = time.time()
            marked = threading.Event()

            def mark() -> None:
                self._mark_deleted([r[0] for r in victims], now)
                self.store.notify_written(marked)

            try:
                self.loop.call_soon_threadsafe(mark)
            except RuntimeError:  # the loop is closed (shutdown): the next start does it
                return 0
            if not marked.wait(_RETENTION_MARK_TIMEOUT):
                log.warning("retention: the index was not updated within %.0f s; %d files kept"
                            " for now", _RETENTION_MARK_TIMEOUT, len(victims))
                return 0
            for _, path, _, _ in victims:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("retention: could not delete %s: %s", path, exc)
            log.info("retention: %d recordings deleted", len(victims))
            return len(victims)

    def _retention_victims(self) -> list[tuple[str, str, float, int]]:
        s = self.settings
        rows = self.store.recordings(status="ready")
        victims = []
        if s.max_age_days:
            horizon = time.time() - s.max_age_days * 86400
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
        return victims

    def _mark_deleted(self, call_ids: list[str], at: float) -> None:
        """Retention is removing these recordings' files: their links answer 410 from now on."""
        for call_id in call_ids:
            self.store.recording_deleted(call_id, at=at)
        self.store.hand_over()

    def _schedule_retention(self) -> None:
        """Run retention soon in a worker thread; runs requested meanwhile coalesce."""
        if self._retention_task is not None and not self._retention_task.done():
            self._retention_again = True
            return
        self._retention_task = self.loop.create_task(self._retention_soon())

    async def _retention_soon(self) -> None:
        while True:
            self._retention_again = False
            written = threading.Event()
            self.store.notify_written(written)  # count the recording that just finished

            def job(written: threading.Event = written) -> int:
                written.wait(_RETENTION_MARK_TIMEOUT)
                return self.enforce_retention()

            try:
                await self.loop.run_in_executor(None, job)
            # A background task: anything it raises (an sqlite3 error reading the index)
            # would otherwise surface only when the task is collected. Logged with traceback.
            except Exception:
                log.exception("retention after a recording failed")
            if not self._retention_again:
                return

    async def aclose(self) -> None:
        """Finish what is in flight (calls still up are finalised at shutdown time)."""
        now = self.loop.time()
        for call_id in list(self._active):
            self.stop(call_id, now)
        tasks = [t for a in list(self._active.values()) for t in a.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=10.0)
        if self._retention_task is not None:
            await asyncio.wait([self._retention_task], timeout=_RETENTION_MARK_TIMEOUT + 1)
            self._retention_task.cancel()
        # Waiting for the workers blocks: off the loop, which still serves the others.
        await self.loop.run_in_executor(None, functools.partial(self._pool.shutdown, wait=True))


_RESTART: Final = "interrupted by a restart"
"""Reason of a row recovery could not publish (older versions also used it for complete files
renamed just before a crash: such rows are looked at again)."""


def _recovery_plan(directory: str, index: list[tuple[str, str, str, str]]) -> list[_Recovered]:
    """Blocking (decodes files): what :meth:`RecordingManager.recover` should do."""
    partials = {os.path.realpath(r.path or r.part_path[: -len(PART_SUFFIX)]): r
                for r in recover_partials(directory)}
    plan: list[_Recovered] = []
    indexed: set[str] = set()
    call_ids = {row[0] for row in index}
    note = "recovered after a restart"
    for call_id, path, status, reason in index:
        key = os.path.realpath(path)
        indexed.add(key)
        partial = partials.get(key)
        if status == "ready":
            continue
        if status == "deleted" or (status == "failed" and not reason.startswith(_RESTART)):
            # 'deleted': retention committed the mark but died before removing the file.
            # 'failed' (a codec, the encoder): a crash before its .part was removed, which
            # recover_partials may just have finalised. Neither may be served.
            _remove(path, f"its recording is {status}")
            continue
        if status not in ("recording", "failed"):
            continue
        if partial is not None and not partial.finalised:
            if status == "recording":
                plan.append(_Recovered(call_id, path, "failed",
                                       reason=f"{_RESTART} ({partial.reason})"))
            continue
        # A partial finalised just now, or a complete file renamed before the crash (the row
        # then still says 'recording', or 'failed' from a recovery that did not look).
        if partial is not None:
            f: RecordingFile | None = RecordingFile(path, partial.duration_seconds,
                                                    partial.size_bytes)
        else:
            f = probe(path) if os.path.exists(path) else None
        if f is not None:
            plan.append(_Recovered(call_id, path, "ready", file=f, reason=note))
        elif status == "recording":
            plan.append(_Recovered(call_id, path, "failed", reason=_RESTART))
    root = Path(directory)
    for mp3 in sorted(root.glob("*.mp3")) if root.is_dir() else []:
        path = str(mp3)
        if os.path.realpath(path) in indexed or not mp3.is_file():
            continue
        call_id = mp3.name[: -len(".mp3")]
        if call_id in call_ids:
            log.warning("recording %s: its index row names another path; left alone", path)
            continue
        f = probe(path)
        if f is None:
            _remove(path, "it has no index row and does not decode")
            continue
        plan.append(_Recovered(call_id, path, "new", file=f, reason=note,
                               created_at=mp3.stat().st_mtime))
    return plan


def _remove(path: str, why: str) -> None:
    """Start-up: delete a recording file that must not be served."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("recording %s: could not delete it (%s): %s", path, why, exc)
        return
    log.info("recording %s deleted: %s", path, why)
