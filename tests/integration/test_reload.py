"""Changing the configuration of a running softpbx process (``SIGHUP``, ``softpbx reload``)
and the command line's rough edges: ``--version``, ``--help``, ``--data-dir``, start-up
errors naming the address, a malformed HTTP request logged in one line."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.phone import Phone, make_sdp
from tests.support.rtp import RtpEndpoint
from tests.support.server import SHIPPED_PROFILES, PbxProcess, free_port
from tests.support.sip_client import SipClient

pytestmark = pytest.mark.integration


def softpbx(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTPBX_")}
    return subprocess.run([sys.executable, "-m", "softpbx", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=env)


def registered(pbx: PbxProcess, user: str, password: str) -> int:
    """REGISTER ``user`` over UDP; the final status."""
    with SipClient("udp", pbx.sip_addr) as c:
        _, final = c.register(user, password)
        return final.status


def test_sighup_and_softpbx_reload_apply_refuse_and_keep(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    shutil.copytree(SHIPPED_PROFILES, profiles)
    with PbxProcess.create(tmp_path / "pbx", profiles=profiles) as pbx:
        assert (pbx.workdir / "softpbx.pid").read_text().strip() == str(pbx.pid)
        assert registered(pbx, "101", "secret101") == 200
        assert registered(pbx, "104", "secret104") == 403  # no such extension yet
        # SIGHUP: a new extension registers at once, 101 keeps its registration
        (profiles / "directory" / "104.toml").write_text('[user]\npassword = "secret104"\n')
        os.kill(pbx.pid, signal.SIGHUP)
        pbx.wait_for_log("configuration reloaded: extensions added: 104")
        assert registered(pbx, "104", "secret104") == 200
        assert len(pbx.registrations("101")) == 1
        # a broken file: `softpbx reload` refuses it before signalling anything ...
        dp = profiles / "dialplan.toml"
        good = dp.read_text()
        dp.write_text(good.replace('fallback = "102"', 'fallback = "109"'))
        r = softpbx("reload", "--profiles", str(profiles), "--data-dir", str(pbx.workdir))
        assert r.returncode == 2, r
        assert r.stderr.strip() == ("softpbx: configuration error: dialplan.toml: "
                                    "inbound[0].fallback: unknown extension '109' "
                                    "(no directory/109.toml)")
        # ... and a SIGHUP sent by hand is refused whole by the process: 104 stays
        os.kill(pbx.pid, signal.SIGHUP)
        log = pbx.wait_for_log("reload refused: configuration error: dialplan.toml: "
                               "inbound[0].fallback: unknown extension '109'")
        assert "the running configuration stays" in log
        assert registered(pbx, "104", "secret104") == 200
        # fixed, 104 removed, a listener changed: `softpbx reload` says what it did
        dp.write_text(good)
        (profiles / "directory" / "104.toml").unlink()
        internal = profiles / "internal.toml"
        internal.write_text(internal.read_text() + "\n")  # same content: no restart needed
        r = softpbx("reload", "--profiles", str(profiles), "--data-dir", str(pbx.workdir))
        assert r.returncode == 0, r
        assert r.stdout.startswith(f"softpbx (pid {pbx.pid}): reloaded: extensions removed: "
                                   "104; 2 registrations of removed extensions dropped")  # two REGISTERs, two ports
        assert pbx.registrations("104") == [] and len(pbx.registrations("101")) == 1
        assert registered(pbx, "104", "secret104") == 403
        # a section that needs a restart is named, and not applied
        main = profiles / "softpbx.toml"
        main.write_text(main.read_text().replace("# rtp_start_port = 16384",
                                                 "rtp_start_port = 30000"))
        r = softpbx("reload", "--profiles", str(profiles), "--data-dir", str(pbx.workdir))
        assert r.returncode == 0 and "NOT applied until a restart: media" in r.stdout, r
    assert not (pbx.workdir / "softpbx.pid").exists()  # removed at a clean stop
    r = softpbx("reload", "--profiles", str(profiles), "--data-dir", str(pbx.workdir))
    assert r.returncode == 1 and "no running softpbx for data directory" in r.stderr


def test_answered_call_survives_a_reload_that_removes_its_caller(tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    shutil.copytree(SHIPPED_PROFILES, profiles)
    dp = profiles / "dialplan.toml"
    dp.write_text(dp.read_text().replace('["101", "102"]', '["101", "103"]')
                  .replace('fallback = "102"', 'fallback = "103"'))
    with PbxProcess.create(tmp_path / "pbx", profiles=profiles,
                           overrides={"recording.enabled": "false"}) as pbx, \
            Phone(user="101", pbx=pbx.sip_addr, password="secret101") as alice, \
            Phone(user="102", pbx=pbx.sip_addr, password="secret102") as bob, \
            RtpEndpoint() as rtp:
        alice.register()
        call = bob.call("101", sdp=make_sdp(rtp.port))
        inc = alice.wait_invite()
        inc.answer(make_sdp(rtp.port))
        assert call.wait_final().status == 200
        (profiles / "directory" / "102.toml").unlink()
        r = softpbx("reload", "--profiles", str(profiles), "--data-dir", str(pbx.workdir))
        assert r.returncode == 0 and "extensions removed: 102" in r.stdout, r
        assert len(pbx.http_json("/api/calls")["calls"]) == 1  # still up
        assert call.bye().status == 200
        inc.wait_bye()
        deadline = time.monotonic() + 5
        while not pbx.http_json("/api/cdr?limit=5")["cdr"] and time.monotonic() < deadline:
            time.sleep(0.05)
        (cdr,) = pbx.http_json("/api/cdr?limit=5")["cdr"]
        assert (cdr["disposition"], cdr["caller"], cdr["extension"]) == ("answered", "102", "101")
        assert cdr["started_at_local"].endswith("+03:00")  # Europe/Moscow, the sample's zone
        assert bob.call("101", sdp=make_sdp(rtp.port)).wait_final().status == 403


def test_version_and_help_for_every_command() -> None:
    r = softpbx("--version")
    assert r.returncode == 0 and r.stdout.strip().startswith("softpbx 0.")
    r = softpbx("--help")
    assert r.returncode == 0
    for command in ("run", "check", "reload"):
        assert command in r.stdout
        h = softpbx(command, "--help")
        assert h.returncode == 0 and "examples:" in h.stdout and "--data-dir" in h.stdout, h


def test_data_dir_is_not_next_to_the_profiles(tmp_path: Path) -> None:
    etc = tmp_path / "etc" / "softpbx"
    shutil.copytree(SHIPPED_PROFILES, etc)
    work = tmp_path / "work"
    work.mkdir()
    r = softpbx("check", "--profiles", str(etc), cwd=work)
    assert r.returncode == 0, r.stderr
    assert f"database {work.resolve()}/softpbx.db" in r.stdout
    assert "etc/softpbx.db" not in r.stdout and "etc/recordings" not in r.stdout
    r = softpbx("check", "--profiles", str(etc), "--data-dir", "../var", cwd=work)
    assert f"database {tmp_path.resolve()}/var/softpbx.db" in r.stdout
    assert f"into {tmp_path.resolve()}/var/recordings" in r.stdout


def test_cannot_start_names_the_address(tmp_path: Path) -> None:
    pbx = PbxProcess.create(tmp_path / "pbx", overrides={
        "internal.sip_ip": "192.0.2.1", "external.sip_ip": "192.0.2.1"})
    r = subprocess.run(pbx.command(), capture_output=True, text=True, timeout=30,
                       cwd=pbx.workdir)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last == (f"softpbx: cannot start: [Errno 99] SIP profile internal (internal.toml) "
                    f"cannot listen on 192.0.2.1:{pbx.sip_port}: Cannot assign requested "
                    "address"), r.stderr
    assert "Traceback" not in r.stderr
    port = free_port(udp=False)
    busy = socket.socket()
    busy.bind(("127.0.0.1", port))
    busy.listen()
    try:
        pbx = PbxProcess.create(tmp_path / "pbx2")
        pbx.http_port = port
        r = subprocess.run(pbx.command(), capture_output=True, text=True, timeout=30,
                           cwd=pbx.workdir)
    finally:
        busy.close()
    assert r.returncode == 1
    assert (f"cannot start: [Errno 98] HTTP ([http] in softpbx.toml) cannot listen on "
            f"127.0.0.1:{port}: Address already in use") in r.stderr, r.stderr


def test_malformed_http_request_is_one_log_line(tmp_path: Path) -> None:
    with PbxProcess.create(tmp_path / "pbx") as pbx:
        for junk in (b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", pbx.http_port), timeout=5) as s:
                s.sendall(junk)
                status_line = s.recv(200).split(b"\r\n", 1)[0]
                assert status_line.startswith(b"HTTP/1.") and b" 400 " in status_line
        deadline = time.monotonic() + 3
        while "Invalid char in url path" not in pbx.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = [ln for ln in pbx.log_text().splitlines() if "Error handling request" in ln]
        assert len(lines) == 1, pbx.log_text()  # the second (TLS) one aiohttp logs at debug
        assert ": 400 Invalid char in url path" in lines[0] and "Traceback" not in pbx.log_text()
