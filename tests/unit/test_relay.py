"""Relay decisions (latching, source checks, RTCP, counters, clock), port allocation, RTP helpers.

No sockets: packets go in as ``(bytes, addr)``, the answer is where they would be sent.
"""

from __future__ import annotations

import pytest

from softpbx.config.schema import MediaSettings
from softpbx.media.ports import PortAllocator, PortRangeExhausted
from softpbx.media.relay import LatchPolicy, RelaySession, Side
from softpbx.media.rtp import (
    RtpError,
    build_rtcp_receiver_report,
    build_rtp,
    is_rtcp,
    parse_header,
    rtp_payload,
    unpack_header,
)

PHONE_A_SDP = ("192.168.1.10", 7078)  # what A's SDP says (a private address)
PHONE_A_NAT = ("203.0.113.9", 40001)  # where A's packets really come from
PHONE_B = ("10.0.0.20", 8000)
PKT = build_rtp(0, 1, 160, 0x1234, b"\xff" * 160)


def call(policy: LatchPolicy = LatchPolicy.SYMMETRIC, now: float = 100.0) -> RelaySession:
    session = RelaySession(a_port=20000, b_port=20002, now=now, policy=policy)
    session.a.set_remote(PHONE_A_SDP)
    session.b.set_remote(PHONE_B)
    return session


def test_forwarding_both_ways_with_nat_latching() -> None:
    s = call()
    # B speaks first: A has not latched yet, so A's media goes to A's SDP address.
    assert s.b.rtp.receive(PKT, PHONE_B) == PHONE_A_SDP
    # A's first packet comes from its NAT address: latched, goes to B.
    assert s.a.rtp.receive(PKT, PHONE_A_NAT) == PHONE_B
    assert s.a.rtp.source == PHONE_A_NAT and s.a.rtp.latches == 1
    # From now on B's media goes to A's real (NAT) address.
    assert s.b.rtp.receive(PKT, PHONE_B) == PHONE_A_NAT
    a, b = s.a.counters(), s.b.counters()
    assert (a.packets_in, a.bytes_in, a.packets_out, a.bytes_out) == (1, len(PKT), 2, 2 * len(PKT))
    assert (b.packets_in, b.packets_out, b.latched) == (2, 1, PHONE_B)


def test_foreign_source_is_dropped_while_latched_peer_talks() -> None:
    s = call()
    s.a.rtp.receive(PKT, PHONE_A_NAT)
    s.tick(100.5)
    assert s.a.rtp.receive(PKT, ("198.51.100.66", 5004)) is None
    assert s.a.rtp.rejected == 1 and s.a.rtp.source == PHONE_A_NAT
    # ...even long after, as long as the latched source keeps sending.
    for t in range(1, 20):
        s.a.rtp.receive(PKT, PHONE_A_NAT)
        s.tick(100.5 + t)
    assert s.a.rtp.receive(PKT, ("198.51.100.66", 5004)) is None
    assert s.a.rtp.source == PHONE_A_NAT


def test_sdp_address_may_always_take_the_latch() -> None:
    s = call()
    s.a.rtp.receive(PKT, PHONE_A_NAT)
    assert s.a.rtp.receive(PKT, PHONE_A_SDP) == PHONE_B
    assert s.a.rtp.source == PHONE_A_SDP
    assert s.b.rtp.receive(PKT, PHONE_B) == PHONE_A_SDP


def test_relatch_after_silence() -> None:
    s = call(now=0.0)
    s.a.rtp.receive(PKT, PHONE_A_NAT)
    s.tick(0.5)
    new_nat = ("203.0.113.9", 40555)  # the NAT binding changed
    assert s.a.rtp.receive(PKT, new_nat) is None
    s.tick(1.0)
    s.tick(2.0)
    assert s.a.rtp.receive(PKT, new_nat) is None  # silent 1.5 s only
    s.tick(2.5)
    assert s.a.rtp.receive(PKT, new_nat) == PHONE_B  # silent 2 s: re-latched
    assert s.b.rtp.receive(PKT, PHONE_B) == new_nat
    assert s.a.rtp.latches == 2


def test_sdp_change_drops_the_latch() -> None:
    s = call()
    s.a.rtp.receive(PKT, PHONE_A_NAT)
    s.a.set_remote(PHONE_A_SDP)  # same SDP again (session refresh): latch kept
    assert s.a.rtp.source == PHONE_A_NAT
    s.a.set_remote(("192.168.1.10", 7080))  # re-INVITE with a new port
    assert s.a.rtp.source is None
    assert s.b.rtp.receive(PKT, PHONE_B) == ("192.168.1.10", 7080)
    assert s.a.rtp.receive(PKT, ("203.0.113.9", 40003)) == PHONE_B  # anyone may latch again


def test_hold_with_unspecified_address_sends_nothing() -> None:
    s = call()
    s.a.rtp.receive(PKT, PHONE_A_NAT)
    s.a.set_remote(("0.0.0.0", 7078))
    assert s.b.rtp.receive(PKT, PHONE_B) is None
    assert s.b.rtp.unroutable == 1
    assert s.b.counters().packets_in == 1 and s.a.counters().packets_out == 0


def test_same_ip_policy() -> None:
    s = call(LatchPolicy.SAME_IP)
    assert s.a.rtp.receive(PKT, PHONE_A_NAT) is None  # another IP cannot latch
    assert s.a.rtp.receive(PKT, ("192.168.1.10", 9999)) == PHONE_B  # same IP, other port
    assert s.b.rtp.receive(PKT, PHONE_B) == ("192.168.1.10", 9999)


def test_sdp_only_policy() -> None:
    s = call(LatchPolicy.SDP_ONLY)
    assert s.a.rtp.receive(PKT, ("192.168.1.10", 9999)) is None
    assert s.a.rtp.receive(PKT, PHONE_A_SDP) == PHONE_B
    assert s.b.rtp.receive(PKT, PHONE_B) == PHONE_A_SDP
    assert s.a.rtp.rejected == 1


def test_asymmetric_policy_sends_to_sdp() -> None:
    s = call(LatchPolicy.ASYMMETRIC)
    assert s.a.rtp.receive(PKT, PHONE_A_NAT) == PHONE_B
    assert s.a.rtp.receive(PKT, ("198.51.100.7", 1)) == PHONE_B  # any source
    assert s.b.rtp.receive(PKT, ("198.51.100.8", 2)) == PHONE_A_SDP  # never to the source


def test_rtcp_is_separate_and_defaults_to_port_plus_one() -> None:
    s = call()
    rr = build_rtcp_receiver_report(0x1234)
    assert s.b.rtcp.receive(rr, (PHONE_B[0], PHONE_B[1] + 1)) == ("192.168.1.10", 7079)
    assert s.a.rtcp.receive(rr, ("203.0.113.9", 40002)) == ("10.0.0.20", 8001)
    assert s.b.rtcp.receive(rr, (PHONE_B[0], PHONE_B[1] + 1)) == ("203.0.113.9", 40002)
    assert s.a.rtp.source is None  # RTP latch untouched by RTCP
    s.b.set_remote(PHONE_B, ("10.0.0.21", 9000))  # RFC 3605 a=rtcp
    assert s.a.rtcp.receive(rr, ("203.0.113.9", 40002)) == ("10.0.0.21", 9000)
    assert s.a.counters().packets_in == 2 and s.a.rtp.packets_in == 0


def test_no_remote_yet_is_unroutable() -> None:
    s = RelaySession(a_port=20000, b_port=20002, now=0.0)
    assert s.a.rtp.receive(PKT, PHONE_A_NAT) is None
    assert s.a.rtp.unroutable == 1 and s.a.rtp.source == PHONE_A_NAT
    s.b.set_remote(PHONE_B)
    assert s.a.rtp.receive(PKT, PHONE_A_NAT) == PHONE_B


def test_ipv6_sdp_matches_socket_address() -> None:
    s = RelaySession(a_port=20000, b_port=20002, now=0.0, policy=LatchPolicy.SDP_ONLY)
    s.a.set_remote(("2001:DB8:0:0::10", 5000))
    s.b.set_remote(("2001:db8::20", 6000))
    assert s.a.rtp.receive(PKT, ("2001:db8::10", 5000, 0, 0)) == ("2001:db8::20", 6000)


def test_last_media_at_and_tick() -> None:
    s = call(now=10.0)
    assert s.last_media_at == 10.0  # no media yet: the session's start
    s.tick(11.0)
    assert s.last_media_at == 10.0
    s.a.rtp.receive(PKT, PHONE_A_NAT)
    s.tick(11.5)
    assert s.last_media_at == 11.5 and s.a.last_rx_at == 11.5 and s.b.last_rx_at == 10.0
    s.tick(70.0)
    assert s.last_media_at == 11.5  # RTP timeout: now - last_media_at
    s.b.rtp.receive(PKT, PHONE_B)
    s.tick(70.5)
    assert s.last_media_at == 70.5


def test_tap_sees_accepted_rtp_only() -> None:
    s = call()
    seen: list[tuple[Side, bytes]] = []
    s.tap = lambda side, data: seen.append((side, data))
    s.a.rtp.receive(PKT, PHONE_A_NAT)
    s.b.rtp.receive(PKT, PHONE_B)
    s.a.rtp.receive(PKT, ("198.51.100.66", 1))  # rejected
    s.a.rtcp.receive(build_rtcp_receiver_report(1), ("203.0.113.9", 40002))
    assert seen == [(Side.A, PKT), (Side.B, PKT)]
    s.tap = None
    s.a.rtp.receive(PKT, PHONE_A_NAT)
    assert len(seen) == 2


def test_session_side_lookup_and_ports() -> None:
    s = call()
    assert s.side(Side.A) is s.a and s.side(Side.B) is s.b
    assert (s.a.rtp_port, s.a.rtcp_port, s.b.rtp_port, s.b.rtcp_port) == (
        20000,
        20001,
        20002,
        20003,
    )
    s.a.set_policy(LatchPolicy.SDP_ONLY)
    assert s.a.rtp.receive(PKT, PHONE_A_NAT) is None


# -- port allocation -------------------------------------------------------------------------


def test_allocator_pairs_round_robin() -> None:
    ports = PortAllocator(start=10001, end=10010)  # odd start rounds up; 10010 has no +1
    assert ports.capacity == 4
    got = [ports.allocate() for _ in range(4)]
    assert got == [10002, 10004, 10006, 10008]
    with pytest.raises(PortRangeExhausted) as info:
        ports.allocate()
    assert info.value.status_hint == 503
    ports.release(10004)
    ports.release(10002)
    assert ports.allocate() == 10004  # released first, reused first; never the most recent
    assert ports.free_count == 1 and ports.in_use_count == 3


def test_allocator_does_not_reuse_immediately() -> None:
    ports = PortAllocator.from_settings(MediaSettings(rtp_start_port=20000, rtp_end_port=20009))
    first = ports.allocate()
    ports.release(first)
    assert ports.allocate() != first
    with pytest.raises(ValueError):
        ports.release(first)  # not allocated any more
    with pytest.raises(ValueError):
        PortAllocator(start=20000, end=20000)


# -- RTP helpers -----------------------------------------------------------------------------


def test_rtp_build_and_parse() -> None:
    pkt = build_rtp(8, 65535, 2**32 - 1, 0xDEADBEEF, b"abc", marker=True)
    assert unpack_header(pkt) == (1, 8, 65535, 2**32 - 1, 0xDEADBEEF)
    h = parse_header(pkt)
    assert (h.version, h.marker, h.payload_type, h.sequence, h.ssrc) == (
        2,
        True,
        8,
        65535,
        0xDEADBEEF,
    )
    assert rtp_payload(pkt) == b"abc" and not is_rtcp(pkt)
    assert is_rtcp(build_rtcp_receiver_report(7))


def test_rtp_csrc_extension_padding() -> None:
    # V=2 P=1 X=1 CC=1, PT 0; one CSRC, a one-word extension, payload "xy", 2 bytes padding.
    pkt = (
        bytes([0xB1, 0x00, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3])
        + b"\x00\x00\x00\x09"
        + b"\xbe\xde\x00\x01"
        + b"\x01\x02\x03\x04"
        + b"xy"
        + b"\x00\x02"
    )
    h = parse_header(pkt)
    assert h.csrc_count == 1 and h.extension and h.padding
    assert rtp_payload(pkt) == b"xy"


@pytest.mark.parametrize(
    "pkt", [b"", b"\x80\x00", bytes(12), bytes([0x90]) + bytes(11), bytes([0xA0]) + bytes(11)]
)
def test_rtp_malformed(pkt: bytes) -> None:
    with pytest.raises(RtpError):
        parse_header(pkt)


def test_a_closed_session_has_no_cycles_and_drops_late_packets() -> None:
    import gc

    s = RelaySession(a_port=20000, b_port=20002, now=0.0)
    s.a.set_remote(("127.0.0.1", 40000))
    s.b.set_remote(("127.0.0.1", 50000))
    stream = s.a.rtp
    assert stream.receive(b"x" * 12, ("127.0.0.1", 40000)) == ("127.0.0.1", 50000)
    s.detach()
    assert stream.receive(b"x" * 12, ("127.0.0.1", 40000)) is None  # a late packet: dropped
    assert s.a.counters().packets_out == 0
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        del s, stream
        gc.collect()
        left = [o for o in gc.garbage if type(o).__module__ == "softpbx.media.relay"]
        assert left == [], "a detached session is freed by reference counting"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
