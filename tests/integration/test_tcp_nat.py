"""TCP phones and phones behind NAT against a real softpbx process, real sockets on 127.0.0.1.

"Behind NAT" means: the phone writes a private address (192.168.1.50) into its Contact, Via
and SDP while its packets come from 127.0.0.1, and (on TCP) listens nowhere, so only its
registration's connection reaches it. Nothing here sends to 192.168.1.50, and each test checks
that softpbx did not try to either (no connection attempt in its log, RTP latched first).
"""

from __future__ import annotations

import socket
import time

import pytest

from softpbx.sip.message import Request, Response

from ..conftest import PbxFactory
from ..support.phone import Phone, build_request, make_sdp, new_tag, sdp_audio_address
from ..support.rtp import RtpEndpoint
from ..support.server import PbxProcess
from ..support.tcp_phone import PRIVATE_IP, TcpPhone

HOST = "127.0.0.1"


def loopback(addr: tuple[str, int]) -> tuple[str, int]:
    """``addr`` if it is a loopback address: the only traffic target the tests allow."""
    assert addr[0].startswith("127."), f"refusing to send to {addr}"
    return addr


def assert_never_tried_private(pbx: PbxProcess) -> None:
    log = pbx.log_text()
    assert f"tcp connect to {PRIVATE_IP}" not in log, log


def talk(a_rtp: RtpEndpoint, a_dest: tuple[str, int], b_rtp: RtpEndpoint,
         b_dest: tuple[str, int]) -> None:
    """Audio both ways: the NAT side (b) speaks first, so the relay latches its real source
    before it has anything to send it (until then it would only know the private SDP address).
    Each side must hear exactly the payloads the other sent."""
    sent_b = b_rtp.send_pcmu(loopback(b_dest), count=10)
    heard_a = a_rtp.wait_packets(10)
    assert [p.payload for p in heard_a[-10:]] == [p.payload for p in sent_b], "caller hears nothing"
    sent_a = a_rtp.send_pcmu(loopback(a_dest), count=10)
    heard_b = b_rtp.wait_packets(10)
    assert [p.payload for p in heard_b[-10:]] == [p.payload for p in sent_a], "NAT phone hears nothing"


class NatUdpPhone(Phone):
    """The UDP test phone writing a private address into Via, Contact and SDP."""

    @property
    def contact(self) -> str:
        return f"<sip:{self.user}@{PRIVATE_IP}:5060>"

    def via(self, branch: str) -> str:
        return f"SIP/2.0/UDP {PRIVATE_IP}:5060;branch={branch};rport"


def test_tcp_phone_behind_nat_takes_a_call_on_its_registration_connection(pbx: PbxProcess) -> None:
    with (TcpPhone(user="102", password="secret102", pbx=pbx.sip_addr, nat=True) as bob,
          Phone(user="101", password="secret101", pbx=pbx.sip_addr) as alice,
          RtpEndpoint() as a_rtp, RtpEndpoint() as b_rtp):
        bob.register()
        (reg,) = pbx.wait_registrations("102", 1)
        assert reg["source"] == f"tcp:{HOST}:{bob.conn.local[1]}"  # its real source
        call = alice.call("102", sdp=make_sdp(a_rtp.port))
        inv = bob.wait_invite()
        assert inv.conn is bob.conn  # the registration's connection: nothing else reaches it
        assert isinstance(inv.msg, Request)
        tag = new_tag()
        bob.respond(inv, 180, to_tag=tag)
        bob.respond(inv, 200, to_tag=tag, body=bob.sdp(b_rtp.port))
        bob.wait_for(lambda m: isinstance(m, Request) and m.method == "ACK"
                     and m.call_id == inv.msg.call_id, "ACK")
        assert call.wait_final().status == 200
        talk(a_rtp, call.remote_media, b_rtp, sdp_audio_address(inv.msg.body))
        assert call.bye().status == 200
        bye = bob.wait_for(lambda m: isinstance(m, Request) and m.method == "BYE", "BYE")
        assert bye.conn is bob.conn
    assert_never_tried_private(pbx)


def test_udp_phone_behind_nat_is_reached_at_its_source_and_hears_audio(pbx: PbxProcess) -> None:
    with (NatUdpPhone(user="102", password="secret102", pbx=pbx.sip_addr) as bob,
          Phone(user="101", password="secret101", pbx=pbx.sip_addr) as alice,
          RtpEndpoint() as a_rtp, RtpEndpoint() as b_rtp):
        bob.register()
        (reg,) = pbx.wait_registrations("102", 1)
        assert reg["contact"] == f"sip:102@{PRIVATE_IP}:5060"
        assert reg["source"] == f"udp:{HOST}:{bob.port}"
        call = alice.call("102", sdp=make_sdp(a_rtp.port))
        incoming = bob.wait_invite()  # it arrived at the phone's socket: its real source
        nat_sdp = make_sdp(b_rtp.port, ip=PRIVATE_IP)
        incoming.ring()
        incoming.answer(nat_sdp)
        assert call.wait_final().status == 200
        talk(a_rtp, call.remote_media, b_rtp, incoming.remote_media)
        assert incoming.bye().status == 200  # the NAT phone hangs up
        call.wait_bye()


def test_call_to_tcp_phone_whose_connection_died_gets_480_at_once(pbx: PbxProcess) -> None:
    with (TcpPhone(user="102", password="secret102", pbx=pbx.sip_addr, nat=True) as bob,
          Phone(user="101", password="secret101", pbx=pbx.sip_addr) as alice):
        bob.register()
        pbx.wait_registrations("102", 1)
        bob.conn.close()  # the NAT mapping is gone
        pbx.wait_for_log("not offered to calls")
        started = time.monotonic()
        call = alice.call("102", sdp=make_sdp(40000))
        final = call.wait_final(timeout=10.0)
        elapsed = time.monotonic() - started
        assert final.status == 480, final
        assert elapsed < 3.0, f"480 after {elapsed:.1f}s: waited for a timer (Timer B is 32 s)"
        # It registers again over a new connection: reachable there at once.
        bob.conn = bob.connect()
        bob.register()
        call2 = alice.call("102", sdp=make_sdp(40002))
        inv = bob.wait_invite()
        assert inv.conn is bob.conn
        bob.respond(inv, 486, to_tag=new_tag())
        assert call2.wait_final().status == 486
    assert_never_tried_private(pbx)


def test_ringing_tcp_phone_whose_connection_dies_is_given_up_at_once(pbx: PbxProcess) -> None:
    with (TcpPhone(user="102", password="secret102", pbx=pbx.sip_addr, nat=True) as bob,
          Phone(user="101", password="secret101", pbx=pbx.sip_addr) as alice):
        bob.register()
        call = alice.call("102", sdp=make_sdp(40000))
        inv = bob.wait_invite()
        bob.respond(inv, 180, to_tag=new_tag())
        call.wait_status(180)
        started = time.monotonic()
        bob.conn.close()  # out of Wi-Fi while ringing
        final = call.wait_final(timeout=10.0)
        assert final.status == 408 and time.monotonic() - started < 3.0, final
    assert_never_tried_private(pbx)


def test_tcp_binding_restored_at_start_up_has_a_dead_flow(pbx: PbxProcess) -> None:
    # No connection outlives the process: after a restart the phone must register again.
    with TcpPhone(user="102", password="secret102", pbx=pbx.sip_addr, nat=True) as bob:
        bob.register()
        pbx.wait_registrations("102", 1)
        pbx.restart()
        assert "1 registrations restored" in pbx.log_text()
        with Phone(user="101", password="secret101", pbx=pbx.sip_addr) as alice:
            started = time.monotonic()
            final = alice.call("102", sdp=make_sdp(40000)).wait_final(timeout=10.0)
            assert final.status == 480 and time.monotonic() - started < 3.0
    assert_never_tried_private(pbx)


def test_tcp_phone_not_behind_nat_is_reached_by_a_new_connection(pbx: PbxProcess) -> None:
    # RFC 3261 §18.1.1: a plain (not outbound) Contact on the REGISTER's own IP.
    with (TcpPhone(user="102", password="secret102", pbx=pbx.sip_addr) as bob,
          Phone(user="101", password="secret101", pbx=pbx.sip_addr) as alice):
        bob.register()
        bob.conn.close()
        pbx.wait_for_log("reached by a new connection to its Contact")
        call = alice.call("102", sdp=make_sdp(40000))
        inv = bob.wait_invite()
        assert inv.conn in bob.accepted and inv.conn.sock.getsockname()[1] == bob.listen_port
        bob.respond(inv, 486, to_tag=new_tag())
        assert call.wait_final().status == 486


def test_outbound_tcp_phone_with_dead_flow_is_not_reached_at_its_contact(pbx: PbxProcess) -> None:
    # RFC 5626: an ;ob Contact is reached over its flow only, even when it names our IP.
    with (TcpPhone(user="102", password="secret102", pbx=pbx.sip_addr, outbound=True) as bob,
          Phone(user="101", password="secret101", pbx=pbx.sip_addr) as alice):
        resp = bob.register()
        assert "outbound" in (resp.get("require") or "")
        bob.conn.close()
        pbx.wait_for_log("not offered to calls")
        call = alice.call("102", sdp=make_sdp(40000))
        assert call.wait_final(timeout=10.0).status == 480
        assert bob.accepted == []


def test_response_after_connection_loss_goes_to_received_and_sent_by_port(pbx: PbxProcess) -> None:
    # RFC 3261 §18.2.2: the caller's connection drops while its call rings; the 180 and the
    # 200 come on a new connection to its Via's sent-by port, not to the dead ephemeral port.
    with (TcpPhone(user="101", password="secret101", pbx=pbx.sip_addr) as alice,
          Phone(user="102", password="secret102", pbx=pbx.sip_addr) as bob,
          RtpEndpoint() as a_rtp):
        bob.register()
        out = alice.invite("102", alice.sdp(a_rtp.port))
        incoming = bob.wait_invite()
        alice.conn.close()
        incoming.ring()
        ringing = alice.wait_response(out.call_id, 2, "INVITE", status=180)
        assert ringing.conn in alice.accepted
        assert ringing.conn.sock.getsockname()[1] == alice.listen_port
        incoming.answer(make_sdp(40010), wait_ack=False)
        ok = alice.wait_response(out.call_id, 2, "INVITE")
        assert isinstance(ok.msg, Response) and ok.msg.status == 200
        assert ok.conn is ringing.conn  # the new connection is reused
        out.ack_2xx(ok)
        incoming.wait_ack()
        # Alice hangs up on the new connection.
        target = str(ok.msg.contacts[0].uri)
        ok.conn.send(build_request("BYE", target, [
            ("Via", alice.via()), ("Max-Forwards", "70"), ("From", out.frm),
            ("To", ok.msg.get("to") or ""), ("Call-ID", out.call_id), ("CSeq", "3 BYE")]))
        assert alice.wait_response(out.call_id, 3, "BYE").msg.status == 200  # type: ignore[union-attr]
        incoming.wait_bye()


# -- connection caps -------------------------------------------------------------------------
def connect_from(ip: str, pbx: PbxProcess) -> socket.socket:
    sock = socket.create_connection(loopback(pbx.sip_addr), timeout=2.0, source_address=(ip, 0))
    return sock


def options_answered(sock: socket.socket, pbx: PbxProcess, timeout: float = 2.0) -> bool:
    """OPTIONS on ``sock``: True when the 200 comes back, False when the server closed it."""
    ip, port = sock.getsockname()[:2]
    branch = "z9hG4bK" + new_tag()
    sock.sendall(build_request("OPTIONS", f"sip:{pbx.sip_addr[0]}", [
        ("Via", f"SIP/2.0/TCP {ip}:{port};branch={branch}"), ("Max-Forwards", "70"),
        ("From", f"<sip:probe@{ip}>;tag={new_tag()}"), ("To", f"<sip:{pbx.sip_addr[0]}>"),
        ("Call-ID", f"{new_tag()}@{ip}"), ("CSeq", "1 OPTIONS")]))
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65535)
        except TimeoutError:
            break
        except (ConnectionResetError, BrokenPipeError):
            return False
        if not data:
            return False
        buf += data
        if b"SIP/2.0 200" in buf and b"\r\n\r\n" in buf:
            return True
    raise AssertionError(f"no answer and no close within {timeout}s: {buf[:200]!r}")


def closed_by_server(sock: socket.socket, timeout: float = 2.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(65535) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_tcp_connection_caps_close_the_idlest(pbx_factory: PbxFactory) -> None:
    pbx = pbx_factory(overrides={"sip.tcp_max_connections": "4",
                                 "sip.tcp_max_connections_per_ip": "2"})
    socks: dict[str, socket.socket] = {}
    try:
        # Each one speaks once as it opens: that sets the order of last activity.
        for name, ip in (("a1", "127.0.0.1"), ("a2", "127.0.0.1"), ("b1", "127.0.0.2"),
                         ("c1", "127.0.0.3")):
            socks[name] = connect_from(ip, pbx)
            assert options_answered(socks[name], pbx), name
        assert options_answered(socks["a1"], pbx)  # a1 speaks again: a2 is 127.0.0.1's idlest
        # A third from 127.0.0.1: over its per-IP cap, its idlest (a2) goes.
        socks["a3"] = connect_from("127.0.0.1", pbx)
        assert options_answered(socks["a3"], pbx)
        assert closed_by_server(socks["a2"])
        # A fifth in all (from 127.0.0.4): over the total cap, the idlest of all (b1) goes.
        socks["d1"] = connect_from("127.0.0.4", pbx)
        assert options_answered(socks["d1"], pbx)
        assert closed_by_server(socks["b1"])
        for name in ("a1", "c1", "a3", "d1"):
            assert options_answered(socks[name], pbx), f"{name} should still be open"
        log = pbx.wait_for_log("(tcp_max_connections)")
        assert "2 connections from 127.0.0.1 (tcp_max_connections_per_ip)" in log
    finally:
        for s in socks.values():
            s.close()


def test_garbage_flood_logs_one_rejected_line_per_source(pbx: PbxProcess) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.5", 0))
        for i in range(200):
            sock.sendto(b"GARBAGE %d\r\n\r\n" % i, loopback(pbx.sip_addr))
        # Then a request that is answered, so we know every datagram before it was read.
        with Phone(user="101", password="secret101", pbx=pbx.sip_addr) as alice:
            alice.register()
        log = pbx.log_text()
        lines = [ln for ln in log.splitlines() if "rejected message from udp:127.0.0.5" in ln]
        assert len(lines) == 1, lines
    finally:
        sock.close()


def test_private_address_is_never_a_traffic_target() -> None:
    with pytest.raises(AssertionError):
        loopback((PRIVATE_IP, 5060))
