"""Webhook outbox benchmarks (issue 9), production code paths, everything on 127.0.0.1.

1. ``latency``: what the outbox adds to a NOTIFY_START with a CRM answering at once: from
   ``Outbox.submit`` (the driver's call) to the answer callback (what un-blocks the call),
   i.e. commit to SQLite + POST + answer + parse. p50/p99 over ``--latency-events``.
2. ``drain``: a CRM outage of ``--minutes`` at ``--rate`` calls/s with ``--events-per-call``
   events each, written straight into the outbox table as pending (what the outbox holds
   after that outage); then softpbx's outbox starts (as after a restart) with the CRM up, and
   drains it: events/s, peak RSS of this process, the most events held in memory, and a
   check that every event arrived exactly once and in order per call.

The CRM is a separate process (an aiohttp server parsing each multipart form, as a CRM
would), so its CPU and memory are not counted here::

    .venv/bin/python bench/webhook_bench.py --minutes 10 --rate 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web  # noqa: E402

from softpbx.aio.outbox import Outbox  # noqa: E402
from softpbx.config.schema import CrmSettings  # noqa: E402
from softpbx.core.events import SendWebhook  # noqa: E402
from softpbx.crm.webhook import AttemptResult, WebhookSender  # noqa: E402
from softpbx.store.outbox import OutboxDb  # noqa: E402
from softpbx.store.sqlite import SqliteStore  # noqa: E402

EVENTS = ("NOTIFY_START", "NOTIFY_INTERNAL", "NOTIFY_END", "NOTIFY_RECORD")
peak_rss = 0.0
"""Largest VmRSS sampled during the drain, MB."""


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# -- the CRM (own process) ----------------------------------------------------------------------
def crm_main(port: int, ready: multiprocessing.synchronize.Event, out: str) -> None:
    """Accept every POST (200); at SIGTERM write what arrived (event ids in order) to out."""
    import signal

    got: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        form = await request.post()
        got.append(request.headers.get("X-Event-Id", ""))
        if form.get("event") == "NOTIFY_START":
            return web.json_response({})
        return web.Response(text="")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready.set()
        await stop.wait()
        Path(out).write_text(json.dumps(got))
        await runner.cleanup()

    try:
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


class Crm:
    def __init__(self, workdir: str) -> None:
        self.port = free_port()
        self.out = os.path.join(workdir, "crm.json")
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Event()
        self.proc = ctx.Process(target=crm_main, args=(self.port, ready, self.out), daemon=True)
        self.proc.start()
        if not ready.wait(15):
            raise SystemExit("the CRM did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def stop(self) -> list[str]:
        assert self.proc.pid is not None
        os.kill(self.proc.pid, 15)
        self.proc.join(15)
        return json.loads(Path(self.out).read_text())


# -- helpers --------------------------------------------------------------------------------------
def fields(event: str, call: str, i: int) -> tuple[tuple[str, str], ...]:
    if event == "NOTIFY_RECORD":
        return (("event", event), ("pbx_call_id", call),
                ("record_link", f"http://127.0.0.1:8080/rec/{call[3:23]}.mp3"))
    out = [("event", event), ("call_start", "2026-12-02 12:00:00"), ("pbx_call_id", call),
           ("caller_id", f"7916{i:07}"), ("called_did", "74950000000")]
    if event != "NOTIFY_START":
        out.append(("internal", "101"))
    if event == "NOTIFY_END":
        out += [("duration", "42"), ("disposition", "answered")]
    return tuple(out)


def call_id(i: int) -> str:
    return "in_" + f"{i:040x}"


def rss_mb() -> float:
    """Resident set size now (VmRSS), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_db(workdir: str) -> str:
    path = os.path.join(workdir, "softpbx.db")
    SqliteStore(path=path).close()
    return path


# -- 1. latency -----------------------------------------------------------------------------------
class TimedSender(WebhookSender):
    """The production sender, noting when each event's first POST starts."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.started: dict[str, float] = {}

    async def post(self, *, event_id: str, event: str,
                   fields: tuple[tuple[str, str], ...]) -> AttemptResult:
        self.started.setdefault(event_id.rsplit(".", 1)[0], time.perf_counter())
        return await super().post(event_id=event_id, event=event, fields=fields)


async def latency(url: str, db_path: str, n: int, rate: float
                  ) -> tuple[list[float], list[float]]:
    """(submit -> first POST starts, submit -> answer applied) in ms, sorted."""
    loop = asyncio.get_running_loop()
    done: dict[str, float] = {}
    settings = CrmSettings(webhook_url=url)
    sender = TimedSender(url=url, timeout_s=5, max_in_flight=16)
    outbox = Outbox(settings=settings, db=OutboxDb(path=db_path, deliver=loop.call_soon_threadsafe),
                    sender=sender, loop=loop,
                    on_answer=lambda c, a: done.__setitem__(c, time.perf_counter()))
    outbox.start()
    sent: dict[str, float] = {}
    for i in range(n):
        c = "in_" + f"{10**9 + i:040x}"
        sent[c] = time.perf_counter()
        outbox.submit(SendWebhook(event_id=f"{c}.1", pbx_call_id=c, seq=1, event="NOTIFY_START",
                                  fields=fields("NOTIFY_START", c, i), wants_answer=True))
        await asyncio.sleep(1.0 / rate)
    deadline = time.monotonic() + 10
    while len(done) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await outbox.stop()
    return (sorted((sender.started[c] - sent[c]) * 1000.0 for c in sent if c in sender.started),
            sorted((done[c] - sent[c]) * 1000.0 for c in sent if c in done))


# -- 2. drain -------------------------------------------------------------------------------------
def backlog(db_path: str, calls: int, per_call: int, rate: float) -> int:
    """The outbox after an outage: every event pending, ``attempts`` 3, created over time."""
    t0 = time.time() - calls / rate
    db = sqlite3.connect(db_path)

    def rows():  # a generator: the backlog never sits in this process's memory
        for i in range(calls):
            c = call_id(i)
            at = t0 + i / rate
            for s, ev in enumerate(EVENTS[:per_call], 1):
                yield (f"{c}.{s}", c, s, ev, json.dumps(fields(ev, c, i), ensure_ascii=False),
                       at + 300.0, at)

    db.executemany("INSERT INTO outbox (event_id, pbx_call_id, seq, event, fields, state,"
                   " attempts, next_attempt_at, created_at, last_status, last_error)"
                   " VALUES (?,?,?,?,?,'pending',3,?,?,NULL,'connection refused')", rows())
    db.commit()
    db.close()
    return calls * per_call


async def drain(url: str, db_path: str, total: int, max_in_flight: int,
                window: int) -> tuple[float, int, Outbox]:
    loop = asyncio.get_running_loop()
    settings = CrmSettings(webhook_url=url, max_in_flight=max_in_flight)
    outbox = Outbox(settings=settings, db=OutboxDb(path=db_path, deliver=loop.call_soon_threadsafe),
                    sender=WebhookSender(url=url, timeout_s=5, max_in_flight=max_in_flight),
                    loop=loop, on_answer=lambda c, a: None, window=window)
    peak_held = 0
    start = time.perf_counter()
    outbox.start()
    deadline = time.monotonic() + 3600
    global peak_rss
    while outbox.delivered < total and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        peak_held = max(peak_held, outbox.held)
        peak_rss = max(peak_rss, rss_mb())
    elapsed = time.perf_counter() - start
    await outbox.stop()
    return elapsed, peak_held, outbox


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="outage length")
    ap.add_argument("--rate", type=float, default=20.0, help="calls per second during the outage")
    ap.add_argument("--events-per-call", type=int, default=4, choices=(1, 2, 3, 4))
    ap.add_argument("--max-in-flight", type=int, default=16)
    ap.add_argument("--window", type=int, default=2000, help="events held in memory")
    ap.add_argument("--latency-events", type=int, default=1000)
    ap.add_argument("--latency-rate", type=float, default=100.0, help="NOTIFY_STARTs per second")
    args = ap.parse_args()
    import logging
    logging.basicConfig(level=logging.WARNING)  # one INFO line per attempt would dominate
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    with tempfile.TemporaryDirectory(prefix="webhook_bench") as work:
        crm = Crm(work)
        try:
            lat_dir = os.path.join(work, "latency")
            os.makedirs(lat_dir)
            lat_pair = runner(latency(crm.url, make_db(lat_dir), args.latency_events,
                                      args.latency_rate))
            drain_dir = os.path.join(work, "drain")
            os.makedirs(drain_dir)
            db_path = make_db(drain_dir)
            calls = int(args.minutes * 60 * args.rate)
            t = time.perf_counter()
            total = backlog(db_path, calls, args.events_per_call, args.rate)
            fill = time.perf_counter() - t
            rss_before = rss_mb()
            cpu0 = time.process_time()
            elapsed, peak_held, outbox = runner(drain(crm.url, db_path, total,
                                                      args.max_in_flight, args.window))
            cpu = time.process_time() - cpu0
            rss_after = rss_mb()
        finally:
            got = crm.stop()
    commit, lat = lat_pair
    for what, xs in (("submit -> committed, first POST starts", commit),
                     ("submit -> CRM answer applied (incl. the HTTP round trip)", lat)):
        print(f"NOTIFY_START {what}: {len(xs)} events at {args.latency_rate:.0f}/s: p50 "
              f"{statistics.median(xs):.2f} ms, p99 {xs[int(len(xs) * 0.99) - 1]:.2f} ms, "
              f"max {xs[-1]:.2f} ms")
    print(f"backlog: {args.minutes:g} min outage x {args.rate:g} calls/s x "
          f"{args.events_per_call} events = {total} pending events (written in {fill:.1f} s)")
    print(f"drain: {outbox.delivered}/{total} delivered in {elapsed:.1f} s = "
          f"{outbox.delivered / elapsed:.0f} events/s (max_in_flight {args.max_in_flight}); "
          f"most held in memory {peak_held} (window {args.window}); RSS "
          f"{rss_before:.0f} MB before, peak {peak_rss:.0f} MB during, {rss_after:.0f} MB "
          f"after; softpbx side CPU "
          f"{cpu / max(1, outbox.delivered) * 1000:.2f} ms per event (the CRM's not counted)")
    expected = {f"{call_id(i)}.{s}" for i in range(calls)
                for s in range(1, args.events_per_call + 1)}
    seen = [e for e in got if e in expected]  # the drain's (not the latency run's)
    order_ok = True
    last: dict[str, int] = {}
    for e in seen:
        c, s = e.rsplit(".", 1)
        if last.get(c, 0) >= int(s):
            order_ok = False
        last[c] = int(s)
    print(f"CRM check: {len(set(seen))}/{total} distinct events, {len(seen) - len(set(seen))} "
          f"duplicates, order per call {'kept' if order_ok else 'BROKEN'}")


if __name__ == "__main__":
    main()
