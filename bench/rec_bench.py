#!/usr/bin/env python3
"""Recording cost of softpbx, side by side with the shared anchor bench.

Measures, as CPU seconds (``time.process_time``, one thread; pin with ``taskset -c 1``):

* the relay's tap: ``CallRecorder.feed`` per packet (the only recording work on the hot path);
* the recorder core: G.711 decode + placement by timestamp + stereo/mono assembly, i.e. every
  ``feed`` of both sides plus a ``flush`` every ``--flush`` seconds and the final ``finish``,
  as x realtime per call (both directions of one call);
* MP3 encoding with our ``Mp3Writer`` (soundfile/libsndfile LAME, 8 kHz, the configured
  compression level, CBR), mono mix and stereo, fed in flush-sized chunks, as x realtime;
* the implied %CPU per recorded call and calls per core, against the issue's target of at most
  0.5 % of a core per call;

then runs ``../shared/bench/rec/rec_bench.py`` (the anchor: numpy LUT decode, soundfile and
lameenc MP3) in the same run with the same audio length, and prints our ratios to it.

Usage: bench/rec_bench.py [--seconds 120] [--repeat 3] [--flush 5] [--level 0.5] [--no-anchor]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from softpbx.config.schema import RecordingSettings
from softpbx.media.g711 import ulaw_encode
from softpbx.media.mp3 import Mp3Writer
from softpbx.media.recorder import SAMPLE_RATE, CallRecorder, Side

ANCHOR = Path(__file__).resolve().parents[2] / "shared" / "bench" / "rec" / "rec_bench.py"
ANCHOR_PYTHON = Path(os.environ.get("BENCH_VENV", "/tmp/sipbench-venv")) / "bin" / "python"
SPP = 160  # samples per 20 ms packet
TARGET_PCT = 0.5


def voice_like(seconds: float, seed: int) -> np.ndarray:
    """Harmonic buzz with a syllable envelope and pauses (as the anchor's test signal)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 120 + 25 * np.sin(2 * np.pi * 0.3 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    x = sum(np.sin(k * phase) / k for k in range(1, 16))
    envelope = (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2
    gate = (np.sin(2 * np.pi * 0.2 * t + seed) > -0.4).astype(float)
    x = x * envelope * gate + 0.003 * rng.standard_normal(n)
    return (x / np.max(np.abs(x)) * 0.3 * 32767).astype(np.int16)


def rtp_stream(pcm: np.ndarray, *, ssrc: int, t0: float, seed: int) -> list[tuple[bytes, float]]:
    """20 ms PCMU RTP packets with arrival times (2 ms jitter, ~1% reordered pairs)."""
    rng = np.random.default_rng(seed)
    codes = ulaw_encode(pcm)
    ts0 = int(rng.integers(0, 2**32))
    packets = []
    for k, i in enumerate(range(0, len(codes) - SPP + 1, SPP)):
        header = bytes([0x80, 0]) + (k & 0xFFFF).to_bytes(2, "big")
        header += ((ts0 + i) & 0xFFFFFFFF).to_bytes(4, "big") + ssrc.to_bytes(4, "big")
        arrival = t0 + k * 0.02 + float(rng.uniform(0, 0.002))
        packets.append((header + codes[i : i + SPP], arrival))
    for k in range(1, len(packets) - 1, 97):  # swap neighbours: reordering
        (a, ta), (b, tb) = packets[k], packets[k + 1]
        packets[k], packets[k + 1] = (b, ta), (a, tb)
    return packets


def cpu(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median CPU seconds of ``fn`` and its last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.process_time()
        result = fn()
        times.append(time.process_time() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--flush", type=float, default=RecordingSettings().flush_seconds)
    parser.add_argument("--level", type=float, default=RecordingSettings().compression_level)
    parser.add_argument("--no-anchor", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    secs = args.seconds
    out: dict[str, Any] = {"audio_seconds": secs, "python": sys.version.split()[0]}
    rows: list[dict[str, Any]] = []

    def row(name: str, cpu_s: float, **extra: Any) -> dict[str, Any]:
        x = secs / cpu_s if cpu_s > 0 else float("inf")
        d = {"name": name, "cpu_s": round(cpu_s, 4), "x_realtime": round(x, 1), **extra}
        rows.append(d)
        print(f"{name:58s} cpu={cpu_s * 1000:9.1f} ms  x-realtime={x:9.1f}  {extra or ''}")
        return d

    caller = rtp_stream(voice_like(secs, 1), ssrc=0x1111, t0=100.0, seed=1)
    callee = rtp_stream(voice_like(secs, 2) // 2, ssrc=0x2222, t0=100.3, seed=2)
    events = sorted(
        [(t, Side.CALLER, p) for p, t in caller] + [(t, Side.CALLEE, p) for p, t in callee],
        key=lambda e: e[0],
    )
    n_packets = len(events)
    print(f"# softpbx recording bench: {secs:.0f} s call, {n_packets} RTP packets (both sides)")

    # ---- the hot-path tap ----------------------------------------------------------------
    def feed_only() -> CallRecorder:
        rec = CallRecorder(start=100.0)
        feed = rec.feed
        for t, side, p in events:
            feed(side, p, t)
        return rec

    c, _ = cpu(feed_only, args.repeat)
    row("tap: CallRecorder.feed per packet", c, us_per_packet=round(1e6 * c / n_packets, 3))

    # ---- recorder core: feed + periodic flush + finish ------------------------------------
    def record(stereo: bool) -> list[np.ndarray]:
        rec = CallRecorder(start=100.0, stereo=stereo)
        feed = rec.feed
        chunks = []
        next_flush = 100.0 + args.flush
        for t, side, p in events:
            if t >= next_flush:
                chunks.append(rec.flush(t))
                next_flush += args.flush
            feed(side, p, t)
        chunks.append(rec.finish(100.0 + secs + 0.3))
        assert rec.failure is None and rec.stats().late == 0, rec.stats()
        return chunks

    core: dict[str, float] = {}
    chunks: dict[str, list[np.ndarray]] = {}
    for stereo in (True, False):
        name = "stereo" if stereo else "mono"
        c, chunks[name] = cpu(lambda stereo=stereo: record(stereo), args.repeat)
        core[name] = c
        row(
            f"recorder: 2x G.711 decode + placement -> {name}, flush {args.flush:g} s",
            c,
            us_per_packet=round(1e6 * c / n_packets, 3),
        )

    # ---- MP3 encoding with our writer -----------------------------------------------------
    encode: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="softpbx-recbench-") as tmp:

        def write(name: str, channels: int) -> Any:
            writer = Mp3Writer(Path(tmp) / f"{name}.mp3", channels=channels,
                               compression_level=args.level)  # fmt: skip
            for pcm in chunks[name]:
                writer.write(pcm)
            return writer.close()

        for name, channels in (("mono", 1), ("stereo", 2)):
            c, result = cpu(lambda name=name, channels=channels: write(name, channels), args.repeat)
            encode[name] = c
            kbps = result.size_bytes * 8 / secs / 1000
            row(
                f"mp3 Mp3Writer {name} level={args.level:g} CBR, {args.flush:g} s chunks",
                c,
                kbps=round(kbps, 1),
                duration_s=round(result.duration_seconds, 3),
            )

    # ---- per recorded call ----------------------------------------------------------------
    print("# per recorded call (recorder core + MP3 encode; the MP3 part runs in worker threads)")
    per_call: dict[str, Any] = {}
    for name in ("mono", "stereo"):
        total = core[name] + encode[name]
        pct = 100 * total / secs
        per_call[name] = {
            "cpu_pct_per_call": round(pct, 3),
            "calls_per_core": int(100 / pct),
            "core_share_pct": round(100 * core[name] / total, 1),
            "meets_0.5pct_target": pct <= TARGET_PCT,
        }
        print(
            f"  {name:6s}: {pct:.3f} % of a core per call -> {int(100 / pct)} calls per core "
            f"(recorder core {100 * core[name] / total:.1f} % of it); "
            f"target <= {TARGET_PCT} %: {'met' if pct <= TARGET_PCT else 'NOT met'}"
        )
    out["per_call"] = per_call

    # ---- the anchor, same run ---------------------------------------------------------------
    if not args.no_anchor and ANCHOR.exists():
        python = str(ANCHOR_PYTHON) if ANCHOR_PYTHON.exists() else sys.executable
        print(f"# anchor: {python} {ANCHOR} --seconds {secs:g} --repeat {args.repeat}")
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp_json:
            proc = subprocess.run(
                [python, str(ANCHOR), "--seconds", f"{secs:g}", "--repeat", str(args.repeat),
                 "--json", tmp_json.name],
                check=False, text=True, capture_output=True,
            )  # fmt: skip
            print(proc.stdout, end="")
            if proc.returncode != 0:
                print(f"# anchor failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
            else:
                anchor = json.loads(Path(tmp_json.name).read_text())
                out["anchor"] = anchor
                by_name = {r["name"]: r for r in anchor["rows"]}
                ours_mono = secs / encode["mono"]
                ref = by_name.get(f"mp3 soundfile level={args.level:g} CONSTANT 1s chunks") or (
                    by_name.get("mp3 soundfile level=0.5 CONSTANT 1s chunks")
                )
                print("# ratios (ours / anchor, same run)")
                if ref:
                    print(
                        f"  MP3 mono encode: ours {ours_mono:.0f}x vs anchor '{ref['name']}' "
                        f"{ref['x_realtime']}x -> ratio {ours_mono / ref['x_realtime']:.2f}"
                    )
                batched = by_name.get("decode numpy LUT batched (whole buffer)")
                if batched:
                    ours = secs / core["mono"]
                    print(
                        f"  recorder core (2 sides, parse+place+mix) {ours:.0f}x vs anchor LUT "
                        f"batched decode (1 side) {batched['x_realtime']}x"
                    )
                for r in anchor["rows"]:
                    if r["name"].startswith("per call"):
                        print(
                            f"  anchor '{r['name']}': {r['cpu_pct_per_call']} %/call; "
                            f"ours mono {per_call['mono']['cpu_pct_per_call']} %/call, "
                            f"stereo {per_call['stereo']['cpu_pct_per_call']} %/call"
                        )
    out["rows"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k not in ("rows", "anchor")}))


if __name__ == "__main__":
    main()
