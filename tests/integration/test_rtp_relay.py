"""The RTP relay on real UDP sockets (127.0.0.1, uvloop): two phones talk through a session."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from softpbx.aio.rtp_transport import RtpRelay
from softpbx.config.schema import MediaSettings
from softpbx.media.ports import PortRangeExhausted
from softpbx.media.relay import Side
from softpbx.media.rtp import build_rtcp_receiver_report, build_rtp

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
# Below the ephemeral range, so the phones' own sockets never take a relay port.
SETTINGS = MediaSettings(rtp_ip=HOST, rtp_start_port=27400, rtp_end_port=27599)


class Phone(asyncio.DatagramProtocol):
    """A UDP endpoint that records what it receives."""

    def __init__(self) -> None:
        self.got: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.got.put_nowait((data, addr))

    @property
    def addr(self) -> tuple[str, int]:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[:2]

    def send(self, data: bytes, port: int) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (HOST, port))

    async def recv(self, timeout: float = 1.0) -> tuple[bytes, tuple[str, int]]:
        return await asyncio.wait_for(self.got.get(), timeout)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def phone() -> Phone:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(Phone, local_addr=(HOST, 0))
    return proto


def run(main: Callable[[], Awaitable[None]], timeout: float = 4.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await main()

    uvloop.run(bounded())


def test_two_phones_talk_through_the_relay_with_nat_latching() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        relay = RtpRelay(settings=SETTINGS, loop=loop)
        session = relay.open_session()
        assert relay.session_count == 1 and relay.live_sockets == 4 and relay.ports_in_use == 2
        a_port, b_port = session.a.rtp_port, session.b.rtp_port
        assert a_port % 2 == 0 and b_port % 2 == 0 and a_port != b_port

        a, a_rtcp, b, b_rtcp, stranger = [await phone() for _ in range(5)]
        # A sits behind a "NAT": its SDP names a port it never sends from.
        a_sdp_port = a.addr[1] + 1000 if a.addr[1] < 60000 else a.addr[1] - 1000
        session.a.set_remote((HOST, a_sdp_port), (HOST, a_rtcp.addr[1]))
        session.b.set_remote(b.addr, b_rtcp.addr)
        await relay.wait_ready(session)

        tapped: list[tuple[Side, bytes]] = []
        session.tap = lambda side, data: tapped.append((side, data))

        for seq in range(5):
            pkt = build_rtp(0, seq, seq * 160, 0xA, bytes([seq]) * 160)
            a.send(pkt, a_port)
            data, src = await b.recv()
            assert data == pkt and src == (HOST, b_port)  # unchanged, from the relay's B side

        # B answers: latched to A's real source, not its SDP port.
        for seq in range(5):
            pkt = build_rtp(8, 1000 + seq, seq * 160, 0xB, b"\xd5" * 160, marker=seq == 0)
            b.send(pkt, b_port)
            data, src = await a.recv()
            assert data == pkt and src == (HOST, a_port)
        assert session.a.rtp.source == a.addr

        # RTCP goes port+1 to port+1, to the a=rtcp address.
        rr = build_rtcp_receiver_report(0xA)
        a_rtcp.send(rr, a_port + 1)
        data, src = await b_rtcp.recv()
        assert data == rr and src == (HOST, b_port + 1)

        # A stranger cannot inject into A's side while A talks.
        stranger.send(build_rtp(0, 1, 1, 0xBAD, b"x" * 10), a_port)
        a.send(build_rtp(0, 99, 99, 0xA, b"ok"), a_port)
        data, _ = await b.recv()
        assert data.endswith(b"ok")
        assert b.got.empty() and session.a.rtp.rejected == 1

        counters = session.a.counters()
        assert counters.packets_in == 7 and counters.packets_out == 5
        assert [side for side, _ in tapped] == [Side.A] * 5 + [Side.B] * 5 + [Side.A]

        relay.close_session(session)
        relay.close_session(session)  # idempotent
        assert relay.session_count == 0 and relay.ports_in_use == 0
        await relay.aclose()
        assert relay.live_sockets == 0
        for p in (a, a_rtcp, b, b_rtcp, stranger):
            p.close()

    run(main)


def test_busy_port_pair_is_skipped_and_exhaustion_leaks_nothing() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        settings = MediaSettings(rtp_ip=HOST, rtp_start_port=27600, rtp_end_port=27607)
        busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            busy.bind((HOST, 27601))  # the RTCP port of the first pair
        except OSError:
            pytest.skip("port 27601 busy on this host")
        relay = RtpRelay(settings=settings, loop=loop)
        try:
            session = relay.open_session()
            assert 27600 not in (session.a.rtp_port, session.b.rtp_port)
            assert relay.live_sockets == 4
            with pytest.raises(PortRangeExhausted):
                relay.open_session()  # one pair left free-but-busy, one free: not enough
            assert relay.live_sockets == 4 and relay.ports_in_use == 2
            relay.close_session(session)
            await relay.aclose()
            assert relay.live_sockets == 0 and relay.ports_in_use == 0
        finally:
            busy.close()

    run(main)


def test_close_before_attach_and_many_sessions() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        relay = RtpRelay(settings=SETTINGS, loop=loop, tick_interval=0.01)
        sessions = [relay.open_session() for _ in range(20)]
        relay.close_session(sessions[0])  # its transports are not attached yet
        await asyncio.sleep(0.05)  # a few ticks
        assert sessions[1].created_at <= sessions[1].last_media_at
        for s in sessions[1:]:
            relay.close_session(s)
        await relay.aclose()
        assert relay.live_sockets == 0 and relay.session_count == 0 and relay.ports_in_use == 0

    run(main)
