"""``GET /api/webhooks`` and ``POST /api/webhooks/<id>/retry``: the webhook outbox for an
operator (issue 9: state, attempts, last status, latency; filter by state and call; a failed
or given-up event can be re-queued). Errors are JSON, like the rest of the API."""

from __future__ import annotations

import asyncio
from typing import Protocol

from aiohttp import web

STATES = ("pending", "delivered", "failed", "given_up")


class WebhookOutbox(Protocol):
    """What the API needs of the outbox (:class:`softpbx.aio.outbox.Outbox` provides it)."""

    def rows(self, *, state: str, pbx_call_id: str, before_id: int,
             limit: int) -> list[dict[str, object]]:
        """Blocking (an executor): outbox rows, newest first."""

    def counts(self) -> dict[str, int]:
        """Blocking: events per state."""

    async def requeue(self, row_id: int) -> dict[str, object] | str:
        """Re-queue a failed/given-up event: its row, or why not (``unknown`` or its state)."""


OUTBOX_KEY: web.AppKey[WebhookOutbox] = web.AppKey("outbox", WebhookOutbox)


async def list_webhooks(request: web.Request) -> web.Response:
    """``GET /api/webhooks?state=&pbx_call_id=&limit=&before=``: newest first; ``before``
    (an id) pages back, and ``next_before`` says where the next page starts."""
    q = request.query
    state = q.get("state", "")
    if state and state not in STATES:
        raise web.HTTPBadRequest(reason=f"state must be one of {', '.join(STATES)}")
    try:
        limit = int(q.get("limit", "50"))
        before = int(q.get("before", "0"))
    except ValueError:
        raise web.HTTPBadRequest(reason="limit and before must be integers") from None
    if not 1 <= limit <= 1000:
        raise web.HTTPBadRequest(reason="limit must be between 1 and 1000")
    if before < 0:
        raise web.HTTPBadRequest(reason="before must not be negative")
    outbox = request.app[OUTBOX_KEY]
    loop = asyncio.get_running_loop()
    rows = await loop.run_in_executor(
        None, lambda: outbox.rows(state=state, pbx_call_id=q.get("pbx_call_id", ""),
                                  before_id=before, limit=limit))
    counts = await loop.run_in_executor(None, outbox.counts)
    more = rows[-1]["id"] if len(rows) == limit else None
    return web.json_response({"counts": counts, "webhooks": rows, "next_before": more})


async def retry_webhook(request: web.Request) -> web.Response:
    """``POST /api/webhooks/<id>/retry``: 200 with the row, 404 unknown id, 409 not failed
    or given up."""
    text = request.match_info["id"]
    if not text.isdigit():
        raise web.HTTPNotFound(reason="no such webhook")
    result = await request.app[OUTBOX_KEY].requeue(int(text))
    if result == "unknown":
        raise web.HTTPNotFound(reason="no such webhook")
    if isinstance(result, str):
        raise web.HTTPConflict(reason=f"webhook is {result}; only failed or given_up events "
                                      "can be re-queued")
    return web.json_response({"webhook": result})


def add_routes(app: web.Application, outbox: WebhookOutbox) -> None:
    """Mount the outbox API on ``app``."""
    app[OUTBOX_KEY] = outbox
    app.router.add_get("/api/webhooks", list_webhooks)
    app.router.add_post("/api/webhooks/{id}/retry", retry_webhook)
