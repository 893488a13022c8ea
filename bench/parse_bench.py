#!/usr/bin/env python3
"""SIP parser micro-benchmark: messages/s and µs/message for softpbx's message layer.

Measures, on one thread (pin with ``taskset -c 1`` for stable figures), for

* a typical INVITE with SDP as a desk phone sends it (~900 bytes: Via with ``rport``, Contact,
  Allow, Supported, Session-Expires, User-Agent, an SDP offer with PCMU/PCMA/telephone-event;
  the first INVITE, without credentials), and
* a typical REGISTER carrying digest ``Authorization`` (the second REGISTER of a registration),

the cost of

* ``parse``:  ``softpbx.sip.parser.parse_message(data)`` (which already validates the start
  line, CSeq, From, To, Max-Forwards and the top Via of a request);
* ``parse+fields``: the same plus reading what the switch reads (``top_via``, ``cseq``,
  ``from_``, ``to``, ``call_id``, ``contacts``, Authorization values);
* ``serialize``: ``Message.serialize()`` of an already parsed message;
* optionally ``pyVoIP``: ``pyVoIP.SIP.SIPMessage(data)`` (a test dependency) as a reference.

Every loop is bounded (``--n`` messages, at most 2,000,000; ``--repeat`` rounds, the best and
the median round are reported). Wall time (``perf_counter``) and CPU time (``process_time``)
are both taken; µs/message is CPU time.

Usage: taskset -c 1 .venv/bin/python bench/parse_bench.py [--n 20000] [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Measure the checkout this script belongs to (not whatever `softpbx` the venv points at).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from softpbx.sip import parser as _parser_module  # noqa: E402
from softpbx.sip.parser import parse_message  # noqa: E402

MAX_N = 2_000_000

SDP = (
    b"v=0\r\n"
    b"o=- 20518 0 IN IP4 192.168.1.34\r\n"
    b"s=SDP data\r\n"
    b"c=IN IP4 192.168.1.34\r\n"
    b"t=0 0\r\n"
    b"m=audio 11796 RTP/AVP 0 8 101\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-15\r\n"
    b"a=ptime:20\r\n"
    b"a=sendrecv\r\n"
)

INVITE = (
    "INVITE sip:74951234567@pbx.example.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 192.168.1.34:5062;branch=z9hG4bK1486722946;rport\r\n"
    'From: "Alice 101" <sip:101@pbx.example.com>;tag=1789461215\r\n'
    "To: <sip:74951234567@pbx.example.com>\r\n"
    "Call-ID: 1193862297@192.168.1.34\r\n"
    "CSeq: 2 INVITE\r\n"
    "Contact: <sip:101@192.168.1.34:5062;transport=udp>\r\n"
    "Max-Forwards: 70\r\n"
    "User-Agent: Yealink SIP-T46S 66.86.0.15\r\n"
    "Allow: INVITE, ACK, CANCEL, BYE, NOTIFY, REFER, OPTIONS, INFO, SUBSCRIBE, UPDATE, MESSAGE\r\n"
    "Supported: replaces, timer, path\r\n"
    "Session-Expires: 1800\r\n"
    "Min-SE: 90\r\n"
    'P-Preferred-Identity: "Alice 101" <sip:101@pbx.example.com>\r\n'
    "Allow-Events: talk, hold, conference, refer, check-sync\r\n"
    "Content-Type: application/sdp\r\n"
    f"Content-Length: {len(SDP)}\r\n"
    "\r\n"
).encode() + SDP

REGISTER = (
    b"REGISTER sip:127.0.0.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.168.1.34:5062;branch=z9hG4bK2089753812;rport\r\n"
    b'From: "Alice 101" <sip:101@127.0.0.1>;tag=2035468091\r\n'
    b'To: "Alice 101" <sip:101@127.0.0.1>\r\n'
    b"Call-ID: 0_1481203911@192.168.1.34\r\n"
    b"CSeq: 2 REGISTER\r\n"
    b'Contact: <sip:101@192.168.1.34:5062>;reg-id=1;+sip.instance="<urn:uuid:00000000-0000-1000-8000-805ec0a1b2c3>"\r\n'
    b'Authorization: Digest username="101", realm="127.0.0.1", '
    b'nonce="18c2f3a9b1e.5f2a9c1d7e3b.0c5d1f8e2a7b4c9d3e6f1a8b5c2d9e4f", '
    b'uri="sip:127.0.0.1", response="2f1a8b5c2d9e4f0c5d1f8e2a7b4c9d3e", algorithm=MD5, '
    b'cnonce="7d2e9a41", qop=auth, nc=00000001\r\n'
    b"Max-Forwards: 70\r\n"
    b"User-Agent: Yealink SIP-T46S 66.86.0.15\r\n"
    b"Expires: 3600\r\n"
    b"Allow: INVITE, ACK, CANCEL, BYE, NOTIFY, REFER, OPTIONS, INFO, SUBSCRIBE, UPDATE, MESSAGE\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

MESSAGES = {"INVITE+SDP": INVITE, "REGISTER+auth": REGISTER}


def parse_only(data: bytes) -> Callable[[], Any]:
    def run() -> Any:
        return parse_message(data)

    return run


def parse_fields(data: bytes) -> Callable[[], Any]:
    def run() -> Any:
        m = parse_message(data)
        v = m.top_via
        c = m.cseq
        f = m.from_
        t = m.to
        i = m.call_id
        ct = m.contacts
        a = m.get_all("authorization")
        return v, c, f, t, i, ct, a

    return run


def serialize(data: bytes) -> Callable[[], Any]:
    msg = parse_message(data)
    msg.top_via, msg.cseq, msg.from_, msg.to, msg.call_id, msg.contacts  # noqa: B018
    return msg.serialize


def pyvoip_parse(data: bytes) -> Callable[[], Any] | str:
    """pyVoIP's parser as a reference, or why it cannot be measured."""
    try:
        import pyVoIP.VoIP  # noqa: F401 - pyVoIP.SIP alone hits a circular import
        from pyVoIP.SIP import SIPMessage
    except Exception as exc:  # noqa: BLE001 - optional reference, any import problem means "skip"
        return f"pyVoIP not importable: {exc.__class__.__name__}"
    try:
        SIPMessage(data)
    except Exception as exc:  # noqa: BLE001 - pyVoIP is a phone: it refuses e.g. REGISTER
        return f"pyVoIP cannot parse it: {str(exc)[:48]}"

    def run() -> Any:
        return SIPMessage(data)

    return run


def measure(fn: Callable[[], Any], n: int, repeat: int) -> dict[str, float]:
    """CPU and wall µs per call over ``repeat`` rounds of ``n`` calls (GC on, as in service)."""
    for _ in range(min(n, 2000)):  # warm-up
        fn()
    cpu_us: list[float] = []
    wall_us: list[float] = []
    rng = range(n)
    for _ in range(repeat):
        gc.collect()
        c0 = time.process_time()
        w0 = time.perf_counter()
        for _ in rng:
            fn()
        w1 = time.perf_counter()
        c1 = time.process_time()
        cpu_us.append((c1 - c0) * 1e6 / n)
        wall_us.append((w1 - w0) * 1e6 / n)
    best = min(cpu_us)
    med = statistics.median(cpu_us)
    return {
        "us_best": round(best, 2),
        "us_median": round(med, 2),
        "wall_us_median": round(statistics.median(wall_us), 2),
        "msgs_per_s": round(1e6 / med),
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=20000, help=f"messages per round (max {MAX_N})")
    ap.add_argument("--repeat", type=int, default=5, help="rounds (best and median reported)")
    ap.add_argument("--no-pyvoip", action="store_true", help="skip the pyVoIP reference")
    ap.add_argument("--json", action="store_true", help="one JSON object per figure on stdout")
    a = ap.parse_args()
    n = max(1, min(a.n, MAX_N))
    repeat = max(1, min(a.repeat, 50))

    rows = []
    for label, data in MESSAGES.items():
        cases: list[tuple[str, Callable[[], Any] | str]] = [
            ("parse", parse_only(data)),
            ("parse+fields", parse_fields(data)),
            ("serialize", serialize(data)),
        ]
        if not a.no_pyvoip:
            cases.append(("pyVoIP SIPMessage", pyvoip_parse(data)))
        for case, fn in cases:
            if isinstance(fn, str):
                rows.append({"message": label, "bytes": len(data), "case": case, "skipped": fn})
                continue
            nn = n if case != "pyVoIP SIPMessage" else max(1, n // 4)
            r = measure(fn, nn, repeat)
            rows.append({"message": label, "bytes": len(data), "case": case, "n": nn, **r})

    if a.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(
        f"softpbx parser benchmark: python {sys.version.split()[0]}, n={n} x {repeat} rounds, "
        "CPU time per message (median round; best in brackets)"
    )
    print(f"parser: {_parser_module.__file__}")
    print(f"{'message':<15} {'bytes':>5}  {'case':<18} {'µs/msg':>8} {'(best)':>8} {'msgs/s':>9}")
    for r in rows:
        if r.get("skipped"):
            print(f"{r['message']:<15} {r['bytes']:>5}  {r['case']:<18} skipped: {r['skipped']}")
            continue
        print(
            f"{r['message']:<15} {r['bytes']:>5}  {r['case']:<18} {r['us_median']:>8.2f} "
            f"{'(' + format(r['us_best'], '.2f') + ')':>8} {r['msgs_per_s']:>9,}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
