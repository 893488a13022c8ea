"""The built-in CRM inspector (issue 9): what a CRM would see, served on the HTTP port when
``crm.webhook_url`` is empty, so the integration can be watched with no CRM at all.

- ``POST /crm/webhook``: receives the events exactly as a CRM does (the outbox posts here
  through the same path as to a real CRM), parses the ``multipart/form-data`` form, keeps the
  last :data:`KEEP` in memory and answers a ``NOTIFY_START`` with the answer set below.
- ``GET /crm/``: a page listing the events live (newest first, every field). Plain HTML and
  JS from the package (``static/inspector.html``), no CDN; it polls the JSON feed and writes
  values with ``textContent``, so a caller name like ``<script>`` is shown, never run.
- ``GET /crm/events.json?after=<n>``: the same events as JSON (``n``: the last ``seq`` the
  client has; 0 = all kept).
- ``POST /crm/answer``: the answer the next NOTIFY_START gets (``caller_name``,
  ``redirect``, ``hangup``; ``mode=none`` clears it). A browser form is sent back to the
  page (303); a client asking for JSON gets the answer now set.
"""

from __future__ import annotations

import collections
import json
import time
from importlib import resources
from typing import Any

from aiohttp import web

KEEP = 200
"""Events kept in memory (the oldest are dropped)."""
MAX_FIELD = 4096
"""Characters of one field value kept (a CRM page, not a store)."""


class CrmInspector:
    """The inspector's state: the last events received and the next NOTIFY_START answer."""

    def __init__(self, *, keep: int = KEEP) -> None:
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self.seq = 0
        """Events received since start (the ``seq`` of the newest)."""
        self.next_answer: dict[str, Any] = {}
        """The JSON the next NOTIFY_START is answered with ({} = route normally)."""
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._page = resources.files("softpbx.http").joinpath("static/inspector.html") \
            .read_text("utf-8")

    def routes(self) -> list[web.RouteDef]:
        """The ``/crm/`` routes."""
        return [web.post("/crm/webhook", self.webhook), web.get("/crm/", self.page),
                web.get("/crm", self.to_page), web.get("/crm/events.json", self.feed),
                web.post("/crm/answer", self.set_answer)]

    def _duplicate(self, event_id: str) -> bool:
        """Whether this X-Event-Id came before (a retry the CRM already had)."""
        if not event_id:
            return False
        if event_id in self._seen:
            return True
        self._seen[event_id] = None
        while len(self._seen) > 10 * (self.events.maxlen or KEEP):
            self._seen.popitem(last=False)
        return False

    async def webhook(self, request: web.Request) -> web.Response:
        """``POST /crm/webhook``: one event, as a CRM receives it."""
        try:
            form = await request.post()
        except ValueError as exc:  # a malformed body: a CRM would say 400 too
            raise web.HTTPBadRequest(reason=f"unreadable form: {exc}") from None
        fields = [(str(k), str(v)[:MAX_FIELD]) for k, v in form.items()]
        event = dict(fields).get("event", "")
        event_id = request.headers.get("X-Event-Id", "")
        self.seq += 1
        answer: dict[str, Any] = {}
        if event == "NOTIFY_START" and self.next_answer:
            answer, self.next_answer = self.next_answer, {}
        self.events.append({
            "seq": self.seq, "received_at": round(time.time(), 3), "event": event,
            "event_id": event_id, "duplicate": self._duplicate(event_id),
            "content_type": request.headers.get("Content-Type", "").split(";")[0],
            "signature": request.headers.get("Signature", ""),
            "fields": fields, "answer": answer,
        })
        if answer:
            return web.json_response(answer)
        return web.Response(status=200, text="")

    async def page(self, request: web.Request) -> web.Response:
        """``GET /crm/``: the live page."""
        return web.Response(text=self._page, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store",
                                     "Content-Security-Policy":
                                         "default-src 'self'; script-src 'unsafe-inline';"
                                         " style-src 'unsafe-inline'"})

    async def to_page(self, request: web.Request) -> web.Response:
        """``GET /crm`` -> ``/crm/``."""
        raise web.HTTPFound("/crm/")

    async def feed(self, request: web.Request) -> web.Response:
        """``GET /crm/events.json?after=<seq>``: newest first."""
        try:
            after = int(request.query.get("after", "0"))
        except ValueError:
            raise web.HTTPBadRequest(reason="after must be an integer") from None
        events = [e for e in reversed(self.events) if e["seq"] > after]
        return web.json_response({"seq": self.seq, "next_answer": self.next_answer,
                                  "events": events},
                                 dumps=lambda o: json.dumps(o, ensure_ascii=False))

    async def set_answer(self, request: web.Request) -> web.Response:
        """``POST /crm/answer``: what the next NOTIFY_START gets."""
        form = await request.post()
        mode = str(form.get("mode", ""))
        answer: dict[str, Any] = {}
        name = str(form.get("caller_name", "")).strip()
        redirect = str(form.get("redirect", "")).strip()
        if mode == "hangup" or str(form.get("hangup", "")) in ("1", "on", "true"):
            answer["hangup"] = 1
        elif mode != "none":
            if name:
                answer["caller_name"] = name
            if redirect:
                answer["redirect"] = redirect
                rt = str(form.get("return_timeout", "")).strip()
                if rt:
                    if not rt.isdigit():
                        raise web.HTTPBadRequest(reason="return_timeout must be whole seconds")
                    answer["return_timeout"] = int(rt)
        self.next_answer = answer
        if "application/json" in request.headers.get("Accept", ""):
            return web.json_response({"next_answer": answer})
        raise web.HTTPSeeOther("/crm/")
