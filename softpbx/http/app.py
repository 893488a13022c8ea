"""The HTTP side of softpbx (aiohttp): the JSON API, recordings, click-to-call, the CRM
inspector and the web console (:mod:`.console`), behind :mod:`.access`. Every error answer is
JSON."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import os
import re
import stat
from collections.abc import Awaitable, Callable
from typing import BinaryIO, Final

from aiohttp import hdrs, web

from ..core.switch import Switch
from . import click_to_call, console
from .access import Access
from .inspector import CrmInspector
from .webhooks import WebhookOutbox, add_routes

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
    """``GET /api/status``: counts an operator or a test looks at (with the console: version,
    uptime, listeners and store size too)."""
    sw = request.app[SWITCH_KEY]
    out = console.status_counts(sw)
    sources = request.app.get(console.CONSOLE_KEY)
    if sources is not None:
        out.update(console.status_extra(sources))
    return web.json_response(out)


async def calls(request: web.Request) -> web.Response:
    """``GET /api/calls``: calls in progress."""
    rows = console.call_rows(request.app[SWITCH_KEY], request.app[CLOCK_KEY]())
    return web.json_response({"calls": rows})


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
    rows = console.registration_rows(request.app[SWITCH_KEY], request.app[CLOCK_KEY]())
    return web.json_response({"registrations": rows})


_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,64}\Z")
_CHUNK = 256 * 1024
"""Bytes read per executor call while sending a recording."""

# RFC 9110 §14.1.2:  int-range = first-pos "-" [ last-pos ]   suffix-range = "-" suffix-length
_BYTE_RANGE_RE = re.compile(r"[ \t]*([0-9]{0,18})-([0-9]{0,18})[ \t]*\Z")
UNSATISFIABLE: Final = "unsatisfiable"
""":func:`byte_range`'s answer for a Range no byte of the file can satisfy (416)."""


def byte_range(value: str, size: int) -> tuple[int, int] | str | None:
    """The ``[start, end)`` slice a ``Range`` header asks of a ``size``-byte file, ``None``
    when it is to be ignored (the whole file, 200), or :data:`UNSATISFIABLE` (416).

    RFC 9110 §14.2: a server ignores a Range with a unit it does not know, may ignore an
    invalid one (a malformed spec, last-pos < first-pos), and may ignore several ranges
    (a multipart answer buys a recording nothing); only a well-formed single range none of
    whose bytes exist (``bytes=-0``, a first-pos past the end) gets 416 (§14.1.1).
    """
    unit, eq, spec = value.partition("=")
    if not eq or unit.strip().lower() != "bytes" or "," in spec:
        return None
    m = _BYTE_RANGE_RE.match(spec)
    if m is None or not (m.group(1) or m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            return UNSATISFIABLE
        return max(0, size - suffix), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        return UNSATISFIABLE
    return start, size if not last else min(int(last) + 1, size)


def if_range_holds(value: str | None, etag: str, mtime: float) -> bool:
    """RFC 9110 §13.1.5: honour the Range only if the If-Range validator is the file's
    current one (a strong entity-tag equal to ``etag``, or exactly its Last-Modified date)."""
    if value is None:
        return True
    value = value.strip()
    if value.startswith('"'):
        return value == etag
    if value.startswith("W/"):
        return False  # weak tags never match for If-Range
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return False
    return when.tzinfo is not None and int(when.timestamp()) == int(mtime)


def _open_recording(lookup: Callable[[str], tuple[str, str, str] | None], digest: str
                    ) -> tuple[str, BinaryIO | None, os.stat_result | None] | None:
    """Executor job: the index row's status and, when ready, the open file and its stat."""
    row = lookup(digest)
    if row is None:
        return None
    path, state, _ = row
    if state != "ready":
        return state, None, None
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the handler after sending
    except OSError:
        return state, None, None
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
        f.close()
        return state, None, None
    return state, f, st


async def recording(request: web.Request) -> web.StreamResponse:
    """``GET``/``HEAD /rec/<token>.mp3``: a recording, without login (the token is the key).

    The index holds only SHA-256 of tokens, so a lookup never compares a guess with a real
    token; unknown and malformed tokens get the same 404. The lookup and the file's opening
    run in one executor job (no disk access on the loop). A single byte range is served
    (206); see :func:`byte_range` for what is ignored and what gets 416.
    """
    token = request.match_info["token"]
    if not _TOKEN_RE.match(token):
        raise web.HTTPNotFound(reason="no such recording")
    digest = hashlib.sha256(token.encode()).hexdigest()
    loop = asyncio.get_running_loop()
    found = await loop.run_in_executor(None, _open_recording, request.app[RECORDING_KEY],
                                       digest)
    return await _serve(request, found, "no such recording")


async def _serve(request: web.Request,
                 found: tuple[str, BinaryIO | None, os.stat_result | None] | None,
                 not_ready: str) -> web.StreamResponse:
    """Answer with what :func:`_open_recording` found: 404 unknown, 410 deleted by the
    retention policy, 404 ``not_ready`` without a file; else the file (closed after)."""
    if found is None:
        raise web.HTTPNotFound(reason="no such recording")
    state, f, st = found
    if state == "deleted":
        raise web.HTTPGone(reason="recording deleted by the retention policy")
    if f is None or st is None:
        raise web.HTTPNotFound(reason=not_ready)
    try:
        return await _send(request, f, st)
    finally:
        await asyncio.get_running_loop().run_in_executor(None, f.close)


def _open_by_call(lookup: Callable[[str], tuple[str, str] | None], call_id: str
                  ) -> tuple[str, BinaryIO | None, os.stat_result | None] | None:
    """Executor job: :func:`_open_recording` for the authenticated path by call id."""
    row = lookup(call_id)
    if row is None:
        return None
    return _open_recording(lambda _: (row[0], row[1], call_id), call_id)


async def recording_by_call(request: web.Request) -> web.StreamResponse:
    """``GET``/``HEAD /api/recordings/<call_id>.mp3``: a call's recording behind the API's
    login (the console's player); the public ``/rec/<token>.mp3`` link stays as it is."""
    call_id = request.match_info["call_id"]
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", call_id):
        raise web.HTTPNotFound(reason="no such recording")
    loop = asyncio.get_running_loop()
    found = await loop.run_in_executor(None, _open_by_call,
                                       request.app[console.CONSOLE_KEY].recording_path, call_id)
    return await _serve(request, found, "no such recording (not ready)")


async def _send(request: web.Request, f: BinaryIO, st: os.stat_result) -> web.StreamResponse:
    size = st.st_size
    etag = f'"{st.st_mtime_ns:x}-{size:x}"'
    headers = {"Content-Type": "audio/mpeg", "Accept-Ranges": "bytes", "ETag": etag,
               "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
               "Cache-Control": "private, max-age=86400"}
    span: tuple[int, int] | str | None = None
    value = request.headers.get(hdrs.RANGE)
    # RFC 9110 §14.2: Range is defined for GET only (HEAD answers as GET without it would).
    if (value is not None and request.method == hdrs.METH_GET
            and if_range_holds(request.headers.get(hdrs.IF_RANGE), etag, st.st_mtime)):
        span = byte_range(value, size)
    if span == UNSATISFIABLE:
        return web.json_response({"error": "Range Not Satisfiable", "status": 416}, status=416,
                                 headers={"Content-Range": f"bytes */{size}",
                                          "Accept-Ranges": "bytes"})
    start, end = span if isinstance(span, tuple) else (0, size)
    if isinstance(span, tuple):
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    resp = web.StreamResponse(status=206 if isinstance(span, tuple) else 200, headers=headers)
    resp.content_length = end - start
    await resp.prepare(request)
    if request.method == hdrs.METH_HEAD:
        return resp
    loop = asyncio.get_running_loop()
    fd = f.fileno()
    offset = start
    while offset < end:
        chunk = await loop.run_in_executor(None, os.pread, fd, min(_CHUNK, end - offset), offset)
        if not chunk:
            break  # shorter than its stat said: nothing a client could be sent instead
        await resp.write(chunk)
        offset += len(chunk)
    await resp.write_eof()
    return resp


def make_app(*, switch: Switch, clock: Callable[[], float],
             cdr_fetch: Callable[[int], list[dict[str, object]]],
             recording_lookup: Callable[[str], tuple[str, str, str] | None],
             originate: click_to_call.Originate | None = None,
             outbox: WebhookOutbox | None = None,
             inspector: CrmInspector | None = None,
             console_sources: console.ConsoleSources | None = None) -> web.Application:
    """The aiohttp application; ``originate`` places click-to-call and ``POST /api/calls``
    calls (see :mod:`softpbx.http.click_to_call`); ``outbox`` serves ``/api/webhooks``;
    ``inspector`` is the built-in CRM under ``/crm/`` (``crm.webhook_url`` empty);
    ``console_sources`` adds the web console (:mod:`softpbx.http.console`)."""
    app = web.Application(middlewares=[json_errors], client_max_size=64 * 1024)
    if switch is not None:
        access = Access(config=switch.config, failures=switch.failures, clock=clock)
        app.middlewares.append(access.middleware)
        app.add_routes(access.routes())
    app[SWITCH_KEY] = switch
    app[CLOCK_KEY] = clock
    app[CDR_KEY] = cdr_fetch
    app[RECORDING_KEY] = recording_lookup
    app.router.add_get("/rec/{token}.mp3", recording)
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/registrations", registrations)
    app.router.add_get("/api/calls", calls)
    if console_sources is not None:
        console.install(app, switch=switch, clock=clock, sources=console_sources)
        app.router.add_get("/api/recordings/{call_id}.mp3", recording_by_call)
    else:
        app.router.add_get("/api/cdr", cdrs)
    click_to_call.install(app, switch=switch, clock=clock, originate=originate)
    if outbox is not None:
        add_routes(app, outbox)
    if inspector is not None:
        app.add_routes(inspector.routes())
    return app
