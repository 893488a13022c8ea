#!/usr/bin/env python3
"""softpbx's RTP relay against the media anchors, in one run.

  rtp_relay_bench.py [--streams 500,1000] [--gen-s 5]        run everything, print a table
  rtp_relay_bench.py serve --streams N --base B --sink H:P    the relay alone (used by the above)

``serve`` starts :class:`softpbx.aio.rtp_transport.RtpRelay` on uvloop with the socket layout
``../shared/bench/rtp/rtp_step.py --modes external`` expects -- stream ``i`` arrives on
``BASE + 2i`` and is forwarded to the sink: session ``k`` has side A on ``BASE + 4k`` (stream
``2k``) and side B on ``BASE + 4k + 2`` (stream ``2k + 1``); both sides' SDP address is the
sink and the sessions use the ``asymmetric`` latch policy, so each side's packets go out of the
other side's socket to the sink. Production code paths only: ``open_session``, ``set_remote``,
the same ``datagram_received``. It prints ``ready <pid>`` once bound.

The default command runs ``rtp_step.py --modes uvloop,c`` (the Python and C anchors) and then
``--modes external`` against a ``serve`` process pinned to ``$SUT_CPU``, for each stream
count, and prints relay CPU per packet for each and softpbx's ratio to them. It needs
``--metrics`` runs softpbx a second time per stream count with the metrics collector reading
the relay (``softpbx.aio.metrics.SoftpbxCollector``, the ``/metrics`` families) and the text
exposition generated every second, as a scrape would: the same run shows both figures. It needs
``$BENCH_TMP/rtpload`` (``../shared/bench/setup.sh``, or just
``gcc -O2 -o $BENCH_TMP/rtpload ../shared/bench/rtp/rtpload.c``). Bounded: every step lasts
``gen_s`` + a few seconds; ``serve`` exits by itself after ``--duration``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time

SHARED_BENCH = os.environ.get(
    "SHARED_BENCH", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "bench"))
RTP_STEP = os.path.join(SHARED_BENCH, "rtp", "rtp_step.py")


# -- the relay under test ------------------------------------------------------------------


async def _serve(a: argparse.Namespace) -> dict[str, object]:
    from softpbx.aio.rtp_transport import RtpRelay
    from softpbx.config.schema import MediaSettings
    from softpbx.media.relay import LatchPolicy

    host, port = a.sink.rsplit(":", 1)
    sink = (host, int(port))
    n_sessions = (a.streams + 1) // 2
    settings = MediaSettings(
        rtp_ip="127.0.0.1", rtp_start_port=a.base, rtp_end_port=a.base + 4 * n_sessions - 1
    )
    loop = asyncio.get_running_loop()
    relay = RtpRelay(
        settings=settings,
        loop=loop,
        policy=LatchPolicy.ASYMMETRIC,
        socket_buffer=None if a.default_buffers else 256 * 1024,
        dscp=None if a.no_dscp else 0x2E,
    )
    sessions = []
    for k in range(n_sessions):
        s = relay.open_session()
        if (s.a.rtp_port, s.b.rtp_port) != (a.base + 4 * k, a.base + 4 * k + 2):
            raise SystemExit(f"port layout broken at session {k}: {s.a.rtp_port}/{s.b.rtp_port}")
        s.a.set_remote(sink)
        s.b.set_remote(sink)
        sessions.append(s)
    for s in sessions:
        await relay.wait_ready(s)
    scraper = loop.create_task(_scrape_every_second(relay, loop)) if a.metrics else None
    print(f"ready {os.getpid()}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    t0 = time.process_time()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), a.duration)
    forwarded = sum(s.a.rtp.packets_in + s.b.rtp.packets_in for s in sessions)
    cpu = time.process_time() - t0
    scrapes = 0
    if scraper is not None:
        scraper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            scrapes = await scraper
    await relay.aclose()
    return {"streams": a.streams, "forwarded": forwarded, "cpu_s": round(cpu, 2),
            "scrapes": scrapes}


async def _scrape_every_second(relay: object, loop: asyncio.AbstractEventLoop) -> int:
    """The relay's /metrics families generated as text every second (what a scrape costs)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    from softpbx.aio.metrics import SoftpbxCollector

    collector = SoftpbxCollector(switch=None, clock=loop.time, relay=relay)  # type: ignore[arg-type]

    class RelayFamilies:
        def collect(self):  # type: ignore[no-untyped-def]
            return collector._media()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayFamilies())  # type: ignore[arg-type]
    n = 0
    try:
        while True:
            await asyncio.sleep(1.0)
            assert b"softpbx_rtp_packets_relayed_total" in generate_latest(registry)
            n += 1
    except asyncio.CancelledError:
        return n


def serve(a: argparse.Namespace) -> None:
    """Run the relay standalone until ``--duration`` passes or SIGTERM."""
    import uvloop

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    print(json.dumps(uvloop.run(_serve(a))), flush=True)


# -- the comparison ------------------------------------------------------------------------


def _step(args: list[str], env: dict[str, str]) -> list[dict[str, object]]:
    cmd = [sys.executable, RTP_STEP, *args]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    sys.stderr.write(proc.stderr)
    rows = []
    for line in proc.stdout.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "streams" in row and "relay_cpu_us_per_pkt" in row:
            rows.append(row)
    return rows


def compare(a: argparse.Namespace) -> None:
    """Anchors, then softpbx, same machine, same run; print the table."""
    env = dict(os.environ)
    env.setdefault("BENCH_TMP", "/tmp/sipbench")
    rtpload = os.path.join(env["BENCH_TMP"], "rtpload")
    if not os.access(rtpload, os.X_OK):
        raise SystemExit(f"{rtpload} missing: run {SHARED_BENCH}/setup.sh (or gcc rtpload.c)")
    common = ["--gen-s", str(a.gen_s), "--relay-base", str(a.base), "--keep-going"]
    rows = _step(["--modes", a.anchors, "--streams", a.streams, *common], env)
    sut_cpu = env.get("SUT_CPU", "1")
    variants = [("softpbx", [])] + ([("softpbx+metrics", ["--metrics"])] if a.metrics else [])
    for n, (label, extra) in [(int(x), v) for x in a.streams.split(",") for v in variants]:
        relay = subprocess.Popen(
            [
                "taskset", "-c", sut_cpu, sys.executable, os.path.abspath(__file__), "serve",
                "--streams", str(n), "--base", str(a.base), "--sink", a.sink,
                "--duration", str(a.gen_s + 30), *extra,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert relay.stdout is not None
        line = relay.stdout.readline()
        if not line.startswith("ready"):
            relay.kill()
            raise SystemExit(f"softpbx relay failed to start: {line!r}")
        pid = line.split()[1]
        try:
            got = _step(
                ["--modes", "external", "--relay-pid", pid, "--streams", str(n), *common], env
            )
        finally:
            relay.send_signal(signal.SIGTERM)
            out, _ = relay.communicate(timeout=20)
        for row in got:
            row["mode"] = label
        rows += got
        print(out.strip(), file=sys.stderr)
        time.sleep(1)

    by = {(r["mode"], r["streams"]): r for r in rows}
    anchors = a.anchors.split(",")
    modes = [*anchors, *(v[0] for v in variants)]
    print(f"\nRTP relay, 172-byte packets, 50 pps/stream, gen {a.gen_s}s, relay on CPU {sut_cpu}")
    print(f"{'streams':>8} {'pps':>7} " + " ".join(f"{m + ' us/pkt':>15}" for m in modes)
          + "  " + " ".join(f"{'softpbx/' + m:>14}" for m in anchors) + "  loss% (softpbx)")  # fmt: skip
    for n in [int(x) for x in a.streams.split(",")]:
        us = {m: (by.get((m, n)) or {}).get("relay_cpu_us_per_pkt") for m in modes}
        ratios = [
            f"{us['softpbx'] / us[m]:>14.2f}" if us["softpbx"] and us[m] else f"{'-':>14}"
            for m in anchors
        ]
        loss = (by.get(("softpbx", n)) or {}).get("loss_pct")
        print(f"{n:>8} {n * 50:>7} " + " ".join(f"{v if v is not None else '-':>15}" for v in us.values())
              + "  " + " ".join(ratios) + f"  {loss}")  # fmt: skip
        if us.get("softpbx+metrics") and us["softpbx"]:
            print(f"{'':>16} metrics on/off: {us['softpbx+metrics'] / us['softpbx']:.3f}")
    for m in modes:
        ok = [
            n for (mode, n), r in by.items() if mode == m and r.get("loss_pct", 100) <= a.max_loss
        ]
        print(f"max streams with loss <= {a.max_loss}% [{m}]: {max(ok) if ok else None}")
    print(json.dumps({"rows": rows}), file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("command", nargs="?", default="compare", choices=["compare", "serve"])
    ap.add_argument("--streams", default="500,1000")
    ap.add_argument("--base", type=int, default=10000)
    ap.add_argument("--sink", default="127.0.0.1:9000")
    ap.add_argument("--duration", type=float, default=60.0, help="serve: exit after this long")
    ap.add_argument("--gen-s", type=float, default=5.0)
    ap.add_argument("--anchors", default="uvloop,c")
    ap.add_argument("--max-loss", type=float, default=0.1)
    ap.add_argument("--default-buffers", action="store_true", help="serve: keep kernel buffers")
    ap.add_argument("--no-dscp", action="store_true", help="serve: do not mark packets")
    ap.add_argument("--metrics", action="store_true",
                    help="compare: softpbx also with the /metrics families generated every "
                         "second; serve: do that")
    a = ap.parse_args()
    if a.command == "serve":
        a.streams = int(a.streams)
        serve(a)
    else:
        compare(a)


if __name__ == "__main__":
    main()
