"""TCP the way RFC 3261 §18 and RFC 5626 say, without sockets: where a response goes when its
connection is gone, what a dead registration flow does to calls, the connection caps, and the
rate limit of "rejected message" warnings. Raw bytes in, a fake clock."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from softpbx.aio.sip_transport import TcpConnection, TcpRegistry
from softpbx.config.loader import load_config
from softpbx.config.schema import ConfigError, Transport
from softpbx.core.security import RateLimitedLog
from softpbx.core.switch import REJECTED_LOG_INTERVAL, Switch
from softpbx.core.timers import TimerQueue
from softpbx.sip.events import Flow, Outgoing
from softpbx.sip.parser import parse_message

from .sipkit import LOCAL, FakeClock, crlf, run_until, tcp, udp
from .test_calls import ALICE, make_net, place_call
from .test_registrar import authed_register

ROOT = Path(__file__).resolve().parents[2]
NAT_PHONE = ("127.0.0.1", 40123)
"""Where a phone behind NAT is seen from: its REGISTER's TCP connection (an ephemeral port)."""


def options(*, via: str, branch: str = "z9hG4bKopt1") -> bytes:
    return crlf(f"""OPTIONS sip:127.0.0.1 SIP/2.0
Via: {via};branch={branch}
From: <sip:101@127.0.0.1>;tag=o1
To: <sip:127.0.0.1>
Call-ID: opt-{branch}
CSeq: 1 OPTIONS
Max-Forwards: 70
Content-Length: 0

""")


def outgoing(sw: Switch) -> list[Outgoing]:
    return sw.datagrams_to_send()


@pytest.fixture
def sw() -> Switch:
    cfg = load_config(ROOT / "sip_profiles", ["registrar.min_expires=30"])
    return Switch(config=cfg, auth_secret=b"k" * 32)


# -- responses: RFC 3261 §18.2.2 --------------------------------------------------------------
@pytest.mark.parametrize(("via", "expected"), [
    ("SIP/2.0/TCP 127.0.0.1:5088", ("127.0.0.1", 5088)),
    ("SIP/2.0/TCP 127.0.0.1:5088;rport", ("127.0.0.1", 5088)),     # rport: UDP only
    ("SIP/2.0/TCP 192.168.1.50:5077;rport", ("127.0.0.1", 5077)),  # received, never the Via host
    ("SIP/2.0/TCP phone.example.com", ("127.0.0.1", 5060)),         # no port: 5060, no DNS
])
def test_tcp_response_names_received_and_sent_by_port(sw: Switch, via: str,
                                                      expected: tuple[str, int]) -> None:
    flow = tcp(NAT_PHONE)
    sw.receive(options(via=via), flow, 1000.0)
    (out,) = outgoing(sw)
    assert out.flow == flow  # first choice: the connection the request came in on
    assert parse_message(out.data).status == 200
    assert out.reconnect == expected


def test_every_response_of_a_tcp_invite_carries_the_reconnect_address(sw: Switch) -> None:
    data = crlf("""INVITE sip:102@127.0.0.1 SIP/2.0
Via: SIP/2.0/TCP 192.168.1.50:5070;branch=z9hG4bKinvt;rport
From: <sip:101@127.0.0.1>;tag=i1
To: <sip:102@127.0.0.1>
Call-ID: inv-tcp
CSeq: 1 INVITE
Contact: <sip:101@192.168.1.50:5070;transport=tcp>
Max-Forwards: 70
Content-Length: 0

""")
    sw.receive(data, tcp(NAT_PHONE), 1000.0)
    outs = outgoing(sw)
    assert [parse_message(o.data).status for o in outs] == [100, 401]
    assert {o.reconnect for o in outs} == {("127.0.0.1", 5070)}


def test_error_response_on_tcp_carries_it_too_and_udp_never(sw: Switch) -> None:
    bad = options(via="SIP/2.0/TCP 127.0.0.1:5099").replace(b"CSeq: 1 OPTIONS", b"CSeq: x OPTIONS")
    sw.receive(bad, tcp(NAT_PHONE), 1000.0)
    (out,) = outgoing(sw)
    # (its CSeq is echoed as it came, so read the status line only)
    assert out.data.startswith(b"SIP/2.0 400 ") and out.reconnect == ("127.0.0.1", 5099)
    sw.receive(options(via="SIP/2.0/UDP 127.0.0.1:5062"), udp(), 1000.0)
    (out,) = outgoing(sw)
    assert out.reconnect is None


# -- registration flows: RFC 5626 -------------------------------------------------------------
def register_tcp(sw: Switch, clock: FakeClock, contact: str, *, remote=NAT_PHONE,
                 cseq: int = 1, extra: str = "") -> None:
    resp = authed_register(sw, clock, flow=tcp(remote), contact=contact, cseq=cseq, extra=extra)
    assert resp.status == 200


def test_nat_binding_is_not_offered_once_its_connection_closed(sw: Switch) -> None:
    clock = FakeClock()
    register_tcp(sw, clock, "<sip:{user}@192.168.1.50:5060;transport=tcp>")
    (b,) = sw.registrar.lookup("101", clock.now)
    assert b.flow == tcp(NAT_PHONE)  # reached at its real source, not at 192.168.1.50
    sw.flow_closed(tcp(("127.0.0.1", 40999)), clock.now)  # someone else's connection
    assert len(sw.registrar.lookup("101", clock.now)) == 1
    sw.flow_closed(tcp(NAT_PHONE), clock.now)
    assert sw.registrar.lookup("101", clock.now) == []
    # The row stays until it expires or the phone registers again.
    assert sw.registrar.binding_count == 1
    assert sw.registrar.flow_dead("101", b.key)
    assert outgoing(sw) == []  # and nothing is sent anywhere
    # It registers again over a new connection: reachable there.
    again = ("127.0.0.1", 40124)
    register_tcp(sw, clock, "<sip:{user}@192.168.1.50:5060;transport=tcp>", remote=again, cseq=3)
    (b2,) = sw.registrar.lookup("101", clock.now)
    assert b2.flow == tcp(again) and not sw.registrar.flow_dead("101", b2.key)
    # The old connection closing late changes nothing for the new one.
    sw.flow_closed(tcp(NAT_PHONE), clock.now)
    assert sw.registrar.lookup("101", clock.now) == [b2]


def test_outbound_binding_with_its_own_ip_is_not_offered_either(sw: Switch) -> None:
    clock = FakeClock()
    register_tcp(sw, clock, "<sip:{user}@127.0.0.1:5090;transport=tcp;ob>;reg-id=1;"
                            '+sip.instance="<urn:uuid:00000000-0000-0000-0000-000000000001>"',
                 extra="Supported: outbound")
    sw.flow_closed(tcp(NAT_PHONE), clock.now)
    assert sw.registrar.lookup("101", clock.now) == []


def test_plain_binding_not_behind_nat_is_reached_by_a_new_connection(sw: Switch) -> None:
    # RFC 3261 §18.1.1: no outbound, the Contact names the very IP the REGISTER came from.
    clock = FakeClock()
    register_tcp(sw, clock, "<sip:{user}@127.0.0.1:5090;transport=tcp>")
    sw.flow_closed(tcp(NAT_PHONE), clock.now)
    (b,) = sw.registrar.lookup("101", clock.now)
    assert b.flow == Flow(Transport.TCP, ("127.0.0.1", 5090), LOCAL)


def test_binding_row_still_expires_and_200_lists_it(sw: Switch) -> None:
    clock = FakeClock()
    register_tcp(sw, clock, "<sip:{user}@192.168.1.50:5060;transport=tcp>")
    sw.flow_closed(tcp(NAT_PHONE), clock.now)
    # A second phone of 101 registers: the 200 lists both current bindings (RFC 3261 §10.3).
    resp = authed_register(sw, clock, flow=udp(), contact="<sip:{user}@127.0.0.1:5062>", cseq=5,
                           call_id="reg-2")
    assert len(resp.get_all("contact")) == 2
    assert [b.contact for b in sw.registrar.lookup("101", clock.now)] == ["sip:101@127.0.0.1:5062"]
    run_until(sw, clock, clock.now + 3601)
    assert sw.registrar.binding_count == 0 and not sw.registrar._dead


def test_call_to_extension_whose_connection_died_fails_at_once_with_480() -> None:
    net = make_net()
    tflow = tcp(NAT_PHONE)
    net.sw.registrar._bindings.pop("103", None)
    register_tcp(net.sw, net.clock, "<sip:{user}@192.168.1.50:5060;transport=tcp>")
    net.sw.datagrams_to_send()
    # 103 registers over TCP from behind NAT (its own credentials).
    resp = authed_register(net.sw, net.clock, user="103", password="secret103", flow=tflow,
                           contact="<sip:{user}@192.168.1.50:5060;transport=tcp>",
                           call_id="reg-103")
    assert resp.status == 200
    net.sw.flow_closed(tflow, net.clock.now)
    place_call(net, "103")
    final = [m for m in net.take(ALICE) if getattr(m, "status", 0) >= 200]
    assert [m.status for m in final][-1:] == [480]
    assert net.take(NAT_PHONE) == []  # no INVITE went anywhere
    assert net.sw.calls == {}


# -- connection caps ----------------------------------------------------------------------------
class FakeTransport:
    """What TcpRegistry touches of an asyncio transport."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def connection(registry: TcpRegistry, remote: tuple[str, int], at: float) -> TcpConnection:
    conn = TcpConnection(local=LOCAL, receiver=lambda *a: None, registry=registry, max_size=65536)
    conn.transport = FakeTransport()  # type: ignore[assignment]
    conn.flow = Flow(Transport.TCP, remote, LOCAL)
    conn.last_activity = at
    registry.add(conn)
    return conn


def test_per_ip_cap_closes_that_ips_idlest_connection() -> None:
    closed: list[Flow] = []
    reg = TcpRegistry(max_connections=100, max_per_ip=3, on_closed=closed.append)
    a = [connection(reg, ("10.0.0.1", 1000 + i), float(i)) for i in range(3)]
    other = connection(reg, ("10.0.0.2", 2000), 3.0)
    reg.touch(a[0])  # the oldest speaks again: a[1] is now the idlest of 10.0.0.1
    d = connection(reg, ("10.0.0.1", 1003), 4.0)
    assert a[1].transport.closed and closed == [a[1].flow]  # type: ignore[union-attr]
    assert not a[0].transport.closed and not other.transport.closed  # type: ignore[union-attr]
    assert reg.count_from("10.0.0.1") == 3 and reg.get(d.flow) is d
    # Its connection_lost comes later: reported once only.
    a[1].connection_lost(None)
    assert closed == [a[1].flow] and reg.evicted == 1


def test_total_cap_closes_the_idlest_of_all() -> None:
    closed: list[Flow] = []
    reg = TcpRegistry(max_connections=3, max_per_ip=3, on_closed=closed.append)
    conns = [connection(reg, (f"10.0.0.{i}", 5060), float(i)) for i in range(1, 4)]
    reg.touch(conns[0])
    connection(reg, ("10.0.0.9", 5060), 9.0)
    assert closed == [conns[1].flow] and len(reg.conns) == 3


def test_closed_connection_is_reported_once() -> None:
    closed: list[Flow] = []
    reg = TcpRegistry(on_closed=closed.append)
    c = connection(reg, ("10.0.0.1", 1000), 0.0)
    c.connection_lost(None)
    c.connection_lost(None)
    assert closed == [c.flow] and reg.conns == {} and reg.count_from("10.0.0.1") == 0


def edited(tmp_path: Path, sip: str) -> Path:
    d = tmp_path / "profiles"
    shutil.copytree(ROOT / "sip_profiles", d)
    main = d / "softpbx.toml"
    main.write_text(main.read_text().replace("[sip]\n", f"[sip]\n{sip}\n", 1))
    return d


def test_caps_are_configurable(tmp_path: Path) -> None:
    cfg = load_config(edited(tmp_path, "tcp_max_connections = 50\ntcp_max_connections_per_ip = 5"))
    assert (cfg.sip.tcp_max_connections, cfg.sip.tcp_max_connections_per_ip) == (50, 5)
    default = load_config(ROOT / "sip_profiles")
    assert (default.sip.tcp_max_connections, default.sip.tcp_max_connections_per_ip) == (10_000, 100)


@pytest.mark.parametrize(("text", "key", "problem"), [
    ("tcp_max_connections = 0", "sip.tcp_max_connections", "range"),
    ("tcp_max_connections_per_ip = -1", "sip.tcp_max_connections_per_ip", "range"),
    ('tcp_max_connections = "many"', "sip.tcp_max_connections", ""),
    ("tcp_max_connections = 10\ntcp_max_connections_per_ip = 11",
     "sip.tcp_max_connections_per_ip", "at most"),
])
def test_bad_caps_are_refused_with_file_and_key(tmp_path: Path, text: str, key: str,
                                                problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(edited(tmp_path, text))
    assert exc.value.file == "softpbx.toml" and exc.value.key == key
    assert problem in exc.value.problem


# -- "rejected message" warnings: rate-limited per source --------------------------------------
def garbage(sw: Switch, src: tuple[str, int], now: float, n: int) -> None:
    for i in range(n):
        sw.receive(b"NOT SIP AT ALL %d\r\n\r\n" % i, udp(src), now)


def rejected_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]


def test_rejected_message_warnings_are_rate_limited_per_source(sw: Switch, caplog) -> None:
    clock = FakeClock()
    caplog.set_level(logging.WARNING, logger="softpbx.switch")
    garbage(sw, ("10.0.0.7", 5060), clock.now, 50)
    garbage(sw, ("10.0.0.8", 5060), clock.now, 1)
    lines = rejected_lines(caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith("rejected message from udp:10.0.0.7:5060")
    assert lines[1].startswith("rejected message from udp:10.0.0.8:5060")
    caplog.clear()
    # The summary comes from the switch's timer, even if the source went quiet.
    when = sw.get_timer()
    assert when is not None and when <= clock.now + REJECTED_LOG_INTERVAL
    run_until(sw, clock, clock.now + REJECTED_LOG_INTERVAL)
    assert rejected_lines(caplog) == ["49 more rejected messages from 10.0.0.7 not logged in 10 s"]
    caplog.clear()
    # Quiet for a whole interval: the next one is written in full again.
    run_until(sw, clock, clock.now + REJECTED_LOG_INTERVAL)
    assert rejected_lines(caplog) == [] and sw.rejected_log.tracked == 0
    garbage(sw, ("10.0.0.7", 5060), clock.now, 1)
    assert len(rejected_lines(caplog)) == 1


def test_rate_limited_log_under_a_steady_flood() -> None:
    logger = logging.getLogger("test.ratelimit")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger.addHandler(h := Keep())
    logger.propagate = False
    try:
        q = TimerQueue()
        rl = RateLimitedLog(logger=logger, interval=10.0, timers=q, max_sources=2)
        # 10 messages a second for a minute: the first line and one summary per 10 s.
        for tick in range(600):
            now = tick / 10
            q.fire(now)
            rl.warning("a", now, "bad from %s", "a")
        assert records[0] == "bad from a"
        assert len(records) == 1 + 5 and all("not logged" in r for r in records[1:])
        # Bounded: a third source closes the oldest interval early (its summary is written).
        records.clear()
        rl.warning("b", 60.0, "bad from %s", "b")
        rl.warning("c", 60.0, "bad from %s", "c")
        assert rl.tracked == 2 and records[-1] == "bad from c"
    finally:
        logger.removeHandler(h)


def test_ringing_tcp_callee_whose_connection_dies_is_given_up_at_once() -> None:
    # RFC 3261 §17.1.4: a transport failure ends the INVITE client transaction now, not when
    # the no-answer timer runs out (the caller would hear ringback from a phone that is gone).
    from .test_calls import answer

    net = make_net()
    tflow = tcp(NAT_PHONE)
    net.sw.registrar._bindings.pop("103", None)
    resp = authed_register(net.sw, net.clock, user="103", password="secret103", flow=tflow,
                           contact="<sip:{user}@192.168.1.50:5060;transport=tcp>",
                           call_id="reg-103")
    assert resp.status == 200
    place_call(net, "103")
    net.take(ALICE)
    (inv,) = net.take(NAT_PHONE)
    net.sw.receive(answer(inv, 180), tflow, net.clock.now)
    net.collect()
    assert [m.status for m in net.take(ALICE)] == [180]
    assert net.sw.stack.flow_closed(tcp(("127.0.0.1", 1)), net.clock.now) == 0  # not its flow
    net.sw.flow_closed(tflow, net.clock.now)
    net.collect()
    finals = [m.status for m in net.take(ALICE) if m.status >= 200]
    assert finals == [408], finals  # the leg failed as one whose Timer B fired, only now
    assert net.sw.calls == {}
    assert net.take(NAT_PHONE) == []  # no CANCEL into the dead connection's address
    net.assert_no_leaks()
