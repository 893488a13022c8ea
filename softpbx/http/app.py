"""The HTTP side of softpbx (aiohttp): status API now; recordings, click-to-call and the web
console join it as the switch grows. Every error answer is JSON."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from ..core.switch import Switch

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SWITCH_KEY: web.AppKey[Switch] = web.AppKey("switch", Switch)
CLOCK_KEY: web.AppKey[Callable[[], float]] = web.AppKey("clock", Callable[[], float])


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
    return web.json_response({
        "extensions": len(sw.extensions),
        "registrations": sw.registrar.binding_count,
        "transactions": sw.stack.transaction_count,
    })


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


def make_app(*, switch: Switch, clock: Callable[[], float]) -> web.Application:
    """The aiohttp application."""
    app = web.Application(middlewares=[json_errors], client_max_size=64 * 1024)
    app[SWITCH_KEY] = switch
    app[CLOCK_KEY] = clock
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/registrations", registrations)
    return app
