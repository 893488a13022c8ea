#!/usr/bin/env python3
"""Write a ``sip_profiles/`` copy for the registration benchmark (bench/reg_bench.sh).

The copy keeps everything of the source profiles except:

* ``directory/``: N users ``u100000``, ``u100001``, ... with password ``pw-<user>``, the rule
  of ``../shared/bench/sip/make_users.py`` (and of the Kamailio anchor's config); the sample
  extensions 101..103 stay, because the shipped dial plan routes to them;
* ``softpbx.toml``: domain (= digest realm) ``127.0.0.1``; the database in ``--data-dir`` (a
  scratch directory, never the checkout); log level ``warning`` so that logging does not
  dominate the measured CPU; ``auth.max_failures`` so high that the load is never banned;
  ``registrar.max_expires`` above the 3600 s SIPp asks for; HTTP off (``http_port = 0``);
* ``internal.toml``/``external.toml``: UDP only, on ``--port`` (both profiles share it).

Usage: bench/make_bench_profiles.py OUT_DIR [--users 10000] [--port 5260]
           [--data-dir DIR] [--source sip_profiles]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRST_USER = 100000
PASSWORD_PREFIX = "pw-"  # make_users.py's default prefix

# (section, key) -> TOML literal written into softpbx.toml.
MAIN_SETTINGS = {
    ("global", "domain"): '"127.0.0.1"',
    ("global", "log_level"): '"warning"',
    ("auth", "max_failures"): "1000000000",
    ("auth", "failure_window"): "1",
    ("registrar", "max_expires"): "86400",
    ("http", "http_port"): "0",
    ("recording", "enabled"): "false",
}


def toml_str(s: str) -> str:
    """A TOML basic string (paths may hold backslashes or quotes)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def set_keys(text: str, settings: dict[tuple[str, str], str]) -> str:
    """Set ``key = value`` in ``[section]`` of a TOML text, replacing an uncommented line.

    Keeps the file's comments; a section that does not exist is appended.
    """
    lines = text.splitlines()
    by_section: dict[str, dict[str, str]] = {}
    for (section, key), value in settings.items():
        by_section.setdefault(section, {})[key] = value
    out: list[str] = []
    current: str | None = None
    header = re.compile(r"^\s*\[([A-Za-z0-9_.-]+)\]\s*(#.*)?$")
    assign = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")
    for line in lines:
        m = header.match(line)
        if m:
            current = m.group(1)
            out.append(line)
            for key, value in by_section.get(current, {}).items():
                out.append(f"{key} = {value}  # set by bench/make_bench_profiles.py")
            continue
        a = assign.match(line)
        if current in by_section and a and a.group(1) in by_section[current]:
            continue  # replaced above
        out.append(line)
    present = {m.group(1) for line in lines if (m := header.match(line))}
    for section, keys in by_section.items():
        if section not in present:
            out.append("")
            out.append(f"[{section}]")
            out.extend(f"{k} = {v}" for k, v in keys.items())
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", help="profiles directory to (re)create")
    ap.add_argument("--users", type=int, default=10000, help="users u100000.. (default 10000)")
    ap.add_argument("--port", type=int, default=5260, help="UDP port of both profiles")
    ap.add_argument("--ip", default="127.0.0.1", help="listen address (loopback only)")
    ap.add_argument("--data-dir", help="where the database goes (default: a new temp dir)")
    ap.add_argument("--source", default=str(ROOT / "sip_profiles"), help="profiles to copy")
    a = ap.parse_args()
    if not a.ip.startswith("127."):
        ap.error("the benchmark stays on 127.0.0.0/8")
    if not 1 <= a.users <= 200_000:
        ap.error("--users must be in 1..200000")

    src = Path(a.source)
    out = Path(a.out)
    if out.exists():
        if not (out / "softpbx.toml").is_file():
            ap.error(f"{out} exists and is not a profiles directory; refusing to replace it")
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("directory", "*.db", "*.db-*"))
    data_dir = Path(a.data_dir) if a.data_dir else Path(tempfile.mkdtemp(prefix="softpbx-bench-"))
    data_dir.mkdir(parents=True, exist_ok=True)

    settings = dict(MAIN_SETTINGS)
    settings[("global", "data_dir")] = toml_str(str(data_dir.resolve()))
    settings[("global", "db_path")] = '"softpbx-bench.db"'
    main_toml = out / "softpbx.toml"
    main_toml.write_text(set_keys(main_toml.read_text(), settings))
    for name in ("internal", "external"):
        p = out / f"{name}.toml"
        p.write_text(
            set_keys(
                p.read_text(),
                {
                    ("profile", "sip_ip"): toml_str(a.ip),
                    ("profile", "sip_port"): str(a.port),
                    ("profile", "transports"): '["udp"]',
                },
            )
        )

    directory = out / "directory"
    directory.mkdir()
    for sample in sorted((src / "directory").glob("*.toml")):
        shutil.copy(sample, directory / sample.name)  # the dial plan routes to these
    for i in range(a.users):
        user = f"u{FIRST_USER + i}"
        (directory / f"{user}.toml").write_text(
            f'[user]\npassword = "{PASSWORD_PREFIX}{user}"\nrecord = false\n'
        )
    print(
        f"{out}: {a.users} users u{FIRST_USER}..u{FIRST_USER + a.users - 1}, "
        f"sip udp {a.ip}:{a.port}, data_dir {data_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
