"""contrib/softpbx.service: its own user, restart on failure, reload by SIGHUP, and command
lines the CLI accepts (a typo there would only show on a server)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from softpbx.cli import _parser

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "softpbx.service"


def directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_unit_runs_as_its_own_user_restarts_and_reloads_by_hup() -> None:
    d = directives()
    assert d["User"] == ["softpbx"] and d["Group"] == ["softpbx"]
    assert d["Restart"] == ["on-failure"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["StateDirectory"] == ["softpbx"] and d["WorkingDirectory"] == ["/var/lib/softpbx"]
    for key in ("ExecStart", "ExecStartPre"):
        (cmd,) = d[key]
        argv = shlex.split(cmd)
        assert argv[0].endswith("/softpbx")
        args = _parser().parse_args(argv[1:])
        assert (args.profiles, args.data_dir) == ("/etc/softpbx", "/var/lib/softpbx")
    text = UNIT.read_text()
    assert "/var/lib/softpbx   the data: softpbx.db" in text  # where data lives, documented


def test_unit_passes_systemd_analyze_but_for_the_missing_binary(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:  # not a failure of the unit: the parse test above still ran
        return
    r = subprocess.run([tool, "verify", str(UNIT)], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                if ln.strip() and "is not executable" not in ln]
    assert problems == [], problems
