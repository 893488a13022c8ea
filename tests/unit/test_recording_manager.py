"""RecordingManager in-process: a real RelaySession's hot path feeds it, real MP3 files in
tmp_path, a real SQLite index, a real asyncio loop (uvloop, as the server runs). No SIP.

Packets are handed to the relay's ``RelayStream.receive`` -- the call the UDP protocol makes --
paced on the loop at 20 ms, because the recorder aligns the two sides by arrival time
(``loop.time()``). Tones are encoded with an independent mu-law encoder (ITU-T G.711's
segment formula), so a symmetric codec bug could not hide itself.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import re
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import soundfile as sf
import uvloop

from softpbx.aio.recording import FinishedRecording, RecordingManager, token_hash
from softpbx.config.schema import RecordingSettings
from softpbx.core.events import StartRecording
from softpbx.media.mp3 import Mp3Writer
from softpbx.media.relay import LatchPolicy, RelaySession
from softpbx.store.sqlite import SqliteStore

RATE = 8000
SPP = 160
"""Samples per 20 ms packet."""
PTIME = SPP / RATE
CALLER_SRC = ("127.0.0.1", 40000)
CALLEE_SRC = ("127.0.0.1", 40002)
BASE_URL = "https://pbx.example.com:8443/"
T = TypeVar("T")


# -- signals ------------------------------------------------------------------------------------
def ulaw(pcm: np.ndarray) -> bytes:
    """G.711 mu-law encoding (bias 0x84, clip 32635, inverted bits), written independently of
    ``softpbx.media.g711``."""
    x = pcm.astype(np.int32)
    sign = np.where(x < 0, 0x80, 0)
    mag = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.floor(np.log2(mag)).astype(np.int32) - 7
    mantissa = (mag >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def tone(freq: float, seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return (amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def rtp_stream(payload: bytes, *, pt: int = 0, ssrc: int, ts0: int, seq0: int) -> list[bytes]:
    """``payload`` cut into 20 ms RTP packets (RFC 3550 §5.1, no CSRCs)."""
    out = []
    for k in range(len(payload) // SPP):
        header = struct.pack("!BBHII", 0x80, (0x80 if k == 0 else 0) | pt, (seq0 + k) & 0xFFFF,
                             (ts0 + k * SPP) & 0xFFFFFFFF, ssrc)
        out.append(header + payload[k * SPP:(k + 1) * SPP])
    return out


def spectrum_peak(signal: np.ndarray) -> float:
    """Frequency of the strongest FFT bin over 1 s from 1 s in (past the encoder's start-up)."""
    part = signal[RATE:2 * RATE].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(part * np.hanning(len(part))))
    return float(np.argmax(spectrum) * RATE / len(part))


def band(signal: np.ndarray, freq: float) -> float:
    part = signal[RATE:2 * RATE].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(part * np.hanning(len(part))))
    i = round(freq * len(part) / RATE)
    return float(spectrum[i - 3:i + 4].max())


# -- harness ------------------------------------------------------------------------------------
def run(factory: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """Run a coroutine on a fresh uvloop, bounded."""
    async def bounded() -> T:
        return await asyncio.wait_for(factory(), timeout)
    return uvloop.run(bounded())


def rows(db: Path) -> dict[str, dict[str, Any]]:
    """The recordings index as the HTTP side would read it."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return {r["call_id"]: dict(r) for r in con.execute("SELECT * FROM recordings")}
    finally:
        con.close()


class Rig:
    """A manager, its store and directory, and what it reported."""

    def __init__(self, tmp_path: Path, loop: asyncio.AbstractEventLoop,
                 settings: RecordingSettings | None = None) -> None:
        self.db = tmp_path / "softpbx.db"
        self.dir = tmp_path / "recordings"
        self.store = SqliteStore(path=str(self.db))
        self.finished: list[FinishedRecording] = []
        self.manager = RecordingManager(
            settings=settings or RecordingSettings(flush_seconds=0.5), directory=str(self.dir),
            public_base_url=BASE_URL, store=self.store, loop=loop,
            on_finished=self.finished.append)
        self.loop = loop

    def session(self) -> RelaySession:
        """A relay session whose sides latch onto the two test sources."""
        s = RelaySession(a_port=30000, b_port=30002, now=self.loop.time(),
                         policy=LatchPolicy.SYMMETRIC)
        s.a.set_remote(CALLER_SRC)
        s.b.set_remote(CALLEE_SRC)
        return s

    async def wait_finished(self, count: int, timeout: float = 10.0) -> list[FinishedRecording]:
        deadline = self.loop.time() + timeout
        while len(self.finished) < count:
            assert self.loop.time() < deadline, f"only {self.finished} finished in {timeout}s"
            await asyncio.sleep(0.01)
        return self.finished

    async def talk(self, call_id: str, seconds: float = 1.0) -> float:
        """Record ``call_id``: the caller plays 440 Hz and the callee 880 Hz for ``seconds``;
        returns when they are done, with the recording's start time."""
        session = self.session()
        start = self.loop.time()
        self.manager.start(StartRecording(call_id, session, {}, start))
        play(self.loop, session, start,
             rtp_stream(ulaw(tone(440, seconds)), ssrc=1, ts0=0, seq0=0),
             rtp_stream(ulaw(tone(880, seconds)), ssrc=2, ts0=0, seq0=0))
        await asyncio.sleep(start + seconds - self.loop.time())
        return start

    async def close(self) -> None:
        await self.manager.aclose()
        self.store.flush()
        self.store.close()


def play(loop: asyncio.AbstractEventLoop, session: RelaySession, start: float,
         caller: list[bytes], callee: list[bytes]) -> list[asyncio.TimerHandle]:
    """Schedule both sides' packets into the relay at start + k x 20 ms, as a sender would."""
    handles = []
    for stream, packets, src in ((session.a.rtp, caller, CALLER_SRC),
                                 (session.b.rtp, callee, CALLEE_SRC)):
        for k, pkt in enumerate(packets):
            def deliver(stream: Any = stream, pkt: bytes = pkt, src: tuple[str, int] = src) -> None:
                # The relay forwards every packet to the other side: recording never drops one.
                assert stream.receive(pkt, src) == stream.peer.dest
            handles.append(loop.call_at(start + k * PTIME, deliver))
    return handles


def part_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.part")) if directory.exists() else []


# -- a recorded call ----------------------------------------------------------------------------
def test_call_is_recorded_to_a_stereo_mp3_with_a_secret_link(tmp_path: Path) -> None:
    seconds = 3.0

    async def scenario() -> tuple[Rig, RelaySession, float]:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop)
        session = rig.session()
        start = loop.time()
        rig.manager.start(StartRecording("call-1", session, {0: "PCMU", 101: "telephone-event"},
                                         start))
        assert session.tap is not None and rig.manager.active_count == 1
        caller = rtp_stream(ulaw(tone(440, seconds)), ssrc=0x1111, ts0=123456, seq0=7)
        callee = rtp_stream(ulaw(tone(880, seconds)), ssrc=0x2222, ts0=0xFFFFF000, seq0=65500)
        # First packets 10 ms after the answer, as a phone's first frame would be.
        play(loop, session, start + 0.01, caller, callee)
        backlog_seen = 0
        while loop.time() < start + seconds:
            backlog_seen = max(backlog_seen, rig.manager.backlog)
            await asyncio.sleep(0.05)
        assert part_files(rig.dir) == ["call-1.mp3.part"], "not streaming to a .part file"
        assert not (rig.dir / "call-1.mp3").exists(), "published before the call ended"
        rig.manager.stop("call-1", at=start + seconds)
        assert session.tap is None, "the relay still taps a finished call"
        await rig.wait_finished(1)
        assert rig.manager.active_count == 0 and rig.manager.backlog == 0
        await rig.close()
        return rig, session, backlog_seen

    rig, session, _ = run(scenario)
    [done] = rig.finished
    assert done.call_id == "call-1" and done.reason == ""
    assert done.link is not None
    m = re.fullmatch(r"https://pbx\.example\.com:8443/rec/([A-Za-z0-9_-]+)\.mp3", done.link)
    assert m, done.link
    token = m.group(1)
    assert len(token) * 6 >= 128, "a link token must carry at least 128 bits"

    path = rig.dir / "call-1.mp3"
    assert sorted(p.name for p in rig.dir.iterdir()) == ["call-1.mp3"], "a .part was left"
    audio, rate = sf.read(path, dtype="int16")
    assert rate == RATE and audio.ndim == 2 and audio.shape[1] == 2
    assert abs(len(audio) / RATE - seconds) <= 0.1, len(audio) / RATE
    left, right = audio[:, 0], audio[:, 1]
    assert spectrum_peak(left) == pytest.approx(440, abs=2)
    assert spectrum_peak(right) == pytest.approx(880, abs=2)
    # Each channel holds its own side only.
    assert band(left, 880) < band(left, 440) / 50
    assert band(right, 440) < band(right, 880) / 50
    assert done.duration == pytest.approx(seconds, abs=1e-6)
    assert done.size == path.stat().st_size > 0

    row = rows(rig.db)["call-1"]
    assert row["status"] == "ready" and row["reason"] == ""
    assert row["path"] == str(path)
    assert row["duration"] == pytest.approx(seconds, abs=1e-6)
    assert row["size"] == path.stat().st_size
    assert row["token_hash"] == token_hash(token) == hashlib.sha256(token.encode()).hexdigest()
    assert token not in repr(row), "the index must not hold the token itself"
    assert row["finished_at"] >= row["created_at"] > 0
    # Recording never held up the relay: every packet of both sides went through.
    assert session.a.rtp.packets_in == session.b.rtp.packets_in == int(seconds / PTIME)


def test_two_calls_at_once_keep_their_own_audio(tmp_path: Path) -> None:
    """Ordered writes per call, several calls sharing the worker pool."""
    async def scenario() -> Rig:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop, RecordingSettings(flush_seconds=0.3))
        start = loop.time()
        for call_id, (fa, fb) in {"x": (300, 1200), "y": (1000, 500)}.items():
            session = rig.session()
            rig.manager.start(StartRecording(call_id, session, {}, start))
            play(loop, session, start,
                 rtp_stream(ulaw(tone(fa, 2.5)), ssrc=1, ts0=0, seq0=0),
                 rtp_stream(ulaw(tone(fb, 2.5)), ssrc=2, ts0=0, seq0=0))
        await asyncio.sleep(start + 2.5 - loop.time())
        rig.manager.stop("x", at=start + 2.5)
        rig.manager.stop("y", at=start + 2.5)
        await rig.wait_finished(2)
        await rig.close()
        return rig

    rig = run(scenario)
    assert {f.call_id for f in rig.finished} == {"x", "y"}
    assert all(f.link for f in rig.finished)
    assert len({f.link for f in rig.finished}) == 2
    for call_id, (fa, fb) in {"x": (300, 1200), "y": (1000, 500)}.items():
        audio, _ = sf.read(rig.dir / f"{call_id}.mp3", dtype="int16")
        assert abs(len(audio) / RATE - 2.5) <= 0.1
        assert spectrum_peak(audio[:, 0]) == pytest.approx(fa, abs=2)
        assert spectrum_peak(audio[:, 1]) == pytest.approx(fb, abs=2)
    assert {r["status"] for r in rows(rig.db).values()} == {"ready"}


def test_mono_mix_option(tmp_path: Path) -> None:
    async def scenario() -> Rig:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop, RecordingSettings(flush_seconds=0.5, stereo=False))
        session = rig.session()
        start = loop.time()
        rig.manager.start(StartRecording("mono", session, {}, start))
        play(loop, session, start, rtp_stream(ulaw(tone(440, 2.2, 0.2)), ssrc=1, ts0=0, seq0=0),
             rtp_stream(ulaw(tone(880, 2.2, 0.2)), ssrc=2, ts0=0, seq0=0))
        await asyncio.sleep(start + 2.2 - loop.time())
        rig.manager.stop("mono", at=start + 2.2)
        await rig.wait_finished(1)
        await rig.close()
        return rig

    rig = run(scenario)
    audio, _ = sf.read(rig.dir / "mono.mp3", dtype="int16")
    assert audio.ndim == 1 and abs(len(audio) / RATE - 2.2) <= 0.1
    assert band(audio, 440) > 10 * band(audio, 660) and band(audio, 880) > 10 * band(audio, 660)


# -- not recorded -------------------------------------------------------------------------------
@pytest.mark.parametrize("talk", [1.3, 0.1], ids=["failed-at-a-flush", "failed-at-the-end"])
def test_undecodable_codec_means_not_recorded_and_no_file(tmp_path: Path, talk: float) -> None:
    async def scenario() -> tuple[Rig, RelaySession]:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop)
        session = rig.session()
        start = loop.time()
        rig.manager.start(StartRecording("g722", session, {9: "G722/8000"}, start))
        payload = bytes(range(256)) * 50
        g722 = rtp_stream(payload[:int(talk / PTIME) * SPP], pt=9, ssrc=5, ts0=0, seq0=0)
        play(loop, session, start, g722, g722)
        await asyncio.sleep(start + talk + 0.02 - loop.time())
        if talk > 1:
            assert session.tap is None, "a failed recording still taps the relay"
            assert rig.finished == []  # reported once, when the call ends
        rig.manager.stop("g722", at=loop.time())
        await rig.wait_finished(1)
        await rig.close()
        return rig, session

    rig, session = run(scenario)
    [done] = rig.finished
    assert done.link is None and done.size == 0
    assert "G722" in done.reason, done.reason
    assert list(rig.dir.iterdir()) == [], "a failed recording left a file"
    row = rows(rig.db)["g722"]
    assert row["status"] == "failed" and "G722" in row["reason"]
    # The call's media was relayed all along.
    assert session.a.rtp.packets_in == session.b.rtp.packets_in == int(talk / PTIME)
    assert session.a.rtp.unroutable == session.b.rtp.unroutable == 0


def test_silent_call_still_gives_a_valid_file_of_the_talk_time(tmp_path: Path) -> None:
    async def scenario() -> Rig:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop)
        start = loop.time()
        rig.manager.start(StartRecording("quiet", rig.session(), {}, start))
        await asyncio.sleep(1.2)
        rig.manager.stop("quiet", at=start + 1.2)
        await rig.wait_finished(1)
        await rig.close()
        return rig

    rig = run(scenario)
    audio, _ = sf.read(rig.dir / "quiet.mp3", dtype="int16")
    assert abs(len(audio) / RATE - 1.2) <= 0.1 and not audio.any()
    assert rig.finished[0].duration == pytest.approx(1.2)


# -- retention ----------------------------------------------------------------------------------
def ready_recording(rig: Rig, call_id: str, *, seconds: float, created_at: float) -> Path:
    """A finished recording as the manager leaves it: an MP3 and a 'ready' index row.

    Written at 64 kbps CBR (compression 0.0) from noise, so sizes are predictable."""
    path = rig.dir / f"{call_id}.mp3"
    rng = np.random.default_rng(len(call_id))
    writer = Mp3Writer(path, channels=1, compression_level=0.0, bitrate_mode="CONSTANT")
    writer.write((rng.standard_normal(int(seconds * RATE)) * 8000).astype(np.int16))
    f = writer.close()
    rig.store.execute(
        "INSERT INTO recordings (call_id, token_hash, path, status, duration, size, created_at,"
        " finished_at) VALUES (?,?,?,'ready',?,?,?,?)",
        (call_id, token_hash(call_id + "-token"), str(path), f.duration_seconds, f.size_bytes,
         created_at, created_at + seconds))
    return path


def test_retention_by_age_deletes_old_files_and_marks_them_deleted(tmp_path: Path) -> None:
    async def scenario() -> tuple[Rig, int, int]:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop, RecordingSettings(max_age_days=1))
        now = time.time()
        ready_recording(rig, "old", seconds=0.5, created_at=now - 2 * 86400)
        ready_recording(rig, "older", seconds=0.5, created_at=now - 30 * 86400)
        # And one made by the manager just now: it must stay.
        start = loop.time()
        rig.manager.start(StartRecording("fresh", rig.session(), {}, start))
        await asyncio.sleep(0.3)
        rig.manager.stop("fresh", at=start + 0.3)
        await rig.wait_finished(1)
        # A failed recording's row has no file and is not retention's business.
        rig.store.execute("INSERT INTO recordings (call_id, token_hash, path, status, created_at)"
                          " VALUES ('lost','h','/nonexistent.mp3','failed',?)", (now - 9e6,))
        assert rig.store.flush()
        gone = await loop.run_in_executor(None, rig.manager.enforce_retention)
        assert rig.store.flush()
        again = await loop.run_in_executor(None, rig.manager.enforce_retention)
        await rig.close()
        return rig, gone, again

    rig, gone, again = run(scenario)
    assert (gone, again) == (2, 0)
    assert sorted(p.name for p in rig.dir.iterdir()) == ["fresh.mp3"]
    status = {k: r["status"] for k, r in rows(rig.db).items()}
    assert status == {"old": "deleted", "older": "deleted", "fresh": "ready", "lost": "failed"}


def test_retention_by_total_size_deletes_oldest_first(tmp_path: Path) -> None:
    async def scenario() -> tuple[Rig, dict[str, int], int]:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop, RecordingSettings(max_total_mb=1))
        now = time.time()
        sizes = {}
        for i, name in enumerate(["c-newest", "a-oldest", "b-middle"]):
            created = now - {0: 100, 1: 300, 2: 200}[i]
            sizes[name] = ready_recording(rig, name, seconds=60, created_at=created).stat().st_size
        assert rig.store.flush()
        gone = await loop.run_in_executor(None, rig.manager.enforce_retention)
        await rig.close()
        return rig, sizes, gone

    rig, sizes, gone = run(scenario)
    limit = 1024 * 1024
    # The premise: all three are over the limit, the newest two are not.
    assert sum(sizes.values()) > limit >= sizes["b-middle"] + sizes["c-newest"]
    assert gone == 1
    assert sorted(p.name for p in rig.dir.iterdir()) == ["b-middle.mp3", "c-newest.mp3"]
    status = {k: r["status"] for k, r in rows(rig.db).items()}
    assert status == {"a-oldest": "deleted", "b-middle": "ready", "c-newest": "ready"}


def test_retention_tiny_total_keeps_deleting_oldest_until_under(tmp_path: Path) -> None:
    async def scenario() -> tuple[Rig, int]:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop, RecordingSettings(max_total_mb=1))
        now = time.time()
        for i in range(4):
            ready_recording(rig, f"r{i}", seconds=70, created_at=now - 1000 + i)
        assert rig.store.flush()
        # 1 MB holds one 70 s file at 64 kbps (560 kB), not two.
        gone = await loop.run_in_executor(None, rig.manager.enforce_retention)
        rig.manager.settings = replace(rig.manager.settings, max_total_mb=0, max_age_days=0)
        assert await loop.run_in_executor(None, rig.manager.enforce_retention) == 0
        await rig.close()
        return rig, gone

    rig, gone = run(scenario)
    kept = sorted(p.name for p in rig.dir.iterdir())
    total = sum((rig.dir / k).stat().st_size for k in kept)
    assert total <= 1024 * 1024 < 2 * total
    assert gone == 3 and kept == ["r3.mp3"]
    status = {k: r["status"] for k, r in rows(rig.db).items()}
    assert status == {"r0": "deleted", "r1": "deleted", "r2": "deleted", "r3": "ready"}


# -- restart recovery ---------------------------------------------------------------------------
CRASHING_WRITER = """
import os, signal, sys
import numpy as np
from softpbx.media.mp3 import Mp3Writer
t = np.arange(8000) / 8000
left = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
right = (0.3 * 32767 * np.sin(2 * np.pi * 880 * t)).astype(np.int16)
w = Mp3Writer(sys.argv[1], channels=2, compression_level=0.5, bitrate_mode=sys.argv[2])
for _ in range(3):
    w.write(np.column_stack((left, right)))
os.kill(os.getpid(), signal.SIGKILL)  # the switch dies mid-call: no close, no rename
"""


def index_row(rig: Rig, call_id: str, path: Path, status: str = "recording") -> None:
    rig.store.execute("INSERT INTO recordings (call_id, token_hash, path, status, created_at)"
                      " VALUES (?,?,?,?,?)", (call_id, token_hash(call_id), str(path), status,
                                              time.time()))


@pytest.mark.parametrize("mode", [
    "CONSTANT",
    "VARIABLE",  # LAME's zeroed Xing placeholder is filled in by recover_partials
])
def test_recover_finalises_a_crashed_recording_and_fails_the_rest(tmp_path: Path,
                                                                  mode: str) -> None:
    rec_dir = tmp_path / "recordings"
    rec_dir.mkdir()
    crashed = rec_dir / "crashed.mp3"
    proc = subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(crashed), mode],
                          capture_output=True, timeout=30)
    assert proc.returncode == -9, proc.stderr.decode()
    assert (rec_dir / "crashed.mp3.part").stat().st_size > 0 and not crashed.exists()
    (rec_dir / "garbage.mp3.part").write_bytes(os.urandom(4000))

    async def scenario() -> Rig:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop)
        index_row(rig, "crashed", crashed)
        index_row(rig, "garbage", rec_dir / "garbage.mp3")
        index_row(rig, "never-opened", rec_dir / "never-opened.mp3")
        index_row(rig, "done", rec_dir / "done.mp3", status="ready")
        assert rig.store.flush()
        await rig.manager.recover()
        await rig.close()
        return rig

    rig = run(scenario)
    assert sorted(p.name for p in rec_dir.iterdir()) == ["crashed.mp3"]
    got = rows(rig.db)
    row = got["crashed"]
    assert row["status"] == "ready" and "restart" in row["reason"]
    assert row["size"] == crashed.stat().st_size
    audio, _ = sf.read(crashed, dtype="int16")
    # 3 s were written; LAME holds back up to ~0.4 s in its buffers when the process dies.
    assert 2.4 <= len(audio) / RATE <= 3.0 + 0.1, len(audio) / RATE
    assert row["duration"] == pytest.approx(len(audio) / RATE, abs=0.05)
    assert spectrum_peak(audio[:, 0]) == pytest.approx(440, abs=2)
    assert spectrum_peak(audio[:, 1]) == pytest.approx(880, abs=2)
    for name in ("garbage", "never-opened"):
        assert got[name]["status"] == "failed" and got[name]["reason"], got[name]
    assert got["done"]["status"] == "ready"  # untouched


# -- shutdown while a call's file is being finalised ----------------------------------------
def test_shutdown_while_a_finished_call_is_finalised_reports_it_once(tmp_path: Path) -> None:
    """Server.stop() calls aclose(), which stops every call still in the manager -- including
    one whose StopRecording was just handled and whose file is still being finalised."""
    async def scenario() -> tuple[Rig, list[dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        problems: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: problems.append(context))
        rig = Rig(tmp_path, loop)
        start = await rig.talk("ending")
        rig.manager.stop("ending", at=start + 1.0)
        rig.manager.stop("ending", at=start + 1.5)  # a second stop is a no-op
        await rig.close()  # aclose() at once: the finalise is still in flight
        await asyncio.sleep(0.1)
        gc.collect()  # "Task exception was never retrieved" is reported on collection
        return rig, problems

    rig, problems = run(scenario)
    assert problems == []
    assert len(rig.finished) == 1 and rig.finished[0].link, rig.finished
    assert rig.finished[0].duration == pytest.approx(1.0)
    assert sorted(p.name for p in rig.dir.iterdir()) == ["ending.mp3"]
    audio, _ = sf.read(rig.dir / "ending.mp3", dtype="int16")
    assert abs(len(audio) / RATE - 1.0) <= 0.1
    assert rows(rig.db)["ending"]["status"] == "ready"


def test_retention_in_a_worker_thread_writes_the_index_on_the_loop_thread(
        tmp_path: Path) -> None:
    """The server runs enforce_retention in an executor; SqliteStore buffers writes on the loop
    thread without a lock, so index writes must not come from the worker."""
    async def scenario() -> tuple[Rig, set[str]]:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop, RecordingSettings(max_age_days=1))
        threads: set[str] = set()
        store = rig.store
        execute, hand_over = store.execute, store.hand_over

        def spy_execute(sql: str, args: tuple[object, ...]) -> None:
            threads.add("loop" if threading.get_ident() == loop_thread else "other")
            execute(sql, args)

        def spy_hand_over() -> None:
            threads.add("loop" if threading.get_ident() == loop_thread else "other")
            hand_over()

        loop_thread = threading.get_ident()
        for i in range(3):
            ready_recording(rig, f"old{i}", seconds=0.2, created_at=time.time() - 5 * 86400)
        assert store.flush()
        store.execute, store.hand_over = spy_execute, spy_hand_over  # type: ignore[method-assign]
        gone = await loop.run_in_executor(None, rig.manager.enforce_retention)
        assert gone == 3
        store.execute, store.hand_over = execute, hand_over  # type: ignore[method-assign]
        await rig.close()
        return rig, threads

    rig, threads = run(scenario)
    assert threads == {"loop"}
    assert {r["status"] for r in rows(rig.db).values()} == {"deleted"}
    assert list(rig.dir.iterdir()) == []


# -- crash recovery: every file it finds ends up published (with a link) or removed ----------
def complete_mp3(path: Path, seconds: float = 1.0) -> None:
    writer = Mp3Writer(path, channels=2, compression_level=0.5, bitrate_mode="CONSTANT")
    writer.write(np.column_stack((tone(440, seconds), tone(880, seconds))))
    writer.close()


def link_token(link: str | None) -> str:
    assert link is not None
    m = re.fullmatch(r"https://pbx\.example\.com:8443/rec/([A-Za-z0-9_-]{32})\.mp3", link)
    assert m, link
    return m.group(1)


def test_recovery_publishes_what_a_crash_left_with_fresh_logged_links(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The index keeps only token hashes, so a recording published at start-up needs a new
    token, logged (and reported) like a finished call, or nobody could ever reach it."""
    rec_dir = tmp_path / "recordings"
    rec_dir.mkdir()
    complete_mp3(rec_dir / "before-rename.mp3")  # crash after fsync, before os.replace
    os.replace(rec_dir / "before-rename.mp3", rec_dir / "before-rename.mp3.part")
    complete_mp3(rec_dir / "after-rename.mp3")  # crash after os.replace, before 'ready'
    complete_mp3(rec_dir / "no-row.mp3")  # the 'recording' row was never committed
    os.replace(rec_dir / "no-row.mp3", rec_dir / "no-row.mp3.part")
    complete_mp3(rec_dir / "no-row-final.mp3")
    (rec_dir / "junk.mp3").write_bytes(os.urandom(3000))  # no row, does not decode
    complete_mp3(rec_dir / "retained.mp3")  # retention marked it, then died before the unlink
    complete_mp3(rec_dir / "misjudged.mp3")  # an older recovery called a complete file failed
    complete_mp3(rec_dir / "not-recorded.mp3")  # failed (a codec), then a crash: never served
    caplog.set_level(logging.INFO, logger="softpbx.recording")

    async def scenario() -> Rig:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop)
        for name in ("before-rename", "after-rename"):
            index_row(rig, name, rec_dir / f"{name}.mp3")
        index_row(rig, "retained", rec_dir / "retained.mp3", status="deleted")
        index_row(rig, "misjudged", rec_dir / "misjudged.mp3", status="failed")
        rig.store.execute("UPDATE recordings SET reason='interrupted by a restart'"
                          " WHERE call_id='misjudged'", ())
        index_row(rig, "not-recorded", rec_dir / "not-recorded.mp3", status="failed")
        assert rig.store.flush()
        await rig.manager.recover()
        await rig.close()
        return rig

    rig = run(scenario)
    published = {"before-rename", "after-rename", "no-row", "no-row-final", "misjudged"}
    assert sorted(p.name for p in rec_dir.iterdir()) == sorted(f"{n}.mp3" for n in published)
    got = rows(rig.db)
    assert got["retained"]["status"] == "deleted" and "junk" not in got
    assert got["not-recorded"]["status"] == "failed"
    assert {f.call_id for f in rig.finished} == published
    ready_lines = [r.getMessage() for r in caplog.records
                   if r.getMessage().startswith("recording ready: call ")]
    for done in rig.finished:
        token = link_token(done.link)
        row = got[done.call_id]
        assert row["status"] == "ready" and done.recovered and done.reason == ""
        assert row["token_hash"] == token_hash(token) != token_hash(done.call_id)
        path = rec_dir / f"{done.call_id}.mp3"
        assert row["path"] == str(path) and row["size"] == path.stat().st_size == done.size
        assert row["duration"] == pytest.approx(1.0, abs=0.1) == done.duration
        [line] = [ln for ln in ready_lines if ln.split()[3] == done.call_id]
        m = re.fullmatch(r"recording ready: call (\S+) ([\d.]+) s (\d+) bytes (\S+)"
                         r" \(recovered after a restart\)", line)
        assert m and m.group(4) == done.link and int(m.group(3)) == done.size, line
    assert rig.manager.stats().recorded == len(published)


def test_recovery_with_no_leftovers_changes_nothing(tmp_path: Path) -> None:
    async def scenario() -> Rig:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop)
        path = ready_recording(rig, "done", seconds=0.5, created_at=time.time())
        assert rig.store.flush()
        before = rows(rig.db)["done"]
        await rig.manager.recover()
        await rig.close()
        assert rows(rig.db)["done"] == before and path.exists()
        return rig

    assert run(scenario).finished == []


# -- libsndfile or disk errors ------------------------------------------------------------------
def libsndfile_error(*_: Any, **__: Any) -> None:
    raise sf.LibsndfileError(0, "Error closing the file: ")


@pytest.mark.parametrize("step", ["open", "write", "close"])
def test_a_libsndfile_error_means_not_recorded_and_the_call_is_still_settled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        step: str) -> None:
    if step == "open":
        monkeypatch.setattr(Mp3Writer, "__init__", libsndfile_error)
    elif step == "write":
        monkeypatch.setattr(Mp3Writer, "write", libsndfile_error)
    else:
        real_close = Mp3Writer.close

        def failing_close(self: Mp3Writer) -> None:
            self.abort()  # as Mp3Writer.close does on an error
            libsndfile_error()
            real_close(self)

        monkeypatch.setattr(Mp3Writer, "close", failing_close)
    caplog.set_level(logging.INFO, logger="softpbx.recording")

    async def scenario() -> Rig:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop)
        start = await rig.talk("broken")
        rig.manager.stop("broken", at=start + 1.0)
        await rig.wait_finished(1, timeout=5.0)
        assert rig.manager.active_count == 0 and rig.manager.backlog == 0
        await rig.close()
        return rig

    rig = run(scenario)
    [done] = rig.finished
    assert done.link is None and "Error closing the file" in done.reason, done.reason
    row = rows(rig.db)["broken"]
    assert row["status"] == "failed" and row["reason"] == done.reason
    assert list(rig.dir.iterdir()) == [] if rig.dir.exists() else True
    lines = [r.getMessage() for r in caplog.records if "not recorded" in r.getMessage()]
    assert lines == [f"call broken not recorded: {done.reason}"], lines
    assert rig.manager.stats().failed == 1


# -- the encoder falls behind -------------------------------------------------------------------
def test_an_encoder_that_falls_behind_fails_the_call_instead_of_buffering_for_ever(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    real_write = Mp3Writer.write

    def stuck_write(self: Mp3Writer, pcm: np.ndarray) -> None:
        release.wait(20)  # a disk that does not answer
        real_write(self, pcm)

    monkeypatch.setattr(Mp3Writer, "write", stuck_write)
    caplog.set_level(logging.INFO, logger="softpbx.recording")

    async def scenario() -> tuple[Rig, int]:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop, RecordingSettings(flush_seconds=0.02))
        start = loop.time()
        rig.manager.start(StartRecording("slow", rig.session(), {}, start))
        most = 0
        while loop.time() < start + 1.0:  # 50 flushes
            most = max(most, rig.manager.backlog)
            await asyncio.sleep(0.005)
        assert rig.manager.overloaded == 1 and rig.finished == []
        release.set()
        rig.manager.stop("slow", at=loop.time())
        await rig.wait_finished(1)
        await rig.close()
        return rig, most

    rig, most = run(scenario)
    assert most <= rig.manager.max_queued_writes == 12
    [done] = rig.finished
    assert done.link is None and done.reason == "encoder overloaded"
    assert rows(rig.db)["slow"]["status"] == "failed"
    assert list(rig.dir.iterdir()) == []
    stats = rig.manager.stats()
    assert (stats.overloaded, stats.failed, stats.backlog, stats.active) == (1, 1, 0, 0)
    lines = [r.getMessage() for r in caplog.records if "encoder overloaded" in r.getMessage()]
    assert lines == ["call slow not recorded: encoder overloaded"]


# -- retention: mark, then delete; also after each recording ----------------------------------
def test_retention_marks_the_row_deleted_before_the_file_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, str] = {}

    async def scenario() -> Rig:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop, RecordingSettings(max_age_days=1))
        for name in ("old1", "old2"):
            ready_recording(rig, name, seconds=0.2, created_at=time.time() - 3 * 86400)
        assert rig.store.flush()
        real_unlink = os.unlink

        def spy_unlink(path: Any, *args: Any, **kwargs: Any) -> None:
            if str(path).endswith(".mp3"):  # what the link would answer right now
                seen[Path(path).stem] = rows(rig.db)[Path(path).stem]["status"]
            real_unlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "unlink", spy_unlink)
        assert await loop.run_in_executor(None, rig.manager.enforce_retention) == 2
        monkeypatch.undo()
        await rig.close()
        return rig

    rig = run(scenario)
    assert seen == {"old1": "deleted", "old2": "deleted"}
    assert list(rig.dir.iterdir()) == []


def test_retention_runs_after_each_recording_when_a_total_size_is_set(tmp_path: Path) -> None:
    async def scenario() -> tuple[Rig, float]:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop, RecordingSettings(flush_seconds=0.5, max_total_mb=1))
        now = time.time()
        for i in range(2):  # 2 x 560 kB: over 1 MB; nothing calls enforce_retention here
            ready_recording(rig, f"r{i}", seconds=70, created_at=now - 100 + i)
        assert rig.store.flush()
        start = loop.time()
        rig.manager.start(StartRecording("new", rig.session(), {}, start))
        play(loop, rig.session(), start, [], [])
        await asyncio.sleep(1.0)
        rig.manager.stop("new", at=start + 1.0)
        await rig.wait_finished(1)
        stopped = loop.time()
        while rows(rig.db)["r0"]["status"] != "deleted":
            assert loop.time() < stopped + 5, "no retention after the recording"
            await asyncio.sleep(0.02)
        waited = loop.time() - stopped
        await rig.close()
        return rig, waited

    rig, _ = run(scenario)
    status = {k: r["status"] for k, r in rows(rig.db).items()}
    assert status == {"r0": "deleted", "r1": "ready", "new": "ready"}
    assert sorted(p.name for p in rig.dir.iterdir()) == ["new.mp3", "r1.mp3"]


# -- shutdown does not block the loop -----------------------------------------------------------
def test_aclose_waits_for_the_workers_off_the_loop(tmp_path: Path) -> None:
    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop)
        busy = loop.run_in_executor(rig.manager._pool, time.sleep, 0.5)  # an encode in flight
        closing = loop.create_task(rig.manager.aclose())
        ticks = 0
        while not closing.done():
            ticks += 1
            await asyncio.sleep(0.01)
        await busy
        rig.store.close()
        return ticks

    assert run(scenario) >= 10, "the loop stood still while the pool shut down"


# -- codecs renegotiated mid-call -----------------------------------------------------------------
def test_set_codecs_applies_each_sides_payload_types(tmp_path: Path) -> None:
    from softpbx.media.g711 import alaw_encode

    async def scenario() -> Rig:
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path, loop)
        session = rig.session()
        start = loop.time()
        # Offered with PT 96 unmapped (it would not decode); the re-INVITE maps it per side.
        rig.manager.start(StartRecording("dyn", session, {}, start))
        rig.manager.set_codecs("dyn", {96: "PCMU/8000"}, {96: "PCMA/8000"})
        rig.manager.set_codecs("no-such-call", {0: "PCMU"}, {0: "PCMU"})  # ignored
        play(loop, session, start,
             rtp_stream(ulaw(tone(440, 2.2)), pt=96, ssrc=1, ts0=0, seq0=0),
             rtp_stream(alaw_encode(tone(880, 2.2)), pt=96, ssrc=2, ts0=0, seq0=0))
        await asyncio.sleep(start + 2.2 - loop.time())
        rig.manager.stop("dyn", at=start + 2.2)
        rig.manager.set_codecs("dyn", {}, {})  # finished: ignored
        await rig.wait_finished(1)
        await rig.close()
        return rig

    rig = run(scenario)
    [done] = rig.finished
    assert done.link is not None, done.reason
    audio, _ = sf.read(rig.dir / "dyn.mp3", dtype="int16")
    assert spectrum_peak(audio[:, 0]) == pytest.approx(440, abs=2)
    assert spectrum_peak(audio[:, 1]) == pytest.approx(880, abs=2)
