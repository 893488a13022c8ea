"""Who may use the console, ``/api/*`` and the CRM inspector (issue 11, "Access").

One middleware (:meth:`Access.middleware`) guards the *protected* paths: ``/api/*``,
``/console/*``, ``/`` and ``/crm/*`` except ``POST /crm/webhook`` (the outbox posts there like
a CRM would). Recording links (``/rec/<token>.mp3``) and the click-to-call path keep their own
rules and never pass through here.

- ``Authorization: Bearer <http.api_token>`` (RFC 6750 §2.1) is accepted on every protected
  path; bad tokens log the fail2ban line and count towards the per-IP ban.
- A session cookie after the login form (``http.admin_user`` / ``admin_password``, compared in
  constant time): ``HttpOnly``, ``SameSite=Strict``, random 256-bit id, 12 h at most.
- With neither configured the protected paths answer clients on a loopback address only (a
  ``Host`` that is not loopback is refused too, so DNS rebinding cannot reach them).

CSRF (OWASP "Cross-Site Request Forgery Prevention"): a state-changing request carrying the
session cookie must come with an ``Origin`` of this server and, on ``/api/*``, the session's
``X-CSRF-Token`` (the console reads it from ``GET /api/session``, which another origin cannot
read). A bearer request carries no ambient credential and needs neither.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

from aiohttp import hdrs, web

from ..config.schema import Config
from ..core.security import FailureTracker
from .click_to_call import auth_failure, peer_address

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

COOKIE = "softpbx_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_TTL = 12 * 3600.0
"""Seconds a login lasts (absolute: an operator logs in again each working day)."""
MAX_SESSIONS = 1000
"""Sessions kept at most; the oldest is dropped first (a login flood cannot grow memory)."""
BEARER_MISSING = "bad or missing bearer token (Authorization: Bearer <http.api_token>)"
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(slots=True)
class Session:
    """One logged-in browser."""

    user: str
    csrf: str
    expires_at: float


SESSION_KEY: web.RequestKey[Session | None] = web.RequestKey("session", Session)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _host_only(host: str) -> str:
    """``127.0.0.1`` of ``127.0.0.1:8080``, ``::1`` of ``[::1]:8080``."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def is_protected(request: web.Request) -> bool:
    """Whether ``request`` is for the console, the API or the inspector (not the webhook)."""
    for path in (request.path, _canonical(request)):
        if path in ("/", "/api", "/console", "/crm", "/metrics") or path.startswith(("/api/", "/console/")):
            return True
        if path.startswith("/crm/"):
            return not (path == "/crm/webhook" and request.method == hdrs.METH_POST)
    return False


def _canonical(request: web.Request) -> str:
    # Both the decoded path and the matched route: "/%61pi/status" is "/api/status".
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else ""


class Access:
    """Sessions, the login form and the middleware of the protected paths."""

    def __init__(self, *, config: Config, failures: FailureTracker,
                 clock: Callable[[], float]) -> None:
        self.config = config
        self.failures = failures
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self._login_page = resources.files("softpbx.http").joinpath("console/login.html") \
            .read_text("utf-8")

    # ------------------------------------------------------------------ configuration

    @property
    def login_enabled(self) -> bool:
        """Whether the login form can succeed (both admin keys set)."""
        http = self.config.http
        return bool(http.admin_user and http.admin_password)

    @property
    def open_on_loopback(self) -> bool:
        """No credential configured at all: loopback clients only, without login."""
        return not (self.login_enabled or self.config.http.api_token)

    # ------------------------------------------------------------------ sessions

    def session_of(self, request: web.Request) -> Session | None:
        """The live session the request's cookie names, if any."""
        sid = request.cookies.get(COOKIE, "")
        s = self.sessions.get(sid) if sid else None
        if s is None:
            return None
        if s.expires_at <= time.monotonic():
            self.sessions.pop(sid, None)
            return None
        return s

    def _new_session(self, user: str) -> tuple[str, Session]:
        while len(self.sessions) >= MAX_SESSIONS:
            self.sessions.pop(next(iter(self.sessions)))
        sid = secrets.token_urlsafe(32)
        s = Session(user=user, csrf=secrets.token_urlsafe(32),
                    expires_at=time.monotonic() + SESSION_TTL)
        self.sessions[sid] = s
        return sid, s

    @staticmethod
    def _set_cookie(request: web.Request, resp: web.StreamResponse, sid: str) -> None:
        resp.set_cookie(COOKIE, sid, httponly=True, samesite="Strict", path="/",
                        secure=request.secure)

    # ------------------------------------------------------------------ the middleware

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Let a protected request through only with a credential the configuration asks."""
        if request.path in ("/login", "/logout") or not is_protected(request):
            return await handler(request)
        api = (request.path.startswith(("/api", "/metrics"))  # a scraper is no browser: 401
               or _canonical(request).startswith(("/api", "/metrics")))
        if self.open_on_loopback:
            return await self._loopback_only(request, handler, api)
        auth = request.headers.get(hdrs.AUTHORIZATION)
        if auth is not None and self.config.http.api_token:
            return await self._bearer(request, handler, auth)
        session = self.session_of(request)
        if session is None:
            if api:
                return _json_error(401, BEARER_MISSING if not self.login_enabled else
                                   "login required: a session cookie (POST /login) or "
                                   "Authorization: Bearer <http.api_token>",
                                   {hdrs.WWW_AUTHENTICATE: 'Bearer realm="softpbx"'})
            target = urllib.parse.quote(request.path, safe="/")
            raise web.HTTPSeeOther(f"/login?next={target}")
        if request.method in _UNSAFE:
            refused = self._csrf_refusal(request, session, api)
            if refused is not None:
                return refused
        request[SESSION_KEY] = session
        return await handler(request)

    async def _loopback_only(self, request: web.Request, handler: Handler,
                             api: bool) -> web.StreamResponse:
        ip, _ = peer_address(request)
        if not (_loopback(ip) and _loopback(_host_only(request.host))):
            return _json_error(403, "the console and /api/* answer loopback clients only: set "
                                    "http.admin_user/admin_password or http.api_token to open "
                                    "them to the network")
        if request.method in _UNSAFE and not self._same_origin(request, required=False):
            return _json_error(403, "cross-origin request refused")
        session = self.session_of(request)
        if session is None and not api and request.method == hdrs.METH_GET:
            # A browser gets a session anyway: the console's requests carry its CSRF token.
            sid, session = self._new_session("local")
            request[SESSION_KEY] = session
            resp = await handler(request)
            self._set_cookie(request, resp, sid)
            return resp
        if session is not None and request.method in _UNSAFE:
            refused = self._csrf_refusal(request, session, api)
            if refused is not None:
                return refused
        request[SESSION_KEY] = session
        return await handler(request)

    async def _bearer(self, request: web.Request, handler: Handler,
                      auth: str) -> web.StreamResponse:
        ip, port = peer_address(request)
        now = self.clock()
        banned = self.failures.is_banned(ip, now)
        scheme, _, given = auth.strip().partition(" ")
        # RFC 9110 §11.1: the auth scheme is case-insensitive.
        if banned or scheme.lower() != "bearer" or not _equal(given.strip(),
                                                              self.config.http.api_token):
            if not banned:
                auth_failure(self.config, self.failures, ip, port, "api", now)
            # RFC 6750 §3: a 401 names the scheme the client has to use.
            return _json_error(401, BEARER_MISSING, {hdrs.WWW_AUTHENTICATE: 'Bearer realm="softpbx"'})
        return await handler(request)

    def _csrf_refusal(self, request: web.Request, session: Session,
                      api: bool) -> web.Response | None:
        if not self._same_origin(request, required=True):
            return _json_error(403, "cross-origin request refused (Origin is not this server)")
        if api and not _equal(request.headers.get(CSRF_HEADER, ""), session.csrf):
            return _json_error(403, f"missing or wrong {CSRF_HEADER} header "
                                    "(GET /api/session gives it)")
        return None

    def _same_origin(self, request: web.Request, *, required: bool) -> bool:
        """RFC 6454 §7: the ``Origin`` a browser sends must be ours (or the public URL's)."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            # Browsers send Origin on every cross-origin and on every non-GET fetch; without
            # one, Fetch Metadata still tells a cross-site request apart.
            return not required and request.headers.get("Sec-Fetch-Site") != "cross-site"
        ours = {f"{request.scheme}://{request.host}"}
        public = urllib.parse.urlsplit(self.config.http.public_base_url)
        if public.scheme and public.netloc:
            ours.add(f"{public.scheme}://{public.netloc}")
        return origin in ours

    # ------------------------------------------------------------------ login / logout

    async def login_page(self, request: web.Request) -> web.Response:
        """``GET /login``: the form (``next``: where to go after it, a local path)."""
        target = request.query.get("next", "/console/")
        if not _local_path(target):
            target = "/console/"
        page = (self._login_page.replace("{{next}}", html.escape(target, quote=True))
                .replace("{{failed}}", "" if request.query.get("failed") else "hidden")
                .replace("{{disabled}}", "hidden" if self.login_enabled else ""))
        return web.Response(text=page, content_type="text/html", charset="utf-8",
                            headers=SECURITY_HEADERS)

    async def login(self, request: web.Request) -> web.StreamResponse:
        """``POST /login`` (``user``, ``password``, ``next``): a session cookie and a 303."""
        if not self._same_origin(request, required=True):
            return _json_error(403, "cross-origin login refused")
        try:
            form = await request.post()
        except ValueError:
            raise web.HTTPBadRequest(reason="unreadable form") from None
        user, password = str(form.get("user", "")), str(form.get("password", ""))
        target = str(form.get("next", "")) or "/console/"
        if not _local_path(target):
            target = "/console/"  # never an open redirect
        ip, port = peer_address(request)
        now = self.clock()
        http = self.config.http
        banned = self.failures.is_banned(ip, now)
        # Both compared, always, in constant time: timing tells nothing about which was wrong.
        ok_user = _equal(user, http.admin_user)
        ok_password = _equal(password, http.admin_password)
        if banned or not (self.login_enabled and ok_user and ok_password):
            if not banned:
                auth_failure(self.config, self.failures, ip, port, "console", now)
            raise web.HTTPSeeOther("/login?failed=1&next=" + urllib.parse.quote(target, safe="/"))
        sid, _ = self._new_session(user)
        resp = web.HTTPSeeOther(target)
        self._set_cookie(request, resp, sid)
        raise resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """``POST /logout``: the session ends (same-origin only: no forced logout)."""
        if not self._same_origin(request, required=True):
            return _json_error(403, "cross-origin request refused")
        self.sessions.pop(request.cookies.get(COOKIE, ""), None)
        resp = web.HTTPSeeOther("/login")
        resp.del_cookie(COOKIE, path="/")
        raise resp

    async def session_info(self, request: web.Request) -> web.Response:
        """``GET /api/session``: who is logged in and the CSRF token of the session."""
        s = request.get(SESSION_KEY)
        return web.json_response({"user": s.user if s else "", "csrf": s.csrf if s else "",
                                  "login": self.login_enabled},
                                 headers={"Cache-Control": "no-store"})

    def routes(self) -> list[web.RouteDef]:
        """``/login``, ``/logout`` and ``/api/session``."""
        return [web.get("/login", self.login_page), web.post("/login", self.login),
                web.post("/logout", self.logout), web.get("/api/session", self.session_info)]


SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'self'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
"""Headers of every console page: no inline script runs, nothing loads from elsewhere."""


def _local_path(target: str) -> bool:
    """A path on this server (``/x``), not ``//host`` or ``/\\host`` (an open redirect)."""
    return target.startswith("/") and not target.startswith("//") and "\\" not in target \
        and all(" " < c < "\x7f" for c in target)


def _equal(given: str, expected: str) -> bool:
    """Constant-time comparison (hmac.compare_digest); an empty ``expected`` never matches."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def _json_error(status: int, message: str,
                headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status,
                             headers=headers)
