"""POST /click-to-call, POST /api/calls and the /api bearer auth through the real aiohttp app
(an in-process server on 127.0.0.1, a real Switch for its ban tracker, a fake origination and
a fake clock): every answer's status code and JSON body, the three body encodings, the
token check and the ban it feeds, the disabled endpoint, error_codes=false."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

import softpbx.crm.click_to_call as c2c
from softpbx.config import Config, load_config
from softpbx.core.events import OriginateRefused
from softpbx.core.switch import Switch
from softpbx.http.app import make_app
from softpbx.http.click_to_call import api_auth_required

SAMPLE = Path(__file__).resolve().parents[2] / "sip_profiles"
TOKEN = "crm-s3cret"
API_TOKEN = "api-k3y"
CALL_ID = "out_" + "ab" * 20
T = TypeVar("T")
Client = TestClient[Any, Any]


def config(*overrides: str, **http: Any) -> Config:
    """The shipped sample with click-to-call on, a ban after 3 failures, and ``overrides``."""
    cfg = load_config(SAMPLE, [f"crm.click_to_call_token={TOKEN}", "auth.max_failures=3",
                               *overrides])
    if http:  # a config object, as a non-loopback http_ip must not be bound by a unit test
        cfg = dataclasses.replace(cfg, http=dataclasses.replace(cfg.http, **http))
    return cfg


class FakeOriginate:
    """Records every origination; answers ``CALL_ID`` or the refusal/exception it is given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, bool]] = []
        self.answer: str | OriginateRefused | Exception = CALL_ID

    def __call__(self, extension: str, number: str, *, caller_name: str = "",
                 auto_answer: bool = False) -> str | OriginateRefused:
        self.calls.append((extension, number, caller_name, auto_answer))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class Rig:
    """The app under test, its fake clock and fake origination."""

    def __init__(self, cfg: Config, *, originate: bool = True) -> None:
        self.now = 1000.0
        self.switch = Switch(config=cfg)
        self.originate = FakeOriginate()
        self.app = make_app(switch=self.switch, clock=lambda: self.now, cdr_fetch=lambda n: [],
                            recording_lookup=lambda d: None,
                            originate=self.originate if originate else None)

    def run(self, scenario: Callable[[Client], Awaitable[T]]) -> T:
        async def go() -> T:
            async with TestClient(TestServer(self.app, host="127.0.0.1")) as client:
                return await scenario(client)

        return asyncio.run(go())


async def click(client: Client, data: Any = None, *, token: str | None = TOKEN,
                path: str = "/click-to-call", method: str = "POST",
                **kw: Any) -> tuple[int, str, str]:
    """(status, Content-Type, body text) of one request."""
    headers = dict(kw.pop("headers", {}))
    if token is not None:
        headers["x-pbx-authentication"] = token
    async with client.request(method, path, data=data, headers=headers, **kw) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


def ok_body(call_id: str = CALL_ID) -> str:
    return '{"status":"1","pbx_call_id":"' + call_id + '"}'


# --------------------------------------------------------------------------- success


def test_urlencoded_click_places_the_call_and_answers_status_1() -> None:
    rig = Rig(config())
    status, ctype, body = rig.run(lambda c: click(c, {"from": "101", "to": "+7 (916) 123-45-67",
                                                      "name": "Ivanov Ivan"}))
    assert status == 200 and ctype.startswith("application/json")
    assert body == ok_body()  # the spec's {"status":"1"} first, compact, then the call id
    assert rig.originate.calls == [("101", "+79161234567", "Ivanov Ivan", False)]


def test_multipart_and_json_and_bare_bodies_are_read() -> None:
    rig = Rig(config("crm.click_to_call_min_interval_s=0", "crm.click_to_call_auto_answer=true"))

    async def scenario(c: Client) -> list[tuple[int, str, str]]:
        form = aiohttp.FormData()
        form.add_field("from", "101")
        form.add_field("to", "8 916 000-00-01")
        form.add_field("attachment", b"\x00\x01", filename="x.bin")  # forces multipart, ignored
        out = [await click(c, form)]
        out.append(await click(c, json=({"from": 101, "to": 89160000002})))
        out.append(await click(c, json=({"from": "101", "to": "89160000003", "name": None})))
        # No Content-Type at all (a hand-written CRM): read as urlencoded.
        out.append(await click(c, b"from=101&to=89160000004", skip_auto_headers=["Content-Type"]))
        # A repeated field keeps its first value.
        out.append(await click(c, b"from=101&to=89160000005&to=1",
                               headers={"Content-Type": "application/x-www-form-urlencoded"}))
        return out

    answers = rig.run(scenario)
    assert [a[0] for a in answers] == [200] * 5 and all(a[2] == ok_body() for a in answers)
    assert [call[1] for call in rig.originate.calls] == [
        "89160000001", "89160000002", "89160000003", "89160000004", "89160000005"]
    assert all(call[3] is True for call in rig.originate.calls)  # click_to_call_auto_answer


def test_the_path_is_configurable() -> None:
    rig = Rig(config("crm.click_to_call_path=/pbx/v1/c2c"))

    async def scenario(c: Client) -> tuple[int, int]:
        moved = await click(c, {"from": "101", "to": "1"}, path="/pbx/v1/c2c")
        old = await click(c, {"from": "101", "to": "1"})
        return moved[0], old[0]

    assert rig.run(scenario) == (200, 404)


# --------------------------------------------------------------------------- refusals


def refusal(status: int, error_part: str) -> Callable[[tuple[int, str, str]], None]:
    def check(answer: tuple[int, str, str]) -> None:
        got_status, ctype, body = answer
        assert got_status == status, body
        assert ctype.startswith("application/json")
        data = json.loads(body)
        assert list(data) == ["status", "error"] and data["status"] == "0", body
        assert error_part in data["error"], body
    return check


BAD_REQUESTS: list[tuple[str, dict[str, Any], int, str]] = [
    ("missing from", {"data": {"to": "123"}}, 400, "'from'"),
    ("missing to", {"data": {"from": "101"}}, 400, "'to'"),
    ("empty to", {"data": {"from": "101", "to": " "}}, 400, "'to'"),
    ("malformed to", {"data": {"from": "101", "to": "+7 916 abc"}}, 400, "malformed field 'to'"),
    ("malformed from", {"data": {"from": "1 0 1", "to": "1"}}, 400, "malformed field 'from'"),
    ("json array", {"json": ["101", "123"]}, 400, "JSON body must be an object"),
    ("json nested", {"json": {"from": {"x": 1}, "to": "1"}}, 400, "'from'"),
    ("bad json", {"data": b"{from:", "headers": {"Content-Type": "application/json"}},
     400, "unreadable body"),
    ("deep json", {"data": b"[" * 60000, "headers": {"Content-Type": "application/json"}},
     400, "unreadable body"),
    ("not utf-8", {"data": b"from=101&to=\xff\xfe",
                   "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
     400, "unreadable body"),
    ("unknown charset", {"data": b"from=101&to=1", "headers": {
        "Content-Type": "application/x-www-form-urlencoded; charset=klingon"}},
     400, "unreadable body"),
    ("broken multipart", {"data": b"--zz\r\nno headers here", "headers": {
        "Content-Type": "multipart/form-data; boundary=zz"}}, 400, "unreadable body"),
    ("unterminated multipart", {"data": b'--zz\r\nContent-Disposition: form-data; name="from"'
                                        b"\r\n\r\n101", "headers": {
        "Content-Type": "multipart/form-data; boundary=zz"}}, 400, "unreadable body"),
    ("wrong boundary", {"data": b"--yy\r\n\r\n--yy--\r\n", "headers": {
        "Content-Type": "multipart/form-data; boundary=zz"}}, 400, "unreadable body"),
    ("no boundary", {"data": b"--yy\r\n\r\n--yy--\r\n", "headers": {
        "Content-Type": "multipart/form-data"}}, 400, "unreadable body"),
    ("xml", {"data": b"<from>101</from>", "headers": {"Content-Type": "text/xml"}},
     400, "unsupported Content-Type"),
    ("too large", {"data": {"from": "101", "to": "1", "pad": "x" * 70_000}}, 400, "too large"),
]


@pytest.mark.parametrize(("what", "kw", "status", "error"), BAD_REQUESTS,
                         ids=[r[0] for r in BAD_REQUESTS])
def test_bad_requests_are_400_naming_the_field(what: str, kw: dict[str, Any], status: int,
                                               error: str) -> None:
    rig = Rig(config())
    refusal(status, error)(rig.run(lambda c: click(c, **kw)))
    assert rig.originate.calls == []


@pytest.mark.parametrize("refused", [
    OriginateRefused(404, "unknown extension 'from' = 999", "from"),
    OriginateRefused(409, "extension 'from' = 101 is not registered", "from"),
    OriginateRefused(429, "extension 'from' = 101 is already in a call", "from"),
    OriginateRefused(422, "no outbound route for 'to' = 123", "to"),
    OriginateRefused(503, "no media ports", ""),
], ids=lambda r: str(r.status))
def test_the_switchs_refusals_pass_through(refused: OriginateRefused) -> None:
    rig = Rig(config())
    rig.originate.answer = refused
    refusal(refused.status, refused.error)(rig.run(lambda c: click(c, {"from": "101",
                                                                       "to": "123"})))


def test_a_refused_click_does_not_count_towards_the_repeat_limit() -> None:
    rig = Rig(config())
    rig.originate.answer = OriginateRefused(409, "extension 'from' = 101 is not registered")

    async def scenario(c: Client) -> list[int]:
        first = await click(c, {"from": "101", "to": "1"})
        rig.originate.answer = CALL_ID
        second = await click(c, {"from": "101", "to": "1"})
        return [first[0], second[0]]

    assert rig.run(scenario) == [409, 200]


def test_a_repeated_click_within_the_interval_is_429() -> None:
    rig = Rig(config("crm.click_to_call_min_interval_s=5"))

    async def scenario(c: Client) -> list[tuple[int, str, str]]:
        out = [await click(c, {"from": "101", "to": "79160000001"})]
        rig.now += 1
        out.append(await click(c, {"from": "101", "to": "79160000001"}))  # same click
        out.append(await click(c, {"from": "101", "to": "79160000002"}))  # another number
        out.append(await click(c, {"from": "102", "to": "79160000002"}))  # another extension
        rig.now += 4
        out.append(await click(c, {"from": "101", "to": "79160000001"}))  # interval passed
        return out

    first, same, other, ext102, later = rig.run(scenario)
    assert first[0] == 200 and ext102[0] == 200 and later[0] == 200
    refusal(429, "repeated click")(same)
    refusal(429, "'from'")(other)
    assert len(rig.originate.calls) == 3


def test_a_crash_in_the_switch_is_a_json_500_and_the_server_goes_on() -> None:
    rig = Rig(config("crm.click_to_call_min_interval_s=0"))
    rig.originate.answer = RuntimeError("bug")

    async def scenario(c: Client) -> tuple[tuple[int, str, str], int]:
        crashed = await click(c, {"from": "101", "to": "1"})
        rig.originate.answer = CALL_ID
        return crashed, (await click(c, {"from": "101", "to": "1"}))[0]

    crashed, after = rig.run(scenario)
    refusal(500, "internal error")(crashed)
    assert after == 200


def test_without_an_origination_the_endpoint_answers_503() -> None:
    rig = Rig(config(), originate=False)
    refusal(503, "not available")(rig.run(lambda c: click(c, {"from": "101", "to": "1"})))


def test_other_methods_get_405_in_the_same_format() -> None:
    rig = Rig(config())

    async def scenario(c: Client) -> tuple[int, str, str, str]:
        async with c.get("/click-to-call", headers={"x-pbx-authentication": TOKEN}) as r:
            return r.status, r.headers["Content-Type"], await r.text(), r.headers["Allow"]

    status, ctype, body, allow = rig.run(scenario)
    refusal(405, "POST")((status, ctype, body))
    assert allow == "POST"


# --------------------------------------------------------------------------- token and ban


def test_bad_and_missing_tokens_get_the_same_401() -> None:
    rig = Rig(config())

    async def scenario(c: Client) -> list[tuple[int, str, str]]:
        fields = {"from": "101", "to": "1"}
        return [await click(c, fields, token="crm-s3creT"), await click(c, fields, token=None),
                await click(c, fields, token=""), await click(c, fields, token=TOKEN + "x")]

    answers = rig.run(scenario)
    for a in answers:
        refusal(401, "bad or missing token")(a)
    assert len({a[2] for a in answers}) == 1  # no hint which
    assert rig.originate.calls == []


def test_the_token_is_checked_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[bytes, bytes]] = []
    real = c2c.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(c2c.hmac, "compare_digest", spy)
    rig = Rig(config())
    rig.run(lambda c: click(c, {"from": "101", "to": "1"}, token="guess"))
    assert seen == [(b"guess", TOKEN.encode())]


def test_bad_tokens_log_the_fail2ban_line_and_ban_the_ip(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    rig = Rig(config())  # auth.max_failures = 3
    caplog.set_level(logging.WARNING, logger="softpbx.auth")

    async def scenario(c: Client) -> list[int]:
        fields = {"from": "101", "to": "1"}
        out = [(await click(c, fields, token="wrong"))[0] for _ in range(3)]
        out.append((await click(c, fields))[0])        # the right token, but banned now
        rig.now += rig.switch.config.auth.ban_time
        out.append((await click(c, fields))[0])        # the ban is over
        return out

    assert rig.run(scenario) == [401, 401, 401, 401, 200]
    assert len(rig.originate.calls) == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "softpbx.auth"]
    failures = [ln for ln in lines if ln.startswith("softpbx auth failure:")]
    assert len(failures) == 3  # the banned request is not checked, hence not logged
    assert all(re.fullmatch(r'softpbx auth failure: ip=127\.0\.0\.1 port=\d+ transport=http '
                            r'method=click-to-call user="" reason=bad_token', ln)
               for ln in failures), failures
    assert "softpbx auth ban: ip=127.0.0.1 for 300s after 3 failures" in lines
    assert not rig.switch.failures.is_banned("127.0.0.1", rig.now)  # over, as for SIP


def test_sip_failures_and_http_failures_share_one_ban() -> None:
    rig = Rig(config())
    for _ in range(2):  # two SIP digest failures from the same address...
        rig.switch.failures.record_failure("127.0.0.1", rig.now)

    async def scenario(c: Client) -> list[int]:
        fields = {"from": "101", "to": "1"}
        return [(await click(c, fields, token="wrong"))[0], (await click(c, fields))[0]]

    assert rig.run(scenario) == [401, 401]  # ...and one bad token: banned
    assert rig.switch.failures.is_banned("127.0.0.1", rig.now)


def test_an_empty_token_disables_the_endpoint() -> None:
    rig = Rig(config("crm.click_to_call_token="))

    async def scenario(c: Client) -> list[tuple[int, str, str]]:
        return [await click(c, {"from": "101", "to": "1"}, token=""),
                await click(c, {"from": "101", "to": "1"}, token=None),
                await click(c, {"from": "101", "to": "1"}, token="anything")]

    for a in rig.run(scenario):
        refusal(403, "disabled")(a)
    assert rig.originate.calls == []
    assert not rig.switch.failures.is_banned("127.0.0.1", rig.now)


def test_error_codes_false_answers_every_refusal_with_200() -> None:
    rig = Rig(config("crm.click_to_call_error_codes=false"))

    async def scenario(c: Client) -> list[tuple[int, str, str]]:
        out = [await click(c, {"from": "101", "to": "1"}, token="bad"),
               await click(c, {"to": "1"}),
               await click(c, {"from": "101", "to": "x"}),
               await click(c, method="GET")]
        rig.originate.answer = OriginateRefused(404, "unknown extension 'from' = 101", "from")
        out.append(await click(c, {"from": "101", "to": "1"}))
        rig.originate.answer = CALL_ID
        out.append(await click(c, {"from": "101", "to": "1"}))
        return out

    answers = rig.run(scenario)
    assert [a[0] for a in answers] == [200] * 6
    assert [json.loads(a[2])["status"] for a in answers] == ["0"] * 5 + ["1"]
    assert "unknown extension" in answers[4][2]
    disabled = Rig(config("crm.click_to_call_token=", "crm.click_to_call_error_codes=false"))
    status, _, body = disabled.run(lambda c: click(c, {"from": "101", "to": "1"}))
    assert status == 200 and "disabled" in body


# --------------------------------------------------------------------------- /api auth


async def api(client: Client, path: str = "/api/status", method: str = "GET",
              auth: str | None = None, **kw: Any) -> tuple[int, dict[str, Any], str]:
    headers = {"Authorization": auth} if auth is not None else {}
    headers.update(kw.pop("headers", {}))
    async with client.request(method, path, headers=headers, **kw) as r:
        return r.status, json.loads(await r.text()), r.headers.get("WWW-Authenticate", "")


def test_loopback_without_a_token_leaves_the_api_open() -> None:
    cfg = config()
    assert not api_auth_required(cfg)
    status, body, _ = Rig(cfg).run(lambda c: api(c))
    assert status == 200 and "calls" in body


def test_non_loopback_api_needs_the_bearer_token() -> None:
    cfg = config("auth.max_failures=100", http_ip="0.0.0.0", api_token=API_TOKEN)
    assert api_auth_required(cfg)
    rig = Rig(cfg)

    async def scenario(c: Client) -> dict[str, Any]:
        return {
            "none": await api(c),
            "wrong": await api(c, auth="Bearer api-k3Y"),
            "basic": await api(c, auth=f"Basic {API_TOKEN}"),
            "bare": await api(c, auth=API_TOKEN),
            "right": await api(c, auth=f"Bearer {API_TOKEN}"),
            "case": await api(c, auth=f"bearer  {API_TOKEN}"),
            "escaped": await api(c, "/%61pi/status"),
            "unknown": await api(c, "/api/nothing-here"),
            "unknown_ok": await api(c, "/api/nothing-here", auth=f"Bearer {API_TOKEN}"),
            "cdr": await api(c, "/api/cdr", auth=f"Bearer {API_TOKEN}"),
            # Recording links and click-to-call keep their own rules (no bearer asked).
            "rec": await api(c, "/rec/" + "A" * 32 + ".mp3"),
            "c2c": await click(c, {"from": "101", "to": "1"}),
        }

    got = rig.run(scenario)
    for key in ("none", "wrong", "basic", "bare", "escaped", "unknown"):
        status, body, challenge = got[key]
        assert status == 401, key
        assert body == {"error": "bad or missing bearer token (Authorization: Bearer "
                                 "<http.api_token>)", "status": 401}
        assert challenge == 'Bearer realm="softpbx"'  # RFC 6750 §3
    assert got["right"][0] == 200 and got["case"][0] == 200 and got["cdr"][0] == 200
    assert got["unknown_ok"][0] == 404
    assert got["rec"][0] == 404 and got["rec"][1]["error"] == "no such recording"
    assert got["c2c"][0] == 200


def test_bad_bearer_tokens_feed_the_ban() -> None:
    rig = Rig(config(http_ip="0.0.0.0", api_token=API_TOKEN))

    async def scenario(c: Client) -> list[int]:
        out = [(await api(c, auth="Bearer nope"))[0] for _ in range(3)]
        out.append((await api(c, auth=f"Bearer {API_TOKEN}"))[0])  # banned: not checked
        return out

    assert rig.run(scenario) == [401] * 4
    assert rig.switch.failures.is_banned("127.0.0.1", rig.now)


def test_without_credentials_a_non_loopback_api_answers_loopback_only() -> None:
    # No api_token and no console login: /api/* answers loopback clients on a loopback Host
    # only (a rebound DNS name pointing at 127.0.0.1 is refused too).
    rig = Rig(config(http_ip="0.0.0.0", api_token=""))

    async def scenario(c: Client) -> list[tuple[int, dict[str, Any], str]]:
        return [await api(c), await api(c, headers={"Host": "evil.example:8080"})]

    local, rebound = rig.run(scenario)
    assert local[0] == 200
    assert rebound[0] == 403 and "loopback clients only" in rebound[1]["error"]


def test_a_token_on_loopback_is_checked_too() -> None:
    rig = Rig(config(api_token=API_TOKEN))

    async def scenario(c: Client) -> list[int]:
        return [(await api(c))[0], (await api(c, auth=f"Bearer {API_TOKEN}"))[0]]

    assert rig.run(scenario) == [401, 200]


# --------------------------------------------------------------------------- POST /api/calls


def test_api_calls_is_the_same_origination_behind_the_api_auth() -> None:
    rig = Rig(config("crm.click_to_call_error_codes=false", http_ip="0.0.0.0",
                     api_token=API_TOKEN))
    bearer = f"Bearer {API_TOKEN}"

    async def scenario(c: Client) -> list[tuple[int, dict[str, Any], str]]:
        out = [await api(c, "/api/calls", "POST", json={"from": "101", "to": "1"})]
        out.append(await api(c, "/api/calls", "POST", bearer,
                             json={"from": "101", "to": "+7 916 1", "name": "Petrov"}))
        out.append(await api(c, "/api/calls", "POST", bearer, json={"from": "101", "to": "2"}))
        out.append(await api(c, "/api/calls", "POST", bearer, json={"from": "101"}))
        out.append(await api(c, "/api/calls", auth=bearer))  # GET: the list of calls still
        return out

    unauth, placed, repeated, missing, listing = rig.run(scenario)
    assert unauth[0] == 401
    assert placed[:2] == (200, {"status": "1", "pbx_call_id": CALL_ID})
    # The console gets the fitting status even with error_codes=false (the CRM's setting),
    # and shares the repeat limit with the CRM's door.
    assert repeated[0] == 429 and repeated[1]["status"] == "0"
    assert missing[0] == 400 and "'to'" in missing[1]["error"]
    assert listing[0] == 200 and listing[1] == {"calls": []}
    assert rig.originate.calls == [("101", "+79161", "Petrov", False)]


def test_api_calls_does_not_need_the_crm_token() -> None:
    # The console's door has its own auth; the CRM's token being empty (the CRM door off)
    # does not close it.
    rig = Rig(config("crm.click_to_call_token="))
    status, body, _ = rig.run(lambda c: api(c, "/api/calls", "POST",
                                            json={"from": "101", "to": "5"}))
    assert status == 200 and body["status"] == "1"
