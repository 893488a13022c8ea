#!/usr/bin/env python3
"""Scrape softpbx's ``/metrics`` every ``--interval`` seconds, as Prometheus would (but far
more often than its usual 15 s), until SIGTERM or ``--max-s``; then print one line: how many
scrapes, how long the slowest took, and the call counters of the last one.

Used by ``cps_bench.sh METRICS=1``: the CPU per call is measured with the scrapes going on.
Every scrape is parsed with ``prometheus_client``'s parser, so a malformed exposition fails
the bench instead of passing unnoticed.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", required=True)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--max-s", type=float, default=900.0)
    a = ap.parse_args()
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    deadline = time.monotonic() + a.max_s
    scrapes, errors, slowest = 0, 0, 0.0
    last: dict[str, float] = {}
    while not stop and time.monotonic() < deadline:
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(a.url, timeout=5) as resp:  # noqa: S310 - 127.0.0.1
                text = resp.read().decode()
            sample = {}
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if s.name in ("softpbx_calls_ended_total", "softpbx_sip_requests_total",
                                  "softpbx_rtp_packets_relayed_total",
                                  "softpbx_event_loop_lag_seconds",
                                  "process_cpu_seconds_total"):
                        key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()))
                        sample[key] = s.value
            last = sample
            scrapes += 1
        except (OSError, ValueError):
            errors += 1
        took = time.monotonic() - t0
        slowest = max(slowest, took)
        time.sleep(max(0.0, a.interval - took))
    calls = {k: v for k, v in last.items() if k.startswith("softpbx_calls_ended_total")}
    print(json.dumps({"scrapes": scrapes, "errors": errors, "slowest_ms": round(slowest * 1000, 1),
                      "calls_ended": calls,
                      "invites_in": last.get("softpbx_sip_requests_total,direction=in,"
                                             "method=INVITE"),
                      "cpu_s": last.get("process_cpu_seconds_total")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
