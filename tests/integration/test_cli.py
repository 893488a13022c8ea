"""The command line as an operator meets it: ``softpbx check`` on good and broken profiles, and
``softpbx run`` stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.server import SHIPPED_PROFILES, PbxProcess

pytestmark = pytest.mark.integration


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "softpbx", "check", *args], capture_output=True,
                          text=True, timeout=60)


def test_check_prints_what_the_shipped_profiles_define() -> None:
    r = check("--profiles", str(SHIPPED_PROFILES))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for needle in ("101", "102", "103", "carrier", "127.0.0.1:5070", "74950000000",
                   "configuration OK"):
        assert needle in out, f"{needle!r} missing from:\n{out}"
    assert "secret101" not in out  # passwords are not printed


def test_check_names_file_key_and_problem(tmp_path: Path) -> None:
    profiles = tmp_path / "p"
    shutil.copytree(SHIPPED_PROFILES, profiles)
    ext = profiles / "directory" / "102.toml"
    ext.write_text(ext.read_text().replace('password = "secret102"', 'password = ""'))
    r = check("--profiles", str(profiles))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == ("softpbx: configuration error: directory/102.toml: "
                                "user.password: must not be empty")
    r = check("--profiles", str(SHIPPED_PROFILES), "--set", "sip.t1_ms=soon")
    assert r.returncode == 2 and "--set: sip.t1_ms:" in r.stderr and "integer" in r.stderr
    r = check("--profiles", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_run_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    pbx = PbxProcess.create(tmp_path / "pbx")
    pbx.start()
    log = pbx.log_text()
    assert f"SIP listening on udp 127.0.0.1:{pbx.sip_port}" in log
    assert f"SIP listening on tcp 127.0.0.1:{pbx.sip_port}" in log
    proc = pbx.proc
    assert proc is not None
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 0
    pbx.proc = None
    log = pbx.log_text()
    assert "INFO softpbx: stopped" in log and "Traceback" not in log
