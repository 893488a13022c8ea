"""Linphone's console phone (``linphonec``, Debian ``linphone-cli``) as a real SIP peer.

A second SIP stack independent of softpbx's and baresip's (belle-sip, mediastreamer2), run
headless: its "sound card" is files (``soundcard use files``): it plays a WAV as its
microphone and records what it hears into another WAV, so a test checks audio by tone
detection (tests/support/tones.py) on what the phone heard.

::

    with Linphone(tmp_path / "101", user="101", password="secret101",
                  pbx=pbx.sip_addr, play=tone_440_wav) as alice:
        alice.register()
        alice.call("102")
        alice.wait_output("connected")

linphonec reads commands through readline, so it runs on a pseudo-terminal; a thread reads
its output into a buffer that ``wait_output`` polls (bounded). Every instance has its own
HOME (liblinphone keeps a sqlite database under ``~/.local/share/linphone`` and does not
start when it cannot create it), free SIP and RTP ports, and a ``-d 6`` log that the test
keeps: ``describe()`` shows the console output and the SIP messages of the log.

Why linphonec and not ``linphone-daemon``: the daemon has no "files as sound card" switch
(``linphone_core_set_use_files``), only ``incall-player-start`` for the microphone side and no
recorder of what the far end sends; linphonec has both (``play``/``record`` in file mode).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .server import HOST, free_port

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
PROMPT = "linphonec> "
SIP_LOG = re.compile(
    r"(?m)^\S+ \S+ belle-sip-message-channel \[[^]]+\]: "
    r"(?:(?P<sent>message sent to)|received \[\d+\] new bytes from) \[[^]]+\].*\n"
    r"(?P<msg>(?:(?!\d{4}-\d\d-\d\d \d\d:\d\d:\d\d:\d{3} ).*\n)*)")
"""One SIP message in the ``-d 6`` log: belle-sip's "message sent to [..]" or "received [n]
new bytes from [..]" line, then the message up to the next time-stamped line."""
PASSWORD_PROMPT = re.compile(r"Password for \S+ on \S+: $")
"""linphonec asks on the console when the registrar refused the credentials (403): the
next input line would be taken as the password, so ``stop`` does not type ``quit`` then."""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
"""readline's bracketed-paste switches (``ESC[?2004h``) and the like, removed from output."""


def free_rtp_port() -> int:
    """A free even UDP port whose odd neighbour (RTCP) is free too."""
    for _ in range(50):
        port = free_port(tcp=False)
        if port % 2 == 0 and port + 1 < 65535 and _udp_free(port + 1):
            return port
    raise RuntimeError("no free RTP port pair on 127.0.0.1")


def _udp_free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


class Linphone:
    """One ``linphonec`` process: config, start/stop by PID, commands, bounded waits."""

    def __init__(self, workdir: Path, *, user: str, password: str, pbx: tuple[str, int],
                 transport: str = "udp", play: Path | None = None,
                 record: Path | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.user = user
        self.password = password
        self.pbx = pbx
        self.transport = transport
        self.play = play
        self.record = record or workdir / "heard.wav"
        self.sip_port = free_port()
        self.rtp_port = free_rtp_port()
        self.rc_path = workdir / "linphonerc"
        self.log_path = workdir / "linphone.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._master: int | None = None
        self._reader: threading.Thread | None = None
        self._out: list[str] = []
        self._lock = threading.Lock()
        self._mark = 0
        """Offset in the output from which ``wait_output`` searches (see ``mark``)."""

    # -- configuration --------------------------------------------------------------------
    def write_rc(self) -> None:
        """The linphonerc: one UDP and one TCP port, RFC 4733 DTMF, no video (codecs: see
        ``only_g711``)."""
        lines = [
            "[sip]",
            f"sip_port={self.sip_port}",
            f"sip_tcp_port={self.sip_port}",
            "sip_tls_port=0",  # 0: no TLS listener (-1 would be a random port)
            # RFC 4733 telephone-events, not SIP INFO.
            "use_rfc2833=1",
            "use_info=0",
            "ping_with_options=0",
            "[rtp]",
            f"audio_rtp_port={self.rtp_port}",
            "audio_adaptive_jitt_comp_enabled=1",
            "[sound]",
            "echocancellation=0",
            "[video]",
            "capture=0",
            "display=0",
            "automatically_initiate=0",
            "automatically_accept=0",
            "[net]",
            "firewall_policy=0",
            "[misc]",
            "history_max_size=0",
        ]
        self.rc_path.write_text("\n".join(lines) + "\n")

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start linphonec on a pty; wait (bounded) for its first prompt; switch to files."""
        assert self.proc is None, "already running"
        self.write_rc()
        home = self.workdir / "home"
        # liblinphone does not start its core when it cannot open this database.
        (home / ".local" / "share" / "linphone").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HOME": str(home), "TERM": "dumb", "LANG": "C.UTF-8"}
        master, slave = pty.openpty()
        # A wide terminal: readline would otherwise wrap long command lines in its echo.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 1000, 0, 0))
        try:
            self.proc = subprocess.Popen(
                ["linphonec", "-c", str(self.rc_path), "-d", "6", "-l", str(self.log_path)],
                stdin=slave, stdout=slave, stderr=slave, cwd=self.workdir, env=env,
                close_fds=True, start_new_session=True)
        finally:
            os.close(slave)
        self._master = master
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"linphonec-{self.user}")
        self._reader.start()
        self.wait_output(PROMPT, timeout=timeout)
        self.only_g711()
        self.command("soundcard use files")
        if self.play is not None:
            self.command(f"play {self.play}")
        self.command(f"record {self.record}")

    def only_g711(self) -> None:
        """Disable every audio codec but PCMU and PCMA (``codec list`` / ``codec disable``).

        The ``[audio_codec_N]`` sections of the rc file are not enough: liblinphone 5.1 puts
        its own list (opus, speex first) back at start-up. G.711 only, so that the relay, the
        recordings and a SIPp carrier all see a codec they know.
        """
        listing = self.command("codec list")
        rows = re.findall(r"(?m)^\s*(\d+): (\S+) \((\d+)\) (enabled|disabled)", listing)
        assert rows, f"no codec list from linphonec:\n{listing}"
        for index, mime, _rate, state in rows:
            if state == "enabled" and mime not in ("PCMU", "PCMA"):
                self.command(f"codec disable {index}")

    def _read(self) -> None:
        """Collect the pty's output until linphonec closes it (runs on its own thread)."""
        assert self._master is not None
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self._out.append(ANSI.sub("", data.decode("utf-8", "replace")))

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """``quit`` (which unregisters); SIGTERM then SIGKILL by PID if it does not exit."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            asking = PASSWORD_PROMPT.search(self.output()) is not None
            with contextlib.suppress(OSError):
                if asking:
                    self._signal(proc, signal.SIGTERM)
                else:
                    self._write("quit")
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    self._signal(proc, signal.SIGKILL)
                    proc.wait(timeout=5)
        if self._master is not None:
            with contextlib.suppress(OSError):
                os.close(self._master)
            self._master = None
        if self._reader is not None:
            self._reader.join(timeout=2)

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        # The process leads its own session (start_new_session): only its group is signalled.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def __enter__(self) -> Linphone:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- commands and output --------------------------------------------------------------
    def _write(self, line: str) -> None:
        assert self._master is not None, "not running"
        os.write(self._master, line.encode() + b"\n")

    def output(self) -> str:
        """Everything linphonec printed so far."""
        with self._lock:
            return "".join(self._out)

    def mark(self) -> None:
        """Make later ``wait_output`` calls look only at what is printed from now on."""
        self._mark = len(self.output())

    def command(self, line: str, timeout: float = 5.0) -> str:
        """Send one command line; wait (bounded) for the next prompt; return what it printed."""
        start = len(self.output())
        self._write(line)
        # The echo of the line comes first, then the command's output, then a new prompt.
        text = self._wait(lambda out: PROMPT in out[start + len(line):], timeout,
                          f"prompt after {line!r}")
        return text[start:]

    def wait_output(self, pattern: str, timeout: float = 5.0) -> re.Match[str]:
        """Wait (bounded) until ``pattern`` (a regex) appears after the last ``mark``."""
        rx = re.compile(pattern)
        since = self._mark
        text = self._wait(lambda out: rx.search(out, since) is not None, timeout, repr(pattern))
        match = rx.search(text, since)
        assert match is not None
        self._mark = match.end()
        return match

    def _wait(self, done: Callable[[str], bool], timeout: float, what: str) -> str:
        """Poll the output (bounded) until ``done`` holds; fail if linphonec exits first."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.output()
            if done(out):
                return out
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(f"linphonec {self.user} exited waiting for {what}:\n"
                                     f"{self.describe()}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"linphonec {self.user}: no {what} within {timeout}s:\n"
                                     f"{self.describe()}")
            time.sleep(0.02)

    # -- phone actions --------------------------------------------------------------------
    def register(self, *, password: str | None = None) -> None:
        """Register (``register`` command) to softpbx over this phone's transport."""
        host, port = self.pbx
        proxy = f"sip:{host}:{port};transport={self.transport}"
        self.command(f"register sip:{self.user}@{host} {proxy} {password or self.password}")

    def call(self, number: str) -> None:
        """Call ``number`` at softpbx."""
        host, port = self.pbx
        self.command(f"call sip:{number}@{host}:{port};transport={self.transport}")

    def sip_messages(self, *, sent: bool) -> list[str]:
        """The SIP messages this phone sent (or received), oldest first, from its log.

        liblinphone buffers its log file: the list is complete only once the phone stopped.
        """
        text = self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""
        return [m.group("msg").replace("\r", "") for m in SIP_LOG.finditer(text)
                if (m.group("sent") is not None) == sent]

    def requests(self, method: str, *, sent: bool) -> list[str]:
        """The ``method`` requests among ``sip_messages``."""
        return [m for m in self.sip_messages(sent=sent) if m.startswith(f"{method} sip:")]

    def responses(self, *, sent: bool) -> list[str]:
        """The status lines of the responses among ``sip_messages`` (``SIP/2.0 403 ...``)."""
        return [m.split("\n", 1)[0] for m in self.sip_messages(sent=sent)
                if m.startswith("SIP/2.0 ")]

    def describe(self) -> str:
        """Console output and the tail of the liblinphone log, for failure messages."""
        log = ""
        if self.log_path.exists():
            log = self.log_path.read_text("utf-8", "replace")[-8000:]
        return (f"--- linphonec {self.user} console ---\n{self.output()[-4000:]}\n"
                f"--- {self.log_path} (tail) ---\n{log}")
