"""The web console (issue 11): static pages from the package and the JSON it reads.

- ``GET /console/``: one page (``console/index.html``) with a tab per view (registrations,
  calls, CDRs, webhooks, CRM inspector, status); its script and style are served from
  ``/static/`` (no secrets in them, so no login needed; no CDN, no build step).
- ``GET /api/events/stream``: Server-Sent Events (WHATWG HTML §9.2). The server looks at its
  own state once a second and sends an event only when something changed (registrations,
  calls, status, a new CDR, the outbox's first page); the browser never polls. Countdowns and
  durations tick in the browser from the values of the last event.
- ``DELETE /api/calls/<id>``: hang up a live call (``Switch.hang_up``, then the driver's kick).
- ``GET /api/cdr``: CDRs with filters (``since``, ``until``, ``extension``, ``number``,
  ``direction``, ``disposition``) and paging (``limit``, ``offset``).

Everything the page shows is written with ``textContent`` (never ``innerHTML`` with data),
so a caller name like ``<script>`` is shown as text; the CSP forbids inline script anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web

from ..core.call import Call
from ..core.negotiation import codec_map
from ..core.switch import Switch
from .access import SECURITY_HEADERS

TICK_S = 1.0
"""How often the stream looks at the state (and the countdowns' resolution)."""
HEARTBEAT_S = 15.0
"""A comment line this often keeps proxies from closing an idle stream."""
MAX_STREAMS = 32
"""Browsers watching at once; more get 503 (each costs a look at the state per second)."""
DIRECTIONS = ("inbound", "outbound", "internal")
DISPOSITIONS = ("answered", "busy", "cancel", "no answer", "failed")
_STATIC = {"console.js": "application/javascript", "console.css": "text/css"}


@dataclass(slots=True)
class ConsoleSources:
    """What the console needs from the shell (``aio/app.py`` builds it)."""

    cdr_search: Callable[..., dict[str, object]]
    """Blocking: ``CdrSearch.search(**filters)``."""
    cdr_mark: Callable[[], object]
    """Blocking: a value that changes when a CDR or a recording is written."""
    recording_path: Callable[[str], tuple[str, str] | None]
    """Blocking: ``(path, status)`` of a call's recording."""
    store_size: Callable[[], int]
    hang_up: Callable[[str], bool]
    """``Switch.hang_up`` at loop time, then the driver's kick."""
    listeners: list[str] = field(default_factory=list)
    version: str = ""
    started_at: float = field(default_factory=time.time)
    webhook_page: Callable[[], list[dict[str, object]]] | None = None
    """Blocking: the outbox's newest rows (``None``: no outbox)."""
    inspector: bool = False
    """Whether the built-in CRM inspector is mounted at ``/crm/``."""


CONSOLE_KEY: web.AppKey[ConsoleSources] = web.AppKey("console", ConsoleSources)


# --------------------------------------------------------------------------- snapshots


def codec_of(call: Call) -> str:
    """The codec in force (the answer's first one that is not DTMF), "" before the answer."""
    neg = call.neg
    if neg is None:
        return ""
    for sdp in (neg.sdp_b, neg.sdp_a):
        for name in codec_map(sdp).values():
            if name.lower() != "telephone-event":
                return name
    return ""


def call_rows(switch: Switch, now: float) -> list[dict[str, Any]]:
    """The live calls as ``GET /api/calls`` and the stream show them."""
    out = []
    for c in switch.calls.values():
        callee = c.answered.extension if c.answered is not None and c.answered.extension \
            else c.route.dialled
        out.append({
            "id": c.id, "pbx_call_id": c.pbx_call_id, "state": c.state.value,
            "direction": c.route.direction.value, "caller": c.caller_number,
            "caller_name": c.caller_name, "dialled": c.route.dialled, "callee": callee,
            "age": round(now - c.created_at, 1),
            "talk": round(now - c.answered_at, 1) if c.answered_at is not None else None,
            "codec": codec_of(c), "recorded": c.recorded, "on_hold": c.on_hold})
    return out


def registration_rows(switch: Switch, now: float) -> list[dict[str, Any]]:
    """Current bindings per extension, as ``GET /api/registrations`` shows them."""
    out = []
    for ext in sorted(switch.extensions):
        for b in switch.registrar.lookup(ext, now):
            out.append({"extension": ext, "contact": b.contact, "expires_in": b.expires_in(now),
                        "transport": b.flow.transport.value, "source": str(b.flow),
                        "user_agent": b.user_agent})
    return out


def status_extra(sources: ConsoleSources) -> dict[str, Any]:
    """Version, uptime, listeners and store size for ``GET /api/status``."""
    return {"version": sources.version, "uptime_s": round(time.time() - sources.started_at),
            "started_at": sources.started_at, "listeners": sources.listeners,
            "store_bytes": sources.store_size(), "crm_inspector": sources.inspector}


# --------------------------------------------------------------------------- handlers


def _page(name: str, content_type: str = "text/html") -> web.Response:
    text = resources.files("softpbx.http").joinpath(f"console/{name}").read_text("utf-8")
    return web.Response(text=text, content_type=content_type, charset="utf-8",
                        headers=SECURITY_HEADERS)


async def index(request: web.Request) -> web.Response:
    """``GET /console/``: the console page."""
    return _page("index.html")


async def static(request: web.Request) -> web.Response:
    """``GET /static/<name>``: the console's script and style (a fixed list of files)."""
    name = request.match_info["name"]
    if name not in _STATIC:
        raise web.HTTPNotFound(reason="no such file")
    return _page(name, _STATIC[name])


async def to_console(request: web.Request) -> web.Response:
    """``GET /`` and ``/console`` -> ``/console/``."""
    raise web.HTTPFound("/console/")


async def hang_up(request: web.Request) -> web.Response:
    """``DELETE /api/calls/<id>``: 200 when the call was live (its BYE/CANCEL is on the way),
    404 otherwise."""
    call_id = request.match_info["id"]
    if not request.app[CONSOLE_KEY].hang_up(call_id):
        raise web.HTTPNotFound(reason="no such call")
    return web.json_response({"hung_up": call_id})


def _day_or_time(key: str, text: str) -> float | None:
    """``since``/``until`` as Unix time: a number, or an ISO date/time (UTC unless it says)."""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{key} must be Unix time or an ISO date") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def cdr_filters(query: Any) -> dict[str, object]:
    """The ``/api/cdr`` query as ``CdrSearch.search`` keywords (400 on a bad value)."""
    try:
        limit = int(query.get("limit", "50"))
        offset = int(query.get("offset", "0"))
    except ValueError:
        raise web.HTTPBadRequest(reason="limit and offset must be integers") from None
    if not 1 <= limit <= 500:
        raise web.HTTPBadRequest(reason="limit must be between 1 and 500")
    if offset < 0:
        raise web.HTTPBadRequest(reason="offset must not be negative")
    direction = query.get("direction", "")
    if direction and direction not in DIRECTIONS:
        raise web.HTTPBadRequest(reason=f"direction must be one of {', '.join(DIRECTIONS)}")
    disposition = query.get("disposition", "")
    if disposition and disposition not in DISPOSITIONS:
        raise web.HTTPBadRequest(reason=f"disposition must be one of {', '.join(DISPOSITIONS)}")
    return {"since": _day_or_time("since", query.get("since", "")),
            "until": _day_or_time("until", query.get("until", "")),
            "extension": query.get("extension", "").strip()[:64],
            "number": query.get("number", "").strip()[:64],
            "direction": direction, "disposition": disposition,
            "limit": limit, "offset": offset}


async def cdrs(request: web.Request) -> web.Response:
    """``GET /api/cdr``: filtered, newest first, ``total`` for the pager; each row with its
    recording's status and ``recording_url`` (the authenticated path by call id)."""
    filters = cdr_filters(request.query)
    sources = request.app[CONSOLE_KEY]
    loop = asyncio.get_running_loop()
    found = await loop.run_in_executor(None, lambda: sources.cdr_search(**filters))
    rows = found["cdr"]
    assert isinstance(rows, list)
    for row in rows:
        ready = row.get("recording_status") == "ready"
        row["recording_url"] = f"/api/recordings/{row['call_id']}.mp3" if ready else None
    return web.json_response({**found, "limit": filters["limit"],
                              "offset": filters["offset"]})


# --------------------------------------------------------------------------- the stream


class EventHub:
    """Looks at the state for the streams: once per tick however many browsers watch."""

    def __init__(self, *, switch: Switch, clock: Callable[[], float],
                 sources: ConsoleSources) -> None:
        self.switch = switch
        self.clock = clock
        self.sources = sources
        self.streams = 0
        self.stopping = asyncio.Event()
        self._at = -1.0
        self._snap: dict[str, tuple[str, str]] = {}
        self._lock = asyncio.Lock()

    async def snapshot(self) -> dict[str, tuple[str, str]]:
        """``event name -> (change key, JSON data)``, recomputed at most once per tick."""
        async with self._lock:
            now = self.clock()
            if now - self._at < TICK_S / 2:
                return self._snap
            self._at = now
            sw = self.switch
            regs = registration_rows(sw, now)
            calls = call_rows(sw, now)
            # Keys leave out what ticks by itself (expiry, age): the browser counts those.
            reg_key = json.dumps([(r["extension"], r["contact"], r["source"], r["user_agent"],
                                   round(now + r["expires_in"])) for r in regs])
            call_key = json.dumps([{k: v for k, v in c.items() if k not in ("age", "talk")}
                                   | {"answered": c["talk"] is not None} for c in calls])
            status = self._status(now)
            status_key = json.dumps({k: v for k, v in status.items() if k != "uptime_s"},
                                    sort_keys=True)
            loop = asyncio.get_running_loop()
            mark = await loop.run_in_executor(None, self.sources.cdr_mark)
            snap = {
                "registrations": (reg_key, json.dumps({"registrations": regs})),
                "calls": (call_key, json.dumps({"calls": calls})),
                "status": (status_key, json.dumps(status)),
                "cdr": (json.dumps(mark), json.dumps({"mark": mark})),
            }
            if self.sources.webhook_page is not None:
                rows = await loop.run_in_executor(None, self.sources.webhook_page)
                key = json.dumps([(r.get("id"), r.get("state"), r.get("attempts"),
                                   r.get("last_status")) for r in rows])
                snap["webhooks"] = (key, json.dumps({"changed": True}))
            self._snap = snap
            return snap

    def _status(self, now: float) -> dict[str, Any]:
        sw = self.switch
        return {**status_counts(sw), **status_extra(self.sources)}

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/events/stream``: ``event: <name>`` + ``data: <json>`` on each change."""
        if self.streams >= MAX_STREAMS:
            raise web.HTTPServiceUnavailable(reason="too many console streams open")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        self.streams += 1
        sent: dict[str, str] = {}
        quiet_since = time.monotonic()
        try:
            # WHATWG HTML §9.2.6: "retry" is how long the browser waits before reconnecting.
            await resp.write(b"retry: 2000\n\n")
            while not self.stopping.is_set():
                out = []
                for name, (key, data) in (await self.snapshot()).items():
                    if sent.get(name) != key:
                        sent[name] = key
                        out.append(f"event: {name}\ndata: {data}\n\n")
                if not out and time.monotonic() - quiet_since > HEARTBEAT_S:
                    out.append(": ping\n\n")
                if out:
                    quiet_since = time.monotonic()
                    await resp.write("".join(out).encode())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), TICK_S)
        except (ConnectionResetError, ConnectionError):
            pass  # the browser went away
        finally:
            self.streams -= 1
        return resp

    async def on_shutdown(self, app: web.Application) -> None:
        """The server stops: every stream ends now, not after aiohttp's shutdown timeout."""
        self.stopping.set()


def status_counts(sw: Switch) -> dict[str, Any]:
    """The counts of ``GET /api/status`` (the shape tests and operators already read)."""
    relay = sw.relay
    return {
        "extensions": len(sw.extensions),
        "registrations": sw.registrar.binding_count,
        "transactions": sw.stack.transaction_count,
        "calls": len(sw.calls),
        "dialogs": sw.dialog_count,
        "media_sessions": getattr(relay, "session_count", 0),
        "rtp_ports": getattr(relay, "ports_in_use", 0),
        "gateways": {name: {"state": reg.state.value, "last_status": reg.last_status}
                     for name, reg in sw.gateway_registrations.items()},
    }


def install(app: web.Application, *, switch: Switch, clock: Callable[[], float],
            sources: ConsoleSources) -> None:
    """The console's pages, the stream, hang-up and the filtered CDRs on ``app``."""
    app[CONSOLE_KEY] = sources
    hub = EventHub(switch=switch, clock=clock, sources=sources)
    app.on_shutdown.append(hub.on_shutdown)
    app.router.add_get("/", to_console)
    app.router.add_get("/console", to_console)
    app.router.add_get("/console/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/events/stream", hub.stream)
    app.router.add_delete("/api/calls/{id}", hang_up)
    app.router.add_get("/api/cdr", cdrs)
