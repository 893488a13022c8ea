"""The dial plan as decisions: who may call what, and which targets ring in which order.

Pure functions over the config; nothing here knows SIP. A route is a list of *stages*: each
stage rings its targets together for a while; the next stage starts when the previous one
found nobody (sequential ring groups, the no-answer fallback).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from ..config.schema import Config, Extension, Gateway, OutboundRoute

DIGITS_RE = re.compile(r"\+?[0-9*#]+\Z")


class Direction(StrEnum):
    """Which way a call goes, as CDRs and the CRM see it."""

    INTERNAL = "internal"
    INBOUND = "inbound"
    OUTBOUND = "outbound"


@dataclass(frozen=True, slots=True)
class ExtensionTarget:
    """Ring every registered phone of an extension."""

    extension: str


@dataclass(frozen=True, slots=True)
class GatewayTarget:
    """Send the call out of a gateway to ``number``."""

    gateway: str
    number: str
    caller_id_number: str = ""
    """Caller ID to present on the trunk ("" = none configured)."""
    caller_id_name: str = ""


Target = ExtensionTarget | GatewayTarget


@dataclass(frozen=True, slots=True)
class Stage:
    """Targets rung together; ``timeout`` seconds before the next stage (0 = the call's)."""

    targets: tuple[Target, ...]
    timeout: float = 0.0


@dataclass(frozen=True, slots=True)
class Route:
    """What routing decided for one call."""

    direction: Direction
    stages: tuple[Stage, ...]
    dialled: str
    """The number as dialled (the DID for inbound calls)."""
    record: bool = True
    """Whether what routing already knows asks for recording: the calling extension, the
    trunk, the dial rule or inbound route (any of them); :meth:`Router.records` adds the
    parties known at the answer."""
    rule: str = ""
    """Dial rule or inbound route that matched (for CDRs and logs)."""


@dataclass(frozen=True, slots=True)
class NoRoute:
    """Nothing matched: answer with ``status``."""

    status: int
    reason: str


class Router:
    """Decides routes from the config (indexes built once)."""

    def __init__(self, *, config: Config) -> None:
        self.config = config
        self.extensions: dict[str, Extension] = {e.id: e for e in config.extensions if e.enabled}
        self.gateways: dict[str, Gateway] = {g.name: g for g in config.gateways}
        self.groups = {g.name: g for g in config.dialplan.ring_groups}
        self.inbound = {r.did: r for r in config.dialplan.inbound}
        self.outbound = [(re.compile(r.pattern), r) for r in config.dialplan.outbound]

    def from_extension(self, ext_id: str, dialled: str) -> Route | NoRoute:
        """An authenticated extension dialled ``dialled``."""
        ext = self.extensions.get(ext_id)
        if ext is None:
            return NoRoute(403, "Forbidden")
        if dialled in self.extensions:
            return Route(Direction.INTERNAL, (Stage((ExtensionTarget(dialled),)),), dialled,
                         record=ext.record)
        if dialled.startswith("group:") or dialled in self.groups:
            name = dialled.removeprefix("group:")
            if name in self.groups:
                # A member calling its own group rings the others, not its own phone.
                stages = self._group_stages(name, 0, exclude=ext_id)
                if not stages:
                    return NoRoute(480, "Temporarily Unavailable")  # nobody else in it
                return Route(Direction.INTERNAL, stages, dialled, record=ext.record)
        for pattern, rule in self.outbound:
            if pattern.fullmatch(dialled):
                return self._outbound(ext, rule, dialled)
        return NoRoute(404, "Not Found")

    def _outbound(self, ext: Extension, rule: OutboundRoute, dialled: str) -> Route:
        number = dialled
        for rw in rule.rewrites:
            m = re.fullmatch(rw.match, number)
            if m is not None:
                number = m.expand(rw.replace)
        cid = rule.caller_id_number or ext.outbound_caller_id_number
        name = rule.caller_id_name or ext.outbound_caller_id_name
        gw = self.gateways[rule.gateway]
        return Route(Direction.OUTBOUND,
                     (Stage((GatewayTarget(gw.name, number, cid, name),)),), dialled,
                     record=ext.record or rule.record or gw.record, rule=rule.name)

    def from_gateway(self, gateway: Gateway, did: str) -> Route | NoRoute:
        """A call from trunk ``gateway`` to ``did``."""
        route = self.inbound.get(did) or self.inbound.get("*")
        if route is None:
            return NoRoute(404, "Not Found")
        first = self._destination(route.destination, did, route.no_answer_timeout)
        stages = list(first)
        if route.fallback:
            stages += self._destination(route.fallback, did, 0)
        return Route(Direction.INBOUND, tuple(stages), did,
                     record=route.record or gateway.record, rule=route.did)

    def _destination(self, dest: str, did: str, timeout: float) -> tuple[Stage, ...]:
        if dest.startswith("group:"):
            return self._group_stages(dest.removeprefix("group:"), timeout)
        if dest.startswith("gateway:"):
            # No caller ID of its own: the forwarded call shows the original caller's number.
            gw, _, number = dest.removeprefix("gateway:").partition("/")
            return (Stage((GatewayTarget(gw, number or did),), timeout),)
        return (Stage((ExtensionTarget(dest),), timeout),)

    def redirect_stages(self, dest: str, return_timeout: float = 0.0) -> tuple[Stage, ...] | None:
        """The stages of a CRM ``redirect`` to ``dest`` (an extension, ``group:<name>`` or a
        bare group name), ringing for ``return_timeout`` seconds (0: the call's no-answer
        timeout); ``None`` when ``dest`` names nothing."""
        name = dest.removeprefix("group:")
        if dest in self.extensions:
            return (Stage((ExtensionTarget(dest),), return_timeout),)
        if name in self.groups:
            return self._group_stages(name, return_timeout)
        return None

    def unrouted(self, direction: Direction, dialled: str) -> Route:
        """A route with nothing to ring (an unknown DID): the CRM may still redirect it,
        else it fails with 404."""
        return Route(direction, (), dialled, record=False)

    def records(self, route: Route, *, extensions: tuple[str, ...] = (),
                gateways: tuple[str, ...] = ()) -> bool:
        """Whether a call on ``route`` is recorded, decided when it is answered: with
        ``[recording] enabled`` (the master switch), when any party involved has
        ``record = true`` -- the route itself (calling extension, trunk, dial rule or
        inbound route), or one of ``extensions`` (the caller's, the one that answered) and
        ``gateways`` (the trunk it came from or went out through); "" entries are skipped."""
        if not self.config.recording.enabled:
            return False
        if route.record:
            return True
        if any(e in self.extensions and self.extensions[e].record for e in extensions if e):
            return True
        return any(g in self.gateways and self.gateways[g].record for g in gateways if g)

    def _group_stages(self, name: str, timeout: float, exclude: str = "") -> tuple[Stage, ...]:
        """The stages of ring group ``name``, without member ``exclude`` (the caller)."""
        group = self.groups[name]
        members = tuple(ExtensionTarget(m) for m in group.members if m != exclude)
        if not members:
            return ()
        if group.strategy == "sequential":
            return tuple(Stage((m,), group.member_timeout) for m in members)
        return (Stage(members, timeout),)
