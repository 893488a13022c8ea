#!/usr/bin/env python3
"""Concurrently recorded calls: relay loss, encode backlog and CPU per call, with and without
recording, in one run.

  rec_concurrency.py [--calls 50,100,200] [--gen-s 25] [--payload silence|voice|conversation|both]
  rec_concurrency.py serve --calls N --base B --sink H:P [--record] ...   (used by the above)
  rec_concurrency.py gen --base B --streams S --gen-s T [--turns]   (voice generator)

``serve`` is the switch's media path in-process, on uvloop, production classes only:
:class:`softpbx.aio.rtp_transport.RtpRelay` (``open_session``, ``set_remote``, the same
``datagram_received``) and, with ``--record``, :class:`softpbx.aio.recording.RecordingManager`
fed by ``StartRecording(codecs={0: "PCMU"})`` per session -- the relay's tap, a flush every
``flush_seconds`` on the loop, ordered MP3 writes in its worker threads, a real SQLite index.
Session ``k`` has side A on ``BASE+4k`` and side B on ``BASE+4k+2`` (stream ``i`` arrives on
``BASE+2i``); both sides' SDP address is the sink and the sessions use the ``asymmetric``
latch policy, so each side's packets leave through the other side's socket to the sink.
Recordings start staggered over one flush period (calls are answered at different times, so
their flushes do not all land on the same tick). Every second ``serve`` samples
``manager.backlog`` (MP3 jobs queued or running) and the loop's lag (how late a 10 ms timer
fires). On SIGTERM it stops every recording, waits for the files and prints JSON.

The default command runs, for each N and each payload, ``serve`` without and then with
recording, each while a generator sends 2N streams of 50 pps 172-byte PCMU RTP (one stream
per side of every call) and ``rtpload sink`` counts what the relay forwards:

* ``--payload silence``: the C generator ``$BENCH_TMP/rtpload gen`` (its payload is fixed
  0xFF bytes, mu-law digital silence; the cheapest audio for LAME);
* ``--payload voice``: ``rec_concurrency.py gen``, a Python generator sending voice-like PCMU
  (harmonic buzz with syllables and pauses, as ``bench/rec_bench.py``) on *both* sides of every
  call at once: the worst case for the encoder (two people talking over each other all call);
* ``--payload conversation``: the same speech, but the two sides of a call take turns (8 s
  each, as people do): the side listening sends its microphone's noise floor (about -60 dBFS
  of white noise, not digital silence, as a phone without VAD does).

Generator and sink run on ``--gen-cpus`` (default core 0), ``serve`` on ``--sut-cpus`` (default
0,1: the loop thread plus the MP3 worker threads; the target is a 2-core machine). CPU is the
``serve`` process's utime+stime over the generator's run (all threads, from /proc), so the
recording's share per call is ``(CPU with - CPU without) / N``. Everything is on 127.0.0.1
and bounded (``serve`` exits by itself after ``--gen-s + 60`` s; every child has a timeout).
Needs ``$BENCH_TMP/rtpload`` (``gcc -O2 -o /tmp/sipbench/rtpload
../shared/bench/rtp/rtpload.c``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from softpbx.config.schema import RecordingSettings

TARGET_PCT_PER_CALL = 0.5
GROWING_SLOPE = 0.2
"""MP3 jobs per second of backlog trend above which encoding is taken as falling behind."""
PPS = 50
PKT_BYTES = 172
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the switch's media path under test ----------------------------------------------------------
async def _serve(a: argparse.Namespace) -> dict[str, Any]:
    from softpbx.aio.recording import FinishedRecording, RecordingManager
    from softpbx.aio.rtp_transport import RtpRelay
    from softpbx.config.schema import MediaSettings
    from softpbx.core.events import StartRecording
    from softpbx.media.relay import LatchPolicy
    from softpbx.store.sqlite import SqliteStore

    host, port = a.sink.rsplit(":", 1)
    sink = (host, int(port))
    loop = asyncio.get_running_loop()
    settings = MediaSettings(rtp_ip="127.0.0.1", rtp_start_port=a.base,
                             rtp_end_port=a.base + 4 * a.calls - 1)
    relay = RtpRelay(settings=settings, loop=loop, policy=LatchPolicy.ASYMMETRIC)
    sessions = []
    for k in range(a.calls):
        s = relay.open_session()
        if (s.a.rtp_port, s.b.rtp_port) != (a.base + 4 * k, a.base + 4 * k + 2):
            raise SystemExit(f"port layout broken at session {k}: {s.a.rtp_port}/{s.b.rtp_port}"
                             " (ports in use?)")
        s.a.set_remote(sink)
        s.b.set_remote(sink)
        sessions.append(s)
    for s in sessions:
        await relay.wait_ready(s)

    manager: RecordingManager | None = None
    store: SqliteStore | None = None
    finished: list[FinishedRecording] = []
    rec_settings = RecordingSettings(flush_seconds=a.flush, stereo=not a.mono,
                                     compression_level=a.level, bitrate_mode=a.bitrate_mode)
    if a.record:
        os.makedirs(a.dir, exist_ok=True)
        store = SqliteStore(path=os.path.join(a.dir, "index.db"))
        manager = RecordingManager(settings=rec_settings, directory=a.dir,
                                   public_base_url="http://127.0.0.1:8080", store=store,
                                   loop=loop, on_finished=finished.append)
        await manager.recover()

        def start(k: int) -> None:
            assert manager is not None
            manager.start(StartRecording(f"bench-{k:04d}", sessions[k], {0: "PCMU"},
                                         loop.time()))

        for k in range(a.calls):  # answered at different times over one flush period
            loop.call_later(a.flush * k / a.calls, start, k)

    backlog: list[tuple[float, int]] = []
    """(time.monotonic(), manager.backlog) about once a second (the parent keeps its window)."""
    lag_ms: list[float] = []
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def sample() -> None:
        while True:
            t = loop.time()
            await asyncio.sleep(0.01)
            lag_ms.append((loop.time() - t - 0.01) * 1000)
            if len(lag_ms) % 90 == 0:  # about once a second
                backlog.append((time.monotonic(),
                                manager.backlog if manager is not None else 0))

    print(f"ready {os.getpid()}", flush=True)
    sampler = loop.create_task(sample())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), a.duration)
    sampler.cancel()
    lag_ms = lag_ms[-int(a.window_s * 90):]  # the generator's run (the parent sends SIGTERM)
    forwarded = sum(s.a.rtp.packets_in + s.b.rtp.packets_in for s in sessions)
    out: dict[str, Any] = {
        "calls": a.calls, "record": a.record, "forwarded": forwarded,
        "backlog": backlog, "lag_ms_max": round(max(lag_ms, default=0.0), 1),
        "lag_ms_p99": round(sorted(lag_ms)[int(0.99 * (len(lag_ms) - 1))], 1) if lag_ms else 0.0,
    }
    if manager is not None and store is not None:
        t0 = time.monotonic()
        now = loop.time()
        for k in range(a.calls):
            manager.stop(f"bench-{k:04d}", now)
        deadline = time.monotonic() + 60
        while len(finished) < a.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        out["finalise_s"] = round(time.monotonic() - t0, 2)
        await manager.aclose()
        store.close()
        files = sorted(Path(a.dir).glob("*.mp3"))
        out.update({
            "finished": len(finished),
            "ready": sum(1 for f in finished if f.link),
            "failed": [f.reason for f in finished if not f.link][:3],
            "files": len(files),
            "part_files": len(list(Path(a.dir).glob("*.part"))),
            "mb": round(sum(f.stat().st_size for f in files) / 1e6, 2),
            "audio_s_min": round(min((f.duration for f in finished), default=0.0), 2),
            "audio_s_max": round(max((f.duration for f in finished), default=0.0), 2),
        })
    for s in sessions:
        relay.close_session(s)
    await relay.aclose()
    return out


def serve(a: argparse.Namespace) -> None:
    """The relay (and the recorder) standalone until SIGTERM or ``--duration``."""
    import uvloop

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    print(json.dumps(uvloop.run(_serve(a))), flush=True)


# -- voice generator ------------------------------------------------------------------------------
def generate(a: argparse.Namespace) -> None:
    """Send ``--streams`` PCMU streams of voice-like audio to BASE+2i at 50 pps each.

    With ``--turns``, streams ``2k`` and ``2k+1`` (the two sides of call ``k``) take turns:
    one talks while the other sends only its noise floor."""
    import numpy as np

    from softpbx.media.g711 import ulaw_encode

    rate, spp = 8000, 160
    # a loop of speech-like audio; each stream (each call, with --turns) starts at another offset
    n = (16 if a.turns else 10) * rate
    t = np.arange(n) / rate
    f0 = 120 + 25 * np.sin(2 * np.pi * 0.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 16))
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2 * (np.sin(2 * np.pi * 0.2 * t) > -0.4)
    x = x / np.max(np.abs(x)) * 0.3
    rng = np.random.default_rng(1)
    if a.turns:
        talks = (t % 16) < 8  # side A talks the first 8 s of the loop, side B the next 8
        sides = [x * talks, x * ~talks]
    else:
        sides = [x, x]
    tables = []
    for y in sides:
        y = y + 0.001 * rng.standard_normal(n)  # a microphone's noise floor, about -60 dBFS
        codes = ulaw_encode((y * 32767).astype(np.int16))
        tables.append([codes[i:i + spp] for i in range(0, n, spp)])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, 32, 8 << 20)  # SO_SNDBUFFORCE
    dests = [("127.0.0.1", a.base + 2 * i) for i in range(a.streams)]
    npk = len(tables[0])
    offsets = [(37 * (i // 2 if a.turns else i)) % npk for i in range(a.streams)]
    streams = [tables[i % 2] for i in range(a.streams)]
    pack = struct.Struct("!BBHII").pack
    sent = errors = 0
    k = 0
    start = time.monotonic()
    while (now := time.monotonic()) - start < a.gen_s:
        for i, dest in enumerate(dests):
            header = pack(0x80, 0, k & 0xFFFF, (k * spp) & 0xFFFFFFFF, i + 1)
            try:
                sock.sendto(header + streams[i][(offsets[i] + k) % npk], dest)
                sent += 1
            except OSError:
                errors += 1
        k += 1
        pause = start + k / PPS - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    print(f"sent {sent} rate {sent / (now - start):.1f} errors {errors}", flush=True)


# -- the comparison --------------------------------------------------------------------------------
def _proc_cpu(pid: int, tid: int | None = None) -> float:
    """CPU seconds of a process (all threads), or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads


def _count(text: str, word: str) -> int:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == word:
            return int(parts[1])
    raise RuntimeError(f"no '{word} N' line in {text!r}")


def run_one(a: argparse.Namespace, n: int, record: bool, payload: str) -> dict[str, Any]:
    """One ``serve`` process under one generator run."""
    rtpload = os.path.join(os.environ.get("BENCH_TMP", "/tmp/sipbench"), "rtpload")
    rec_dir = tempfile.mkdtemp(prefix="rec_concurrency_")
    cmd = ["taskset", "-c", a.sut_cpus, sys.executable, os.path.abspath(__file__), "serve",
           "--calls", str(n), "--base", str(a.base), "--sink", f"127.0.0.1:{a.sink_port}",
           "--duration", str(a.gen_s + 60), "--flush", str(a.flush), "--dir", rec_dir,
           "--window-s", str(a.gen_s)]
    if record:
        cmd += ["--record", "--level", str(a.level), "--bitrate-mode", a.bitrate_mode]
        if a.mono:
            cmd.append("--mono")
    sut = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert sut.stdout is not None
        line = sut.stdout.readline()
        if not line.startswith("ready"):
            raise SystemExit(f"serve failed to start: {line!r}")
        time.sleep(a.flush + 0.5)  # every recording has started
        pin = ["taskset", "-c", a.gen_cpus]
        sink = subprocess.Popen([*pin, rtpload, "sink", "127.0.0.1", str(a.sink_port), "1",
                                 str(a.gen_s + 3)], stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)
        if payload == "silence":
            gen_cmd = [*pin, rtpload, "gen", "127.0.0.1", str(a.base), "2", str(2 * n),
                       str(PPS), str(a.gen_s), str(PKT_BYTES)]
        else:
            gen_cmd = [*pin, sys.executable, os.path.abspath(__file__), "gen", "--base",
                       str(a.base), "--streams", str(2 * n), "--gen-s", str(a.gen_s)]
            if payload == "conversation":
                gen_cmd.append("--turns")
        # The main thread runs the loop (relay, tap, flushes); the rest are the MP3 workers
        # and the SQLite writer.
        loop0, cpu0, t0 = _proc_cpu(sut.pid, sut.pid), _proc_cpu(sut.pid), time.monotonic()
        gen = subprocess.run(gen_cmd, capture_output=True, text=True, timeout=a.gen_s + 30)
        loop1, cpu1, t1 = _proc_cpu(sut.pid, sut.pid), _proc_cpu(sut.pid), time.monotonic()
        if gen.returncode != 0:
            raise SystemExit(f"generator failed: {gen.stdout} {gen.stderr}")
        sink_out, _ = sink.communicate(timeout=a.gen_s + 30)
        sent, received = _count(gen.stdout, "sent"), _count(sink_out, "received")
        sut.send_signal(signal.SIGTERM)
        out, _ = sut.communicate(timeout=90)
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        if sut.poll() is None:
            sut.kill()
            sut.wait(timeout=10)
        shutil.rmtree(rec_dir, ignore_errors=True)
    wall = t1 - t0
    result.update({
        "payload": payload, "sent": sent, "received": received,
        "loss_pct": round(100 * (sent - received) / sent, 3) if sent else None,
        "wall_s": round(wall, 2), "cpu_s": round(cpu1 - cpu0, 2),
        "loop_cpu_s": round(loop1 - loop0, 2),
        "cpu_pct": round(100 * (cpu1 - cpu0) / wall, 1),
    })
    # Backlog during the generator's run only: its peak, and its trend (least-squares slope,
    # MP3 jobs per second). Encoding that cannot keep up grows it steadily: 200 calls flushing
    # every 5 s queue 40 jobs/s, so a 1 % shortfall is +0.4 jobs/s.
    window = [(t - t0, b) for t, b in result["backlog"] if t0 <= t <= t1]
    result["backlog"] = [b for _, b in window]
    result["backlog_max"] = max(result["backlog"], default=0)
    slope = 0.0
    if len(window) >= 3:
        xs = [t for t, _ in window]
        ys = [b for _, b in window]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in window) / sum((x - mx) ** 2 for x in xs)
    result["backlog_slope"] = round(slope, 3)
    result["backlog_growing"] = slope > GROWING_SLOPE
    print(json.dumps({k: v for k, v in result.items() if k != "backlog"}), file=sys.stderr,
          flush=True)
    return result


def compare(a: argparse.Namespace) -> None:
    rtpload = os.path.join(os.environ.get("BENCH_TMP", "/tmp/sipbench"), "rtpload")
    if not os.access(rtpload, os.X_OK):
        raise SystemExit(f"{rtpload} missing: gcc -O2 -o {rtpload} "
                         "../shared/bench/rtp/rtpload.c")
    payloads = ["silence", "voice"] if a.payload == "both" else [a.payload]
    rows = []
    for payload in payloads:
        for n in [int(x) for x in a.calls.split(",")]:
            base = run_one(a, n, False, payload)
            time.sleep(1)
            rec = run_one(a, n, True, payload)
            time.sleep(1)
            rows.append((payload, n, base, rec))

    print(f"\nConcurrently recorded calls: 2 streams x {PPS} pps x {PKT_BYTES} B per call, "
          f"generator {a.gen_s:g} s, flush {a.flush:g} s, serve on CPU {a.sut_cpus}, "
          f"generator+sink on CPU {a.gen_cpus}; MP3 {'mono' if a.mono else 'stereo'} "
          f"{a.bitrate_mode} level {a.level:g}")
    head = (f"{'payload':>8} {'calls':>5} {'loss% off/on':>13} {'CPU% off':>8} {'CPU% on':>8} "
            f"{'rec %core/call':>14} {'(loop+workers)':>14} {'backlog max':>11} {'slope/s':>7} {'lag ms max/p99':>14} "
            f"{'files':>9} {'MB':>6} {'audio s':>11} {'finalise s':>10}")
    print(head)
    for payload, n, base, rec in rows:
        share = (rec["cpu_s"] - base["cpu_s"]) / rec["wall_s"] / n * 100
        on_loop = (rec["loop_cpu_s"] - base["loop_cpu_s"]) / rec["wall_s"] / n * 100
        rec["rec_pct_per_call"] = round(share, 3)
        split = f"{on_loop:.3f}+{share - on_loop:.3f}"
        files = f"{rec['files']}/{n}" + (f"+{rec['part_files']}p" if rec["part_files"] else "")
        print(f"{payload:>8} {n:>5} {base['loss_pct']:>6}/{rec['loss_pct']:<6} "
              f"{base['cpu_pct']:>8} {rec['cpu_pct']:>8} {share:>14.3f} {split:>14} "
              f"{rec['backlog_max']:>11} {rec['backlog_slope']:>7} "
              f"{rec['lag_ms_max']:>7}/{rec['lag_ms_p99']:<6} {files:>9} {rec['mb']:>6} "
              f"{rec['audio_s_min']:>5}-{rec['audio_s_max']:<5} {rec['finalise_s']:>10}")
    for payload in payloads:
        sustained = [n for p, n, base, rec in rows if p == payload and rec["loss_pct"] == 0
                     and not rec["backlog_growing"] and rec["ready"] == n]
        cheap = [n for p, n, base, rec in rows if p == payload and n in sustained
                 and rec["rec_pct_per_call"] <= TARGET_PCT_PER_CALL]
        print(f"{payload}: largest N recorded with no relay loss, no growing backlog (slope "
              f"<= {GROWING_SLOPE}/s) and every file ready: {max(sustained, default=None)}; "
              f"of those within {TARGET_PCT_PER_CALL}% of a core per call: "
              f"{max(cheap, default=None)}")
    print(json.dumps({"rows": [{"payload": p, "calls": n, "off": b, "on": r}
                               for p, n, b, r in rows]}), file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="compare", choices=["compare", "serve", "gen"])
    ap.add_argument("--calls", default="50,100,200")
    ap.add_argument("--base", type=int, default=25000)
    ap.add_argument("--sink", default="127.0.0.1:9190", help="serve: where the relay sends")
    ap.add_argument("--sink-port", type=int, default=9190)
    ap.add_argument("--gen-s", type=float, default=25.0)
    ap.add_argument("--flush", type=float, default=5.0, help="recording.flush_seconds")
    ap.add_argument("--payload", default="both",
                    choices=["silence", "voice", "conversation", "both"],
                    help="both = silence and voice")
    ap.add_argument("--turns", action="store_true",
                    help="gen: the two sides of a call take turns (conversation)")
    ap.add_argument("--sut-cpus", default=os.environ.get("SUT_CPUS", "0,1"))
    ap.add_argument("--gen-cpus", default=os.environ.get("GEN_CPUS", "0"))
    ap.add_argument("--record", action="store_true", help="serve: record every session")
    defaults = RecordingSettings()
    ap.add_argument("--mono", action="store_true", help="record a mono mix (default stereo)")
    ap.add_argument("--level", type=float, default=defaults.compression_level,
                    help="recording.compression_level")
    ap.add_argument("--bitrate-mode", default=defaults.bitrate_mode,
                    help="recording.bitrate_mode")
    ap.add_argument("--dir", default="", help="serve: recordings directory")
    ap.add_argument("--duration", type=float, default=90.0, help="serve: exit after this long")
    ap.add_argument("--streams", type=int, default=0, help="gen: streams to send")
    ap.add_argument("--window-s", type=float, default=25.0,
                    help="serve: loop-lag figures cover the last this many seconds")
    a = ap.parse_args()
    if a.command == "serve":
        a.calls = int(a.calls)
        serve(a)
    elif a.command == "gen":
        generate(a)
    else:
        compare(a)


if __name__ == "__main__":
    main()
