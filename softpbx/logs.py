"""Logging set-up for ``softpbx run``: text for people, one JSON object per line for shippers.

Every call log line names the call (``call <id> ...``); the JSON format lifts that id into a
``call_id`` field (a record's own ``call_id`` attribute, given with ``extra=``, wins), so a
log shipper (Loki, Elasticsearch, journald's JSON) can select one call's story without
parsing the message.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CALL_ID_RE = re.compile(r"\b(?:in|out|int)_[0-9a-f]{40}\b")
"""A call's permanent id (``Call.id``/``pbx_call_id``: a prefix and 20 random bytes in hex)."""


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"[, "call_id"][, "exception"]}`` per record."""

    def format(self, record: logging.LogRecord) -> str:
        """One line of JSON (newlines inside the message are escaped by the encoder)."""
        message = record.getMessage()
        t = record.created
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))
        obj: dict[str, object] = {
            "time": f"{stamp}.{int((t % 1) * 1000):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        call_id = getattr(record, "call_id", None)
        if not call_id:
            m = CALL_ID_RE.search(message)
            call_id = m.group(0) if m else None
        if call_id:
            obj["call_id"] = call_id
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """``-v`` and ``--log-format`` of ``softpbx run``."""
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log every SIP message sent and received (as [sip] trace = true)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text (default) or json: one JSON object per line with time, "
                             "level, logger, message and call_id, for log shippers")


def setup_logging(level_name: str, log_format: str = "text") -> None:
    """Log to stderr at ``level_name`` (``[global] log_level``) in ``log_format``."""
    level = getattr(logging, level_name.upper(), logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    trace = logging.getLogger("softpbx.sip.trace")
    if trace.getEffectiveLevel() > logging.INFO:
        # -v asks for the SIP trace even with log_level = "warning": it is what was asked.
        trace.setLevel(logging.INFO)
