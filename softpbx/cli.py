"""``softpbx run`` and ``softpbx check``."""

from __future__ import annotations

import argparse
import os
import sys

from .config.loader import describe, load_config
from .config.schema import ConfigError
from .logs import add_log_options, setup_logging

DEFAULT_PROFILES = "sip_profiles"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softpbx", description="A SIP softswitch for CRM telephony.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("run", "start the switch in the foreground"),
                       ("check", "validate the configuration and print what it defines")):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("--profiles", default=os.environ.get("SOFTPBX_PROFILES", DEFAULT_PROFILES),
                       help="configuration directory (default: ./sip_profiles)")
        s.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE",
                       help="override a config key for this run (repeatable), "
                            "e.g. --set crm.webhook_url=http://127.0.0.1:8099/hook")
        if name == "run":
            add_log_options(s)  # -v, --log-format
    from .demo import add_demo_parser  # argparse only at import: --help stays fast

    add_demo_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``softpbx`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "demo":  # loads its own copy of the profiles
        from .demo import main as demo_main

        return demo_main(args)
    if getattr(args, "verbose", False):
        args.overrides.append("sip.trace=true")
    try:
        config = load_config(args.profiles, args.overrides)
    except ConfigError as exc:
        print(f"softpbx: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(describe(config))
        print("configuration OK")
        return 0
    setup_logging(config.global_.log_level, args.log_format)
    from .aio.app import run

    try:
        run(config)
    except OSError as exc:
        print(f"softpbx: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
