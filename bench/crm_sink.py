#!/usr/bin/env python3
"""A local CRM for the benchmarks: an aiohttp server on 127.0.0.1 that answers every webhook
at once (``{}`` to NOTIFY_START: "route normally") and counts what it got.

On SIGTERM/SIGINT (or after ``--max-s``) it prints one JSON line: events received, distinct
``X-Event-Id`` values (duplicates = received - distinct), per event name, and per-call order
violations (an event whose ``.<n>`` is not the next of its call).

Usage: bench/crm_sink.py --port 18080 [--max-s 900]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections import Counter

from aiohttp import web


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-s", type=float, default=900.0)
    args = ap.parse_args()
    received = 0
    ids: set[str] = set()
    names: Counter[str] = Counter()
    last_seq: dict[str, int] = {}
    out_of_order = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal received, out_of_order
        form = await request.post()
        received += 1
        event_id = request.headers.get("X-Event-Id", "")
        duplicate = event_id in ids
        ids.add(event_id)
        names[str(form.get("event", ""))] += 1
        call, _, seq = event_id.rpartition(".")
        if seq.isdigit() and not duplicate:
            n = int(seq)
            if n != last_seq.get(call, 0) + 1:
                out_of_order += 1
            last_seq[call] = max(n, last_seq.get(call, 0))
        return web.json_response({})

    async def run() -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"crm_sink listening on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.max_s)
        await runner.cleanup()

    asyncio.run(run())
    print(json.dumps({"received": received, "distinct": len(ids), "events": dict(names),
                      "calls": len(last_seq), "out_of_order": out_of_order}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
