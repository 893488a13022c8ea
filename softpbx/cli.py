"""``softpbx run``, ``softpbx check`` and ``softpbx reload``."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import sys
import time
from collections.abc import Callable

from .config.checks import config_warnings
from .config.loader import data_dir, describe, load_config
from .config.schema import Config, ConfigError
from .logs import add_log_options, setup_logging

DEFAULT_PROFILES = "sip_profiles"
PID_FILE = "softpbx.pid"
RELOAD_STATUS_FILE = "softpbx.reload"
"""The running switch's files in the data directory (see :mod:`softpbx.aio.app`)."""
RELOAD_WAIT = 10.0
"""Seconds ``softpbx reload`` waits for the running switch to say how the reload went."""

WHERE = """\
where things are:
  configuration  --profiles DIR (default ./sip_profiles, or $SOFTPBX_PROFILES)
  data           --data-dir DIR (default: [global] data_dir, else the current directory,
                 or $SOFTPBX_DATA_DIR): the database (softpbx.db), recordings/, and
                 softpbx.pid while it runs
"""

EXAMPLES = {
    "run": """\
examples:
  softpbx run
  softpbx run --profiles /etc/softpbx --data-dir /var/lib/softpbx
  softpbx run --set http.http_port=9080 --set crm.webhook_url=http://127.0.0.1:8099/hook

SIGHUP (or `softpbx reload`) re-reads the profiles: extensions, gateways and the dial plan
change at once for new calls, live calls and registrations stay. SIGINT/SIGTERM stop it
(live calls are hung up, each with its CDR).
""",
    "check": """\
examples:
  softpbx check
  softpbx check --profiles /etc/softpbx --data-dir /var/lib/softpbx

Prints what the configuration defines and warns about risky settings (an open console,
did = "*" to a gateway, a data or recording folder this user cannot write). Exit status:
0 valid, 2 configuration error.
""",
    "reload": """\
examples:
  softpbx reload
  softpbx reload --profiles /etc/softpbx --data-dir /var/lib/softpbx
  kill -HUP "$(cat /var/lib/softpbx/softpbx.pid)"      # the same, by hand

Validates the profiles first (a configuration with an error is refused whole and the
running one stays), then signals the softpbx whose pid file is in the data directory and
prints what it applied. Listener, media, HTTP and other settings that need a restart are
named as such. Give the same --profiles, --data-dir and --set as the running switch.
Exit status: 0 applied, 1 not running or refused, 2 configuration error.
""",
}


def version() -> str:
    """The installed package's version."""
    try:
        return importlib.metadata.version("softpbx")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a tree
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="softpbx", description="A SIP softswitch for CRM telephony.",
        epilog=WHERE + "\nsee `softpbx <command> --help` for each command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"softpbx {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="<command>")
    for name, text in (("run", "start the switch in the foreground"),
                       ("check", "validate the configuration and print what it defines"),
                       ("reload", "make the running switch re-read its configuration")):
        s = sub.add_parser(name, help=text, description=text, epilog=EXAMPLES[name] + "\n" + WHERE,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_options(s)
        if name == "run":
            add_log_options(s)  # -v, --log-format
    from .demo import add_demo_parser  # argparse only at import: --help stays fast

    add_demo_parser(sub)
    return p


def add_config_options(s: argparse.ArgumentParser) -> None:
    """``--profiles``, ``--data-dir`` and ``--set``: where the configuration and data are."""
    s.add_argument("--profiles", default=os.environ.get("SOFTPBX_PROFILES", DEFAULT_PROFILES),
                   metavar="DIR", help="configuration directory (default: ./sip_profiles)")
    s.add_argument("--data-dir", default=os.environ.get("SOFTPBX_DATA_DIR") or None,
                   metavar="DIR",
                   help="data directory: database, recordings, pid file (default: "
                        "[global] data_dir, else the current directory)")
    s.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="override a config key for this run (repeatable), "
                        "e.g. --set crm.webhook_url=http://127.0.0.1:8099/hook")


def config_loader(args: argparse.Namespace) -> Callable[[], Config]:
    """A function (re-)reading the configuration exactly as the command line says."""
    overrides = list(args.overrides)
    if args.data_dir:
        # Absolute now: a reload later reads the same place whatever the cwd is then.
        overrides.insert(0, f"global.data_dir={json.dumps(os.path.abspath(args.data_dir))}")
    profiles = args.profiles
    return lambda: load_config(profiles, overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``softpbx`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "demo":  # loads its own copy of the profiles
        from .demo import main as demo_main

        return demo_main(args)
    if getattr(args, "verbose", False):
        args.overrides.append("sip.trace=true")
    load = config_loader(args)
    try:
        config = load()
    except ConfigError as exc:
        print(f"softpbx: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(describe(config))
        warnings = config_warnings(config)
        for w in warnings:
            print(f"warning: {w}")
        n = len(warnings)
        print("configuration OK" + (f" ({n} warning{'s' if n > 1 else ''})" if n else ""))
        return 0
    if args.command == "reload":
        return reload_running(config)
    setup_logging(config.global_.log_level, args.log_format)
    from .aio.app import run

    try:
        run(config, load)
    except OSError as exc:
        print(f"softpbx: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def reload_running(config: Config, wait: float = RELOAD_WAIT) -> int:
    """Send SIGHUP to the softpbx whose pid file is in ``config``'s data directory and print
    the outcome it writes to ``softpbx.reload`` (bounded wait)."""
    where = data_dir(config)
    pid_path = os.path.join(where, PID_FILE)
    try:
        with open(pid_path, encoding="ascii") as fh:
            pid = int(fh.read().strip())
    except (OSError, ValueError) as exc:
        print(f"softpbx: no running softpbx for data directory {where} ({pid_path}: "
              f"{getattr(exc, 'strerror', None) or exc}); give the --data-dir it runs with",
              file=sys.stderr)
        return 1
    if not _is_softpbx(pid):
        print(f"softpbx: {pid_path} names pid {pid}, which is not a running softpbx "
              "(a stale pid file?)", file=sys.stderr)
        return 1
    status_path = os.path.join(where, RELOAD_STATUS_FILE)
    before = _read_status(status_path)
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        print(f"softpbx: pid {pid} belongs to another user: run as that user (or root)",
              file=sys.stderr)
        return 1
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        status = _read_status(status_path)
        if status is not None and status.get("pid") == pid and status != before:
            ok = bool(status.get("ok"))
            print(f"softpbx (pid {pid}): {'reloaded' if ok else 'reload refused'}: "
                  f"{status.get('message', '')}", file=sys.stdout if ok else sys.stderr)
            return 0 if ok else 1
        time.sleep(0.05)
    print(f"softpbx: sent SIGHUP to pid {pid}, but it did not report within {wait:g} s; "
          "see its log", file=sys.stderr)
    return 1


def _read_status(path: str) -> dict[str, object] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_softpbx(pid: int) -> bool:
    """Whether ``pid`` is alive and (where /proc tells) a softpbx: a stale pid file must not
    make us signal whatever process got its number since."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's: the kill below says so
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"softpbx" in fh.read()
    except OSError:
        return True  # no /proc: trust the pid file


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
