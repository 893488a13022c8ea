"""asyncio SIP transports: UDP sockets, TCP and TLS connections (RFC 3261 §18), nothing more.

They turn socket callbacks into ``receiver(data, flow, framing_error)`` calls and carry out
:class:`~softpbx.sip.events.Outgoing` items. All protocol decisions live in the sans-IO core.

TCP connections are capped in total and per source IP (``[sip] tcp_max_connections``,
``tcp_max_connections_per_ip``): a new connection beyond a cap closes the one that has been
silent longest (of that IP, or of all), so a scan cannot lock phones out and a flood from one
address only pushes out its own connections. Every closed connection is reported
(``on_closed``): the core then knows the flow of the bindings registered over it is dead.

TLS (RFC 3261 §26.2.1, RFC 5630) is a TCP connection with the stdlib ``ssl`` layer under it:
the same framing, registry, caps and idle rules; its flows say ``Transport.TLS`` and are
labelled with the profile's TLS address (``sip_ip``, ``tls_port``). A connection softpbx
opens itself (to a gateway, back to a phone) verifies the peer per the profile's
``tls_verify``, by the host name the gateway's proxy names (else its IP address).

Idle connections are closed after ``[sip] tcp_idle_timeout``, except those the core says
carry a live registration (``close_idle(keep=...)``): a phone that sends no keep-alives is
reached over its connection for as long as its binding lasts, not for 10 minutes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config.schema import Transport
from ..sip.events import Flow, Outgoing
from ..sip.framing import StreamFramer

if TYPE_CHECKING:
    from .capture import SipCapture

log = logging.getLogger("softpbx.transport")

Receiver = Callable[[bytes, Flow, "str | None"], None]
FlowClosed = Callable[[Flow], None]
KeepFlow = Callable[[Flow], bool]

TLS_HANDSHAKE_TIMEOUT = 10.0
"""Seconds a TLS handshake may take, either side (a silent peer does not hold a slot)."""


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
    """One TCP (or TLS) connection, framed by Content-Length."""

    def __init__(self, *, local: tuple[str, int], receiver: Receiver, registry: TcpRegistry,
                 max_size: int, kind: Transport = Transport.TCP) -> None:
        self.local = local
        self.kind = kind
        self.receiver = receiver
        self.registry = registry
        self.framer = StreamFramer(max_size=max_size)
        self.transport: asyncio.Transport | None = None
        self.flow: Flow | None = None
        self.last_activity = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = _addr(transport.get_extra_info("peername"))
        self.flow = Flow(self.kind, peer, self.local)
        self.last_activity = asyncio.get_running_loop().time()
        self.registry.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_activity = asyncio.get_running_loop().time()
        self.registry.touch(self)
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
        self.transport = None
        self.registry.remove(self)

    def close(self) -> None:
        """Close the connection (what was written is still flushed)."""
        if self.transport is not None:
            self.transport.close()

    def send(self, data: bytes, close_after: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if data:
            t.write(data)
        if close_after:
            t.close()


ConnKey = tuple[tuple[str, int], tuple[str, int]]


class TcpRegistry:
    """Open TCP connections by (local, remote), for sending responses and requests back.

    The dicts are kept in order of last activity (least recent first: a received segment
    moves its connection to the end), so the idlest connection of all, or of one source IP,
    is the first one: finding whom to close at a cap is O(1).
    """

    def __init__(self, *, max_connections: int = 10_000, max_per_ip: int = 100,
                 on_closed: FlowClosed | None = None) -> None:
        self.conns: dict[ConnKey, TcpConnection] = {}
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.on_closed = on_closed
        """Called once per connection that leaves the registry (closed by either side)."""
        self._by_ip: dict[str, dict[ConnKey, TcpConnection]] = {}
        self.evicted = 0
        """Connections closed to make room for a new one (a cap was reached)."""
        self._evict_logged_at: dict[str, float] = {}
        """Per cap, when its warning was last written (one line per 10 s under a flood)."""

    def add(self, conn: TcpConnection) -> None:
        """A new connection: register it, closing the idlest one beyond a cap."""
        assert conn.flow is not None
        key = (conn.local, conn.flow.remote)
        ip = conn.flow.remote[0]
        per_ip = self._by_ip.get(ip)
        victim: TcpConnection | None = None
        if per_ip is not None and len(per_ip) >= self.max_per_ip:
            victim = next(iter(per_ip.values()))
            cap, why = "tcp_max_connections_per_ip", f"{len(per_ip)} connections from {ip}"
        elif len(self.conns) >= self.max_connections:
            victim = next(iter(self.conns.values()))
            cap, why = "tcp_max_connections", f"{len(self.conns)} connections"
        if victim is not None:
            self.evicted += 1
            now = conn.last_activity
            if now - self._evict_logged_at.get(cap, -1e9) >= 10.0:
                self._evict_logged_at[cap] = now
                log.warning("tcp: %s (%s); closing the idlest, %s (%d closed so far)", why, cap,
                            victim.flow, self.evicted)
            self.remove(victim)  # at once: the count must drop before the next connection
            victim.close()
            per_ip = self._by_ip.get(ip)
        self.conns[key] = conn
        if per_ip is None:
            per_ip = self._by_ip[ip] = {}
        per_ip[key] = conn

    def touch(self, conn: TcpConnection) -> None:
        """``conn`` received data: it becomes the most recently active."""
        flow = conn.flow
        if flow is None:
            return
        key = (conn.local, flow.remote)
        conns = self.conns
        if conns.get(key) is conn:
            del conns[key]
            conns[key] = conn
            per_ip = self._by_ip[flow.remote[0]]
            del per_ip[key]
            per_ip[key] = conn

    def remove(self, conn: TcpConnection) -> None:
        """``conn`` closed (or is being closed): forget it and report its flow, once."""
        flow = conn.flow
        if flow is None:
            return
        key = (conn.local, flow.remote)
        if self.conns.get(key) is not conn:
            return
        del self.conns[key]
        per_ip = self._by_ip.get(flow.remote[0])
        if per_ip is not None:
            per_ip.pop(key, None)
            if not per_ip:
                del self._by_ip[flow.remote[0]]
        if self.on_closed is not None:
            self.on_closed(flow)

    def count_from(self, ip: str) -> int:
        """Open connections from ``ip``."""
        return len(self._by_ip.get(ip, ()))

    def get(self, flow: Flow) -> TcpConnection | None:
        return self.conns.get((flow.local, flow.remote))

    def close_idle(self, now: float, idle: float, keep: KeepFlow | None = None) -> int:
        """Close connections silent for ``idle`` seconds, except those ``keep`` says carry
        something live (a registration binding: the phone is reached over that connection
        only, RFC 5626 §3.3); return how many were closed."""
        n = 0
        for conn in list(self.conns.values()):
            if conn.last_activity >= now - idle:
                break  # in order of activity: the rest are more recent
            if conn.transport is None or conn.flow is None:
                continue
            if keep is not None and keep(conn.flow):
                continue
            conn.transport.close()
            n += 1
        return n


class SipTransports:
    """Every SIP listener of the switch, and the way out for :class:`Outgoing` items."""

    capture: SipCapture | None = None
    """Set when ``[sip]`` traces or captures (:func:`softpbx.aio.capture.install_capture`
    also wraps :attr:`receiver`, so received messages are captured before the core sees them)."""

    def __init__(self, *, receiver: Receiver, max_size: int, max_connections: int = 10_000,
                 max_per_ip: int = 100, on_closed: FlowClosed | None = None) -> None:
        self.receiver = receiver
        self.max_size = max_size
        self.udp: dict[tuple[str, int], UdpListener] = {}
        self.tcp_servers: list[asyncio.base_events.Server] = []
        self.tcp = TcpRegistry(max_connections=max_connections, max_per_ip=max_per_ip,
                               on_closed=on_closed)
        self._connecting: dict[tuple, list[Outgoing]] = {}
        self.tls_client: dict[tuple[str, int], ssl.SSLContext] = {}
        """Our TLS address -> the context of the connections we open from it (the profile's
        ``tls_verify``); a TLS flow from an address not listed is not connected."""
        self.tls_names: dict[tuple[str, int], str] = {}
        """Peer address -> the host name its certificate must name (a gateway's proxy);
        peers not listed are checked against their IP address."""

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

    async def listen_tls(self, ip: str, port: int, context: ssl.SSLContext) -> str:
        """Open a TLS listener; return its line for the log."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        local_holder: list[tuple[str, int]] = []

        def factory() -> TcpConnection:
            return TcpConnection(local=local_holder[0], receiver=self.receiver,
                                 registry=self.tcp, max_size=self.max_size, kind=Transport.TLS)

        server = await loop.create_server(factory, host=ip, port=port, family=family,
                                          reuse_address=True, ssl=context,
                                          ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        local_holder.append(_addr(server.sockets[0].getsockname()))
        self.tcp_servers.append(server)
        return f"SIP listening on tls {_fmt(local_holder[0])}"

    def send(self, out: Outgoing) -> None:
        """Put one outgoing item on the wire."""
        flow = out.flow
        if self.capture is not None:
            self.capture.sent(out.data, flow, out.reconnect)
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
        # The connection is gone (or there never was one): open a new one. A response goes
        # where the core says (RFC 3261 §18.2.2: received + sent-by port), a request to the
        # flow's address (RFC 3261 §18.1.1).
        remote = out.reconnect or flow.remote
        if out.reconnect is not None:
            conn = self.tcp.conns.get((flow.local, remote))
            if conn is not None:
                conn.send(out.data, out.close_after)
                return
        key = (flow.local, remote)
        pending = self._connecting.get(key)
        if pending is not None:
            pending.append(out)
            return
        self._connecting[key] = [out]
        asyncio.get_running_loop().create_task(
            self._connect(flow.local, remote, key, flow.transport))

    async def _connect(self, local: tuple[str, int], remote: tuple[str, int], key: tuple,
                       kind: Transport = Transport.TCP) -> None:
        loop = asyncio.get_running_loop()
        tls: dict = {}
        if kind is Transport.TLS:
            context = self.tls_client.get(local)
            if context is None:
                dropped = self._connecting.pop(key, [])
                log.warning("tls connect to %s: no TLS listener at %s (%d messages dropped)",
                            _fmt(remote), _fmt(local), len(dropped))
                return
            tls = {"ssl": context, "server_hostname": self.tls_names.get(remote, remote[0]),
                   "ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT}
        try:
            conn = TcpConnection(local=local, receiver=self.receiver, registry=self.tcp,
                                 max_size=self.max_size, kind=kind)
            await loop.create_connection(lambda: conn, host=remote[0], port=remote[1], **tls)
            for out in self._connecting.pop(key, []):
                conn.send(out.data, out.close_after)
        except (TimeoutError, OSError) as exc:
            # ssl.SSLError (a certificate refused, a failed handshake) is an OSError.
            dropped = self._connecting.pop(key, [])
            log.warning("%s connect to %s failed: %s (%d messages dropped)", kind.value,
                        _fmt(remote), exc or type(exc).__name__, len(dropped))
            # RFC 3261 §8.1.3.1 / §17.1.4: a transport failure is reported to the transaction
            # user at once. The requests' flow names this very connection: reporting it
            # closed ends their client transactions now (the call tries its next callee or
            # fails) instead of after Timer B, e.g. for a carrier whose certificate we refuse.
            flow = Flow(kind, remote, local)
            if self.tcp.on_closed is not None and any(o.flow == flow for o in dropped):
                self.tcp.on_closed(flow)

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
