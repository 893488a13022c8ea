"""The HTTP side of softpbx (aiohttp): status API now; recordings, click-to-call and the web
console join it as the switch grows. Every error answer is JSON."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..core.switch import Switch

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SWITCH_KEY: web.AppKey[Switch] = web.AppKey("switch", Switch)
CLOCK_KEY: web.AppKey[Callable[[], float]] = web.AppKey("clock", Callable[[], float])
RECORDING_KEY: web.AppKey[Callable[[str], tuple[str, str, str] | None]] = web.AppKey(
    "recording", Callable[[str], tuple[str, str, str] | None])
CDR_KEY: web.AppKey[Callable[[int], list[dict[str, object]]]] = web.AppKey(
    "cdr", Callable[[int], list[dict[str, object]]])


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn HTTP errors (404, 405, bad requests) into ``{"error": ...}`` JSON bodies."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response({"error": exc.reason, "status": exc.status}, status=exc.status,
                                 headers={k: v for k, v in exc.headers.items()
                                          if k.lower() == "allow"})


async def status(request: web.Request) -> web.Response:
    """``GET /api/status``: counts an operator or a test looks at."""
    sw = request.app[SWITCH_KEY]
    relay = sw.relay
    return web.json_response({
        "extensions": len(sw.extensions),
        "registrations": sw.registrar.binding_count,
        "transactions": sw.stack.transaction_count,
        "calls": len(sw.calls),
        "dialogs": sw.dialog_count,
        "media_sessions": getattr(relay, "session_count", 0),
        "rtp_ports": getattr(relay, "ports_in_use", 0),
        "gateways": {name: {"state": reg.state.value, "last_status": reg.last_status}
                     for name, reg in sw.gateway_registrations.items()},
    })


async def calls(request: web.Request) -> web.Response:
    """``GET /api/calls``: calls in progress."""
    sw = request.app[SWITCH_KEY]
    now = request.app[CLOCK_KEY]()
    out = [{"id": c.id, "state": c.state.value, "direction": c.route.direction.value,
            "caller": c.caller_number, "dialled": c.route.dialled,
            "age": round(now - c.created_at, 1)} for c in sw.calls.values()]
    return web.json_response({"calls": out})


async def cdrs(request: web.Request) -> web.Response:
    """``GET /api/cdr?limit=N``: the newest call records."""
    fetch = request.app[CDR_KEY]
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise web.HTTPBadRequest(reason="limit must be an integer") from None
    if not 1 <= limit <= 1000:
        raise web.HTTPBadRequest(reason="limit must be between 1 and 1000")
    loop = asyncio.get_running_loop()
    rows = await loop.run_in_executor(None, fetch, limit)
    return web.json_response({"cdr": rows})


async def registrations(request: web.Request) -> web.Response:
    """``GET /api/registrations``: current bindings per extension."""
    sw = request.app[SWITCH_KEY]
    now = request.app[CLOCK_KEY]()
    out = []
    for ext in sorted(sw.extensions):
        for b in sw.registrar.lookup(ext, now):
            out.append({"extension": ext, "contact": b.contact, "expires_in": b.expires_in(now),
                        "source": str(b.flow), "user_agent": b.user_agent})
    return web.json_response({"registrations": out})


_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,64}\Z")


async def recording(request: web.Request) -> web.StreamResponse:
    """``GET``/``HEAD /rec/<token>.mp3``: a recording, without login (the token is the key).

    The index holds only SHA-256 of tokens, so a lookup never compares a guess with a real
    token; unknown and malformed tokens get the same 404. Range requests are served.
    """
    token = request.match_info["token"]
    if not _TOKEN_RE.match(token):
        raise web.HTTPNotFound(reason="no such recording")
    digest = hashlib.sha256(token.encode()).hexdigest()
    lookup = request.app[RECORDING_KEY]
    row = await asyncio.get_running_loop().run_in_executor(None, lookup, digest)
    if row is None:
        raise web.HTTPNotFound(reason="no such recording")
    path, state, _ = row
    if state == "deleted":
        raise web.HTTPGone(reason="recording deleted by the retention policy")
    if state != "ready" or not os.path.isfile(path):
        raise web.HTTPNotFound(reason="no such recording")
    return web.FileResponse(path, headers={"Content-Type": "audio/mpeg",
                                           "Cache-Control": "private, max-age=86400"})


def make_app(*, switch: Switch, clock: Callable[[], float],
             cdr_fetch: Callable[[int], list[dict[str, object]]],
             recording_lookup: Callable[[str], tuple[str, str, str] | None]) -> web.Application:
    """The aiohttp application."""
    app = web.Application(middlewares=[json_errors], client_max_size=64 * 1024)
    app[SWITCH_KEY] = switch
    app[CLOCK_KEY] = clock
    app[CDR_KEY] = cdr_fetch
    app[RECORDING_KEY] = recording_lookup
    app.router.add_get("/rec/{token}.mp3", recording)
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/registrations", registrations)
    app.router.add_get("/api/calls", calls)
    app.router.add_get("/api/cdr", cdrs)
    return app
