"""What a configuration reload changes (``SIGHUP``, ``softpbx reload``): pure comparisons of two
validated :class:`~softpbx.config.schema.Config` objects, used by :meth:`Switch.reload`.

A reload applies the parts of the configuration a running switch can swap between two calls:
the directory (extensions), the gateways and the dial plan, as FreeSWITCH's ``reloadxml`` and
Asterisk's ``dialplan reload``/``pjsip reload`` do. Everything else (listeners, media ports,
the database, HTTP, CRM settings ...) is bound to sockets, files or threads opened at start-up:
those sections are reported as "needs a restart" and keep their running values, so the switch
never runs on a half-applied configuration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config.schema import Config
from .routing import GatewayTarget

if TYPE_CHECKING:
    from .call import Call

APPLIED = ("extensions", "gateways", "dialplan")
"""Config fields a reload swaps in."""
RESTART_SECTIONS = {
    "global_": "global", "sip": "sip", "auth": "auth", "registrar": "registrar",
    "media": "media", "recording": "recording", "calls": "calls", "http": "http", "crm": "crm",
    "internal": "internal.toml", "external": "external.toml",
}
"""Config field -> the name an operator knows it by, for the sections a reload keeps."""


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What :meth:`Switch.reload` did, for the log line and ``softpbx reload``."""

    extensions_added: tuple[str, ...] = ()
    extensions_removed: tuple[str, ...] = ()
    extensions_changed: tuple[str, ...] = ()
    gateways_added: tuple[str, ...] = ()
    gateways_removed: tuple[str, ...] = ()
    gateways_changed: tuple[str, ...] = ()
    dialplan_changed: bool = False
    bindings_dropped: int = 0
    """Registrations of removed (or disabled) extensions that were dropped."""
    needs_restart: tuple[str, ...] = ()
    """Sections that differ from the running ones and were not applied."""

    def summary(self) -> str:
        """One line: what changed (or "no change") and what waits for a restart."""
        parts = []
        for what, items in (("extensions added", self.extensions_added),
                            ("extensions removed", self.extensions_removed),
                            ("extensions changed", self.extensions_changed),
                            ("gateways added", self.gateways_added),
                            ("gateways removed", self.gateways_removed),
                            ("gateways changed", self.gateways_changed)):
            if items:
                parts.append(f"{what}: {', '.join(items)}")
        if self.dialplan_changed:
            parts.append("dial plan changed")
        if self.bindings_dropped:
            parts.append(f"{self.bindings_dropped} registrations of removed extensions dropped")
        text = "; ".join(parts) or "no change to extensions, gateways or dial plan"
        if self.needs_restart:
            text += (f"; changed but NOT applied until a restart: "
                     f"{', '.join(self.needs_restart)}")
        return text


def merged(running: Config, new: Config) -> Config:
    """``running`` with the reloadable parts of ``new``."""
    return dataclasses.replace(running, **{f: getattr(new, f) for f in APPLIED})


def needs_restart(running: Config, new: Config) -> tuple[str, ...]:
    """Sections of ``new`` that differ from ``running`` and a reload does not apply."""
    return tuple(name for attr, name in RESTART_SECTIONS.items()
                 if getattr(running, attr) != getattr(new, attr))


def diff_by_key(old: dict[str, object], new: dict[str, object]
                ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(added, removed, changed) keys between two name -> settings tables."""
    added = tuple(k for k in new if k not in old)
    removed = tuple(k for k in old if k not in new)
    changed = tuple(k for k in new if k in old and old[k] != new[k])
    return added, removed, changed


def gateways_in_use(calls: Iterable[Call]) -> set[str]:
    """Gateways the routes of live ``calls`` name (a later stage may still try them) or
    that the calls came from."""
    calls = list(calls)
    names = {c.from_gateway for c in calls if c.from_gateway}
    for call in calls:
        names.update(t.gateway for s in call.route.stages for t in s.targets
                     if isinstance(t, GatewayTarget))
    return names
