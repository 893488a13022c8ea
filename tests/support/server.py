"""softpbx as a real subprocess on free 127.0.0.1 ports, for integration tests.

::

    with PbxProcess.create(tmp_path, overrides={"registrar.min_expires": "1"}) as pbx:
        ...  # pbx.sip_port, pbx.http_port, pbx.registrations(), pbx.log_text()
        pbx.restart()  # same ports, same database

Stopping sends SIGTERM and asserts a clean exit within a few seconds (the process is killed
otherwise, and the test fails).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""The checkout (``tests/support/server.py`` -> two levels up)."""
SHIPPED_PROFILES = PROJECT_ROOT / "sip_profiles"
RUNNING_MARK = "softpbx running (pid"
"""The log line that says every listener is open."""
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0

TEST_DEFAULTS = {
    # Many tests fail authentication on purpose from 127.0.0.1: only the rate-limit test
    # wants the ban, and it sets its own limit.
    "auth.max_failures": "100000",
}


def _bind_ok(kind: int, port: int) -> bool:
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_port(*, udp: bool = True, tcp: bool = True) -> int:
    """A port free on 127.0.0.1 for every transport asked (the same number for UDP and TCP).

    The kernel picks a TCP port, then the UDP side is checked; a few tries at most.
    """
    for _ in range(50):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
        try:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        finally:
            s.close()
        if (not udp or _bind_ok(socket.SOCK_DGRAM, port)) and (not tcp or _bind_ok(socket.SOCK_STREAM, port)):
            return port
    raise RuntimeError("no free port found on 127.0.0.1 in 50 tries")


class PbxProcess:
    """One softpbx process (``python -m softpbx run``) and the state that outlives restarts."""

    def __init__(self, *, workdir: Path, profiles: Path = SHIPPED_PROFILES,
                 overrides: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.profiles = profiles
        self.sip_port = free_port()
        self.http_port = free_port(udp=False)
        self.db_path = workdir / "softpbx.db"
        self.overrides = {**TEST_DEFAULTS, **(overrides or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self._log_path: Path | None = None

    @classmethod
    def create(cls, workdir: Path, **kwargs: Any) -> PbxProcess:
        """A process object with its own directory under ``workdir`` (not started yet)."""
        workdir.mkdir(parents=True, exist_ok=True)
        return cls(workdir=workdir, **kwargs)

    # -- lifecycle ----------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The command line of one run."""
        sets = {
            "internal.sip_port": str(self.sip_port),
            "external.sip_port": str(self.sip_port),
            "http.http_port": str(self.http_port),
            "global.data_dir": str(self.workdir),
            "global.db_path": str(self.db_path),
            **self.overrides,
        }
        cmd = [sys.executable, "-m", "softpbx", "run", "--profiles", str(self.profiles)]
        for key, value in sets.items():
            cmd += ["--set", f"{key}={value}"]
        return cmd

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the process and wait (bounded) until its log says it is running."""
        assert self.proc is None, "already running"
        self.runs += 1
        self._log_path = self.workdir / f"softpbx-run{self.runs}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("SOFTPBX_PROFILES", None)
        with open(self._log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if RUNNING_MARK in self.log_text():
                return
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.proc = None
                raise AssertionError(f"softpbx exited with {rc} during start-up:\n{self.log_text()}")
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"softpbx did not log {RUNNING_MARK!r} within {timeout}s:\n"
                             f"{self.log_text()}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM; assert the process exits with status 0 within ``timeout`` seconds."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is not None:
            raise AssertionError(f"softpbx died on its own (status {proc.returncode}):\n"
                                 f"{self.log_text()}")
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            raise AssertionError(f"softpbx ignored SIGTERM for {timeout}s (killed):\n"
                                 f"{self.log_text()}") from None
        assert rc == 0, f"softpbx exited with status {rc} after SIGTERM:\n{self.log_text()}"
        log = self.log_text()
        # The shell logs any exception out of the core with its traceback and carries on:
        # nothing a peer sends may cause one, so any traceback is a bug.
        assert "Traceback" not in log, f"softpbx logged an internal error:\n{log}"
        assert "INFO softpbx: stopped" in log, f"no clean 'stopped' line:\n{log}"

    def kill(self) -> None:
        """SIGKILL without any assertion (clean-up after a failure)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def restart(self) -> None:
        """Stop cleanly and start again: same ports, same database."""
        self.stop()
        self.start()

    def __enter__(self) -> PbxProcess:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.stop()
        else:
            self.kill()

    # -- observation --------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        """The running process id."""
        assert self.proc is not None, "not running"
        return self.proc.pid

    @property
    def sip_addr(self) -> tuple[str, int]:
        """Where SIP goes (UDP and TCP)."""
        return (HOST, self.sip_port)

    def log_text(self) -> str:
        """Everything the current (or last) run logged so far."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text("utf-8", "replace")

    def all_logs(self) -> str:
        """The logs of every run, oldest first."""
        return "".join((self.workdir / f"softpbx-run{i}.log").read_text("utf-8", "replace")
                       for i in range(1, self.runs + 1)
                       if (self.workdir / f"softpbx-run{i}.log").exists())

    def wait_for_log(self, text: str, timeout: float = 3.0) -> str:
        """Wait (bounded) until ``text`` appears in this run's log; return the log."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log_text()
            if text in log:
                return log
            if time.monotonic() >= deadline:
                raise AssertionError(f"{text!r} not logged within {timeout}s:\n{log}")
            time.sleep(0.05)

    def http_json(self, path: str, timeout: float = 5.0) -> Any:
        """GET ``path`` from the HTTP API and decode the JSON body."""
        url = f"http://{HOST}:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - 127.0.0.1 only
            return json.loads(resp.read())

    def wait_cdr(self, match: Callable[[dict[str, Any]], bool], what: str = "a matching call",
                 timeout: float = 5.0) -> dict[str, Any]:
        """The one CDR row matching ``match`` (the store writes CDRs off the loop: polled,
        bounded); two matching rows are an error."""
        deadline = time.monotonic() + timeout
        while True:
            rows = [r for r in self.http_json("/api/cdr?limit=100")["cdr"] if match(r)]
            if rows:
                assert len(rows) == 1, rows
                return rows[0]
            if time.monotonic() >= deadline:
                raise AssertionError(f"no CDR for {what} within {timeout}s\n"
                                     f"{self.log_text()[-3000:]}")
            time.sleep(0.1)

    def registrations(self, extension: str | None = None) -> list[dict[str, Any]]:
        """``/api/registrations`` rows, optionally those of one extension."""
        rows = self.http_json("/api/registrations")["registrations"]
        return [r for r in rows if extension is None or r["extension"] == extension]

    def wait_registrations(self, extension: str, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Poll (bounded) until ``extension`` has exactly ``count`` bindings; return them."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.registrations(extension)
            if len(rows) == count:
                return rows
            if time.monotonic() >= deadline:
                raise AssertionError(f"extension {extension}: wanted {count} bindings within "
                                     f"{timeout}s, have {rows}")
            time.sleep(0.1)
