#!/usr/bin/env python3
"""Setup latency NOTIFY_START adds: carrier INVITE -> first INVITE at the phone, p50/p99.

One softpbx subprocess (free 127.0.0.1 ports), a raw UDP "carrier" (an IP-authenticated
gateway) calling the DID 74950000000 -> 101, and a raw UDP phone registered as 101 that
answers every INVITE with 486 (the call ends at once). Two runs in one invocation:

* ``no-wait``: ``crm.events = ["NOTIFY_END"]`` (no NOTIFY_START, nothing to wait for);
* ``crm``: every event POSTed to bench/crm_sink.py on 127.0.0.1, which answers ``{}`` at once:
  the call waits for that answer before the phone is rung.

Everything stays on 127.0.0.1; calls are sequential, bounded in count and time.

Usage: bench/crm_latency_bench.py [--calls 300]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.server import free_port  # noqa: E402
from tests.support.sip_client import SipClient  # noqa: E402

HOST = "127.0.0.1"
SDP = ("v=0\r\no=c 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       "m=audio 40000 RTP/AVP 0\r\na=sendrecv\r\n")


def start_pbx(work: Path, sip_port: int, carrier_port: int, extra: list[str]) -> subprocess.Popen:
    sets = {
        "internal.sip_port": str(sip_port), "external.sip_port": str(sip_port),
        "internal.transports": '["udp"]', "external.transports": '["udp"]',
        "http.http_port": "0", "global.data_dir": str(work),
        "global.db_path": str(work / "softpbx.db"), "global.log_level": "warning",
        "recording.enabled": "false", "auth.max_failures": "1000000",
        "gateways.carrier.proxy": f"{HOST}:{carrier_port}",
        "gateways.carrier.inbound_addresses": f'["{HOST}:{carrier_port}"]',
    }
    cmd = [sys.executable, "-m", "softpbx", "run", "--profiles", str(ROOT / "sip_profiles")]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    cmd += extra
    with open(work / "pbx.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with SipClient("udp", (HOST, sip_port)) as c:
            if c.options(timeout=0.3) is not None:
                return proc
    proc.kill()
    raise SystemExit(f"softpbx did not start: {(work / 'pbx.log').read_text()[-2000:]}")


def headers(msg: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in msg.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]:
        name, _, value = line.partition(":")
        out.setdefault(name.strip().lower(), value.strip())
    return out


def vias(msg: bytes) -> list[str]:
    return [line for line in msg.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
            if line.lower().startswith(("via:", "v:"))]


def one_call(carrier: socket.socket, phone: socket.socket, sip_port: int, i: int) -> float | None:
    branch, call_id = f"z9hG4bK{secrets.token_hex(6)}", f"lat-{i}-{secrets.token_hex(4)}"
    cport = carrier.getsockname()[1]
    inv = (f"INVITE sip:74950000000@{HOST}:{sip_port} SIP/2.0\r\n"
           f"Via: SIP/2.0/UDP {HOST}:{cport};branch={branch};rport\r\n"
           f"From: <sip:79990001122@{HOST}>;tag=c{i}\r\nTo: <sip:74950000000@{HOST}>\r\n"
           f"Call-ID: {call_id}\r\nCSeq: 1 INVITE\r\nContact: <sip:c@{HOST}:{cport}>\r\n"
           f"Max-Forwards: 70\r\nContent-Type: application/sdp\r\n"
           f"Content-Length: {len(SDP)}\r\n\r\n{SDP}").encode()
    t0 = time.perf_counter()
    carrier.sendto(inv, (HOST, sip_port))
    phone.settimeout(3.0)
    try:
        while True:
            data, src = phone.recvfrom(65536)
            if data.startswith(b"INVITE "):
                break
    except TimeoutError:
        return None
    t1 = time.perf_counter()
    h = headers(data)
    resp = ("SIP/2.0 486 Busy Here\r\n" + "\r\n".join(vias(data)) + "\r\n"
            f"From: {h['from']}\r\nTo: {h['to']};tag=p{i}\r\nCall-ID: {h['call-id']}\r\n"
            f"CSeq: {h['cseq']}\r\nContent-Length: 0\r\n\r\n").encode()
    phone.sendto(resp, src)
    carrier.settimeout(3.0)
    try:  # the carrier's final answer, then its ACK (RFC 3261 §17.1.1.3)
        while True:
            data, _ = carrier.recvfrom(65536)
            status = int(data.split(b" ", 2)[1]) if data.startswith(b"SIP/2.0") else 0
            if status >= 300:
                h = headers(data)
                ack = (f"ACK sip:74950000000@{HOST}:{sip_port} SIP/2.0\r\n"
                       f"Via: SIP/2.0/UDP {HOST}:{cport};branch={branch};rport\r\n"
                       f"From: {h['from']}\r\nTo: {h['to']}\r\nCall-ID: {call_id}\r\n"
                       f"CSeq: 1 ACK\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()
                carrier.sendto(ack, (HOST, sip_port))
                break
    except TimeoutError:
        return None
    return (t1 - t0) * 1000.0


def run(label: str, calls: int, extra: list[str]) -> list[float]:
    work = Path(tempfile.mkdtemp(prefix=f"crm-lat-{label}-"))
    sip_port = free_port()
    carrier = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    carrier.bind((HOST, 0))
    proc = start_pbx(work, sip_port, carrier.getsockname()[1], extra)
    try:
        phone = SipClient("udp", (HOST, sip_port))
        _, resp = phone.register("101", "secret101")
        assert resp is not None and resp.status == 200, resp
        for _ in range(20):  # warm-up
            one_call(carrier, phone.sock, sip_port, -1)
        out = []
        for i in range(calls):
            ms = one_call(carrier, phone.sock, sip_port, i)
            if ms is not None:
                out.append(ms)
        phone.close()
        return out
    finally:
        proc.terminate()
        proc.wait(10)
        carrier.close()
        shutil.rmtree(work, ignore_errors=True)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    crm_port = free_port(udp=False)
    sink = subprocess.Popen([sys.executable, str(ROOT / "bench" / "crm_sink.py"), "--port",
                             str(crm_port), "--max-s", "600"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        base = run("no-wait", args.calls, ["--set", 'crm.events=["NOTIFY_END"]',
                                           "--set", f"crm.webhook_url=http://{HOST}:{crm_port}/h"])
        crm = run("crm", args.calls, ["--set", f"crm.webhook_url=http://{HOST}:{crm_port}/h"])
    finally:
        sink.terminate()
        got = sink.communicate(timeout=10)[0].decode().strip()
    print(f"# {args.calls} sequential calls each, carrier INVITE -> INVITE at the phone (ms)")
    for label, v in (("no-wait", base), ("crm", crm)):
        print(f"{label:8} n={len(v):4} p50={statistics.median(v):6.2f} p99={pct(v, 99):6.2f} "
              f"max={max(v):6.2f}")
    print(f"added by NOTIFY_START: p50 {statistics.median(crm) - statistics.median(base):+.2f} ms, "
          f"p99 {pct(crm, 99) - pct(base, 99):+.2f} ms (target p99 <= 5 ms)")
    print(f"# CRM sink: {got}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
