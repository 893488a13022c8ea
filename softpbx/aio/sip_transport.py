"""asyncio SIP transports: UDP sockets and TCP connections (RFC 3261 §18), nothing more.

They turn socket callbacks into ``receiver(data, flow, framing_error)`` calls and carry out
:class:`~softpbx.sip.events.Outgoing` items. All protocol decisions live in the sans-IO core.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from ..config.schema import Transport
from ..sip.events import Flow, Outgoing
from ..sip.framing import StreamFramer

log = logging.getLogger("softpbx.transport")

Receiver = Callable[[bytes, Flow, "str | None"], None]


def _addr(sockaddr: tuple) -> tuple[str, int]:
    return (sockaddr[0], sockaddr[1])


class UdpListener(asyncio.DatagramProtocol):
    """One UDP socket; every datagram is one message (RFC 3261 §18.3)."""

    def __init__(self, *, local: tuple[str, int], receiver: Receiver) -> None:
        self.local = local
        self.receiver = receiver
        self.transport: asyncio.DatagramTransport | None = None
        self._flows: dict[tuple[str, int], Flow] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        remote = _addr(addr)
        flows = self._flows
        flow = flows.get(remote)
        if flow is None:
            if len(flows) > 50_000:
                flows.clear()  # a cache, not state: bounded against address scans
            flow = flows[remote] = Flow(Transport.UDP, remote, self.local)
        self.receiver(data, flow, None)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the peer is gone; transactions time out.
        log.debug("udp %s: %s", self.local, exc)

    def send(self, data: bytes, remote: tuple[str, int]) -> None:
        if self.transport is not None and data:
            self.transport.sendto(data, remote)


class TcpConnection(asyncio.Protocol):
    """One TCP connection, framed by Content-Length."""

    def __init__(self, *, local: tuple[str, int], receiver: Receiver, registry: TcpRegistry,
                 max_size: int) -> None:
        self.local = local
        self.receiver = receiver
        self.registry = registry
        self.framer = StreamFramer(max_size=max_size)
        self.transport: asyncio.Transport | None = None
        self.flow: Flow | None = None
        self.last_activity = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = _addr(transport.get_extra_info("peername"))
        self.flow = Flow(Transport.TCP, peer, self.local)
        self.last_activity = asyncio.get_running_loop().time()
        self.registry.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_activity = asyncio.get_running_loop().time()
        flow = self.flow
        assert flow is not None
        msgs = self.framer.feed(data)
        broken = self.framer.broken
        last = len(msgs) - 1
        for i, msg in enumerate(msgs):
            # When framing broke, the unframeable bytes come last: say why they are bad.
            self.receiver(msg, flow, broken if i == last else None)

    def eof_received(self) -> bool:
        rest = self.framer.feed_eof()
        if rest is None or self.flow is None:
            return False  # nothing half-sent to answer: let the transport close now
        self.receiver(rest, self.flow, "Connection closed mid-message")
        return True  # keep our side open until the answer is written; we close after it

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.remove(self)
        self.transport = None

    def send(self, data: bytes, close_after: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if data:
            t.write(data)
        if close_after:
            t.close()


class TcpRegistry:
    """Open TCP connections by (local, remote), for sending responses and requests back."""

    def __init__(self) -> None:
        self.conns: dict[tuple[tuple[str, int], tuple[str, int]], TcpConnection] = {}

    def add(self, conn: TcpConnection) -> None:
        assert conn.flow is not None
        self.conns[(conn.local, conn.flow.remote)] = conn

    def remove(self, conn: TcpConnection) -> None:
        if conn.flow is not None and self.conns.get((conn.local, conn.flow.remote)) is conn:
            del self.conns[(conn.local, conn.flow.remote)]

    def get(self, flow: Flow) -> TcpConnection | None:
        return self.conns.get((flow.local, flow.remote))

    def close_idle(self, now: float, idle: float) -> int:
        """Close connections silent for ``idle`` seconds; return how many."""
        n = 0
        for conn in list(self.conns.values()):
            if now - conn.last_activity > idle and conn.transport is not None:
                conn.transport.close()
                n += 1
        return n


class SipTransports:
    """Every SIP listener of the switch, and the way out for :class:`Outgoing` items."""

    def __init__(self, *, receiver: Receiver, max_size: int) -> None:
        self.receiver = receiver
        self.max_size = max_size
        self.udp: dict[tuple[str, int], UdpListener] = {}
        self.tcp_servers: list[asyncio.base_events.Server] = []
        self.tcp = TcpRegistry()
        self._connecting: dict[tuple, list[Outgoing]] = {}

    async def listen(self, ip: str, port: int, transports: tuple[Transport, ...]) -> list[str]:
        """Open the listeners of one address; return a line per listener for the log."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        lines = []
        if Transport.UDP in transports and (ip, port) not in self.udp:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
            sock.bind((ip, port))
            local = _addr(sock.getsockname())
            listener = UdpListener(local=local, receiver=self.receiver)
            await loop.create_datagram_endpoint(lambda: listener, sock=sock)
            self.udp[local] = listener
            lines.append(f"SIP listening on udp {_fmt(local)}")
        if Transport.TCP in transports:
            local_holder: list[tuple[str, int]] = []

            def factory() -> TcpConnection:
                return TcpConnection(local=local_holder[0], receiver=self.receiver,
                                     registry=self.tcp, max_size=self.max_size)

            server = await loop.create_server(factory, host=ip, port=port, family=family,
                                              reuse_address=True)
            local_holder.append(_addr(server.sockets[0].getsockname()))
            self.tcp_servers.append(server)
            lines.append(f"SIP listening on tcp {_fmt(local_holder[0])}")
        return lines

    def send(self, out: Outgoing) -> None:
        """Put one outgoing item on the wire."""
        flow = out.flow
        if flow.transport is Transport.UDP:
            listener = self.udp.get(flow.local)
            if listener is None and self.udp:
                listener = next(iter(self.udp.values()))
            if listener is not None:
                listener.send(out.data, flow.remote)
            return
        conn = self.tcp.get(flow)
        if conn is not None:
            conn.send(out.data, out.close_after)
            return
        if out.close_after and not out.data:
            return
        # RFC 3261 §18.2.2: the connection is gone; open a new one to the peer.
        key = (flow.local, flow.remote)
        pending = self._connecting.get(key)
        if pending is not None:
            pending.append(out)
            return
        self._connecting[key] = [out]
        asyncio.get_running_loop().create_task(self._connect(flow, key))

    async def _connect(self, flow: Flow, key: tuple) -> None:
        loop = asyncio.get_running_loop()
        try:
            conn = TcpConnection(local=flow.local, receiver=self.receiver, registry=self.tcp,
                                 max_size=self.max_size)
            await loop.create_connection(lambda: conn, host=flow.remote[0], port=flow.remote[1])
            for out in self._connecting.pop(key, []):
                conn.send(out.data, out.close_after)
        except OSError as exc:
            dropped = self._connecting.pop(key, [])
            log.warning("tcp connect to %s failed: %s (%d messages dropped)", _fmt(flow.remote),
                        exc, len(dropped))

    async def close(self) -> None:
        """Close every listener and connection."""
        for server in self.tcp_servers:
            server.close()
        for conn in list(self.tcp.conns.values()):
            if conn.transport is not None:
                conn.transport.close()
        for listener in self.udp.values():
            if listener.transport is not None:
                listener.transport.close()
        for server in self.tcp_servers:
            await server.wait_closed()


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
