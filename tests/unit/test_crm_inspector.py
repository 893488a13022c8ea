"""The built-in CRM inspector and the /api/webhooks endpoints, through aiohttp's test client
(the outbox behind the API is a small stand-in; the real one is in test_outbox.py and the
integration tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from softpbx.crm.forms import encode_form
from softpbx.http.inspector import CrmInspector
from softpbx.http.webhooks import add_routes

T = TypeVar("T")
START = (("event", "NOTIFY_START"), ("call_start", "2026-12-02 12:00:00"),
         ("pbx_call_id", "in_" + "1" * 40), ("caller_id", "<script>alert(1)</script>"),
         ("called_did", "74950000000"))


def serve(app: web.Application, scenario: Callable[[TestClient[Any, Any]], Awaitable[T]]) -> T:
    async def run() -> T:
        async with TestClient(TestServer(app)) as client:
            return await scenario(client)
    return asyncio.run(run())


def inspector_app() -> tuple[web.Application, CrmInspector]:
    app = web.Application()
    insp = CrmInspector(keep=3)
    app.add_routes(insp.routes())
    return app, insp


async def post_event(client: TestClient[Any, Any], fields: tuple[tuple[str, str], ...],
                     event_id: str) -> web.Response:
    body, ctype = encode_form(fields)
    return await client.post("/crm/webhook", data=body,
                             headers={"Content-Type": ctype, "X-Event-Id": event_id})


def test_the_answer_set_goes_to_the_next_notify_start_only() -> None:
    app, insp = inspector_app()

    async def scenario(client: TestClient[Any, Any]) -> None:
        r = await client.post("/crm/answer", data={"mode": "answer", "caller_name": "Иванов Иван",
                                                    "redirect": "102", "return_timeout": "15"},
                              headers={"Accept": "application/json"})
        assert (await r.json()) == {"next_answer": {"caller_name": "Иванов Иван",
                                                    "redirect": "102", "return_timeout": 15}}
        end = (("event", "NOTIFY_END"), ("pbx_call_id", "in_x"))
        assert (await (await post_event(client, end, "in_x.2")).text()) == ""
        r = await post_event(client, START, "in_1.1")
        assert r.status == 200 and (await r.json())["caller_name"] == "Иванов Иван"
        r = await post_event(client, START, "in_2.1")
        assert (await r.text()) == ""  # used once
        # A browser form: back to the page.
        r = await client.post("/crm/answer", data={"mode": "hangup"}, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/crm/"
        assert insp.next_answer == {"hangup": 1}
        r = await client.post("/crm/answer", data={"mode": "none"}, allow_redirects=False)
        assert insp.next_answer == {}

    serve(app, scenario)


def test_feed_is_newest_first_with_every_field_and_duplicates_marked() -> None:
    app, insp = inspector_app()

    async def scenario(client: TestClient[Any, Any]) -> None:
        for i in range(4):
            await post_event(client, START, f"in_1.{i % 2}")
        doc = await (await client.get("/crm/events.json")).json()
        assert doc["seq"] == 4 and [e["seq"] for e in doc["events"]] == [4, 3, 2]  # keep=3
        newest = doc["events"][0]
        assert newest["fields"] == [list(f) for f in START]
        assert newest["content_type"] == "multipart/form-data" and newest["duplicate"]
        after = await (await client.get("/crm/events.json?after=3")).json()
        assert [e["seq"] for e in after["events"]] == [4]
        assert (await client.get("/crm/events.json?after=x")).status == 400

    serve(app, scenario)


def test_the_page_never_puts_event_text_into_html() -> None:
    """Events reach the page only through the JSON feed and textContent: the page itself is
    static, so a caller_id of <script> cannot become markup."""
    app, _ = inspector_app()

    async def scenario(client: TestClient[Any, Any]) -> None:
        await post_event(client, START, "in_1.1")
        r = await client.get("/crm/")
        page = await r.text()
        assert r.status == 200 and r.content_type == "text/html"
        assert "alert(1)" not in page and "innerHTML" not in page
        assert "textContent" in page
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
        assert "http" not in page.split("<script>")[1].split("fetch(")[0]  # no CDN, no remote
        r = await client.get("/crm", allow_redirects=False)
        assert r.status == 302 and r.headers["Location"] == "/crm/"

    serve(app, scenario)


class FakeOutbox:
    def __init__(self) -> None:
        self.asked: list[dict[str, Any]] = []

    def rows(self, *, state: str, pbx_call_id: str, before_id: int,
             limit: int) -> list[dict[str, object]]:
        self.asked.append({"state": state, "pbx_call_id": pbx_call_id, "before_id": before_id,
                           "limit": limit})
        return [{"id": i} for i in range(10, 10 - limit, -1)]

    def counts(self) -> dict[str, int]:
        return {"pending": 1}

    async def requeue(self, row_id: int) -> dict[str, object] | str:
        return {1: "unknown", 2: "delivered"}.get(row_id, {"id": row_id, "state": "pending"})


def test_webhooks_api_filters_pages_and_requeues() -> None:
    app = web.Application()
    fake = FakeOutbox()
    add_routes(app, fake)

    async def scenario(client: TestClient[Any, Any]) -> None:
        r = await client.get("/api/webhooks?state=failed&pbx_call_id=in_a&limit=2&before=11")
        doc = await r.json()
        assert doc == {"counts": {"pending": 1}, "webhooks": [{"id": 10}, {"id": 9}],
                       "next_before": 9}
        assert fake.asked[-1] == {"state": "failed", "pbx_call_id": "in_a", "before_id": 11,
                                  "limit": 2}
        assert (await client.get("/api/webhooks?state=lost")).status == 400
        assert (await client.get("/api/webhooks?limit=0")).status == 400
        assert (await client.post("/api/webhooks/1/retry")).status == 404
        assert (await client.post("/api/webhooks/abc/retry")).status == 404
        r = await client.post("/api/webhooks/2/retry")
        assert r.status == 409
        r = await client.post("/api/webhooks/7/retry")
        assert (await r.json()) == {"webhook": {"id": 7, "state": "pending"}}

    serve(app, scenario)
