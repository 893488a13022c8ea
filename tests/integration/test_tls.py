"""SIP over TLS with real phones: Debian's baresip (libre's TLS) against a softpbx process
whose internal profile listens on TLS with a self-signed certificate made by the test.

* registration over TLS (a ``sip:...;transport=tls`` account): the binding says ``tls`` and
  the connection it came in on;
* a call between two TLS phones with audio both ways (tone detection on what each heard),
  the INVITE reaching the callee over its own registration connection (no new connection:
  the phone's TLS listener is never used), the CDR;
* a call out through a carrier reached over TLS (a baresip user agent with its own
  certificate plays the carrier): softpbx opens the connection, verifies the carrier's
  certificate against ``tls_ca_file`` and the audio is relayed; a carrier presenting a
  certificate nobody trusts gets no INVITE, and the call fails at once (not after Timer B).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_calls_sipp import write_profiles
from tests.support.baresip import BaresipPhone, baresip_binary
from tests.support.server import HOST, PbxProcess, free_port
from tests.support.tls import make_cert, openssl_binary
from tests.support.tones import read_mono, tone_fraction

pytestmark = pytest.mark.integration

PASSWORDS = {"101": "secret101", "102": "secret102"}
TONES = {"101": 440.0, "102": 880.0, "carrier": 660.0}
HEARD = 0.7
"""Share of the heard audio's 20 ms frames that must hold the far side's tone."""
LOG_TAIL = 60


class TlsPhone(BaresipPhone):
    """A baresip whose own TLS listener (``sip_listen`` + 1) has a certificate."""

    certificate: Path | None = None
    """PEM holding certificate and key, for baresip's ``sip_certificate``."""

    def config_text(self) -> str:
        text = super().config_text()
        if self.certificate is not None:
            text += f"sip_certificate {self.certificate}\n"
        return text


class Rig:
    """The module's softpbx, its TLS port, the certificate and the carrier's address."""

    def __init__(self, pbx: PbxProcess, tls_port: int, cert: Path, carrier_port: int,
                 carrier_cert: Path) -> None:
        self.pbx = pbx
        self.tls_port = tls_port
        self.cert = cert
        self.carrier_port = carrier_port
        self.carrier_cert = carrier_cert

    def uri(self, user: str) -> str:
        """What a TLS phone dials to reach ``user`` through softpbx (baresip adds the
        account's ``;transport=tls`` itself)."""
        return f"sip:{user}@{HOST}:{self.tls_port}"

    def cdr(self, match: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        """The one CDR matching ``match``."""
        return self.pbx.wait_cdr(match, timeout=timeout)


def _carrier_port() -> int:
    """A SIP port for the carrier phone whose next port (its TLS listener) is free."""
    for _ in range(50):
        port = free_port()
        if port < 65535:
            probe = free_port(udp=False)
            if probe == port + 1 or _tcp_free(port + 1):
                return port
    raise RuntimeError("no free port pair for the carrier")


def _tcp_free(port: int) -> bool:
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """One softpbx for the module: internal and external on TLS (one listener, shared), the
    carrier gateway reached over TLS and verified against the carrier's own certificate."""
    for tool, package in ((baresip_binary(), "baresip-core"), (openssl_binary(), "openssl")):
        if tool is None:
            pytest.fail(f"{package} is not installed (apt-get install {package}); the TLS "
                        "tests need it and are not skipped", pytrace=False)
    root = tmp_path_factory.mktemp("tls")
    cert, key = make_cert(root / "certs", "pbx")
    carrier_cert, carrier_key = make_cert(root / "certs", "carrier")
    carrier_sip = _carrier_port()
    carrier_tls = carrier_sip + 1  # baresip's TLS listener
    profiles = write_profiles(root / "profiles", carrier_tls, no_answer_timeout=30)
    (profiles / "gateways" / "carrier.toml").write_text(
        # Its requests arrive over the connection softpbx opened to it: from the proxy's
        # address and port, which is what identifies it without inbound_addresses.
        f'[gateway]\nproxy = "127.0.0.1:{carrier_tls}"\ntransport = "tls"\nregister = false\n')
    tls_port = free_port(udp=False)
    overrides = {"sip.t1_ms": "100", "sip.t4_ms": "1000",
                 "media.rtp_start_port": "22000", "media.rtp_end_port": "22999"}
    for profile in ("internal", "external"):
        overrides |= {f"{profile}.transports": '["udp", "tcp", "tls"]',
                      f"{profile}.tls_cert": str(cert), f"{profile}.tls_key": str(key),
                      f"{profile}.tls_port": str(tls_port),
                      f"{profile}.tls_ca_file": str(carrier_cert)}
    pbx = PbxProcess.create(root / "pbx", profiles=profiles, overrides=overrides)
    pbx.start()
    bundle = root / "certs" / "carrier.pem"
    bundle.write_text(carrier_cert.read_text() + carrier_key.read_text())
    try:
        yield Rig(pbx, tls_port, cert, carrier_sip, bundle)
    except BaseException:
        pbx.kill()
        raise
    try:
        pbx.stop()
    finally:
        pbx.kill()


PhoneFactory = Callable[..., TlsPhone]


@pytest.fixture
def phones(request: pytest.FixtureRequest, rig: Rig, tmp_path: Path) -> Iterator[PhoneFactory]:
    """``phones("101")`` starts a baresip registered over TLS; all are stopped at teardown,
    their logs printed if the test failed."""
    started: list[TlsPhone] = []

    def start(user: str, *, register: bool = True, certificate: Path | None = None) -> TlsPhone:
        phone = TlsPhone.create(tmp_path / f"{user}-{len(started)}", name=user,
                                tone_hz=TONES.get(user, 660.0))
        started.append(phone)
        if user == "carrier":
            phone.certificate = certificate or rig.carrier_cert
            phone.sip_port = rig.carrier_port
        phone.start()
        if register:
            event = tls_register(phone, user, rig.tls_port)
            assert event["type"] == "REGISTER_OK", f"{event}\n{phone.report()}"
        return phone

    yield start
    rep = getattr(request.node, "rep_call", None)
    failed = rep is None or rep.failed
    for phone in started:
        if failed:
            print(phone.report(LOG_TAIL))
        phone.stop()
    if failed:
        tail = "\n".join(rig.pbx.log_text().splitlines()[-LOG_TAIL:])
        print(f"--- softpbx log ({rig.pbx.workdir}), last {LOG_TAIL} lines ---\n{tail}")


def tls_register(phone: BaresipPhone, user: str, port: int) -> dict[str, Any]:
    """``uanew`` with a ``sip:...;transport=tls`` account; the final REGISTER_OK /
    REGISTER_FAIL event."""
    since = phone.mark()
    aor = f"<sip:{user}@{HOST}:{port};transport=tls>"
    resp = phone.command("uanew", f"{aor};auth_pass={PASSWORDS[user]};regint=600")
    assert resp.get("ok"), resp
    return phone.wait_event(lambda e: e.get("type") in ("REGISTER_OK", "REGISTER_FAIL"), 5.0,
                            since=since)


def talk(seconds: float, *phones: BaresipPhone) -> None:
    """Let audio flow for ``seconds`` while reading every phone's events."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        for phone in phones:
            phone.drain(min(left, 0.1) / len(phones))


def assert_heard(phone: BaresipPhone, call_dir: Path, freq: float) -> None:
    """``phone`` heard ``freq`` for most of at least a second of audio."""
    samples, rate = read_mono(phone.recording("dec", call_dir))
    assert samples.size / rate >= 1.0, f"{phone.name} heard {samples.size / rate:.2f}s only"
    share = tone_fraction(samples, freq, rate)
    assert share >= HEARD, f"{phone.name}: {freq} Hz in {share:.0%} of what it heard"


def wire_source(phone: BaresipPhone, method: str) -> str:
    """From baresip's SIP trace: ``TLS a -> b`` of the first ``method`` request it got."""
    m = re.search(rf"(?m)^(TLS|TCP|UDP) (\S+) -> (\S+)\s*\n{method} ", phone.log_text())
    assert m is not None, f"no {method} in {phone.name}'s trace\n{phone.report()}"
    return f"{m.group(1)} {m.group(2)} -> {m.group(3)}"


# -- tests -------------------------------------------------------------------------------------
def test_registers_over_tls(rig: Rig, phones: PhoneFactory) -> None:
    """Digest registration over TLS: the binding names the tls transport and the phone's
    connection (its ephemeral source port). (baresip 1.0 refuses a ``sips:`` account itself,
    ENOSYS, before sending anything: ``sips:`` bindings are covered by tests/unit/test_tls.py.)"""
    phones("101")
    (row,) = rig.pbx.wait_registrations("101", 1)
    assert row["source"].startswith(f"tls:{HOST}:"), row
    assert row["contact"].endswith(";transport=tls"), row
    assert "listening on tls" in rig.pbx.log_text()


def test_call_between_tls_phones_with_audio(rig: Rig, phones: PhoneFactory) -> None:
    """101 calls 102, both on TLS: 102 gets the INVITE over the very connection it
    registered on (softpbx's TLS port -> the phone's source port), both hear each other's
    tone, 102 hangs up; the CDR says answered."""
    alice, bob = phones("101"), phones("102")
    (reg,) = rig.pbx.wait_registrations("102", 1)
    since_a, since_b = alice.mark(), bob.mark()
    alice.dial(rig.uri("102"))
    incoming = bob.wait_event("CALL_INCOMING", 8.0, since=since_b)
    assert incoming["peeruri"].startswith("sip:101@"), incoming
    bob.accept()
    established = alice.wait_event("CALL_ESTABLISHED", 5.0, since=since_a)
    bob.wait_event("CALL_ESTABLISHED", 5.0, since=since_b)
    talk(2.5, alice, bob)
    bob.hangup()
    bob.wait_event("CALL_CLOSED", 5.0, since=since_b)
    alice.wait_event("CALL_CLOSED", 5.0, since=since_a)
    source = reg["source"].removeprefix("tls:")
    assert wire_source(bob, "INVITE") == f"TLS {HOST}:{rig.tls_port} -> {source}"
    assert_heard(alice, alice.collect_recordings(), TONES["102"])
    assert_heard(bob, bob.collect_recordings(), TONES["101"])
    row = rig.cdr(lambda r: r["sip_call_id"] == established["id"])
    assert (row["direction"], row["caller"], row["disposition"], row["extension"]) == \
        ("internal", "101", "answered", "102"), row


def test_call_out_to_a_carrier_over_verified_tls(rig: Rig, phones: PhoneFactory) -> None:
    """101 (TLS) dials 8 999 123-45-67: softpbx connects to the carrier over TLS, verifying
    its certificate (tls_ca_file), the carrier (a baresip user agent for +79991234567)
    answers; each side hears the other's tone through the relay."""
    carrier = phones("carrier", register=False)
    # The carrier's user agent: the number the outbound rule produces; it registers nowhere.
    resp = carrier.command("uanew", f"<sip:+79991234567@{HOST}:{rig.carrier_port}>;regint=0")
    assert resp.get("ok"), resp
    alice = phones("101")
    since_a, since_c = alice.mark(), carrier.mark()
    alice.dial(rig.uri("89991234567"))
    carrier.wait_event("CALL_INCOMING", 8.0, since=since_c)
    carrier.accept()
    established = alice.wait_event("CALL_ESTABLISHED", 5.0, since=since_a)
    talk(2.5, alice, carrier)
    alice.hangup()
    alice.wait_event("CALL_CLOSED", 5.0, since=since_a)
    carrier.wait_event("CALL_CLOSED", 5.0, since=since_c)
    via = wire_source(carrier, "INVITE")
    assert via.startswith("TLS ") and via.endswith(f"-> {HOST}:{rig.carrier_port + 1}"), via
    assert_heard(alice, alice.collect_recordings(), TONES["carrier"])
    assert_heard(carrier, carrier.collect_recordings(), TONES["101"])
    row = rig.cdr(lambda r: r["sip_call_id"] == established["id"])
    assert (row["direction"], row["disposition"], row["gateway"]) == \
        ("outbound", "answered", "carrier"), row


def test_carrier_with_an_untrusted_certificate_gets_nothing(rig: Rig, phones: PhoneFactory,
                                                           tmp_path: Path) -> None:
    """The carrier presents a self-signed certificate softpbx does not trust: the handshake
    fails, no INVITE is sent, softpbx logs why and the call fails at once (the failed
    connection ends the INVITE's transaction: RFC 3261 §8.1.3.1), well before Timer B."""
    cert, key = make_cert(tmp_path / "stranger", "stranger")
    bundle = tmp_path / "stranger" / "stranger.pem"
    bundle.write_text(cert.read_text() + key.read_text())
    carrier = phones("carrier", register=False, certificate=bundle)
    resp = carrier.command("uanew", f"<sip:+79991234567@{HOST}:{rig.carrier_port}>;regint=0")
    assert resp.get("ok"), resp
    alice = phones("101")
    since_a = alice.mark()
    started = time.monotonic()
    alice.dial(rig.uri("89991234567"))
    closed = alice.wait_event("CALL_CLOSED", 5.0, since=since_a)
    took = time.monotonic() - started
    assert took < 3.0, f"the call took {took:.1f}s to fail (Timer B is 6.4s here): {closed}"
    log = rig.pbx.wait_for_log(f"tls connect to {HOST}:{rig.carrier_port + 1} failed")
    assert "CERTIFICATE_VERIFY_FAILED" in log, log[-2000:]
    assert not [e for e in carrier.events if e.get("type") == "CALL_INCOMING"], carrier.events
    assert "INVITE" not in carrier.log_text()
