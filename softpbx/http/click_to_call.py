"""Click-to-call over HTTP (``crm-telephony-api.md`` §5).

Two doors, one code path: ``POST <crm.click_to_call_path>`` (the CRM, ``x-pbx-authentication``
token) and ``POST /api/calls`` (the console, behind the API's auth, :mod:`softpbx.http.access`) both end in
:meth:`ClickToCallEndpoint.place`, which validates with :mod:`softpbx.crm.click_to_call`,
applies the per-extension repeat limit and calls the switch's origination.

Answers are JSON (``application/json``): ``{"status":"1","pbx_call_id":"out_..."}`` when the
call is initiated, ``{"status":"0","error":"..."}`` when it is not, with the HTTP status that
fits (401 token, 403 disabled, 400 field, 404/409/429/422/503 from the switch) or always 200
when ``crm.click_to_call_error_codes`` is off (CRMs built on the OnlinePBX convention).

Bad tokens count towards the same per-IP ban as SIP digest failures (``switch.failures``) and
log the same fail2ban line as ``Switch.authenticate``.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from ..config.schema import Config
from ..core.events import OriginateRefused
from ..core.security import FailureTracker
from ..core.switch import Switch
from ..crm.click_to_call import ClickToCall, Refusal, RepeatLimiter, parse_request, token_matches

log = logging.getLogger("softpbx.http")
auth_log = logging.getLogger("softpbx.auth")
"""The logger ``Switch.authenticate`` writes its fail2ban lines to."""

TOKEN_HEADER = "x-pbx-authentication"
"""The CRM's token header (``crm-telephony-api.md`` §5)."""

_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_dumps = functools.partial(json.dumps, separators=(",", ":"))
"""Compact JSON: ``{"status":"1"}`` byte for byte as the spec writes it (a CRM may compare
the text rather than parse it)."""


class Originate(Protocol):
    """The switch's origination as the HTTP side calls it: ``Switch.originate`` with ``now``
    filled in and the core's output flushed afterwards (``aio/app.py`` builds it)."""

    def __call__(self, extension: str, number: str, *, caller_name: str = "",
                 auto_answer: bool = False) -> str | OriginateRefused:
        """Ring ``extension``, then dial ``number``: the new call's ``pbx_call_id`` or why not."""
        ...


def peer_address(request: web.Request) -> tuple[str, int]:
    """The client's address and port as the log line wants them (``?``/0 once it is gone)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return request.remote or "?", 0


def is_loopback(ip: str) -> bool:
    """Whether listening on ``ip`` keeps the HTTP port on this machine (``0.0.0.0`` does not)."""
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def api_auth_required(config: Config) -> bool:
    """Whether ``/api/*`` asks every client for a credential (a bearer ``http.api_token`` or
    the console's login): whenever one is configured; without any, the API answers loopback
    clients only (:mod:`softpbx.http.access`)."""
    http = config.http
    return bool(http.api_token) or bool(http.admin_user and http.admin_password)


def auth_failure(config: Config, failures: FailureTracker, ip: str, port: int, method: str,
                 now: float) -> None:
    """The fail2ban line of ``Switch.authenticate`` and a strike towards the IP's ban."""
    auth_log.warning(
        'softpbx auth failure: ip=%s port=%d transport=http method=%s user="" reason=%s',
        ip, port, method, "bad_token")
    if failures.record_failure(ip, now):
        auth_log.warning("softpbx auth ban: ip=%s for %ds after %d failures", ip,
                         config.auth.ban_time, config.auth.max_failures)


async def read_fields(request: web.Request) -> dict[str, object] | Refusal:
    """The request body as a mapping of fields, whatever its encoding.

    ``application/x-www-form-urlencoded`` (the spec's), ``multipart/form-data`` and
    ``application/json`` (an object) are read; a body without Content-Type is read as
    urlencoded (``curl -d`` habits of hand-written CRMs). A repeated field keeps its first
    value; file parts of a multipart body are ignored. An unreadable body is a 400.
    """
    ctype = request.content_type
    try:
        if ctype == "application/json" or ctype.endswith("+json"):
            data = json.loads(await request.read())
            if not isinstance(data, dict):
                return Refusal(400, "unreadable body: the JSON body must be an object")
            return data
        if ctype in _FORM_TYPES:
            form = await request.post()
            pairs = list(form.items())
        elif hdrs.CONTENT_TYPE not in request.headers:
            text = (await request.read()).decode("utf-8")
            pairs = urllib.parse.parse_qsl(text, keep_blank_values=True)
        else:
            return Refusal(400, f"unreadable body: unsupported Content-Type {ctype!r} "
                                f"(application/x-www-form-urlencoded, multipart/form-data or "
                                f"application/json)")
    except web.HTTPRequestEntityTooLarge:
        return Refusal(400, "unreadable body: too large")
    except (ValueError, LookupError, RecursionError, HttpProcessingError) as exc:
        # ValueError covers bad JSON, bytes that are not UTF-8 (UnicodeDecodeError) and a
        # malformed multipart body; LookupError an unknown charset; RecursionError JSON nested
        # thousands deep; HttpProcessingError a multipart part with broken headers. None of it
        # is ours to crash on.
        return Refusal(400, f"unreadable body: {type(exc).__name__}")
    fields: dict[str, object] = {}
    for key, value in pairs:
        if isinstance(value, str):
            fields.setdefault(key, value)
    return fields


class ClickToCallEndpoint:
    """The HTTP side of click-to-call: token, ban, body, repeat limit, then the switch."""

    def __init__(self, *, config: Config, failures: FailureTracker,
                 clock: Callable[[], float], originate: Originate | None) -> None:
        self.config = config
        self.failures = failures
        self.clock = clock
        self.originate = originate
        """``None`` when the app runs without a switch to originate with (503)."""
        self.limiter = RepeatLimiter(min_interval=config.crm.click_to_call_min_interval_s)

    # ------------------------------------------------------------------ the one code path

    def place(self, fields: Mapping[str, object]) -> tuple[int, dict[str, str]]:
        """Validate ``fields`` and originate: ``(HTTP status, JSON body)`` of the answer."""
        parsed = parse_request(fields)
        if isinstance(parsed, Refusal):
            return self._refused(parsed.status, parsed.error)
        now = self.clock()
        limited = self.limiter.check(parsed.extension, now)
        if limited is not None:
            return self._refused(limited.status, limited.error)
        if self.originate is None:
            return self._refused(503, "origination is not available in this process")
        result = self._originate(parsed)
        if isinstance(result, OriginateRefused):
            return self._refused(result.status, result.error)
        self.limiter.record(parsed.extension, now)
        log.info("click-to-call %s -> %s: %s", parsed.extension, parsed.number, result)
        # The spec's exact {"status":"1"} first; pbx_call_id lets the CRM match the webhooks.
        return 200, {"status": "1", "pbx_call_id": result}

    def _originate(self, req: ClickToCall) -> str | OriginateRefused:
        assert self.originate is not None
        try:
            return self.originate(req.extension, req.number, caller_name=req.caller_name,
                                  auto_answer=self.config.crm.click_to_call_auto_answer)
        except Exception:
            # A bug in the switch, not the request's fault: logged with its traceback, the
            # caller gets a JSON 500 and the process keeps serving (nothing is hidden).
            log.exception("internal error originating %s -> %s", req.extension, req.number)
            return OriginateRefused(500, "internal error; see the PBX log")

    @staticmethod
    def _refused(status: int, error: str) -> tuple[int, dict[str, str]]:
        return status, {"status": "0", "error": error}

    # ------------------------------------------------------------------ the CRM's door

    async def crm_request(self, request: web.Request) -> web.Response:
        """``POST <crm.click_to_call_path>``: the CRM's click (§5)."""
        status, body = await self._crm_answer(request)
        if not self.config.crm.click_to_call_error_codes:
            status = 200
        headers = {hdrs.ALLOW: hdrs.METH_POST} if status == 405 else None
        return web.json_response(body, status=status, headers=headers, dumps=_dumps)

    async def _crm_answer(self, request: web.Request) -> tuple[int, dict[str, str]]:
        if request.method != hdrs.METH_POST:
            return self._refused(405, f"method {request.method} not allowed: POST the fields "
                                      f"'from' and 'to'")
        token = self.config.crm.click_to_call_token
        if not token:
            # Never open: without a token anybody reaching the port could make calls.
            return self._refused(403, "click-to-call is disabled on this PBX "
                                      "(crm.click_to_call_token is not set)")
        ip, port = peer_address(request)
        now = self.clock()
        # A banned source gets the bad-token answer without a check (no oracle while banned).
        banned = self.failures.is_banned(ip, now)
        if banned or not token_matches(request.headers.get(TOKEN_HEADER), token):
            if not banned:
                self._auth_failure(ip, port, "click-to-call", now)
            return self._refused(401, f"bad or missing token (header '{TOKEN_HEADER}')")
        fields = await read_fields(request)
        if isinstance(fields, Refusal):
            return self._refused(fields.status, fields.error)
        return self.place(fields)

    def _auth_failure(self, ip: str, port: int, method: str, now: float) -> None:
        auth_failure(self.config, self.failures, ip, port, method, now)

    # ------------------------------------------------------------------ the console's door

    async def api_request(self, request: web.Request) -> web.Response:
        """``POST /api/calls`` (JSON ``{"from","to"[,"name"]}``): the same origination, behind
        the API's own auth (:mod:`softpbx.http.access`), with the fitting HTTP status always."""
        fields = await read_fields(request)
        if isinstance(fields, Refusal):
            status, body = self._refused(fields.status, fields.error)
        else:
            status, body = self.place(fields)
        return web.json_response(body, status=status, dumps=_dumps)


CLICK_TO_CALL_KEY: web.AppKey[ClickToCallEndpoint] = web.AppKey("click_to_call",
                                                                ClickToCallEndpoint)


def install(app: web.Application, *, switch: Switch | None, clock: Callable[[], float],
            originate: Originate | None) -> None:
    """Add the click-to-call route and ``POST /api/calls`` to ``app`` (the ``/api/*`` auth is
    :mod:`softpbx.http.access`'s)."""
    if switch is None:
        return  # the recording-link tests build an app without a switch, hence without calls
    endpoint = ClickToCallEndpoint(config=switch.config, failures=switch.failures, clock=clock,
                                   originate=originate)
    app[CLICK_TO_CALL_KEY] = endpoint
    # Every method: a GET from a browser gets the endpoint's own JSON 405, not aiohttp's.
    app.router.add_route("*", switch.config.crm.click_to_call_path, endpoint.crm_request)
    app.router.add_post("/api/calls", endpoint.api_request)
