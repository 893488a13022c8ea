"""Running SIPp scenarios from ``tests/data/sipp/`` against a softpbx under test."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .server import HOST, PROJECT_ROOT, free_port

SCENARIOS = PROJECT_ROOT / "tests" / "data" / "sipp"
SIPP_TIMEOUT_S = 10
"""SIPp's own global timeout (``-timeout``, an error when reached)."""


@dataclass
class SippRun:
    """What one SIPp run did."""

    returncode: int
    output: str
    local_port: int
    workdir: Path

    def traces(self) -> str:
        """SIPp's message and error traces (``-trace_msg``/``-trace_err``), for failure messages."""
        parts = []
        for f in sorted(self.workdir.glob("*.log")):
            parts.append(f"--- {f.name} ---\n{f.read_text('utf-8', 'replace')[-6000:]}")
        return "\n".join(parts)

    def describe(self) -> str:
        """Everything useful to explain a failed run."""
        return f"sipp exit {self.returncode}\n{self.output[-3000:]}\n{self.traces()}"


def run_sipp(sipp_bin: str, scenario: str, *, target: tuple[str, int], workdir: Path,
             users: list[tuple[str, str]], domain: str = HOST, transport: str = "u1",
             calls: int | None = None) -> SippRun:
    """Run ``scenario`` once per ``(user, password)`` row (sequentially) against ``target``.

    The injection csv is ``user;domain;[authentication username=.. password=..]``, as the
    shared benchmark scenario expects. Bounded by SIPp's ``-timeout`` and a subprocess timeout.
    """
    assert target[0] == HOST
    workdir.mkdir(parents=True, exist_ok=True)
    csv = workdir / "users.csv"
    rows = ["SEQUENTIAL"] + [f"{u};{domain};[authentication username={u} password={p}]"
                             for u, p in users]
    csv.write_text("\n".join(rows) + "\n")
    local_port = free_port()
    cmd = [sipp_bin, f"{target[0]}:{target[1]}", "-sf", str(SCENARIOS / scenario),
           "-inf", str(csv), "-t", transport, "-i", HOST, "-p", str(local_port),
           "-m", str(calls or len(users)), "-l", "1", "-r", "10",
           "-timeout", f"{SIPP_TIMEOUT_S}s", "-timeout_error", "-nostdin",
           "-trace_err", "-trace_msg"]
    try:
        proc = subprocess.run(cmd, cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=SIPP_TIMEOUT_S + 10)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode("utf-8", "replace")
        raise AssertionError(f"sipp did not finish within {SIPP_TIMEOUT_S + 10}s:\n{out}") from None
    output = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    return SippRun(proc.returncode, output, local_port, workdir)
