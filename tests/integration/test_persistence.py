"""Bindings live in SQLite: they survive a SIGTERM restart of the process with a sane expiry,
and a binding that lapses disappears, whether it lapses while the switch runs, after a
restart, or while the switch is down."""

from __future__ import annotations

import time

import pytest

from tests.conftest import PbxFactory
from tests.support.digest import authorization
from tests.support.server import HOST, PbxProcess
from tests.support.sip_client import SipClient, pick_challenge

pytestmark = pytest.mark.integration


def _register(pbx: PbxProcess, transport: str, user: str, *, expires: int) -> SipClient:
    """Register ``user`` from a fresh socket (left open: the binding names its port)."""
    c = SipClient(transport, pbx.sip_addr)
    _, ok = c.register(user, f"secret{user}", expires=expires,
                       extra=[("User-Agent", f"persist-{transport}")])
    assert ok.status == 200, ok
    return c


def _by_ext(pbx: PbxProcess) -> dict[str, dict[str, object]]:
    rows = pbx.registrations()
    out = {r["extension"]: r for r in rows}
    assert len(out) == len(rows), f"one binding per extension expected: {rows}"
    return out


def test_bindings_survive_a_restart(pbx: PbxProcess) -> None:
    a = _register(pbx, "udp", "101", expires=3600)
    b = _register(pbx, "tcp", "103", expires=1800)
    try:
        pbx.wait_registrations("103", 1)
        before = _by_ext(pbx)
        assert set(before) == {"101", "103"}
        first_pid = pbx.pid
        pbx.restart()
        assert pbx.pid != first_pid
        assert "2 registrations restored" in pbx.log_text()
        after = _by_ext(pbx)
        assert set(after) == {"101", "103"}
        for ext in ("101", "103"):
            for field in ("contact", "source", "user_agent"):
                assert after[ext][field] == before[ext][field], (ext, field)
        assert after["101"]["source"] == f"udp:{HOST}:{a.local[1]}"
        assert after["103"]["contact"] == f"sip:103@{HOST}:{b.local[1]};transport=tcp"
        # The expiry counts on across the restart: neither reset nor lost.
        assert 3580 <= after["101"]["expires_in"] <= before["101"]["expires_in"]
        assert 1780 <= after["103"]["expires_in"] <= before["103"]["expires_in"]
        # The restored binding is a real one: refreshing it does not duplicate it.
        _, ok = a.register("101", "secret101", expires=600)
        assert ok.status == 200 and len(ok.get_all("contact")) == 1
        assert 590 <= pbx.wait_registrations("101", 1)[0]["expires_in"] <= 600
    finally:
        a.close()
        b.close()


def _wait_gone(pbx: PbxProcess, ext: str, timeout: float) -> float:
    """Poll (bounded) until ``ext`` has no binding; return how long it took."""
    start = time.monotonic()
    pbx.wait_registrations(ext, 0, timeout=timeout)
    return time.monotonic() - start


def test_short_bindings_expire_before_and_after_a_restart(pbx_factory: PbxFactory) -> None:
    pbx = pbx_factory(overrides={"registrar.min_expires": "1"})
    keep = _register(pbx, "udp", "103", expires=3600)
    # 1. Lapses while the switch runs.
    short = _register(pbx, "udp", "101", expires=2)
    row, = pbx.wait_registrations("101", 1)
    assert 1 <= row["expires_in"] <= 2
    assert _wait_gone(pbx, "101", timeout=5.0) <= 4.0
    pbx.wait_for_log("binding expired: 101")
    short.close()
    # 2. Registered, then the switch restarts at once: restored, and still lapses on time.
    short = _register(pbx, "udp", "101", expires=2)
    registered_at = time.monotonic()
    pbx.restart()
    rows = pbx.registrations("101")
    if time.monotonic() - registered_at < 1.5:  # a slow restart may outlast the binding
        assert len(rows) == 1, "restored from the store"
    assert all(r["expires_in"] <= 2 for r in rows)
    pbx.wait_registrations("101", 0, timeout=5.0)
    assert time.monotonic() - registered_at <= 6.0
    short.close()
    # 3. Lapses while the switch is down: not restored at all.
    short = _register(pbx, "udp", "101", expires=2)
    pbx.stop()
    time.sleep(2.5)
    pbx.start()
    assert "1 registrations restored" in pbx.log_text()
    assert pbx.registrations("101") == []
    assert len(pbx.registrations("103")) == 1
    short.close()
    keep.close()


def test_nonce_from_before_a_restart_gets_a_fresh_challenge(pbx: PbxProcess) -> None:
    """auth.secret is random per start: a phone answering a pre-restart challenge must be
    challenged again (401), not refused (403) and counted as a failure."""
    with SipClient("udp", pbx.sip_addr) as c:
        headers = [("Contact", c.contact("101")), ("Expires", "600")]
        first = c.request(c.build("REGISTER", f"sip:{HOST}", headers=headers))
        assert first is not None and first.status == 401
        pbx.restart()
        auth = authorization(pick_challenge(first), username="101", password="secret101",
                             method="REGISTER", uri=f"sip:{HOST}")
        again = c.request(c.build("REGISTER", f"sip:{HOST}",
                                  headers=[*headers, ("Authorization", auth)]))
        assert again is not None and again.status == 401, again
        auth = authorization(pick_challenge(again), username="101", password="secret101",
                             method="REGISTER", uri=f"sip:{HOST}")
        ok = c.request(c.build("REGISTER", f"sip:{HOST}", headers=[*headers, ("Authorization", auth)]))
        assert ok is not None and ok.status == 200
    assert "auth failure" not in pbx.all_logs()
