"""Trunks: registering to a provider (with digest and refresh) and answering its 407 on INVITE."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from softpbx.config.loader import load_config
from softpbx.core.gateway_reg import RegState
from softpbx.core.switch import Switch
from softpbx.sip.auth import AuthOutcome, DigestAuthenticator
from softpbx.sip.message import Response, make_response
from softpbx.sip.parser import parse_message

from .sipkit import FakeClock, run_until
from .test_calls import ALICE, FakeRelay, Net, place_call

ROOT = Path(__file__).resolve().parents[2]
PROVIDER = ("127.0.0.1", 5090)


@pytest.fixture
def profiles(tmp_path: Path) -> Path:
    return provider_profiles(tmp_path)


def provider_profiles(tmp_path: Path) -> Path:
    """The sample profiles plus ``provider`` (registered to, digest) and a carrier that
    answers challenges with ``acct``/``trunkpw``."""
    d = tmp_path / "profiles"
    shutil.copytree(ROOT / "sip_profiles", d)
    (d / "gateways" / "provider.toml").write_text(
        '[gateway]\nproxy = "127.0.0.1:5090"\nregister = true\nusername = "pbx1"\n'
        'password = "provpw"\nrealm = "voip.example"\nexpire_seconds = 300\nretry_seconds = 20\n')
    (d / "gateways" / "carrier.toml").write_text(
        '[gateway]\nproxy = "127.0.0.1:5070"\ninbound_addresses = ["127.0.0.1:5070"]\n'
        'username = "acct"\npassword = "trunkpw"\n')
    return d


def provider_auth() -> DigestAuthenticator:
    a = DigestAuthenticator(realm="voip.example", secret=b"p" * 32, algorithms=("MD5",))
    a.set_users({"pbx1": "provpw", "acct": "trunkpw"})
    return a


def sent_to(sw: Switch, who) -> list:
    return [parse_message(o.data) for o in sw.datagrams_to_send() if o.flow.remote == who]


def test_register_to_provider_with_digest_and_refresh(profiles: Path) -> None:
    sw = Switch(config=load_config(profiles), relay=FakeRelay())
    clock = FakeClock()
    prov = provider_auth()
    sw.start(clock.now)
    (reg,) = sent_to(sw, PROVIDER)
    assert reg.method == "REGISTER" and reg.uri_text == "sip:voip.example"
    assert reg.to.uri.user == "pbx1" and reg.expires == 300
    challenge = make_response(reg, 401, to_tag="p1",
                              headers=[("WWW-Authenticate", v) for v in prov.challenge(clock.now)])
    sw.receive(challenge.serialize(), _flow(), clock.now)
    (reg2,) = sent_to(sw, PROVIDER)
    assert reg2.cseq.number == reg.cseq.number + 1 and reg2.call_id == reg.call_id
    assert prov.check("REGISTER", reg2.get_all("authorization"), clock.now).outcome is AuthOutcome.OK
    ok = make_response(reg2, 200, to_tag="p1",
                       headers=[("Contact", f"{reg2.get('contact')};expires=120")])
    sw.receive(ok.serialize(), _flow(), clock.now)
    g = sw.gateway_registrations["provider"]
    assert g.state is RegState.REGISTERED and g.expires_at == clock.now + 120
    run_until(sw, clock, clock.now + 59)
    assert sent_to(sw, PROVIDER) == []
    run_until(sw, clock, clock.now + 1.2)  # refreshed half-way through the granted 120 s
    (refresh,) = sent_to(sw, PROVIDER)
    assert refresh.method == "REGISTER" and refresh.cseq.number > reg2.cseq.number


def test_provider_refusal_and_silence_are_retried(profiles: Path) -> None:
    sw = Switch(config=load_config(profiles), relay=FakeRelay())
    clock = FakeClock()
    sw.start(clock.now)
    (reg,) = sent_to(sw, PROVIDER)
    sw.receive(make_response(reg, 403, to_tag="x").serialize(), _flow(), clock.now)
    assert sw.gateway_registrations["provider"].state is RegState.FAILED
    run_until(sw, clock, clock.now + 20.1)
    (again,) = sent_to(sw, PROVIDER)
    assert again.method == "REGISTER"
    run_until(sw, clock, clock.now + 40)  # no answer at all: Timer F, then a retry
    msgs = sent_to(sw, PROVIDER)
    assert len(msgs) > 3 and sw.gateway_registrations["provider"].state in (
        RegState.FAILED, RegState.REGISTERING)


def test_trunk_407_on_invite_answered_with_credentials(profiles: Path) -> None:
    relay = FakeRelay()
    sw = Switch(config=load_config(profiles), auth_secret=b"s" * 32, relay=relay)
    net = Net(sw, FakeClock(), relay)
    sw.datagrams_to_send()
    place_call(net, "89991234567")
    net.take(ALICE)
    (inv,) = net.take(("127.0.0.1", 5070))
    prov = provider_auth()
    ch = make_response(inv, 407, to_tag="t",
                       headers=[("Proxy-Authenticate", v) for v in prov.challenge(net.clock.now)])
    net.feed(ch.serialize(), ("127.0.0.1", 5070))
    msgs = net.take(("127.0.0.1", 5070))
    assert [m.method for m in msgs] == ["ACK", "INVITE"]
    inv2 = msgs[1]
    assert inv2.cseq.number == 2 and inv2.call_id == inv.call_id and inv2.body == inv.body
    assert prov.check("INVITE", inv2.get_all("proxy-authorization"), net.clock.now).outcome \
        is AuthOutcome.OK
    # a second challenge is not answered again: the call fails instead of looping, and the
    # caller hears that the route is unusable, not a challenge for the provider's realm
    net.feed(make_response(inv2, 407, to_tag="t").serialize(), ("127.0.0.1", 5070))
    assert [m.status for m in net.take(ALICE)][-1] == 503
    assert net.cdrs[0].sip_code == 503 and net.cdrs[0].gateway == "carrier"
    assert isinstance(ch, Response)


def _flow():  # noqa: D401 - the provider's flow
    from softpbx.config.schema import Transport
    from softpbx.sip.events import Flow

    return Flow(Transport.UDP, PROVIDER, ("127.0.0.1", 5060))
