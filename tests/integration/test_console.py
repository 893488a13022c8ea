"""The web console in a real headless browser (Debian's chromium driven by Playwright) against
a real softpbx process, real SIP phones (SIPp and the test phone), RTP and a real aiohttp CRM.

One softpbx for the module with a console login and an API token (the test's own look-ups use
the token). Webhook retries are 10 minutes apart but an event is given up after 3.6 s: an
event the CRM answered 500 to gets one more attempt at the give-up time, then only the
console's retry button sends it again. Every page is screenshotted into the module's tmp dir.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.crm import CrmServer
from tests.support.phone import Phone, make_sdp
from tests.support.rtp import RtpEndpoint
from tests.support.server import HOST, PbxProcess
from tests.support.sipp import run_sipp

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
ADMIN, PASSWORD, TOKEN = "admin", "s3cret-Console", "api-T0ken-for-tests"
UI_TIMEOUT_MS = 8000
EVIL_NAME = "<script>window.__pwned=1</script><img src=x onerror=window.__pwned=2>"


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[test]'", pytrace=False)
    if shutil.which(CHROMIUM) is None:
        pytest.fail("chromium is missing: apt-get install chromium", pytrace=False)
    return sync_playwright


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crm() -> Iterator[CrmServer]:
    with CrmServer() as server:
        yield server


@pytest.fixture(scope="module")
def pbx(crm: CrmServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxProcess]:
    proc = PbxProcess.create(tmp_path_factory.mktemp("console-pbx"), overrides={
        "http.admin_user": ADMIN, "http.admin_password": PASSWORD, "http.api_token": TOKEN,
        "crm.webhook_url": crm.url, "crm.retry_min_s": "600", "crm.retry_max_s": "600",
        "crm.give_up_after_h": "0.001",
        "crm.answer_timeout_ms": "300", "crm.internal_calls": "true",
        # The caller name the console shows for 101's internal calls: a script, to be inert.
        "directory.101.effective_caller_id_name": EVIL_NAME})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with _playwright()() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture()
def page(browser: Any, pbx: PbxProcess) -> Iterator[Any]:
    """A logged-in console page (a fresh browser context: its own cookie jar)."""
    ctx = browser.new_context(base_url=f"http://{HOST}:{pbx.http_port}",
                              viewport={"width": 1280, "height": 800})
    ctx.set_default_timeout(UI_TIMEOUT_MS)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    login(pg)
    try:
        yield pg
        assert errors == [], errors
    finally:
        ctx.close()


def login(pg: Any) -> None:
    pg.goto("/console/")
    pg.wait_for_url("**/login?next=/console/")
    pg.fill("input[name=user]", ADMIN)
    pg.fill("input[name=password]", PASSWORD)
    pg.click("button[type=submit]")
    pg.wait_for_url("**/console/")
    pg.wait_for_selector("#live.on")


# -- helpers ------------------------------------------------------------------------------------
def api(pbx: PbxProcess, path: str, method: str = "GET") -> Any:
    req = urllib.request.Request(f"http://{HOST}:{pbx.http_port}{path}", method=method,
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - 127.0.0.1
        return json.loads(resp.read())


def wait(pred: Callable[[], Any], what: str, timeout: float = 8.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


def goto_tab(pg: Any, name: str) -> None:
    pg.click(f"#tabs a[data-tab={name}]")
    pg.wait_for_selector(f"section#{name}.active")


def call_rows(pg: Any) -> Any:
    return pg.locator("#call-body tr")


class Talk:
    """102 registered and answering, 101 calling it; ``with`` ends the phones."""

    def __init__(self, pbx: PbxProcess, *, display: str = "", answer: bool = True) -> None:
        self.bob = Phone(user="102", password="secret102", pbx=pbx.sip_addr)
        self.alice = Phone(user="101", password="secret101", pbx=pbx.sip_addr, display=display)
        self.rtp_a, self.rtp_b = RtpEndpoint(), RtpEndpoint()
        assert self.bob.register().status == 200
        self.call = self.alice.call("102", sdp=make_sdp(self.rtp_a.port))
        self.inc = self.bob.wait_invite()
        self.inc.ring()
        if answer:
            self.inc.answer(make_sdp(self.rtp_b.port))
            assert self.call.wait_final().status == 200

    def audio(self, seconds: float) -> None:
        """PCMU both ways through the relay for ``seconds`` (so the call records audio)."""
        n = int(seconds / 0.02)
        threads = [threading.Thread(target=self.rtp_a.send_pcmu, args=(self.call.remote_media, n)),
                   threading.Thread(target=self.rtp_b.send_pcmu, args=(self.inc.remote_media, n))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 5)

    def __enter__(self) -> Talk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bob.unregister(everything=True)
        for x in (self.alice, self.bob, self.rtp_a, self.rtp_b):
            x.close()


def no_calls(pbx: PbxProcess) -> None:
    wait(lambda: api(pbx, "/api/status")["calls"] == 0, "no call left")


# -- tests --------------------------------------------------------------------------------------
def test_login_is_required(browser: Any, pbx: PbxProcess, shots: Path) -> None:
    """No cookie: the console redirects to the form, the API answers 401; a wrong password is
    refused; the right one gives an HttpOnly SameSite=Strict cookie and the live console."""
    ctx = browser.new_context(base_url=f"http://{HOST}:{pbx.http_port}")
    ctx.set_default_timeout(UI_TIMEOUT_MS)
    try:
        pg = ctx.new_page()
        pg.goto("/console/")
        assert "/login?next=/console/" in pg.url
        pg.screenshot(path=shots / "login.png")
        for path in ("/api/status", "/api/calls", "/api/events/stream", "/crm/"):
            r = ctx.request.get(path, max_redirects=0)
            assert r.status == 401 if path != "/crm/" else r.status == 303, (path, r.status)
        pg.fill("input[name=user]", ADMIN)
        pg.fill("input[name=password]", "wrong")
        pg.click("button[type=submit]")
        pg.wait_for_url("**/login?failed=1**")
        assert pg.is_visible("#failed")
        assert ctx.cookies() == []
        pg.fill("input[name=user]", ADMIN)
        pg.fill("input[name=password]", PASSWORD)
        pg.click("button[type=submit]")
        pg.wait_for_url("**/console/")
        pg.wait_for_selector("#live.on")
        (cookie,) = ctx.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert ctx.request.get("/api/status").status == 200
        # A state-changing request without the session's CSRF token is refused.
        r = ctx.request.post("/api/calls", data={"from": "101", "to": "102"},
                             headers={"Origin": f"http://{HOST}:{pbx.http_port}"})
        assert r.status == 403 and "X-CSRF-Token" in r.json()["error"]
        r = ctx.request.delete("/api/calls/x", headers={"Origin": "http://evil.example"})
        assert r.status == 403
    finally:
        ctx.close()


def test_registration_appears_when_sipp_registers(page: Any, pbx: PbxProcess, sipp_bin: str,
                                                  tmp_path: Path, shots: Path) -> None:
    goto_tab(page, "registrations")
    run = run_sipp(sipp_bin, "reg_auth.xml", target=pbx.sip_addr, workdir=tmp_path / "sipp",
                   users=[("103", "secret103")])
    assert run.returncode == 0, run.describe()
    row = page.locator("#reg-body tr", has_text="sipp-integration")
    row.wait_for()
    cells = row.locator("td").all_text_contents()
    assert cells[0] == "103" and cells[2] == "UDP"
    assert cells[3] == f"{HOST}:{run.local_port}"
    # The expiry counts down in the browser (the server sends it once).
    first = cells[5]
    page.wait_for_function("t => document.querySelector('#reg-body tr td:nth-child(6)')"
                           ".textContent !== t", arg=first)
    page.screenshot(path=shots / "registrations.png")


def test_live_call_appears_and_leaves_after_bye(page: Any, pbx: PbxProcess, shots: Path) -> None:
    """An answered call shows caller, callee, direction, state, a ticking duration, the codec
    and recording on; the caller's BYE takes it off the page. The caller's name (101's
    caller-ID name) is a script: it is shown as text and never runs."""
    goto_tab(page, "calls")
    with Talk(pbx) as t:
        row = call_rows(page).first
        page.wait_for_selector("#call-body tr >> text=answered")
        cells = row.locator("td").all_text_contents()
        assert cells[0] == f"{EVIL_NAME} <101>"
        assert cells[1:4] == ["102", "internal", "answered"]
        assert cells[5] == "PCMU" and cells[6] == "on"
        page.wait_for_function("() => document.querySelector('#call-body tr td:nth-child(5)')"
                               ".textContent >= '0:02'")
        assert page.evaluate("() => window.__pwned") is None
        assert page.locator("#call-body script, #call-body img").count() == 0
        page.screenshot(path=shots / "calls.png")
        assert t.call.bye().status == 200
        page.wait_for_selector("#call-body tr", state="detached")
        assert page.is_visible("#call-empty")
    no_calls(pbx)


def test_hang_up_button_ends_the_call(page: Any, pbx: PbxProcess) -> None:
    goto_tab(page, "calls")
    with Talk(pbx) as t:
        page.locator("#call-body button", has_text="Hang up").click()
        # The switch sends BYE to both phones; the row goes.
        t.alice.wait_for(lambda m: getattr(m, "method", "") == "BYE", "BYE to the caller")
        t.bob.wait_for(lambda m: getattr(m, "method", "") == "BYE", "BYE to the callee")
        page.wait_for_selector("#call-body tr", state="detached")
    no_calls(pbx)


def test_cdr_audio_element_loads_the_recording(page: Any, pbx: PbxProcess, shots: Path) -> None:
    with Talk(pbx) as t:
        t.audio(1.5)
        assert t.call.bye().status == 200
        sip_call_id = t.call.call_id
    no_calls(pbx)
    rows = api(pbx, "/api/cdr?limit=20")["cdr"]
    call_id = next(r["call_id"] for r in rows if r["sip_call_id"] == sip_call_id)
    wait(lambda: any(r["call_id"] == call_id and r["recording_url"]
                     for r in api(pbx, "/api/cdr?limit=20")["cdr"]), "the recording ready")
    goto_tab(page, "cdr")
    page.fill("#cdr-filter input[name=extension]", "101")
    page.select_option("#cdr-filter select[name=disposition]", "answered")
    page.click("#cdr-filter button[type=submit]")
    audio = page.locator(f'#cdr-body tr[data-call="{call_id}"] audio')
    audio.wait_for()
    duration = page.wait_for_function(
        "el => el.readyState >= 1 && el.duration > 0 ? el.duration : 0",
        arg=audio.element_handle())
    assert 1.0 < duration.json_value() < 3.0
    link = page.locator(f'#cdr-body tr[data-call="{call_id}"] a[download]')
    assert link.get_attribute("href") == f"/api/recordings/{call_id}.mp3"
    page.screenshot(path=shots / "cdr.png")
    # The authenticated path needs the login like the rest of the API.
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{HOST}:{pbx.http_port}/api/recordings/{call_id}.mp3",
                               timeout=5)
    assert err.value.code == 401


def test_failed_webhook_is_resent_by_the_retry_button(page: Any, pbx: PbxProcess,
                                                      crm: CrmServer, shots: Path) -> None:
    crm.status = 500
    try:
        with Talk(pbx, answer=False) as t:
            t.inc.reject(486)
            t.call.wait_final()
        no_calls(pbx)
        failed = wait(lambda: api(pbx, "/api/webhooks?state=given_up")["webhooks"],
                      "a webhook given up after its 500s", timeout=10)
        row_id = failed[-1]["id"]
        assert failed[-1]["last_status"] == 500 and failed[-1]["attempts"] == 2
    finally:
        crm.status = 200
    seen = len(crm.snapshot())
    goto_tab(page, "webhooks")
    row = page.locator(f'#wh-body tr[data-webhook="{row_id}"]')
    row.wait_for()
    assert row.get_attribute("data-state") == "given_up"
    row.locator("details summary").click()
    page.screenshot(path=shots / "webhooks.png")
    row.locator("button", has_text="Retry").click()
    page.wait_for_selector(f'#wh-body tr[data-webhook="{row_id}"][data-state="delivered"]')
    got = crm.wait_for(lambda got: any(r.status == 200 for r in got[seen:]), "the re-sent event")
    assert any(r.status == 200 for r in got[seen:])


def test_status_and_inspector_pages(page: Any, pbx: PbxProcess, shots: Path) -> None:
    goto_tab(page, "status")
    page.wait_for_selector("#status-listeners li")
    listeners = page.locator("#status-listeners li").all_text_contents()
    assert any(f":{pbx.sip_port}" in x for x in listeners)
    assert any(f"HTTP {HOST}:{pbx.http_port}" in x for x in listeners)
    assert page.locator("#gw-body tr").count() >= 0
    page.screenshot(path=shots / "status.png")
    goto_tab(page, "crm")
    # crm.webhook_url is set in this module: the page says where the events go instead.
    assert page.is_visible("#crm-off")
    page.screenshot(path=shots / "crm.png")


def test_inspector_is_embedded_behind_the_login(browser: Any, pbx_factory: Any,
                                                shots: Path) -> None:
    """Without crm.webhook_url the built-in inspector is mounted: behind the same login,
    except the webhook receiver the outbox posts to."""
    other = pbx_factory(overrides={"http.admin_user": ADMIN, "http.admin_password": PASSWORD})
    base = f"http://{HOST}:{other.http_port}"
    ctx = browser.new_context(base_url=base, viewport={"width": 1280, "height": 800})
    ctx.set_default_timeout(UI_TIMEOUT_MS)
    try:
        for path in ("/crm/", "/crm/events.json"):
            assert ctx.request.get(path, max_redirects=0).status == 303, path
        assert ctx.request.post("/crm/answer", form={"mode": "hangup"},
                                max_redirects=0).status == 303
        # The receiver stays open to the outbox (a form it parses; no login asked).
        assert ctx.request.post("/crm/webhook", multipart={"event": "NOTIFY_TEST"}).status == 200
        pg = ctx.new_page()
        login(pg)
        goto_tab(pg, "crm")
        frame = pg.frame_locator("#crm-frame")
        frame.locator("body").wait_for()
        assert pg.locator("#crm-frame").get_attribute("src") == "/crm/"
        pg.screenshot(path=shots / "crm-inspector.png")
    finally:
        ctx.close()
