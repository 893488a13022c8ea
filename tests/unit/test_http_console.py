"""The console's access rules and JSON endpoints through the real aiohttp app (an in-process
server on 127.0.0.1, a real Switch, fake console sources): login form, session cookie, CSRF
token and Origin checks, open-redirect refusal, bearer token, loopback-only without any
credential, DELETE /api/calls/<id>, /api/cdr filters, the event stream's first events."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from softpbx.core.switch import Switch
from softpbx.http.app import make_app
from softpbx.http.console import ConsoleSources
from tests.unit.test_http_click_to_call import Client, FakeOriginate, config

USER, PASSWORD, TOKEN = "admin", "pa55-word", "tok-3n"


class Rig:
    def __init__(self, *overrides: str) -> None:
        self.switch = Switch(config=config(*overrides))
        self.searches: list[dict[str, object]] = []
        self.hung_up: list[str] = []
        sources = ConsoleSources(
            cdr_search=self._search, cdr_mark=lambda: (0, 0.0),
            recording_path=lambda call_id: None, store_size=lambda: 4096,
            hang_up=self._hang_up, listeners=["SIP 127.0.0.1:5060 (udp)"], version="9.9")
        self.app = make_app(switch=self.switch, clock=lambda: 1000.0, cdr_fetch=lambda n: [],
                            recording_lookup=lambda d: None, originate=FakeOriginate(),
                            console_sources=sources)

    def _search(self, **filters: object) -> dict[str, object]:
        self.searches.append(filters)
        return {"cdr": [{"call_id": "int_1", "recording_status": "ready"},
                        {"call_id": "int_2", "recording_status": None}], "total": 2}

    def _hang_up(self, call_id: str) -> bool:
        self.hung_up.append(call_id)
        return call_id == "int_live"

    def run(self, scenario: Any) -> Any:
        async def go() -> Any:
            async with TestClient(TestServer(self.app, host="127.0.0.1")) as client:
                return await scenario(client)

        return asyncio.run(go())


def origin(c: Client) -> dict[str, str]:
    return {"Origin": str(c.make_url("")).rstrip("/")}


async def log_in(c: Client, password: str = PASSWORD, next_: str = "/console/") -> Any:
    return await c.post("/login", data={"user": USER, "password": password, "next": next_},
                        headers=origin(c), allow_redirects=False)


def test_login_gives_a_strict_httponly_cookie_and_csrf_guards_changes() -> None:
    rig = Rig(f"http.admin_user={USER}", f"http.admin_password={PASSWORD}")

    async def scenario(c: Client) -> dict[str, Any]:
        out: dict[str, Any] = {}
        r = await c.get("/console/", allow_redirects=False)
        out["anon_page"] = (r.status, r.headers.get("Location"))
        out["anon_api"] = (await c.get("/api/status")).status
        out["anon_crm"] = (await c.get("/crm/", allow_redirects=False)).status
        r = await log_in(c, "wrong")
        out["wrong"] = (r.status, r.headers.get("Location"), len(c.session.cookie_jar))
        r = await log_in(c)
        out["right"] = (r.status, r.headers.get("Location"), r.headers.get("Set-Cookie", ""))
        out["status"] = await (await c.get("/api/status")).json()
        csrf = (await (await c.get("/api/session")).json())["csrf"]
        out["no_token"] = (await c.delete("/api/calls/int_live", headers=origin(c))).status
        out["bad_origin"] = (await c.delete("/api/calls/int_live", headers={
            "Origin": "http://evil.example", "X-CSRF-Token": csrf})).status
        out["no_origin"] = (await c.delete("/api/calls/int_live",
                                           headers={"X-CSRF-Token": csrf})).status
        ok = {**origin(c), "X-CSRF-Token": csrf}
        r = await c.delete("/api/calls/int_live", headers=ok)
        out["hang_up"] = (r.status, await r.json())
        out["gone"] = (await c.delete("/api/calls/int_none", headers=ok)).status
        r = await c.post("/logout", headers=origin(c), allow_redirects=False)
        out["logout"] = r.status
        out["after"] = (await c.get("/api/status")).status
        return out

    got = rig.run(scenario)
    assert got["anon_page"] == (303, "/login?next=/console/")
    assert got["anon_api"] == 401 and got["anon_crm"] == 303
    assert got["wrong"][0] == 303 and "failed=1" in got["wrong"][1] and got["wrong"][2] == 0
    status, location, cookie = got["right"]
    assert (status, location) == (303, "/console/")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert got["status"]["version"] == "9.9" and got["status"]["store_bytes"] == 4096
    assert got["no_token"] == 403 and got["bad_origin"] == 403 and got["no_origin"] == 403
    assert got["hang_up"] == (200, {"hung_up": "int_live"})
    assert got["gone"] == 404
    assert rig.hung_up == ["int_live", "int_none"]  # the refused ones never reached the switch
    assert got["logout"] == 303 and got["after"] == 401


def test_login_refuses_open_redirects_and_cross_origin_posts() -> None:
    rig = Rig(f"http.admin_user={USER}", f"http.admin_password={PASSWORD}")

    async def scenario(c: Client) -> list[Any]:
        out = [(await log_in(c, next_=n)).headers.get("Location")
               for n in ("//evil.example/", "https://evil.example/", "/\\evil", "/console/#x")]
        r = await c.post("/login", data={"user": USER, "password": PASSWORD},
                         headers={"Origin": "http://evil.example"}, allow_redirects=False)
        out.append(r.status)
        page = await (await c.get("/login?next=/x%22%3E%3Cscript%3E")).text()
        out.append(page)
        return out

    *targets, cross, page = rig.run(scenario)
    assert targets == ["/console/", "/console/", "/console/", "/console/#x"]
    assert cross == 403
    assert "<script>" not in page and "&quot;&gt;&lt;script&gt;" in page


def test_bearer_token_opens_the_console_api_and_the_inspector_without_csrf() -> None:
    rig = Rig(f"http.api_token={TOKEN}")
    bearer = {"Authorization": f"Bearer {TOKEN}"}

    async def scenario(c: Client) -> list[int]:
        return [(await c.delete("/api/calls/int_live", headers=bearer)).status,
                (await c.delete("/api/calls/int_live")).status,
                (await c.get("/console/", headers=bearer)).status,
                (await c.get("/api/cdr", headers={"Authorization": "Bearer nope"})).status]

    assert rig.run(scenario) == [200, 401, 200, 401]


def test_without_credentials_a_loopback_browser_gets_a_session_and_csrf_applies() -> None:
    rig = Rig()

    async def scenario(c: Client) -> list[Any]:
        page = await c.get("/console/")
        csrf = (await (await c.get("/api/session")).json())["csrf"]
        return [page.status, "SameSite=Strict" in page.headers.get("Set-Cookie", ""), bool(csrf),
                (await c.delete("/api/calls/int_live", headers=origin(c))).status,
                (await c.delete("/api/calls/int_live",
                                headers={**origin(c), "X-CSRF-Token": csrf})).status,
                (await c.get("/api/status", headers={"Host": "rebound.example"})).status]

    assert rig.run(scenario) == [200, True, True, 403, 200, 403]


def test_cdr_filters_are_checked_and_passed_on() -> None:
    rig = Rig()

    async def scenario(c: Client) -> list[Any]:
        ok = await c.get("/api/cdr", params={
            "since": "2026-01-02", "until": "1767400000", "extension": "101", "number": "916",
            "direction": "inbound", "disposition": "no answer", "limit": "10", "offset": "20"})
        bad = [(await c.get("/api/cdr", params=p)).status for p in (
            {"direction": "sideways"}, {"disposition": "x"}, {"limit": "0"}, {"offset": "-1"},
            {"since": "yesterday"})]
        return [ok.status, await ok.json(), bad]

    status, body, bad = rig.run(scenario)
    assert status == 200 and body["total"] == 2
    assert [r["recording_url"] for r in body["cdr"]] == ["/api/recordings/int_1.mp3", None]
    assert rig.searches == [{"since": 1767312000.0, "until": 1767400000.0, "extension": "101",
                             "number": "916", "direction": "inbound",
                             "disposition": "no answer", "limit": 10, "offset": 20}]
    assert bad == [400] * 5


def test_event_stream_sends_the_state_then_nothing_until_it_changes() -> None:
    rig = Rig()

    async def scenario(c: Client) -> list[str]:
        names: list[str] = []
        async with c.get("/api/events/stream") as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            while len(names) < 4:
                line = (await asyncio.wait_for(r.content.readline(), 3)).decode()
                if line.startswith("event: "):
                    names.append(line[7:].strip())
                elif line.startswith("data: ") and names[-1] == "status":
                    assert json.loads(line[6:])["listeners"] == ["SIP 127.0.0.1:5060 (udp)"]
            for _ in range(2):  # the last event's data line and the blank line ending it
                await asyncio.wait_for(r.content.readline(), 3)
            # Nothing changed: the next tick sends nothing (a read times out).
            try:
                await asyncio.wait_for(r.content.readline(), 1.5)
                names.append("unexpected")
            except TimeoutError:
                pass
        return names

    assert rig.run(scenario) == ["registrations", "calls", "status", "cdr"]
