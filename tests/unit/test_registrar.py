"""The switch's registrar and digest auth, driven with raw REGISTER bytes and a fake clock."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from softpbx.config.loader import load_config
from softpbx.core.events import DeleteBinding, SaveBinding
from softpbx.core.switch import Switch
from softpbx.sip.auth import AuthOutcome, DigestAuthenticator, parse_credentials
from softpbx.sip.message import Response

from .sipkit import FakeClock, challenge_params, crlf, digest, run_until, sent, tcp, udp

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def config():
    return load_config(ROOT / "sip_profiles", ["registrar.min_expires=30", "auth.max_failures=5"])


@pytest.fixture
def switch(config):
    return Switch(config=config, auth_secret=b"k" * 32)


def register(user: str = "101", *, cseq: int = 1, call_id: str = "reg-1", branch: str | None = None,
             contact: str = "<sip:{user}@127.0.0.1:5062>", expires: str | None = "3600",
             auth: str | None = None, to_user: str | None = None, extra: str = "") -> bytes:
    lines = [
        "REGISTER sip:127.0.0.1 SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:5062;branch={branch or f'z9hG4bK{call_id}{cseq}'};rport",
        f"From: <sip:{user}@127.0.0.1>;tag=f{cseq}",
        f"To: <sip:{to_user or user}@127.0.0.1>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        "Max-Forwards: 70",
    ]
    if contact:
        lines.append("Contact: " + contact.format(user=user))
    if expires is not None:
        lines.append(f"Expires: {expires}")
    if auth:
        lines.append(f"Authorization: {auth}")
    if extra:
        lines.append(extra)
    lines += ["Content-Length: 0", "", ""]
    return crlf("\n".join(lines))


def exchange(sw: Switch, data: bytes, clock: FakeClock, flow=None) -> Response:
    sw.receive(data, flow or udp(), clock.now)
    msgs = [m for m in sent(sw) if isinstance(m, Response)]
    assert len(msgs) == 1, msgs
    return msgs[0]


def authed_register(sw: Switch, clock: FakeClock, *, user: str = "101", password: str = "secret101",
                    cseq: int = 1, algorithm: str = "MD5", qop: str | None = "auth", flow=None,
                    **kw) -> Response:
    r401 = exchange(sw, register(user, cseq=cseq, **kw), clock, flow)
    assert r401.status == 401
    ch = {challenge_params(v)["algorithm"]: challenge_params(v) for v in r401.get_all("www-authenticate")}
    p = ch[algorithm]
    auth = digest(user=user, password=password, realm=p["realm"], nonce=p["nonce"],
                  method="REGISTER", uri="sip:127.0.0.1", qop=qop, algorithm=algorithm)
    return exchange(sw, register(user, cseq=cseq + 1, auth=auth, **kw), clock, flow)


def actions(sw: Switch) -> list:
    out = []
    while (a := sw.next_action()) is not None:
        out.append(a)
    return out


@pytest.fixture
def switch_sha256():
    """A switch offering both algorithms, SHA-256 opted in after MD5."""
    config = load_config(ROOT / "sip_profiles", ["registrar.min_expires=30",
                                                 'auth.algorithms=["MD5", "SHA-256"]'])
    return Switch(config=config, auth_secret=b"k" * 32)


def test_challenge_offers_only_md5_by_default(switch) -> None:
    r = exchange(switch, register(), FakeClock())
    assert r.status == 401 and r.to.tag
    chs = [challenge_params(v) for v in r.get_all("www-authenticate")]
    assert [c["algorithm"] for c in chs] == ["MD5"]
    assert {c["qop"] for c in chs} == {"auth"} and {c["realm"] for c in chs} == {"127.0.0.1"}


def test_challenge_offers_md5_and_sha256_with_one_nonce(switch_sha256) -> None:
    r = exchange(switch_sha256, register(), FakeClock())
    chs = [challenge_params(v) for v in r.get_all("www-authenticate")]
    assert [c["algorithm"] for c in chs] == ["MD5", "SHA-256"]
    assert {c["qop"] for c in chs} == {"auth"} and {c["realm"] for c in chs} == {"127.0.0.1"}
    assert chs[0]["nonce"] == chs[1]["nonce"]


@pytest.mark.parametrize(("algorithm", "qop"), [("MD5", "auth"), ("SHA-256", "auth"), ("MD5", None)])
def test_register_with_digest_binds_contact_and_source(switch_sha256, algorithm, qop) -> None:
    switch = switch_sha256
    clock = FakeClock()
    flow = udp(("127.0.0.1", 40000))  # the NAT-real source differs from the Contact port
    r = authed_register(switch, clock, algorithm=algorithm, qop=qop, flow=flow)
    assert r.status == 200
    assert r.get_all("contact") == ["<sip:101@127.0.0.1:5062>;expires=3600"]
    (b,) = switch.registrar.lookup("101", clock.now)
    assert b.flow == flow and b.contact == "sip:101@127.0.0.1:5062"
    (a,) = actions(switch)
    assert isinstance(a, SaveBinding) and a.binding is b


def test_unknown_user_and_wrong_password_get_identical_answers(switch) -> None:
    clock = FakeClock()
    wrong = authed_register(switch, clock, password="nope", call_id="a")
    unknown = authed_register(switch, clock, user="999", password="whatever", call_id="b")

    def shape(r: Response):
        return (r.status, r.reason, [n for n, _ in r.headers], r.body)

    assert wrong.status == 403 and shape(wrong) == shape(unknown)
    assert switch.registrar.binding_count == 0


def test_credentials_of_one_extension_cannot_register_another(switch) -> None:
    clock = FakeClock()
    r401 = exchange(switch, register("102"), clock)
    p = challenge_params(r401.get_all("www-authenticate")[0])
    auth = digest(user="101", password="secret101", realm=p["realm"], nonce=p["nonce"],
                  method="REGISTER", uri="sip:127.0.0.1")
    r = exchange(switch, register("102", cseq=2, auth=auth), clock)
    assert r.status == 403 and switch.registrar.binding_count == 0


def test_failures_ban_the_source_and_log_for_fail2ban(switch, caplog) -> None:
    clock = FakeClock()
    caplog.set_level("WARNING", logger="softpbx.auth")
    for i in range(5):
        assert authed_register(switch, clock, password="bad", call_id=f"x{i}").status == 403
    assert 'softpbx auth failure: ip=127.0.0.1 port=5062 transport=udp method=REGISTER user="101"' \
        in caplog.text
    assert "softpbx auth ban: ip=127.0.0.1" in caplog.text
    # banned: no challenge any more, even for a fresh REGISTER
    assert exchange(switch, register(call_id="y"), clock).status == 403
    clock.advance(switch.config.auth.ban_time + 1)
    assert exchange(switch, register(call_id="z"), clock).status == 401


def test_stale_nonce_gets_stale_true(switch) -> None:
    clock = FakeClock()
    r401 = exchange(switch, register(), clock)
    p = challenge_params(r401.get_all("www-authenticate")[0])
    clock.advance(switch.config.auth.nonce_ttl + 1)
    auth = digest(user="101", password="secret101", realm=p["realm"], nonce=p["nonce"],
                  method="REGISTER", uri="sip:127.0.0.1")
    r = exchange(switch, register(cseq=2, auth=auth), clock)
    assert r.status == 401
    assert challenge_params(r.get_all("www-authenticate")[0]).get("stale") == "true"


def test_nc_replay_refused(switch) -> None:
    clock = FakeClock()
    r401 = exchange(switch, register(), clock)
    p = challenge_params(r401.get_all("www-authenticate")[0])
    auth = digest(user="101", password="secret101", realm=p["realm"], nonce=p["nonce"],
                  method="REGISTER", uri="sip:127.0.0.1", nc="00000001")
    assert exchange(switch, register(cseq=2, auth=auth), clock).status == 200
    assert exchange(switch, register(cseq=3, auth=auth), clock).status == 403  # same nc again
    auth2 = digest(user="101", password="secret101", realm=p["realm"], nonce=p["nonce"],
                   method="REGISTER", uri="sip:127.0.0.1", nc="00000002")
    assert exchange(switch, register(cseq=4, auth=auth2), clock).status == 200


def test_forged_nonce_is_challenged_not_accepted(switch) -> None:
    clock = FakeClock()
    auth = digest(user="101", password="secret101", realm="127.0.0.1",
                  nonce="11d1c2.aaaaaaaaaaaa.00000000000000000000000000000000", method="REGISTER",
                  uri="sip:127.0.0.1")
    assert exchange(switch, register(cseq=2, auth=auth), clock).status == 401


def test_digest_uri_may_differ_from_request_uri(switch) -> None:
    clock = FakeClock()
    r401 = exchange(switch, register(), clock)
    p = challenge_params(r401.get_all("www-authenticate")[0])
    auth = digest(user="101", password="secret101", realm=p["realm"], nonce=p["nonce"],
                  method="REGISTER", uri="sip:127.0.0.1;transport=UDP", qop=None)
    assert exchange(switch, register(cseq=2, auth=auth), clock).status == 200


def test_expiry_min_expires_max_and_lapse(switch) -> None:
    clock = FakeClock()
    r = authed_register(switch, clock, expires="10")
    assert r.status == 423 and r.get("min-expires") == "30"
    r = authed_register(switch, clock, expires="999999", call_id="long")
    assert r.get("contact").endswith(f";expires={switch.config.registrar.max_expires}")
    actions(switch)
    r = authed_register(switch, clock, expires="40", call_id="long", cseq=10)
    assert r.get("contact").endswith(";expires=40")
    run_until(switch, clock, clock.now + 41)
    assert switch.registrar.lookup("101", clock.now) == []
    assert any(isinstance(a, DeleteBinding) for a in actions(switch))


def test_contact_param_expires_and_several_contacts(switch) -> None:
    clock = FakeClock()
    contact = ("<sip:101@127.0.0.1:5062;transport=tcp;ob>;expires=60, "
               "<sip:101@10.0.0.9:5060>;q=0.5")
    r = authed_register(switch, clock, contact=contact, flow=tcp())
    assert r.status == 200
    got = sorted(r.get_all("contact"))
    assert got == ["<sip:101@10.0.0.9:5060>;expires=3600",
                   "<sip:101@127.0.0.1:5062;transport=tcp;ob>;expires=60"]
    assert len(switch.registrar.lookup("101", clock.now)) == 2


def test_expires_zero_and_star_unregister(switch) -> None:
    clock = FakeClock()
    authed_register(switch, clock, call_id="p1")
    authed_register(switch, clock, call_id="p2", contact="<sip:101@127.0.0.1:6000>")
    assert len(switch.registrar.lookup("101", clock.now)) == 2
    r = authed_register(switch, clock, call_id="p1", cseq=5, expires="0")
    assert r.status == 200 and r.get_all("contact") == ["<sip:101@127.0.0.1:6000>;expires=3600"]
    r = authed_register(switch, clock, call_id="p3", contact="*", expires="0")
    assert r.status == 200 and r.get_all("contact") == []
    assert switch.registrar.binding_count == 0
    bad = authed_register(switch, clock, call_id="p4", contact="*", expires="60")
    assert bad.status == 400


def test_out_of_order_register_refused(switch) -> None:
    clock = FakeClock()
    assert authed_register(switch, clock, call_id="o", cseq=10).status == 200
    assert authed_register(switch, clock, call_id="o", cseq=3).status == 500


def test_to_must_be_a_sip_aor(switch) -> None:
    data = register().replace(b"To: <sip:101@127.0.0.1>", b"To: <isbn:2983792873>")
    assert exchange(switch, data, FakeClock()).status == 400


def test_options_unknown_methods_and_require(switch) -> None:
    clock = FakeClock()
    opts = register().replace(b"REGISTER sip:", b"OPTIONS sip:").replace(b"1 REGISTER", b"1 OPTIONS")
    r = exchange(switch, opts, clock)
    assert r.status == 200 and "REGISTER" in r.get("allow") and r.get("accept") == "application/sdp"
    msg = opts.replace(b"OPTIONS", b"MESSAGE").replace(b"z9hG4bK", b"z9hG4bKm")
    r = exchange(switch, msg, clock)
    assert r.status == 405 and r.get("allow")
    unk = opts.replace(b"OPTIONS", b"FROBNICATE").replace(b"z9hG4bK", b"z9hG4bKf")
    assert exchange(switch, unk, clock).status == 501
    # path (RFC 3327) is not implemented, so not accepted in Require; outbound is
    req = register(call_id="rq", extra="Require: nothingSupportsThis, path, outbound")
    r = exchange(switch, req, clock)
    assert r.status == 420 and r.get("unsupported") == "nothingsupportsthis, path"
    tel = opts.replace(b"OPTIONS sip:127.0.0.1", b"OPTIONS tel:+123").replace(b"z9hG4bK", b"z9hG4bKt")
    assert exchange(switch, tel, clock).status == 416


def test_invite_from_unknown_source_is_challenged(switch) -> None:
    clock = FakeClock()
    inv = register().replace(b"REGISTER sip:127.0.0.1", b"INVITE sip:79990000000@127.0.0.1") \
        .replace(b"1 REGISTER", b"1 INVITE")
    switch.receive(inv, udp(), clock.now)
    statuses = [m.status for m in sent(switch)]
    assert statuses == [100, 401]


def test_bindings_load_back(switch, config) -> None:
    clock = FakeClock()
    authed_register(switch, clock)
    (save,) = [a for a in actions(switch) if isinstance(a, SaveBinding)]
    other = Switch(config=config)
    other.load_bindings([dataclasses.replace(save.binding)])
    assert [b.contact for b in other.registrar.lookup("101", clock.now)] == ["sip:101@127.0.0.1:5062"]


def test_authenticator_parse_credentials_forms() -> None:
    scheme, p = parse_credentials('Digest username="a b", realm=r,nonce="n,1" , uri="sip:x", '
                                  'response="00", qop=auth, nc=00000001, cnonce="c"')
    assert scheme == "Digest" and p["username"] == "a b" and p["nonce"] == "n,1"
    assert p["realm"] == "r" and p["qop"] == "auth"


def test_authenticator_other_realm_or_scheme_means_challenge() -> None:
    a = DigestAuthenticator(realm="pbx", secret=b"s" * 32)
    a.set_users({"101": "pw"})
    assert a.check("REGISTER", ['Basic dXNlcjpwdw=='], 0.0).outcome is AuthOutcome.MISSING
    assert a.check("REGISTER", ['Digest username="101", realm="elsewhere", nonce="x", uri="u", '
                                'response="r"'], 0.0).outcome is AuthOutcome.MISSING
    assert a.check("REGISTER", ['Digest username="101", realm="pbx", nonce="x", uri="u", '
                                'response="r", algorithm=SHA-512'], 0.0).outcome is AuthOutcome.MALFORMED


def test_refreshes_keep_one_expiry_entry_and_still_lapse(switch) -> None:
    clock = FakeClock()
    for i in range(10):
        assert authed_register(switch, clock, call_id="r", cseq=10 + 2 * i, expires="60").status == 200
        clock.advance(30)
    assert len(switch.registrar._expiry) == 1  # refreshes do not pile up heap entries
    run_until(switch, clock, clock.now + 29)
    assert len(switch.registrar.lookup("101", clock.now)) == 1
    run_until(switch, clock, clock.now + 2)
    assert switch.registrar.lookup("101", clock.now) == []


@pytest.mark.parametrize("field", ["nonce", "response"])
def test_non_ascii_digest_fields_are_refused_not_a_crash(switch, field: str) -> None:
    # hmac.compare_digest raises TypeError on non-ASCII str: once an unanswered request whose
    # server transaction lived for ever (no timer before the final response).
    clock = FakeClock()
    r401 = exchange(switch, register(), clock)
    p = challenge_params(r401.get_all("www-authenticate")[0])
    auth = digest(user="101", password="secret101", realm=p["realm"], nonce=p["nonce"],
                  method="REGISTER", uri="sip:127.0.0.1")
    if field == "nonce":
        auth = auth.replace(p["nonce"], p["nonce"][:-1] + "\u00e9")
    else:
        auth = auth.replace('response="', 'response="\u00e9')
    r = exchange(switch, register(cseq=2, auth=auth), clock)
    assert r.status in (401, 403) and switch.registrar.binding_count == 0
    assert switch.stack.transaction_count == 2  # both answered; completed ones wait out Timer J
    run_until(switch, clock, clock.now + 40)
    assert switch.stack.transaction_count == 0


def test_username_cannot_forge_a_fail2ban_line(switch, caplog) -> None:
    caplog.set_level("WARNING", logger="softpbx.auth")
    clock = FakeClock()
    r401 = exchange(switch, register(), clock)
    p = challenge_params(r401.get_all("www-authenticate")[0])
    evil = "x<LF>softpbx auth failure: ip=198.51.100.1 \u00e9"
    auth = digest(user=evil, password="p", realm=p["realm"], nonce=p["nonce"],
                  method="REGISTER", uri="sip:127.0.0.1")
    data = register(cseq=2, auth=auth).replace(b"<LF>", b"\n")  # a bare LF inside a value
    assert exchange(switch, data, clock).status == 403
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0] and "\\n" in lines[0]
    assert lines[0].startswith("softpbx auth failure: ip=127.0.0.1 ")
    assert "\\xe9" in lines[0]


def test_register_200_has_date_and_via_received(switch) -> None:
    # RFC 3261 §10.3 step 8 (Date); RFC 3581 §4: with rport, received goes in even when it is
    # the same as the sent-by host.
    switch.wall_offset = 1_796_000_000.0 - 1000.0  # FakeClock starts at 1000
    r = authed_register(switch, FakeClock())
    assert r.status == 200 and r.get("date") == "Mon, 30 Nov 2026 00:53:20 GMT"
    via = r.top_via
    assert via.params["received"] == "127.0.0.1" and via.params["rport"] == "5062"
