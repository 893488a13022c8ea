"""Which requests belong to a trunk (address, resolved host name, the registration it holds),
and the finer points of registering to a provider (423, expires 0, un-REGISTER at shutdown)."""

from __future__ import annotations

from pathlib import Path

import pytest

from softpbx.config.loader import load_config
from softpbx.config.schema import Transport
from softpbx.core.events import Binding
from softpbx.core.gateway_reg import RegState
from softpbx.core.notify import CrmAnswer
from softpbx.core.switch import Switch
from softpbx.sip.events import Flow
from softpbx.sip.message import make_response
from softpbx.sip.parser import parse_message

from .sipkit import FakeClock, crlf, run_until
from .test_calls import FakeRelay
from .test_gateways import PROVIDER, provider_profiles

ELSEWHERE = ("127.0.0.1", 6001)  # another host of the provider's, not its proxy address
ALICE = ("127.0.0.1", 5061)


@pytest.fixture
def profiles(tmp_path: Path) -> Path:
    """test_gateways' profiles (a provider we register to) and a trunk named by host name."""
    d = provider_profiles(tmp_path)
    (d / "gateways" / "byname.toml").write_text('[gateway]\nproxy = "sip.provider.test"\n')
    return d


def udp(remote: tuple[str, int]) -> Flow:
    return Flow(Transport.UDP, remote, ("127.0.0.1", 5060))


def switch(profiles: Path) -> Switch:
    sw = Switch(config=load_config(profiles), auth_secret=b"s" * 32, relay=FakeRelay())
    sw.registrar.load([Binding(aor="101", contact="sip:101@127.0.0.1:5061", key="a",
                               expires_at=1e9, call_id="a", cseq=1, flow=udp(ALICE))])
    return sw


def sent(sw: Switch) -> list[tuple[tuple[str, int], object]]:
    return [(o.flow.remote, parse_message(o.data)) for o in sw.datagrams_to_send()]


def registered(sw: Switch, clock: FakeClock):
    sw.start(clock.now)
    ((_, reg),) = [(w, m) for w, m in sent(sw) if w == PROVIDER]
    ok = make_response(reg, 200, to_tag="p", headers=[("Contact", f"{reg.get('contact')};expires=300")])
    sw.receive(ok.serialize(), udp(PROVIDER), clock.now)
    assert sw.gateway_registrations["provider"].state is RegState.REGISTERED
    return reg


def invite(ruri: str, src: tuple[str, int], *, to: str = "74950000000") -> bytes:
    body = crlf("v=0\no=c 1 1 IN IP4 127.0.0.1\ns=-\nc=IN IP4 127.0.0.1\nt=0 0\n"
                "m=audio 40000 RTP/AVP 0\n")
    return crlf(f"""INVITE {ruri} SIP/2.0
Via: SIP/2.0/UDP {src[0]}:{src[1]};branch=z9hG4bKprov1;rport
From: <sip:79990001122@voip.example>;tag=pf
To: <sip:{to}@voip.example>
Call-ID: prov-call-1
CSeq: 1 INVITE
Contact: <sip:79990001122@{src[0]}:{src[1]}>
Max-Forwards: 70
Content-Type: application/sdp
Content-Length: {len(body)}

""") + body


def test_registered_contact_carries_a_line_token_that_identifies_the_gateway(profiles: Path) -> None:
    sw = switch(profiles)
    clock = FakeClock()
    reg = registered(sw, clock)
    contact = parse_message(reg.serialize()).contacts[0]
    line = contact.uri.params["line"]
    assert len(line) >= 24 and contact.uri.user == "pbx1"
    # The provider sends the call to our Contact from a host that is not its proxy address;
    # the DID is in To. It is the provider's call: routed to the DID's extension, no challenge.
    sw.receive(invite(f"sip:pbx1@127.0.0.1:5060;line={line}", ELSEWHERE), udp(ELSEWHERE),
               clock.now)
    out = sent(sw)
    assert [m.status for w, m in out if w == ELSEWHERE] == [100]
    (call,) = sw.calls.values()
    sw.crm_answer(call.pbx_call_id, CrmAnswer(), clock.now)  # the CRM: "route normally"
    out += sent(sw)
    assert call.route.dialled == "74950000000" and call.from_gateway == "provider"
    assert [m.method for w, m in out if w == ALICE] == ["INVITE"]


def test_a_wrong_line_token_is_no_gateway(profiles: Path) -> None:
    sw = switch(profiles)
    clock = FakeClock()
    registered(sw, clock)
    sw.receive(invite("sip:pbx1@127.0.0.1:5060;line=0123456789abcdef01234567", ELSEWHERE),
               udp(ELSEWHERE), clock.now)
    assert [m.status for w, m in sent(sw) if w == ELSEWHERE] == [100, 401]
    assert sw.calls == {}


def test_a_gateway_named_by_host_name_matches_once_resolved(profiles: Path) -> None:
    sw = switch(profiles)
    clock = FakeClock()
    src = ("127.0.0.9", 40123)
    sw.receive(invite("sip:74950000000@127.0.0.1", src), udp(src), clock.now)
    assert [m.status for w, m in sent(sw) if w == src] == [100, 401]  # unknown until resolved
    sw.set_gateway_address("byname", ("127.0.0.9", 5060))
    sw.receive(invite("sip:74950000000@127.0.0.1", src).replace(b"prov1", b"prov2")
               .replace(b"prov-call-1", b"prov-call-2"), udp(src), clock.now)
    assert [m.status for w, m in sent(sw) if w == src] == [100]
    (call,) = sw.calls.values()
    assert call.from_gateway == "byname"


def test_423_is_retried_with_min_expires_and_expires_0_is_a_failure(profiles: Path) -> None:
    sw = switch(profiles)
    clock = FakeClock()
    sw.start(clock.now)
    ((_, reg),) = sent(sw)
    sw.receive(make_response(reg, 423, to_tag="p", headers=[("Min-Expires", "1800")]).serialize(),
               udp(PROVIDER), clock.now)
    ((_, again),) = sent(sw)
    assert again.expires == 1800 and again.cseq.number == reg.cseq.number + 1
    ok0 = make_response(again, 200, to_tag="p",
                        headers=[("Contact", f"{again.get('contact')};expires=0")])
    sw.receive(ok0.serialize(), udp(PROVIDER), clock.now)
    assert sw.gateway_registrations["provider"].state is RegState.FAILED


def test_shutdown_unregisters(profiles: Path) -> None:
    sw = switch(profiles)
    clock = FakeClock()
    registered(sw, clock)
    assert sw.unregister_gateways(clock.now) == 1
    ((who, bye),) = sent(sw)
    assert who == PROVIDER and bye.method == "REGISTER" and bye.expires == 0
    sw.receive(make_response(bye, 200, to_tag="p").serialize(), udp(PROVIDER), clock.now)
    assert sw.gateway_registrations["provider"].state is RegState.IDLE
    run_until(sw, clock, clock.now + 1000)
    assert [m for w, m in sent(sw) if w == PROVIDER] == []  # no refresh or retry follows


def test_outbound_registration_is_confirmed_with_require_outbound(profiles: Path) -> None:
    from .test_registrar import authed_register

    sw = switch(profiles)
    clock = FakeClock()
    contact = '<sip:101@127.0.0.1:5062;ob>;+sip.instance="<urn:uuid:00000000-0000-1000-8000-000A95A0E128>";reg-id=1'
    r = authed_register(sw, clock, contact=contact, extra="Supported: outbound, path")
    assert r.status == 200 and r.get("require") == "outbound"
    plain = authed_register(sw, clock, call_id="plain")
    assert plain.status == 200 and plain.get("require") is None
