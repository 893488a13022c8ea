"""A real baresip phone (Debian ``baresip-core``, libre's SIP stack) driven over ``ctrl_tcp``.

::

    phone = BaresipPhone.create(tmp_path / "101", name="101", tone_hz=440)
    phone.start()
    phone.register("101", "secret101", pbx.sip_port, transport="udp")   # REGISTER_OK or fail
    phone.dial("sip:102@127.0.0.1:PORT")
    callee.wait_event("CALL_INCOMING"); callee.accept()
    ...; phone.hangup(); phone.wait_event("CALL_CLOSED")
    heard = phone.recording("dec")   # the WAV of what the phone heard during its last call
    phone.stop()

The phone needs no sound card: ``aufile`` plays a generated tone WAV as the microphone
(:func:`tests.support.tones.make_tone_wav`), the speaker is an ``aubridge`` device nobody
reads, and the ``sndfile`` audio filter dumps what the phone sends (``enc``) and hears
(``dec``) to WAV files, which the tests analyse with :mod:`tests.support.tones`.

``ctrl_tcp`` speaks netstrings (``<len>:<json>,``): commands are
``{"command": "dial", "params": "...", "token": "..."}``, answered by
``{"response": true, "ok": ..., "data": ..., "token": ...}``; events arrive unasked as
``{"event": true, "class": "call", "type": "CALL_INCOMING", "param": ..., ...}``. Commands
are the ``menu`` module's (``/help`` lists them: ``uanew``, ``dial``, ``accept``, ``hangup``;
in a call also ``hold``, ``resume`` and ``sndcode`` for RFC 4733 DTMF).

Everything is bounded: the socket is read with timeouts, every wait has a deadline, the
process is stopped by its PID (``quit``, then SIGTERM, then SIGKILL) and its log and the
control traffic are kept in the phone's directory for the failure report.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.server import HOST, free_port
from tests.support.tones import make_tone_wav

MODULE_PATH = "/usr/lib/baresip/modules"
"""Where Debian's baresip-core installs its modules."""
START_TIMEOUT = 10.0
COMMAND_TIMEOUT = 5.0
TONE_SECONDS = 60.0
"""Length of the microphone WAV: longer than any call of the tests (aufile stops at its end)."""

Event = dict[str, Any]


def baresip_binary() -> str | None:
    """Path of ``baresip``, or ``None`` when it is not installed."""
    return shutil.which("baresip")


def require_baresip() -> None:
    """FAIL (never skip) the test when baresip is missing, saying how to install it."""
    if baresip_binary() is None:
        pytest.fail("baresip not found on PATH: install it (Debian/Ubuntu: apt-get install "
                    "baresip-core); the real-phone tests need it and are not skipped",
                    pytrace=False)


def _free_sip_port() -> int:
    """A port free for UDP and TCP whose next port is free for TCP too: baresip opens a TLS
    listener on ``sip_listen`` + 1 and fails to start when that one is taken."""
    for _ in range(50):
        port = free_port()
        if port < 65535 and _tcp_free(port + 1):
            return port
    raise RuntimeError("no free SIP port pair for baresip in 50 tries")


def _tcp_free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


class BaresipError(AssertionError):
    """The phone did not do what a test asked within the time allowed (the message says what
    it did instead); an AssertionError, so that it reads as a test failure."""


class BaresipPhone:
    """One ``baresip -f <dir>`` process with its own config, tone and recordings."""

    def __init__(self, *, workdir: Path, name: str, tone_hz: float, binary: str = "baresip",
                 rtp_ports: tuple[int, int] | None = None) -> None:
        self.workdir = workdir
        self.name = name
        self.tone_hz = tone_hz
        self.binary = binary
        self.sip_port = _free_sip_port()
        self.ctrl_port = free_port(udp=False)
        self.rtp_ports = rtp_ports
        self.player = f"aubridge,play{name}"
        """``audio_player``: an aubridge device nobody reads (``alsa,null`` works too)."""
        self.tone_path = workdir / "tone.wav"
        self.dump_dir = workdir / "dumps"
        """Where ``sndfile`` writes ``dump-<time>-enc.wav`` / ``-dec.wav`` for the live call."""
        self.calls_dir = workdir / "calls"
        """Finished calls' dumps, moved to ``calls/<n>/`` by :meth:`collect_recordings`."""
        self.log_path = workdir / "baresip.log"
        self.ctrl_log = workdir / "ctrl.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.events: list[Event] = []
        """Every event received so far, oldest first."""
        self._sock: socket.socket | None = None
        self._buf = b""
        self._responses: dict[str, Event] = {}
        self._token = 0
        self._calls_collected = 0

    @classmethod
    def create(cls, workdir: Path, **kwargs: Any) -> BaresipPhone:
        """A phone with its own directory under ``workdir`` (not started yet)."""
        workdir.mkdir(parents=True, exist_ok=True)
        return cls(workdir=workdir, **kwargs)

    # -- lifecycle ----------------------------------------------------------------------------
    def config_text(self) -> str:
        """The ``config`` file: no sound card, G.711 only, the control socket, the dumps."""
        lines = [
            "poll_method epoll",
            f"sip_listen {HOST}:{self.sip_port}",
            # SDP c= and RTP on the loopback too (otherwise the first interface's address).
            "net_interface 127.0.0.1",
            f"audio_source aufile,{self.tone_path}",
            # The speaker and the ring tone go to aubridge devices no source reads: the
            # decoding chain (and the sndfile dump of it) runs without a sound card.
            f"audio_player {self.player}",
            f"audio_alert aubridge,alert{self.name}",
            "ausrc_srate 8000",
            "auplay_srate 8000",
            "ausrc_channels 1",
            "auplay_channels 1",
            "audio_buffer 20-160",
            f"module_path {MODULE_PATH}",
            "module g711.so",
            "module aufile.so",
            "module aubridge.so",
            "module sndfile.so",
            "module_app menu.so",
            "module_app ctrl_tcp.so",
            f"ctrl_tcp_listen {HOST}:{self.ctrl_port}",
            f"snd_path {self.dump_dir}",
            # Answer nothing by itself, and no redial: the tests decide.
            "redial_attempts 0",
        ]
        if self.rtp_ports:
            lines.append(f"rtp_ports {self.rtp_ports[0]}-{self.rtp_ports[1]}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Write the config and the tone, start baresip, connect to its control socket."""
        assert self.proc is None, "already running"
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        self.calls_dir.mkdir(parents=True, exist_ok=True)
        make_tone_wav(self.tone_path, self.tone_hz, TONE_SECONDS)
        (self.workdir / "config").write_text(self.config_text())
        (self.workdir / "accounts").write_text("")  # accounts come from uanew
        (self.workdir / "contacts").write_text("")
        with open(self.log_path, "ab") as log:
            # -s: the SIP trace goes to the log, which a failing test shows.
            self.proc = subprocess.Popen([self.binary, "-s", "-f", str(self.workdir)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                rc, self.proc = self.proc.returncode, None
                raise BaresipError(f"baresip {self.name} exited with {rc} at start-up:\n"
                                   f"{self.log_text()}")
            try:
                self._sock = socket.create_connection((HOST, self.ctrl_port), timeout=1.0)
                self._sock.setblocking(False)
                return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise BaresipError(f"baresip {self.name}: no ctrl_tcp on {self.ctrl_port} within "
                           f"{timeout}s:\n{self.log_text()}")

    def stop(self, timeout: float = 3.0) -> None:
        """``quit``, then SIGTERM, then SIGKILL, each bounded; by PID only."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None and self._sock is not None:
            with contextlib.suppress(OSError):
                self._send({"command": "quit", "params": "", "token": "quit"})
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None
        self._close()

    def kill(self) -> None:
        """SIGKILL by PID, no questions asked (clean-up after a failure)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._close()

    def _close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def __enter__(self) -> BaresipPhone:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the control socket -------------------------------------------------------------------
    def _send(self, obj: dict[str, Any]) -> None:
        assert self._sock is not None, "not started"
        data = json.dumps(obj).encode()
        with open(self.ctrl_log, "ab") as log:
            log.write(b">> " + data + b"\n")
        self._sock.setblocking(True)
        try:
            self._sock.settimeout(COMMAND_TIMEOUT)
            self._sock.sendall(str(len(data)).encode() + b":" + data + b",")
        finally:
            self._sock.setblocking(False)

    def _pump(self, timeout: float) -> None:
        """Read what the socket has within ``timeout`` s and file the messages."""
        if self._sock is None:
            return
        ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout))
        if not ready:
            return
        try:
            chunk = self._sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # baresip closed the socket (it quit or died)
            self._close()
            return
        self._buf += chunk
        with open(self.ctrl_log, "ab") as log:
            while True:
                head, colon, rest = self._buf.partition(b":")
                if not colon or not head.isdigit():
                    break
                size = int(head)
                if len(rest) < size + 1:
                    break
                payload, self._buf = rest[:size], rest[size + 1:]  # drop the trailing ","
                log.write(b"<< " + payload + b"\n")
                try:
                    msg = json.loads(payload)
                except ValueError:
                    continue
                if msg.get("event"):
                    self.events.append(msg)
                elif msg.get("response"):
                    self._responses[str(msg.get("token", ""))] = msg

    def command(self, command: str, params: str = "", timeout: float = COMMAND_TIMEOUT) -> Event:
        """Run one menu command; return its response (``ok``, ``data``)."""
        self._token += 1
        token = f"{self.name}-{self._token}"
        self._send({"command": command, "params": params, "token": token})
        deadline = time.monotonic() + timeout
        while token not in self._responses:
            left = deadline - time.monotonic()
            if left <= 0 or self._sock is None:
                raise BaresipError(f"baresip {self.name}: no answer to {command} {params!r} "
                                   f"within {timeout}s\n{self.log_text()[-2000:]}")
            self._pump(left)
        return self._responses.pop(token)

    def wait_event(self, kind: str | Callable[[Event], bool], timeout: float = 5.0, *,
                   since: int = 0) -> Event:
        """The first event from index ``since`` on of type ``kind`` (or matching it, a
        predicate), waiting up to ``timeout`` s for it."""
        match = kind if callable(kind) else (lambda e: e.get("type") == kind)
        deadline = time.monotonic() + timeout
        seen = since
        while True:
            for event in self.events[seen:]:
                if match(event):
                    return event
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0 or (self._sock is None and self.proc is None):
                types = [e.get("type") for e in self.events[since:]]
                raise BaresipError(f"baresip {self.name}: no {kind} event within {timeout}s; "
                                   f"events: {types}")
            self._pump(min(left, 0.2))

    def mark(self) -> int:
        """An index for ``wait_event(since=...)``: events from now on."""
        self._pump(0.0)
        return len(self.events)

    def drain(self, seconds: float) -> None:
        """Keep reading events for ``seconds`` (while media flows, say)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._pump(min(left, 0.2))

    # -- phone actions ------------------------------------------------------------------------
    def register(self, user: str, password: str, pbx_port: int, *, transport: str = "udp",
                 timeout: float = 5.0, regint: int = 600) -> Event:
        """Create the user agent (``uanew``) and wait for REGISTER_OK or REGISTER_FAIL;
        returns that event (``param`` holds the final status line)."""
        since = self.mark()
        aor = f"<sip:{user}@{HOST}:{pbx_port};transport={transport}>"
        resp = self.command("uanew", f"{aor};auth_pass={password};regint={regint}")
        if not resp.get("ok"):
            raise BaresipError(f"uanew refused: {resp}")
        return self.wait_event(lambda e: e.get("type") in ("REGISTER_OK", "REGISTER_FAIL"),
                               timeout, since=since)

    def dial(self, uri: str) -> None:
        """Place a call to ``uri`` (a full SIP URI: the phone uses it as Request-URI)."""
        resp = self.command("dial", uri)
        if not resp.get("ok"):
            raise BaresipError(f"dial refused: {resp}")

    def accept(self) -> None:
        """Answer the ringing call."""
        self.command("accept")

    def hangup(self) -> None:
        """Hang up the current call (BYE, or CANCEL while it rings)."""
        self.command("hangup")

    def hold(self) -> None:
        """Put the call on hold (re-INVITE with ``a=sendonly``)."""
        self.command("hold")

    def resume(self) -> None:
        """Take the call off hold (re-INVITE with ``a=sendrecv``)."""
        self.command("resume")

    def send_dtmf(self, digit: str) -> None:
        """Send one DTMF digit (RFC 4733 telephone-event packets)."""
        self.command("sndcode", digit)

    # -- recordings and logs ------------------------------------------------------------------
    def collect_recordings(self) -> Path:
        """Move the dumps of the call that just ended into ``calls/<n>/`` and return that
        directory (the next call's dumps cannot overwrite them; sndfile names files by the
        second)."""
        self._calls_collected += 1
        dest = self.calls_dir / str(self._calls_collected)
        dest.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.dump_dir.glob("*.wav")):
            path.rename(dest / path.name)
        return dest

    def recording(self, kind: str, call_dir: Path) -> Path:
        """The ``dec`` (heard) or ``enc`` (sent) WAV of one collected call."""
        found = sorted(call_dir.glob(f"*-{kind}.wav"))
        if not found:
            raise BaresipError(f"baresip {self.name}: no {kind} dump in {call_dir}: "
                               f"{sorted(p.name for p in call_dir.iterdir())}")
        return found[-1]

    def log_text(self) -> str:
        """The process output so far."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text("utf-8", "replace")

    def report(self, lines: int = 60) -> str:
        """The tails of the process log and of the control traffic, for a failure report."""
        ctrl = self.ctrl_log.read_text("utf-8", "replace") if self.ctrl_log.exists() else ""
        # The call status line ("[0:00:02] audio=...") is redrawn with \r several times a
        # second: dropped, it would push the SIP trace out of the tail.
        text = re.sub(r"\[\d+:\d\d:\d\d\] audio=[^\r\n]*\r?", "", self.log_text())
        log_tail = "\n".join(line for line in text.splitlines() if line.strip())
        log_tail = "\n".join(log_tail.splitlines()[-lines:])
        ctrl_tail = "\n".join(ctrl.splitlines()[-lines:])
        return (f"--- baresip {self.name} log ({self.workdir}) ---\n{log_tail}\n"
                f"--- baresip {self.name} ctrl_tcp ---\n{ctrl_tail}")
