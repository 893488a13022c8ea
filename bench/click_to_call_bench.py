#!/usr/bin/env python3
"""Click-to-call under load: ``--rate`` CRM requests per second for ``--seconds`` against a real
softpbx, SIPp as every employee's phone and SIPp as the carrier.

Wiring (all on 127.0.0.1, every step bounded, the whole run killed after ``--max-s``):

* softpbx from a scratch copy of ``sip_profiles/``: ``--extensions`` extensions 2000.. (password
  ``pw-<ext>``), the ``carrier`` gateway on the carrier SIPp's port, recording and webhooks off,
  log level warning, the per-extension repeat limit off (the load reuses extensions);
* the employees: one SIPp registers every extension from one port (``reg_auth.xml``), then a
  SIPp UAS on that port answers every INVITE (``call_answer.xml``, no media);
* the carrier: a SIPp UAS answering the client leg, talking ``--talk-ms``, then sending BYE
  (``bench/sipp/uas_answer_bye.xml``);
* the CRM: an aiohttp client POSTing ``from=<ext>&to=8999<7 digits>`` paced at ``--rate``,
  extensions round-robin (one in use at most every ``extensions / rate`` seconds).

Printed: requests answered ``{"status":"1"}`` (and the others by answer), HTTP answer time
p50/p99, calls bridged (CDR disposition ``answered``), and setup time p50/p99 = the CDR's
``answered_at - started_at`` (the click's origination to the client's answer, as the PBX saw
it). Exit status 0 when every request got ``status 1`` and every call was bridged.

Usage: .venv/bin/python bench/click_to_call_bench.py [--rate 50] [--seconds 20]
           [--extensions 200] [--talk-ms 1000] [--max-s 240]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
SIPP_TESTS = ROOT / "tests" / "data" / "sipp"
HOST = "127.0.0.1"
TOKEN = "bench-click-token"
FIRST_EXT = 2000


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A port free on 127.0.0.1 for ``kind`` (and for UDP+TCP when SIP listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                t.bind((HOST, port))
                u.bind((HOST, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``values``, 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def write_profiles(out: Path, *, extensions: int, carrier_port: int) -> Path:
    """The shipped profiles with the bench's extensions and the carrier on ``carrier_port``."""
    prof = out / "profiles"
    shutil.copytree(ROOT / "sip_profiles", prof, ignore=shutil.ignore_patterns("*.db*"))
    for i in range(extensions):
        ext = FIRST_EXT + i
        (prof / "directory" / f"{ext}.toml").write_text(
            f'[user]\npassword = "pw-{ext}"\nrecord = false\n')
    (prof / "gateways" / "carrier.toml").write_text(
        f'[gateway]\nproxy = "{HOST}:{carrier_port}"\ntransport = "udp"\nregister = false\n'
        f'inbound_addresses = ["{HOST}:{carrier_port}"]\nrecord = false\n')
    return prof


class Proc:
    """A child process with its output in a file; killed (its group) when left running."""

    def __init__(self, name: str, cmd: list[str], out: Path, **kw: Any) -> None:
        self.name = name
        self.log = out / f"{name}.log"
        self._fh = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, **kw)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            if self.wait(timeout) is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._fh.close()
        return self.proc.returncode

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.log.read_text("utf-8", "replace").splitlines()[-n:])


def sipp(name: str, out: Path, target: int, scenario: Path, port: int, *extra: str) -> Proc:
    exe = shutil.which("sipp")
    if exe is None:
        raise SystemExit("sipp is not installed (apt-get install sip-tester)")
    return Proc(name, [exe, f"{HOST}:{target}", "-sf", str(scenario), "-i", HOST, "-p", str(port),
                       "-nostdin", "-trace_err", "-error_file", str(out / f"{name}_errors.log"),
                       *extra], out, cwd=out)


async def wait_http(url: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url) as r:
                    return await r.json()
            except aiohttp.ClientError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.1)


async def wait_registrations(base: str, count: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        st = await wait_http(f"{base}/api/status", 5)
        if st["registrations"] >= count or time.monotonic() >= deadline:
            return int(st["registrations"])
        await asyncio.sleep(0.2)


async def load(base: str, *, rate: float, seconds: float, extensions: int
               ) -> list[tuple[float, int, dict[str, Any]]]:
    """POST ``rate`` clicks per second for ``seconds``: (answer time, HTTP status, body) each."""
    total = int(rate * seconds)
    results: list[tuple[float, int, dict[str, Any]]] = []
    timeout = aiohttp.ClientTimeout(total=10)
    conn = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as s:

        async def one(i: int) -> None:
            fields = {"from": str(FIRST_EXT + i % extensions), "to": f"8999{i:07d}"}
            t0 = time.perf_counter()
            try:
                async with s.post(f"{base}/click-to-call", data=fields,
                                  headers={"x-pbx-authentication": TOKEN}) as r:
                    body = await r.json(content_type=None)
                    results.append((time.perf_counter() - t0, r.status, body))
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                results.append((time.perf_counter() - t0, 0, {"error": repr(exc)}))

        start = time.perf_counter()
        tasks = []
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    return results


def read_cdrs(db: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(db) as c:
        c.row_factory = sqlite3.Row
        return [dict(r) for r in c.execute("SELECT * FROM cdr WHERE pbx_call_id LIKE 'out_%'")]


async def run(a: argparse.Namespace, out: Path) -> int:
    sip_port, http_port = free_port(), free_port(socket.SOCK_STREAM)
    emp_port, carrier_port = free_port(), free_port()
    prof = write_profiles(out, extensions=a.extensions, carrier_port=carrier_port)
    db = out / "softpbx.db"
    sets = {
        "internal.sip_port": sip_port, "external.sip_port": sip_port,
        "internal.transports": '["udp"]', "external.transports": '["udp"]',
        "http.http_port": http_port, "global.data_dir": out, "global.db_path": db,
        "global.log_level": "warning", "auth.max_failures": 1_000_000_000,
        "registrar.max_expires": 86400, "recording.enabled": "false",
        "media.rtp_timeout": 0, "crm.events": "[]",
        "crm.click_to_call_token": TOKEN, "crm.click_to_call_min_interval_s": 0,
        "media.rtp_start_port": 30000, "media.rtp_end_port": 39999,
    }
    cmd = [sys.executable, "-m", "softpbx", "run", "--profiles", str(prof)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    total = int(a.rate * a.seconds)
    pbx = Proc("softpbx", cmd, out, cwd=ROOT)
    procs = [pbx]
    try:
        base = f"http://{HOST}:{http_port}"
        await wait_http(f"{base}/api/status", 20)
        users = out / "users.csv"
        users.write_text("SEQUENTIAL\n" + "".join(
            f"{FIRST_EXT + i};{HOST};[authentication username={FIRST_EXT + i} "
            f"password=pw-{FIRST_EXT + i}]\n" for i in range(a.extensions)))
        reg = sipp("register", out, sip_port, SIPP_TESTS / "reg_auth.xml", emp_port,
                   "-inf", str(users), "-m", str(a.extensions), "-r", "200", "-l", "100",
                   "-timeout", "30s", "-timeout_error")
        if reg.wait(40) != 0:
            print(f"registration failed:\n{reg.tail()}")
            reg.stop()
            return 1
        reg.stop()
        got = await wait_registrations(base, a.extensions, 10)
        print(f"# {got} extensions registered from SIPp on {HOST}:{emp_port}")
        phones = sipp("phones", out, sip_port, SIPP_TESTS / "call_answer.xml", emp_port,
                      "-s", "phone", "-m", str(total), "-timeout", f"{a.max_s}s")
        carrier = sipp("carrier", out, sip_port, Path(__file__).parent / "sipp" /
                       "uas_answer_bye.xml", carrier_port, "-s", "carrier", "-m", str(total),
                       "-d", str(a.talk_ms), "-timeout", f"{a.max_s}s")
        procs += [phones, carrier]
        await asyncio.sleep(0.5)  # both UAS bound (SIPp gives no readiness signal)
        print(f"# {total} clicks at {a.rate:g}/s for {a.seconds:g} s, talk {a.talk_ms} ms")
        results = await load(base, rate=a.rate, seconds=a.seconds, extensions=a.extensions)
        # Bounded wait for the last calls to end (talk time plus a margin).
        deadline = time.monotonic() + a.talk_ms / 1000 + 15
        while time.monotonic() < deadline:
            st = await wait_http(f"{base}/api/status", 5)
            if st["calls"] == 0:
                break
            await asyncio.sleep(0.2)
        pbx.stop()  # SIGTERM: the store is flushed
        cdrs = read_cdrs(db)
    finally:
        for p in reversed(procs):
            p.stop()

    ok = [t for t, status, body in results if status == 200 and body.get("status") == "1"]
    other: dict[str, int] = {}
    for _, status, body in results:
        if not (status == 200 and body.get("status") == "1"):
            key = f"{status} {body.get('error', '')[:60]}"
            other[key] = other.get(key, 0) + 1
    answered = [c for c in cdrs if c["disposition"] == "answered"]
    setup = [c["answered_at"] - c["started_at"] for c in answered
             if c["answered_at"] is not None and c["started_at"] is not None]
    print(f"requests: {len(results)}, answered {{\"status\":\"1\"}}: {len(ok)}")
    for key, n in sorted(other.items()):
        print(f"  refused {n}: {key}")
    print(f"HTTP answer time: p50 {percentile(ok, 50) * 1000:.1f} ms, "
          f"p99 {percentile(ok, 99) * 1000:.1f} ms, max {max(ok, default=0) * 1000:.1f} ms")
    dispositions: dict[str, int] = {}
    for c in cdrs:
        dispositions[c["disposition"]] = dispositions.get(c["disposition"], 0) + 1
    print(f"calls: {len(cdrs)} CDRs, bridged (answered): {len(answered)}, by disposition "
          f"{json.dumps(dispositions, sort_keys=True)}")
    if setup:
        print(f"setup time (CDR answered_at - started_at): p50 {percentile(setup, 50) * 1000:.1f}"
              f" ms, p99 {percentile(setup, 99) * 1000:.1f} ms, "
              f"mean {statistics.fmean(setup) * 1000:.1f} ms")
    print(f"# logs in {out}")
    return 0 if len(ok) == total and len(answered) == total else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=50.0, help="clicks per second (default 50)")
    ap.add_argument("--seconds", type=float, default=20.0, help="load duration (default 20)")
    ap.add_argument("--extensions", type=int, default=200, help="employee extensions")
    ap.add_argument("--talk-ms", type=int, default=1000, help="carrier's talk time per call")
    ap.add_argument("--max-s", type=int, default=240, help="whole-run bound in seconds")
    ap.add_argument("--out", help="work directory (default: a new temp dir)")
    a = ap.parse_args()
    if not 0 < a.rate <= 500 or not 0 < a.seconds <= 300 or not 1 <= a.extensions <= 5000:
        ap.error("rate in (0, 500], seconds in (0, 300], extensions in 1..5000")
    if a.extensions / a.rate * 1000 <= a.talk_ms + 500:
        ap.error("extensions / rate must leave each extension idle before its next click "
                 "(raise --extensions or lower --talk-ms)")
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="softpbx-c2c-bench-"))
    out.mkdir(parents=True, exist_ok=True)

    async def bounded() -> int:
        return await asyncio.wait_for(run(a, out), timeout=a.max_s)

    return asyncio.run(bounded())


if __name__ == "__main__":
    sys.exit(main())
