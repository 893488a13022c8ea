"""Toll-fraud guards of digest auth (RFC 2617 §3.2.2.5, RFC 3261 §22.4): credentials are bound
to the Request-URI, and an RFC 2069 (qop-less) nonce is good for one request. Driven with raw
INVITE/REGISTER bytes through the switch and a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from softpbx.config.loader import load_config
from softpbx.core.events import Binding
from softpbx.core.switch import Switch
from softpbx.sip.auth import AuthOutcome, DigestAuthenticator, digest_uri_matches

from .sipkit import FakeClock, challenge_params, digest
from .test_calls import ALICE, BOB, CARRIER, FakeRelay, Net, ack_for, flow, invite
from .test_registrar import exchange, register

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def net() -> Net:
    cfg = load_config(ROOT / "sip_profiles", ["calls.max_duration=0"])
    sw = Switch(config=cfg, auth_secret=b"s" * 32, relay=FakeRelay())
    for ext, addr in (("101", ALICE), ("102", BOB)):
        sw.registrar.load([Binding(aor=ext, contact=f"sip:{ext}@{addr[0]}:{addr[1]}", key=ext,
                                   expires_at=1e9, call_id=ext, cseq=1, flow=flow(addr))])
    return Net(sw, FakeClock(), sw.relay)  # type: ignore[arg-type]


def challenge(net: Net, to: str, *, branch: str, call_id: str) -> dict[str, str]:
    """An unauthenticated INVITE from 101's phone; returns the MD5 challenge's params."""
    net.feed(invite(to=to, branch=branch, call_id=call_id), ALICE)
    r401 = [m for m in net.take(ALICE) if getattr(m, "status", 0) == 401][0]
    net.feed(ack_for(r401, to, branch=branch), ALICE)
    net.take(ALICE)
    return challenge_params(r401.get_all("www-authenticate")[0])


def final_statuses(net: Net, who=ALICE) -> list[int]:
    return [m.status for m in net.take(who) if getattr(m, "status", 100) > 100]


@pytest.mark.parametrize(("duri", "ruri", "method", "same"), [
    ("sip:102@127.0.0.1", "sip:102@127.0.0.1", "INVITE", True),
    ("sip:102@127.0.0.1;transport=UDP", "sip:102@127.0.0.1", "INVITE", True),  # params ignored
    ("sip:102@127.0.0.1", "sip:102@127.0.0.1:5070;user=phone", "INVITE", True),  # port one side
    ("sip:102@PBX.Example.COM", "sip:102@pbx.example.com", "INVITE", True),
    ("sip:%31%30%32@[::1]:5060", "sip:102@[0:0::1]:5060", "INVITE", True),
    ("sip:102@127.0.0.1:5060", "sip:102@127.0.0.1:5070", "INVITE", False),
    ("sip:102@127.0.0.1", "sip:89991234567@127.0.0.1", "INVITE", False),  # the fraud
    # no user: it names this server (pyVoIP's INVITEs); one-use nonces stop its replay
    ("sip:127.0.0.1;transport=UDP", "sip:89991234567@127.0.0.1", "INVITE", True),
    ("sip:10.0.0.1;transport=UDP", "sip:89991234567@127.0.0.1", "INVITE", False),
    ("sips:102@127.0.0.1", "sip:102@127.0.0.1", "INVITE", False),
    ("sip:102@10.0.0.1", "sip:102@127.0.0.1", "INVITE", False),
    ("sip:101@127.0.0.1", "sip:127.0.0.1", "REGISTER", True),  # the AOR hashed (SIPp does)
    ("sip:101@127.0.0.1", "sip:127.0.0.1", "INVITE", False),
    ("sip:127.0.0.1", "sip:127.0.0.1", "REGISTER", True),
    ("not a uri", "sip:127.0.0.1", "REGISTER", False),
    ("tel:+4930123", "TEL:+4930123", "INVITE", True),
])
def test_digest_uri_designates_the_request_uri_resource(duri: str, ruri: str, method: str,
                                                        same: bool) -> None:
    assert digest_uri_matches(duri, ruri, method) is same


@pytest.mark.parametrize("qop", ["auth", None])
def test_sniffed_invite_credentials_cannot_dial_another_number(net: Net, qop, caplog) -> None:
    caplog.set_level("WARNING", logger="softpbx.auth")
    p = challenge(net, "102", branch="z9hG4bKc1", call_id="c1")
    auth = digest(user="101", password="secret101", realm=p["realm"], nonce=p["nonce"],
                  method="INVITE", uri="sip:102@127.0.0.1", qop=qop)
    # the attacker puts them on an INVITE to a trunk number first (a race, or an on-path peer)
    net.feed(invite(to="89991234567", branch="z9hG4bKevil", call_id="evil", cseq=2, auth=auth),
             ALICE)
    assert final_statuses(net) == [403]
    assert net.take(CARRIER) == [] and net.sw.calls == {}
    assert 'method=INVITE user="101" reason=uri_mismatch' in caplog.text
    # the failed attempt did not spend the nonce: the phone's own INVITE still goes through
    net.feed(invite(to="102", branch="z9hG4bKc2", call_id="c1", cseq=2, auth=auth), ALICE)
    assert [m.method for m in net.take(BOB)] == ["INVITE"]


def test_rfc2069_nonce_is_single_use_replay_gets_stale(net: Net) -> None:
    p = challenge(net, "89991234567", branch="z9hG4bKo1", call_id="o1")
    auth = digest(user="101", password="secret101", realm=p["realm"], nonce=p["nonce"],
                  method="INVITE", uri="sip:89991234567@127.0.0.1", qop=None)
    net.feed(invite(to="89991234567", branch="z9hG4bKo2", call_id="o1", cseq=2, auth=auth), ALICE)
    assert len(net.take(CARRIER)) == 1  # the real call
    # a sniffed copy, replayed as a new call to the same number within the nonce's lifetime
    net.clock.advance(10)
    net.feed(invite(to="89991234567", branch="z9hG4bKr1", call_id="replay", cseq=2, auth=auth),
             ALICE)
    (r,) = [m for m in net.take(ALICE) if getattr(m, "status", 0) > 100]
    assert r.status == 401
    fresh = challenge_params(r.get_all("www-authenticate")[0])
    assert fresh.get("stale") == "true" and fresh["nonce"] != p["nonce"]
    assert net.take(CARRIER) == []
    net.feed(ack_for(r, "89991234567", branch="z9hG4bKr1"), ALICE)
    # a compliant phone answers the fresh nonce and gets through
    auth2 = digest(user="101", password="secret101", realm=fresh["realm"], nonce=fresh["nonce"],
                   method="INVITE", uri="sip:89991234567@127.0.0.1", qop=None)
    net.feed(invite(to="89991234567", branch="z9hG4bKr2", call_id="replay", cseq=3, auth=auth2),
             ALICE)
    assert len(net.take(CARRIER)) == 1


def test_rfc2069_register_reusing_its_nonce_is_asked_again(net: Net) -> None:
    sw, clock = net.sw, net.clock
    r401 = exchange(sw, register(call_id="r"), clock)
    p = challenge_params(r401.get_all("www-authenticate")[0])
    auth = digest(user="101", password="secret101", realm=p["realm"], nonce=p["nonce"],
                  method="REGISTER", uri="sip:127.0.0.1", qop=None)
    assert exchange(sw, register(call_id="r", cseq=2, auth=auth), clock).status == 200
    again = exchange(sw, register(call_id="r", cseq=3, auth=auth), clock)
    assert again.status == 401
    assert challenge_params(again.get_all("www-authenticate")[0]).get("stale") == "true"


def test_authenticator_nonce_table_spent_marks_and_stays_bounded() -> None:
    a = DigestAuthenticator(realm="pbx", secret=b"s" * 32, nonce_ttl=60)
    a.set_users({"101": "pw"})

    def creds(nonce: str, qop, nc: str = "00000001", uri: str = "sip:102@pbx") -> list[str]:
        return [digest(user="101", password="pw", realm="pbx", nonce=nonce, method="INVITE",
                       uri=uri, qop=qop, nc=nc)]

    n = a.nonce(0.0)
    ok = a.check("INVITE", creds(n, None), 1.0, request_uri="sip:102@pbx")
    assert ok.outcome is AuthOutcome.OK
    # a qop=auth response on a nonce spent without qop is a replay too
    assert a.check("INVITE", creds(n, "auth", "ffffffff"), 2.0,
                   request_uri="sip:102@pbx").outcome is AuthOutcome.REPLAY
    # a wrong URI wins over staleness: a failure, not a silent re-challenge
    assert a.check("INVITE", creds(a.nonce(0.0), None), 100.0,
                   request_uri="sip:7999@pbx").outcome is AuthOutcome.URI_MISMATCH
    for i in range(50):
        assert a.check("INVITE", creds(a.nonce(3.0 + i * 0.001), None), 3.0,
                       request_uri="sip:102@pbx").outcome is AuthOutcome.OK
    assert len(a._nc) == 51
    later = 3.0 + 60 + 11
    assert a.check("INVITE", creds(a.nonce(later), None), later,
                   request_uri="sip:102@pbx").outcome is AuthOutcome.OK
    assert len(a._nc) == 1 and len(a._nc_order) == 1
