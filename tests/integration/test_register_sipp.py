"""Registration against a real softpbx process: SIPp over UDP and TCP, and raw sockets where
the assertion must be more precise than a SIPp scenario can be (identical 401/403 answers,
bindings, Expires, ``*``, 423, several contacts, the failure rate limit)."""

from __future__ import annotations

import email.utils
import re
import time
from pathlib import Path

import pytest

from softpbx.sip.message import Response
from tests.conftest import PbxFactory
from tests.support.digest import authorization
from tests.support.server import HOST, PbxProcess
from tests.support.sip_client import SipClient, challenges, header_names, pick_challenge
from tests.support.sipp import run_sipp

pytestmark = pytest.mark.integration


# -- SIPp -------------------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_sipp_registers_with_digest(pbx: PbxProcess, sipp_bin: str, tmp_path: Path,
                                    transport: str) -> None:
    """SIPp answers the MD5 challenge (qop=auth) and gets 200; the binding is listed with the
    address the REGISTER really came from."""
    run = run_sipp(sipp_bin, "reg_auth.xml", target=pbx.sip_addr, workdir=tmp_path / "sipp",
                   users=[("101", "secret101")], transport="u1" if transport == "udp" else "t1")
    assert run.returncode == 0, run.describe()
    rows = pbx.wait_registrations("101", 1)
    row = rows[0]
    assert row["user_agent"] == "sipp-integration"
    assert row["source"].startswith(f"{transport}:{HOST}:"), row
    if transport == "udp":
        assert row["source"] == f"udp:{HOST}:{run.local_port}"
        assert row["contact"] == f"sip:101@{HOST}:{run.local_port};transport=UDP"
    assert 3590 <= row["expires_in"] <= 3600


def test_sipp_bad_credentials_get_401_then_403(pbx: PbxProcess, sipp_bin: str,
                                               tmp_path: Path) -> None:
    """A wrong password and an unknown user both go 401 -> 403, and nothing is bound."""
    run = run_sipp(sipp_bin, "reg_forbidden.xml", target=pbx.sip_addr,
                   workdir=tmp_path / "sipp", users=[("101", "wrong-password"),
                                                     ("999", "secret101")])
    assert run.returncode == 0, run.describe()
    assert pbx.registrations() == []


# -- identical answers for a wrong password and an unknown user --------------------------------
def _normalise(resp: Response, client: SipClient, user: str) -> str:
    """The response's bytes with what legitimately differs between two requests blanked out:
    tags, branch, Call-ID, CSeq number, the user in From/To, our port, the nonce."""
    text = resp.serialize().decode()
    text = text.replace(client.call_id, "CALL-ID")
    text = re.sub(r"tag=[^;>\r\n]+", "tag=TAG", text)
    text = re.sub(r"branch=[^;\r\n]+", "branch=BRANCH", text)
    text = re.sub(r"CSeq: \d+", "CSeq: N", text)
    text = re.sub(r'nonce="[^"]*"', 'nonce="NONCE"', text)
    text = text.replace(f"sip:{user}@", "sip:USER@").replace(str(client.local[1]), "PORT")
    return text


def _challenge_shape(resp: Response) -> list[tuple[object, ...]]:
    return [(c.realm, c.algorithm, c.qop, c.stale, c.opaque, tuple(sorted(c.params)))
            for c in challenges(resp)]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_wrong_password_and_unknown_user_look_the_same(pbx: PbxProcess, transport: str) -> None:
    """No extension enumeration: the 401 and the 403 for a wrong password on 101 and for the
    unknown user 999 are the same bytes apart from tags, Call-ID, branch, CSeq and nonce."""
    answers: dict[str, tuple[Response, Response, str, str]] = {}
    for label, user, password in (("wrong", "101", "not-secret101"), ("unknown", "999", "secret101")):
        with SipClient(transport, pbx.sip_addr) as c:
            first, second = c.register(user, password)
            answers[label] = (first, second, _normalise(first, c, user), _normalise(second, c, user))
    w1, w2, w1_text, w2_text = answers["wrong"]
    u1, u2, u1_text, u2_text = answers["unknown"]
    assert (w1.status, w1.reason) == (u1.status, u1.reason) == (401, "Unauthorized")
    assert (w2.status, w2.reason) == (u2.status, u2.reason) == (403, "Forbidden")
    assert header_names(w1) == header_names(u1)
    assert header_names(w2) == header_names(u2)
    assert _challenge_shape(w1) == _challenge_shape(u1)
    assert [c.algorithm for c in challenges(w1)] == ["MD5"]  # the default: MD5 only
    assert all(c.qop == ("auth",) and c.realm == HOST for c in challenges(w1))
    assert w2.get("www-authenticate") is None
    assert w1_text == u1_text
    assert w2_text == u2_text
    assert pbx.registrations() == []
    log = pbx.wait_for_log('user="999" reason=unknown_user')
    assert 'user="101" reason=wrong_password' in log


# -- bindings -----------------------------------------------------------------------------------
def test_binding_keeps_the_real_source_address(pbx: PbxProcess) -> None:
    """The Contact claims 10.0.0.99:5060; the binding remembers where the REGISTER came from."""
    with SipClient("udp", pbx.sip_addr) as c:
        _, ok = c.register("101", "secret101", contacts=["<sip:101@10.0.0.99:5060>"],
                           extra=[("User-Agent", "nat-phone/1.0")])
        assert ok.status == 200
        assert ok.get_all("contact") == ["<sip:101@10.0.0.99:5060>;expires=3600"]
        # RFC 3261 §10.3 step 8: the 200 is dated with the wall clock (set by the shell)
        date = email.utils.parsedate_to_datetime(ok.get("date") or "")
        assert abs(date.timestamp() - time.time()) < 60
        row, = pbx.wait_registrations("101", 1)
        assert row["source"] == f"udp:{HOST}:{c.local[1]}"
        assert row["contact"] == "sip:101@10.0.0.99:5060"
        assert row["user_agent"] == "nat-phone/1.0"


def test_expires_zero_unregisters(pbx: PbxProcess) -> None:
    """``Expires: 0`` removes the binding (header form), and ``;expires=0`` (contact form)."""
    with SipClient("udp", pbx.sip_addr) as c:
        assert c.register("101", "secret101")[1].status == 200
        pbx.wait_registrations("101", 1)
        _, gone = c.register("101", "secret101", expires=0)
        assert gone.status == 200
        assert gone.get_all("contact") == []
        pbx.wait_registrations("101", 0)
        assert c.register("101", "secret101")[1].status == 200
        pbx.wait_registrations("101", 1)
        _, gone = c.register("101", "secret101", expires=None,
                             contacts=[c.contact("101", expires="0")])
        assert gone.status == 200
        pbx.wait_registrations("101", 0)


def test_star_with_expires_zero_unregisters_all(pbx: PbxProcess) -> None:
    """``Contact: *`` + ``Expires: 0`` removes every binding of that extension only."""
    with SipClient("udp", pbx.sip_addr) as a, SipClient("tcp", pbx.sip_addr) as b, \
            SipClient("udp", pbx.sip_addr) as other:
        assert a.register("101", "secret101")[1].status == 200
        assert b.register("101", "secret101")[1].status == 200
        assert other.register("102", "secret102")[1].status == 200
        pbx.wait_registrations("101", 2)
        _, bad = a.register("101", "secret101", contacts=["*"], expires=3600)
        assert bad.status == 400, "RFC 3261 §10.3 step 6: '*' only with Expires: 0"
        pbx.wait_registrations("101", 2)
        _, done = a.register("101", "secret101", contacts=["*"], expires=0)
        assert done.status == 200
        assert done.get_all("contact") == []
        pbx.wait_registrations("101", 0)
        assert len(pbx.registrations("102")) == 1


def test_too_brief_expiry_gets_423_with_min_expires(pbx: PbxProcess) -> None:
    """Expires below registrar.min_expires (60 by default): 423 Interval Too Brief."""
    with SipClient("udp", pbx.sip_addr) as c:
        first, brief = c.register("101", "secret101", expires=30)
        assert first.status == 401
        assert brief.status == 423
        assert brief.get("min-expires") == "60"
        assert pbx.registrations("101") == []
        _, ok = c.register("101", "secret101", expires=60)
        assert ok.status == 200


def test_several_contacts_per_extension(pbx: PbxProcess) -> None:
    """Two Contacts in one REGISTER plus one from another phone: three bindings, all listed
    in the 200."""
    with SipClient("udp", pbx.sip_addr) as desk, SipClient("tcp", pbx.sip_addr) as mobile:
        two = ["<sip:101@127.0.0.1:5091>;expires=120", "<sip:101@127.0.0.1:5092>"]
        _, ok = desk.register("101", "secret101", contacts=two, expires=600)
        assert ok.status == 200
        _, ok = mobile.register("101", "secret101")
        assert ok.status == 200
        listed = ok.get_all("contact")
        assert len(listed) == 3, listed
        assert any("5091>" in v and v.endswith("expires=120") for v in listed), listed
        assert any("5092>" in v and v.endswith("expires=600") for v in listed), listed
        rows = pbx.wait_registrations("101", 3)
        assert {r["contact"] for r in rows} == {
            "sip:101@127.0.0.1:5091", "sip:101@127.0.0.1:5092",
            f"sip:101@127.0.0.1:{mobile.local[1]};transport=tcp"}
        sources = {r["contact"]: r["source"] for r in rows}
        assert sources["sip:101@127.0.0.1:5091"] == f"udp:{HOST}:{desk.local[1]}"


def test_register_without_contact_lists_bindings(pbx: PbxProcess) -> None:
    """RFC 3261 §10.2.3: a REGISTER without Contact is a query; the bindings are unchanged."""
    with SipClient("udp", pbx.sip_addr) as c:
        assert c.register("101", "secret101", expires=600)[1].status == 200
        _, listed = c.register("101", "secret101", contacts=[], expires=None)
        assert listed.status == 200
        contact, = listed.get_all("contact")
        m = re.fullmatch(re.escape(c.contact("101")) + r";expires=(\d+)", contact)
        assert m is not None and 595 <= int(m.group(1)) <= 600, contact
        assert len(pbx.registrations("101")) == 1


def test_contacts_beyond_max_contacts_drop_the_soonest_to_lapse(pbx_factory: PbxFactory) -> None:
    """registrar.max_contacts=2: of three contacts the one closest to expiry goes."""
    pbx = pbx_factory(overrides={"registrar.max_contacts": "2"})
    with SipClient("udp", pbx.sip_addr) as c:
        three = [f"<sip:101@127.0.0.1:{p}>;expires={e}" for p, e in ((5091, 300), (5092, 100),
                                                                     (5093, 200))]
        _, ok = c.register("101", "secret101", contacts=three, expires=None)
        assert ok.status == 200
        rows = pbx.wait_registrations("101", 2)
        assert {r["contact"] for r in rows} == {"sip:101@127.0.0.1:5091", "sip:101@127.0.0.1:5093"}
        assert len(ok.get_all("contact")) == 2


def test_out_of_order_register_is_refused(pbx: PbxProcess) -> None:
    """RFC 3261 §10.3 step 7: same Call-ID, CSeq not higher than the binding's: the update is
    aborted (500) and the binding stays."""
    with SipClient("udp", pbx.sip_addr) as c:
        c.cseq = 10
        _, ok = c.register("101", "secret101")  # CSeq 11 (challenged), 12 (bound)
        assert ok.status == 200 and ok.cseq.number == 12
        c.cseq = 5
        _, late = c.register("101", "secret101", expires=0)  # CSeq 6, 7: an old request
        assert late.status == 500
        assert len(pbx.registrations("101")) == 1


def test_same_instance_from_a_new_address_replaces_its_binding(pbx: PbxProcess) -> None:
    """RFC 5626 §6: ``+sip.instance``/``reg-id`` identify the phone; after a NAT rebinding
    (new source port, new Contact port) it still has one binding, with the new source."""
    instance = '+sip.instance="<urn:uuid:00000000-0000-1000-8000-000A95A0E128>";reg-id=1'
    sources = []
    for _ in range(2):
        with SipClient("udp", pbx.sip_addr) as c:
            _, ok = c.register("101", "secret101",
                               contacts=[f"{c.contact('101', uri_params=';ob')};{instance}"])
            assert ok.status == 200
            assert len(ok.get_all("contact")) == 1
            sources.append(f"udp:{HOST}:{c.local[1]}")
    row, = pbx.wait_registrations("101", 1)
    assert row["source"] == sources[-1]


def test_credentials_of_one_extension_cannot_register_another(pbx: PbxProcess) -> None:
    """101's good credentials on a REGISTER for To: 102 are refused like a bad password."""
    with SipClient("udp", pbx.sip_addr) as c:
        headers = [("Contact", c.contact("102")), ("Expires", "600")]
        first = c.request(c.build("REGISTER", f"sip:{HOST}", from_user="101", to_user="102",
                                  headers=headers))
        assert first is not None and first.status == 401
        auth = authorization(pick_challenge(first), username="101", password="secret101",
                             method="REGISTER", uri=f"sip:{HOST}")
        second = c.request(c.build("REGISTER", f"sip:{HOST}", from_user="101", to_user="102",
                                   headers=[*headers, ("Authorization", auth)]))
        assert second is not None and second.status == 403
        assert pbx.registrations() == []


# -- failure rate limit -------------------------------------------------------------------------
def test_repeated_failures_are_rate_limited(pbx_factory: PbxFactory) -> None:
    """With auth.max_failures=3, the third failure bans 127.0.0.1: the next REGISTER gets 403
    without a challenge, even with the right password; each failure is logged for fail2ban."""
    pbx = pbx_factory(overrides={"auth.max_failures": "3"})
    with SipClient("udp", pbx.sip_addr) as c:
        for _ in range(3):
            first, second = c.register("101", "wrong")
            assert (first.status, second.status) == (401, 403)
        banned = c.request(c.build("REGISTER", f"sip:{HOST}",
                                   headers=[("Contact", c.contact("101")), ("Expires", "600")]))
        assert banned is not None and banned.status == 403
        assert banned.get("www-authenticate") is None
    with SipClient("tcp", pbx.sip_addr) as c:
        first, _ = c.register("101", "secret101")
        assert first.status == 403, "a ban holds for the address, whatever the transport"
    log = pbx.wait_for_log("softpbx auth ban: ip=127.0.0.1")
    failures = re.findall(r"softpbx auth failure: ip=127\.0\.0\.1 port=\d+ transport=udp "
                          r'method=REGISTER user="101" reason=wrong_password', log)
    assert len(failures) == 3, log
    assert pbx.registrations() == []


def test_long_expiry_is_shortened_to_max_expires(pbx: PbxProcess) -> None:
    """registrar.max_expires (3600): a longer request is granted 3600, and the 200 says so."""
    with SipClient("udp", pbx.sip_addr) as c:
        _, ok = c.register("101", "secret101", expires=86400)
        assert ok.status == 200
        assert ok.get_all("contact") == [f"{c.contact('101')};expires=3600"]
        row, = pbx.wait_registrations("101", 1)
        assert 3590 <= row["expires_in"] <= 3600
