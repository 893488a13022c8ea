"""SIP over TLS below the switch: the profile's TLS keys and their checks (``softpbx check``),
the listener and the client side over real 127.0.0.1 sockets (our certificate verified, or
refused), TLS-flavoured Via/Contact/reconnect addresses, and the idle close that spares a
connection carrying a live registration (TCP and TLS alike)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from pathlib import Path

import pytest

from softpbx.aio.sip_transport import SipTransports, TcpConnection, TcpRegistry
from softpbx.aio.tls import client_context, server_context
from softpbx.config.loader import describe, load_config
from softpbx.config.schema import ConfigError, Transport
from softpbx.core.switch import Switch
from softpbx.sip.events import Flow, Outgoing
from softpbx.sip.headers import parse_via
from softpbx.sip.message import Request
from softpbx.sip.stack import _reconnect_to
from tests.support.tls import make_cert, openssl_binary

from .sipkit import FakeClock, crlf
from .test_registrar import authed_register
from .test_tcp_flows import FakeTransport

ROOT = Path(__file__).resolve().parents[2]
PHONE = ("127.0.0.1", 40200)

pytestmark = pytest.mark.skipif(openssl_binary() is None, reason="needs the openssl command")


@pytest.fixture
def profiles(tmp_path: Path) -> Path:
    """A copy of the sample with a certificate pair in ``tls/`` (relative paths)."""
    d = tmp_path / "profiles"
    shutil.copytree(ROOT / "sip_profiles", d)
    make_cert(d / "tls", "pbx")
    return d


def with_tls(root: Path, profile: str = "internal", extra: str = "", *,
             cert: str = "tls/pbx.crt", key: str = "tls/pbx.key") -> None:
    path = root / f"{profile}.toml"
    text = path.read_text().replace('transports = ["udp", "tcp"]',
                                    'transports = ["udp", "tcp", "tls"]', 1)
    text += f'tls_cert = "{cert}"\ntls_key = "{key}"\ntls_port = 5071\n{extra}'
    path.write_text(text)


# -- configuration ---------------------------------------------------------------------------
def test_tls_profile_loads_with_paths_relative_to_the_profiles_dir(profiles: Path) -> None:
    with_tls(profiles)
    cfg = load_config(profiles)
    p = cfg.internal
    assert Transport.TLS in p.transports and p.tls_port == 5071 and p.tls_verify
    assert "tls      127.0.0.1:5071" in describe(cfg)
    assert server_context(p, cfg.profiles_dir).minimum_version is ssl.TLSVersion.TLSv1_2
    assert client_context(p, cfg.profiles_dir).verify_mode is ssl.CERT_REQUIRED
    assert cfg.external.tls_port == 5061 and Transport.TLS not in cfg.external.transports


@pytest.mark.parametrize(("setup", "key", "word"), [
    (lambda d: with_tls(d, cert=""), "profile.tls_cert", "required"),
    (lambda d: with_tls(d, key="tls/missing.key"), "profile.tls_key", "not found"),
    # A certificate with another certificate's key: OpenSSL's key values mismatch.
    (lambda d: (make_cert(d / "tls", "other"), with_tls(d, key="tls/other.key")),
     "profile.tls_key", "do not load"),
    (lambda d: ((d / "tls" / "junk.crt").write_text("not a PEM\n"),
                with_tls(d, cert="tls/junk.crt")), "profile.tls_key", "do not load"),
    (lambda d: with_tls(d, extra="tls_port = 5060\n".replace("tls_port", "sip_port")),
     "profile.tls_port", "differ"),
    (lambda d: with_tls(d, extra='tls_ca_file = "tls/nothing.pem"\n'), "profile.tls_ca_file",
     "not found"),
], ids=["no cert", "missing key", "mismatched pair", "not PEM", "same port as tcp", "no ca"])
def test_broken_tls_settings_name_file_and_key(profiles: Path, setup, key: str, word: str) -> None:
    setup(profiles)
    if key == "profile.tls_port":  # both sip_port lines: keep the last (ours)
        path = profiles / "internal.toml"
        path.write_text(path.read_text().replace("sip_port = 5060\n", "", 1)
                        .replace("tls_port = 5071\n", "tls_port = 5060\n"))
    with pytest.raises(ConfigError) as exc:
        load_config(profiles)
    err = exc.value
    assert (err.file, err.key) == ("internal.toml", key), str(err)
    assert word in err.problem, str(err)


def test_tls_gateway_needs_tls_on_the_external_profile(profiles: Path) -> None:
    gw = profiles / "gateways" / "carrier.toml"
    gw.write_text(gw.read_text().replace('transport = "udp"', 'transport = "tls"'))
    assert 'transport = "tls"' in gw.read_text()
    with pytest.raises(ConfigError) as exc:
        load_config(profiles)
    assert (exc.value.file, exc.value.key) == ("gateways/carrier.toml", "gateway.transport")
    with_tls(profiles, "external")
    assert load_config(profiles).gateways[0].transport is Transport.TLS


# -- the core's TLS flavour ------------------------------------------------------------------
def tls_switch(profiles: Path) -> Switch:
    with_tls(profiles)
    return Switch(config=load_config(profiles, ["registrar.min_expires=30"]),
                  auth_secret=b"k" * 32)


def test_contact_via_and_reconnect_port_over_tls(profiles: Path) -> None:
    sw = tls_switch(profiles)
    flow = Flow(Transport.TLS, PHONE, ("127.0.0.1", 5071))
    assert sw.contact_for(flow) == "<sip:softpbx@127.0.0.1:5071;transport=tls>"
    req = Request("OPTIONS", "sip:101@127.0.0.1", [("Max-Forwards", "70"),
                  ("From", "<sip:softpbx@127.0.0.1>;tag=1"), ("To", "<sip:101@127.0.0.1>"),
                  ("Call-ID", "o1"), ("CSeq", "1 OPTIONS"), ("Content-Length", "0")])
    sw.stack.send_request(req, flow, 0.0)
    (out,) = sw.datagrams_to_send()
    assert out.data.startswith(b"OPTIONS sip:101@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TLS "
                               b"127.0.0.1:5071;branch=")
    via = parse_via("SIP/2.0/TLS 10.0.0.5;branch=z9hG4bKa")
    assert _reconnect_to(via, flow) == ("127.0.0.1", 5061)  # RFC 3261 §18.2.2: TLS default
    assert _reconnect_to(via, Flow(Transport.TCP, PHONE, ("127.0.0.1", 5060)))[1] == 5060


def test_sips_binding_reconnects_over_tls_to_5061(profiles: Path) -> None:
    sw, clock = tls_switch(profiles), FakeClock()
    flow = Flow(Transport.TLS, PHONE, ("127.0.0.1", 5071))
    resp = authed_register(sw, clock, flow=flow, contact="<sips:{user}@127.0.0.1>")
    assert resp.status == 200
    (b,) = sw.registrar.lookup("101", clock.now)
    assert b.flow == flow and sw.registrar.holds_binding(flow, clock.now)
    sw.flow_closed(flow, clock.now)
    (b,) = sw.registrar.lookup("101", clock.now)
    assert b.flow == Flow(Transport.TLS, ("127.0.0.1", 5061), ("127.0.0.1", 5071))


def stream(registry: TcpRegistry, flow: Flow, at: float) -> TcpConnection:
    """A registered connection of ``flow``'s kind on a fake transport."""
    conn = TcpConnection(local=flow.local, receiver=lambda *a: None, registry=registry,
                         max_size=65536, kind=flow.transport)
    conn.transport = FakeTransport()  # type: ignore[assignment]
    conn.flow = flow
    conn.last_activity = at
    registry.add(conn)
    return conn


# -- idle close vs registrations -------------------------------------------------------------
@pytest.mark.parametrize("kind", [Transport.TCP, Transport.TLS])
def test_idle_close_spares_connections_with_a_live_binding(profiles: Path,
                                                           kind: Transport) -> None:
    """A phone registered for an hour over a connection it never pings is still reachable
    after the 600 s idle timeout; once its binding lapses (or for a connection with none)
    the idle close applies."""
    sw, clock = tls_switch(profiles), FakeClock()
    local = ("127.0.0.1", 5071 if kind is Transport.TLS else 5060)
    phone_flow = Flow(kind, PHONE, local)
    assert authed_register(sw, clock, flow=phone_flow, expires="3600").status == 200
    reg = TcpRegistry(on_closed=lambda flow: sw.flow_closed(flow, clock.now))
    t0 = clock.now  # registered now, for 3600 s, and silent ever since
    phone = stream(reg, phone_flow, t0)
    idle = stream(reg, Flow(kind, ("127.0.0.1", 40201), local), t0)

    def housekeep(now: float) -> int:
        n = reg.close_idle(now, 600.0, keep=lambda f: sw.registrar.holds_binding(f, now))
        for conn in list(reg.conns.values()):
            if conn.transport.closed:  # type: ignore[union-attr]
                conn.connection_lost(None)  # what asyncio reports after the close
        return n

    def open_flows() -> list[Flow]:
        return [c.flow for c in reg.conns.values()]  # type: ignore[misc]

    assert housekeep(t0 + 601) == 1 and open_flows() == [phone_flow]
    assert idle.transport is None  # closed, and reported
    assert housekeep(t0 + 3599) == 0 and open_flows() == [phone_flow]
    assert sw.registrar.lookup("101", t0 + 3599)[0].flow == phone_flow
    assert housekeep(t0 + 3601) == 1 and open_flows() == [] and phone.transport is None
    # Without a keep callback (or for a recent connection) nothing changes.
    fresh = TcpRegistry()
    c = stream(fresh, Flow(Transport.TCP, PHONE, ("127.0.0.1", 5060)), 100.0)
    assert fresh.close_idle(650.0, 600.0) == 0 and fresh.close_idle(701.0, 600.0) == 1
    assert isinstance(c.transport, FakeTransport) and c.transport.closed


# -- real sockets ----------------------------------------------------------------------------
OPTIONS = crlf("OPTIONS sip:127.0.0.1 SIP/2.0\nVia: SIP/2.0/TLS 127.0.0.1:1;branch=z9hG4bKt1\n"
               "From: <sip:a@127.0.0.1>;tag=1\nTo: <sip:127.0.0.1>\nCall-ID: t1\n"
               "CSeq: 1 OPTIONS\nContent-Length: 0\n\n")


def test_listener_and_client_over_real_tls(profiles: Path) -> None:
    """Our listener takes a TLS client and frames its messages; a TLS flow we send on
    opens a verified connection (our CA file trusts the peer) or, unverified certificate,
    none (the message is dropped with a warning; nothing crashes)."""
    with_tls(profiles, extra='tls_ca_file = "tls/pbx.crt"\n')
    cfg = load_config(profiles)
    prof = cfg.internal

    async def scenario() -> None:
        got: list[tuple[bytes, Flow]] = []
        arrived = asyncio.Event()

        def receiver(data: bytes, flow: Flow, err: str | None) -> None:
            got.append((data, flow))
            arrived.set()

        tp = SipTransports(receiver=receiver, max_size=65536)
        line = await tp.listen_tls("127.0.0.1", 0, server_context(prof, cfg.profiles_dir))
        port = tp.tcp_servers[0].sockets[0].getsockname()[1]
        assert line == f"SIP listening on tls 127.0.0.1:{port}"
        # 1. A phone connects and sends a request; the answer goes back on its connection.
        phone_ctx = ssl.create_default_context(cafile=str(profiles / "tls" / "pbx.crt"))
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=phone_ctx,
                                    server_hostname="127.0.0.1"), 5)
        writer.write(OPTIONS)
        await asyncio.wait_for(arrived.wait(), 5)
        data, flow = got[0]
        assert data == OPTIONS and flow.transport is Transport.TLS
        assert flow.local == ("127.0.0.1", port) and flow.reliable
        tp.send(Outgoing(flow, b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"))
        assert (await asyncio.wait_for(reader.readline(), 5)) == b"SIP/2.0 200 OK\r\n"
        writer.close()
        # 2. Client side: a verified connection to our own listener, by IP (the SAN has it).
        got.clear()
        arrived.clear()
        local = ("127.0.0.1", 5071)
        tp.tls_client[local] = client_context(prof, cfg.profiles_dir)
        tp.send(Outgoing(Flow(Transport.TLS, ("127.0.0.1", port), local), OPTIONS))
        await asyncio.wait_for(arrived.wait(), 5)
        assert got[0][0] == OPTIONS
        # 3. A peer whose certificate is not trusted: refused, nothing delivered.
        other_cert, other_key = make_cert(profiles / "tls", "stranger")
        stranger = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        stranger.load_cert_chain(other_cert, other_key)
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0, ssl=stranger)
        sport = server.sockets[0].getsockname()[1]
        tp.send(Outgoing(Flow(Transport.TLS, ("127.0.0.1", sport), local), OPTIONS))
        for _ in range(100):  # bounded: the failed handshake ends the attempt
            if not tp._connecting:
                break
            await asyncio.sleep(0.05)
        assert not tp._connecting and tp.tcp.get(Flow(Transport.TLS, ("127.0.0.1", sport),
                                                      local)) is None
        server.close()
        await tp.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
