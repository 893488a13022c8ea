"""Streaming MP3 files for call recordings: the one module that imports ``soundfile``.

This is IO, the sanctioned exception in ``media/``: libsndfile's MPEG layer III writer (LAME
inside) encodes 8 kHz PCM as it is written, so a call of any length needs only the chunk in hand.

Threading contract
    Every method here blocks on encoding and disk IO (``Mp3Writer(...)`` opens the file, ``write``
    encodes, ``close`` flushes, fsyncs and renames, ``recover_partials`` and ``probe`` decode
    whole files).
    Never call them on the event loop thread: the shell runs them in a worker thread, e.g.
    ``await loop.run_in_executor(executor, writer.write, pcm)``. One writer must only be used by
    one thread at a time; submitting a call's chunks in order to a single-thread executor (or
    awaiting each before the next) keeps that true. Nothing here uses asyncio, and libsndfile
    releases the GIL while encoding, so several calls encode in parallel across cores.

Crash safety
    A recording is written to ``<final>.part`` and renamed to ``<final>`` with ``os.replace``
    only when complete (after ``fsync``), so a published path never names a half-written file.
    On start-up :func:`recover_partials` finalises the ``.part`` files a crash left behind when
    they decode, and deletes them when they do not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import soundfile as sf

__all__ = [
    "ENCODER_ERRORS",
    "PART_SUFFIX",
    "Mp3Writer",
    "RecordingFile",
    "RecoveredPartial",
    "probe",
    "recover_partials",
]

PART_SUFFIX: Final = ".part"
"""Suffix of a recording still being written."""

ENCODER_ERRORS: Final = (sf.SoundFileError, RuntimeError, OSError)
"""What opening, writing or closing a recording raises when libsndfile or the disk fails
(``soundfile.LibsndfileError`` is a ``RuntimeError``; a full disk is an ``OSError``): the call
is then "not recorded". Anything else is a bug."""

_MAX_COMPRESSION: Final = 0.99
"""libsndfile 1.2.2 refuses a compression level of exactly 1.0 (8 kbps CBR at 0.99)."""


@dataclass(frozen=True, slots=True)
class RecordingFile:
    """A finished recording on disk."""

    path: str
    """Final path (the ``.part`` has been renamed to it)."""
    duration_seconds: float
    """Audio length: samples written / sample rate."""
    size_bytes: int
    """File size."""


@dataclass(frozen=True, slots=True)
class RecoveredPartial:
    """What :func:`recover_partials` did with one leftover ``.part`` file."""

    part_path: str
    """The ``.part`` file found."""
    path: str | None
    """The final path it was renamed to, or ``None`` when it was deleted."""
    duration_seconds: float
    """Decodable audio it held (0 when deleted)."""
    size_bytes: int
    """Size of the finalised file (0 when deleted)."""
    reason: str
    """Why it was deleted; empty when finalised."""

    @property
    def finalised(self) -> bool:
        """``True`` when the partial was kept and renamed to its final path."""
        return self.path is not None


class Mp3Writer:
    """Encodes int16 PCM chunks into ``<path>.part`` and publishes ``<path>`` on ``close()``.

    Blocking: run every method in a worker thread (see the module docstring).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        channels: int,
        samplerate: int = 8000,
        compression_level: float = 0.5,
        bitrate_mode: str = "CONSTANT",
        fsync: bool = True,
    ) -> None:
        """Open ``<path>.part`` for writing (creating the directory if needed).

        ``compression_level`` is libsndfile's, 0.0 (best) .. 1.0 (smallest); with
        ``CONSTANT`` bitrate at 8 kHz it maps to 64 - level x 56 kbps (0.5 -> 32 kbps,
        0.8 -> 16 kbps). ``bitrate_mode`` is ``CONSTANT``, ``AVERAGE`` or ``VARIABLE``.
        """
        if channels not in (1, 2):
            raise ValueError("MP3 recordings have 1 or 2 channels")
        if not 0.0 <= compression_level <= 1.0:
            raise ValueError("compression_level must be within 0.0 .. 1.0")
        self._path = os.fspath(path)
        self._part = self._path + PART_SUFFIX
        self._channels = channels
        self._samplerate = samplerate
        self._fsync = fsync
        self._frames = 0
        self._closed = False
        directory = os.path.dirname(self._path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        try:
            self._file = sf.SoundFile(
                self._part,
                "w",
                samplerate=samplerate,
                channels=channels,
                format="MP3",
                subtype="MPEG_LAYER_III",
                compression_level=min(compression_level, _MAX_COMPRESSION),
                bitrate_mode=bitrate_mode,
            )
        except BaseException:
            # libsndfile may have created the file before refusing a setting.
            Path(self._part).unlink(missing_ok=True)
            raise

    @property
    def path(self) -> str:
        """The final path, published by ``close()``."""
        return self._path

    @property
    def part_path(self) -> str:
        """The temporary path written to until ``close()``."""
        return self._part

    @property
    def channels(self) -> int:
        """1 (mono) or 2 (stereo)."""
        return self._channels

    @property
    def frames(self) -> int:
        """Samples per channel written so far."""
        return self._frames

    @property
    def closed(self) -> bool:
        """``True`` after ``close()`` or ``abort()``."""
        return self._closed

    def write(self, pcm: npt.NDArray[np.int16]) -> None:
        """Encode one chunk: int16 of shape ``(n,)`` (mono) or ``(n, 2)`` (stereo)."""
        if self._closed:
            raise ValueError("write to a closed recording")
        pcm = np.asarray(pcm)
        if pcm.dtype != np.int16:
            raise TypeError(f"expected int16 PCM, got {pcm.dtype}")
        if self._channels == 1:
            if pcm.ndim == 2 and pcm.shape[1] == 1:
                pcm = pcm[:, 0]
            if pcm.ndim != 1:
                raise ValueError(f"mono recording expects shape (n,), got {pcm.shape}")
            if len(pcm):
                self._file.write(pcm)
        else:
            if pcm.ndim != 2 or pcm.shape[1] != 2:
                raise ValueError(f"stereo recording expects shape (n, 2), got {pcm.shape}")
            if len(pcm):
                # libsndfile 1.2.2's interleaved *short* MP3 path copies only half of each
                # block (memcpy of a sample count as bytes): stereo int16 comes out garbled
                # and slower. Its int32 path is correct, so widen (exact: x 65536).
                self._file.write(pcm.astype(np.int32) << 16)
        self._frames += len(pcm)

    def close(self) -> RecordingFile:
        """Finish encoding, fsync, rename ``.part`` to the final path; return what was written.

        A recording with no audio gets one silent sample, so the published file is always a
        valid MP3 (libsndfile writes an empty file otherwise).
        """
        if self._closed:
            raise ValueError("recording already closed")
        try:
            if self._frames == 0:
                self.write(np.zeros((1, self._channels) if self._channels == 2 else 1, np.int16))
            self._file.close()
            if self._fsync:
                fd = os.open(self._part, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(self._part, self._path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return RecordingFile(
            path=self._path,
            duration_seconds=self._frames / self._samplerate,
            size_bytes=os.path.getsize(self._path),
        )

    def abort(self) -> None:
        """Stop and delete the partial file (the call is not recorded). Safe to repeat."""
        self._closed = True
        try:
            if not self._file.closed:
                self._file.close()
        finally:
            Path(self._part).unlink(missing_ok=True)

    def __enter__(self) -> Mp3Writer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        """Abort on an exception or when never closed; a closed writer is left alone."""
        if not self._closed:
            self.abort()


def _decodable_frames(path: str) -> tuple[int, int]:
    """Frames and sample rate of the audio libsndfile can decode from ``path`` (reads it all)."""
    frames = 0
    with sf.SoundFile(path) as audio:
        rate = audio.samplerate
        while True:
            block = audio.read(65536, dtype="int16")
            if not len(block):
                break
            frames += len(block)
    return frames, rate


# MPEG audio frame header (ISO/IEC 11172-3 §2.4.2.3, 13818-3; "2.5" is the 8 kHz extension):
#   sync(11) version(2) layer(2) no-crc(1) | bitrate(4) rate(2) padding(1) private(1) | mode(2) ...
_L3_KBPS_V1 = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_L3_KBPS_V2 = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _frame_length(header: int) -> int:
    """Bytes of the Layer III frame starting with ``header``; 0 when it is not one."""
    if header >> 21 != 0x7FF or (header >> 17) & 3 != 1:
        return 0
    version = (header >> 19) & 3
    bitrate_i, rate_i = (header >> 12) & 15, (header >> 10) & 3
    if version == 1 or bitrate_i in (0, 15) or rate_i == 3:
        return 0
    rate = _RATES[version][rate_i]
    kbps = (_L3_KBPS_V1 if version == 3 else _L3_KBPS_V2)[bitrate_i]
    per_frame = 144 if version == 3 else 72  # samples per frame / 8
    return per_frame * kbps * 1000 // rate + ((header >> 9) & 1)


def _repair_vbr_header(path: str) -> None:
    """Fill in the Xing header LAME leaves zeroed until ``close()`` (VBR files).

    Without it a decoder guesses the length from the first frame's bitrate and stops early
    (a crashed 3 s VBR recording decoded as 0.9 s). The frames are counted by walking their
    headers; a torn last frame is cut off. CBR files and complete files are left alone.
    """
    with open(path, "r+b") as f:
        data = f.read()
        if len(data) < 4:
            return
        first = int.from_bytes(data[:4], "big")
        first_len = _frame_length(first)
        if not first_len or len(data) < first_len:
            return
        version = (first >> 19) & 3
        mono = (first >> 6) & 3 == 3
        side_info = (17 if not mono else 9) if version == 3 else (9 if mono else 17)
        tag_at = 4 + side_info
        if any(data[4:first_len]) or first_len < tag_at + 16:
            return  # not LAME's zeroed placeholder: nothing to repair
        frames, pos = 0, first_len
        while pos + 4 <= len(data):
            n = _frame_length(int.from_bytes(data[pos : pos + 4], "big"))
            if not n or pos + n > len(data):
                break
            frames += 1
            pos += n
        tag = b"Xing" + (3).to_bytes(4, "big") + frames.to_bytes(4, "big") + pos.to_bytes(4, "big")
        f.seek(tag_at)
        f.write(tag)
        f.truncate(pos)


def probe(path: str | os.PathLike[str]) -> RecordingFile | None:
    """The audio length and size of a finished MP3 (decodes it all: a worker thread's job);
    ``None`` when it is missing, does not decode or holds no audio."""
    path = os.fspath(path)
    try:
        frames, rate = _decodable_frames(path)
        size = os.path.getsize(path)
    except (RuntimeError, OSError):  # soundfile.LibsndfileError is a RuntimeError
        return None
    if frames == 0:
        return None
    return RecordingFile(path=path, duration_seconds=frames / rate, size_bytes=size)


def recover_partials(directory: str | os.PathLike[str]) -> list[RecoveredPartial]:
    """Finalise or delete the ``.part`` recordings a crash left in ``directory``.

    Call once at start-up, before any writer is opened (a live writer's ``.part`` would be
    taken for a leftover), from a worker thread: it decodes every partial to check it. A
    partial that libsndfile opens and decodes to at least one sample is renamed to its final
    name (the MPEG frames a crash left are playable up to the last complete one); anything else
    is deleted. A partial whose final file already exists is deleted. Returns one entry per
    partial so the shell can update the recordings index.
    """
    results: list[RecoveredPartial] = []
    root = Path(directory)
    if not root.is_dir():
        return results
    for part in sorted(root.glob("*" + PART_SUFFIX)):
        if not part.is_file():
            continue
        part_path = str(part)
        final = part_path[: -len(PART_SUFFIX)]
        reason = ""
        if os.path.exists(final):
            reason = "final file already exists"
        else:
            try:
                _repair_vbr_header(part_path)
                frames, rate = _decodable_frames(part_path)
            except (RuntimeError, OSError) as exc:  # soundfile.LibsndfileError is a RuntimeError
                reason = f"not decodable: {exc}"
            else:
                if frames == 0:
                    reason = "no audio"
                else:
                    os.replace(part_path, final)
                    results.append(
                        RecoveredPartial(
                            part_path=part_path,
                            path=final,
                            duration_seconds=frames / rate,
                            size_bytes=os.path.getsize(final),
                            reason="",
                        )
                    )
                    continue
        part.unlink(missing_ok=True)
        results.append(
            RecoveredPartial(
                part_path=part_path,
                path=None,
                duration_seconds=0.0,
                size_bytes=0,
                reason=reason,
            )
        )
    return results
