"""The RTP relay's asyncio shell: UDP sockets around :mod:`softpbx.media.relay` decisions.

Each relay session binds four UDP sockets (side A RTP/RTCP, side B RTP/RTCP) on a port pair
per side from :class:`~softpbx.media.ports.PortAllocator`. One ``DatagramProtocol`` per socket
asks the session's :class:`~softpbx.media.relay.RelayStream` where a packet goes and calls the
other side's ``transport.sendto`` at once: no queue, no task, nothing allocated by us per
packet (the shape of ``bench/rtp/rtp_relay.py``'s uvloop mode, plus one method call).

:meth:`RtpRelay.open_session` is synchronous -- the sockets are bound (and the ports known)
when it returns, so the SDP can be rewritten at once; the transports attach on the next loop
iterations and packets that arrive meanwhile wait in the kernel. A single periodic timer ticks
every live session with ``loop.time()`` (``last_media_at``, re-latching).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from softpbx.config.schema import MediaSettings
from softpbx.media.ports import PortAllocator, PortRangeExhausted
from softpbx.media.relay import Address, LatchPolicy, RelaySession, RelayStream, RelayTotals

__all__ = ["RtpRelay"]

log = logging.getLogger(__name__)


def _discard(data: bytes, addr: Address) -> None:
    """A send target for a port whose session is closed."""


class _RelayPort(asyncio.DatagramProtocol):
    """One bound relay socket: asks its stream, forwards through the peer's transport."""

    __slots__ = ("on_lost", "peer", "receive", "send", "sock", "transport")

    def __init__(self, stream: RelayStream, on_lost: Callable[[], None]) -> None:
        self.receive = stream.receive
        self.send: Callable[[bytes, Address], None] = self._send_first
        self.peer: _RelayPort | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.sock: socket.socket | None = None
        """The bound socket, until its transport is attached (see :meth:`_send_first`)."""
        self.on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.sock = None

    def datagram_received(self, data: bytes, addr: Address) -> None:
        dest = self.receive(data, addr)
        if dest is not None:
            self.send(data, dest)

    def _send_first(self, data: bytes, addr: Address) -> None:
        # Once the peer socket's transport is attached, bind its sendto directly so the hot
        # path is a single call. Until then (the four sockets are attached one loop turn
        # each, and a callee that answers at once with a caller that talks at once beats
        # that on a busy loop) the packet goes out of the peer's bound socket as it is: the
        # first words of a call must not be lost.
        peer = self.peer
        if peer is None:
            return
        transport = peer.transport
        if transport is None:
            if peer.sock is not None:
                with contextlib.suppress(OSError):  # a full buffer, or closed meanwhile
                    peer.sock.sendto(data, addr)
            return
        if transport.is_closing():
            return
        self.send = transport.sendto
        transport.sendto(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a phone that went away, and the like: the RTP timeout
        # deals with dead peers; nothing to do per packet.
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        # Break every link of the cycles a live port is part of (bound ``_send_first``,
        # the peer port, the transport), so the closed port is freed by reference counting.
        self.send = _discard
        self.peer = None
        self.transport = None
        self.sock = None
        self.on_lost()


class _SessionSockets:
    """The shell's side of one session: sockets, protocols, the attach task."""

    __slots__ = ("attach", "ports", "protocols", "sockets")

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.sockets: list[socket.socket] = []
        self.protocols: list[_RelayPort] = []
        self.attach: asyncio.Task[None] | None = None


class RtpRelay:
    """The media relay of the switch: opens and closes :class:`RelaySession`\\ s on UDP.

    Driven by the call layer: ``open_session()`` when a call needs media (ports known at once,
    for the SDP rewrite), ``session.a/b.set_remote(...)`` as offers and answers arrive,
    ``close_session()`` when the call ends. Times it reports (``last_media_at``) are
    ``loop.time()``.
    """

    def __init__(
        self,
        *,
        settings: MediaSettings,
        loop: asyncio.AbstractEventLoop,
        policy: LatchPolicy = LatchPolicy.SYMMETRIC,
        relatch_after: float = 2.0,
        tick_interval: float = 0.5,
        socket_buffer: int | None = 256 * 1024,
        dscp: int | None = 0x2E,
    ) -> None:
        """``socket_buffer``: SO_RCVBUF/SO_SNDBUF per socket (the kernel caps it at
        ``net.core.rmem_max``/``wmem_max``; ``None`` keeps the default): bursts of a thousand
        calls need more than the default. ``dscp``: DiffServ code point for IPv4 RTP (46 =
        expedited forwarding, RFC 3246; ``None`` leaves it). ``tick_interval``: seconds
        between session clock ticks."""
        self._settings = settings
        self._loop = loop
        self._policy = policy
        self._relatch_after = relatch_after
        self._tick_interval = tick_interval
        self._socket_buffer = socket_buffer
        self._dscp = dscp
        self._ports = PortAllocator.from_settings(settings)
        self._family = socket.AF_INET6 if ":" in settings.rtp_ip else socket.AF_INET
        self._sessions: dict[RelaySession, _SessionSockets] = {}
        self._live_sockets = 0
        self._timer: asyncio.TimerHandle | None = None
        self.closed = RelayTotals()
        """Counters of the sessions closed so far (metrics add the live ones)."""

    # -- introspection -------------------------------------------------------------------

    @property
    def advertised_ip(self) -> str:
        """The address to write into SDP ``c=`` lines (``ext_rtp_ip``, else ``rtp_ip``)."""
        return self._settings.ext_rtp_ip or self._settings.rtp_ip

    @property
    def session_count(self) -> int:
        """Sessions open."""
        return len(self._sessions)

    @property
    def sessions(self) -> list[RelaySession]:
        """The open sessions (a copy; metrics read their counters)."""
        return list(self._sessions)

    @property
    def live_sockets(self) -> int:
        """UDP sockets bound and not yet closed (four per session once closes complete)."""
        return self._live_sockets

    @property
    def ports_in_use(self) -> int:
        """Port pairs allocated (two per session)."""
        return self._ports.in_use_count

    # -- sessions ------------------------------------------------------------------------

    def open_session(
        self, *, policy: LatchPolicy | None = None, relatch_after: float | None = None
    ) -> RelaySession:
        """Bind a new session's four sockets and start relaying.

        Returns the session with its ports set (``session.a.rtp_port``, ``session.b.rtp_port``).
        A pair whose bind fails is skipped for the next one. Raises
        :class:`~softpbx.media.ports.PortRangeExhausted` when no pair can be bound.
        """
        record = _SessionSockets()
        try:
            a_port = self._bind_pair(record)
            b_port = self._bind_pair(record)
        except BaseException:
            self._close_raw(record)
            raise
        session = RelaySession(
            a_port=a_port,
            b_port=b_port,
            now=self._loop.time(),
            policy=self._policy if policy is None else policy,
            relatch_after=self._relatch_after if relatch_after is None else relatch_after,
        )
        protocols = [_RelayPort(stream, self._socket_lost) for stream in session.streams()]
        a_rtp, a_rtcp, b_rtp, b_rtcp = protocols
        a_rtp.peer, b_rtp.peer, a_rtcp.peer, b_rtcp.peer = b_rtp, a_rtp, b_rtcp, a_rtcp
        record.protocols = protocols
        for proto, sock in zip(protocols, record.sockets, strict=True):
            proto.sock = sock
        self._sessions[session] = record
        self.closed.opened += 1
        record.attach = self._loop.create_task(self._attach(record))
        if self._timer is None:
            self._timer = self._loop.call_later(self._tick_interval, self._tick)
        return session

    async def wait_ready(self, session: RelaySession) -> None:
        """Wait until the session's transports are attached (tests; packets queue meanwhile)."""
        record = self._sessions.get(session)
        if record is not None and record.attach is not None:
            await asyncio.shield(record.attach)

    def close_session(self, session: RelaySession) -> None:
        """Stop relaying, close the session's sockets and give its ports back. Idempotent."""
        record = self._sessions.pop(session, None)
        if record is None:
            return
        self.closed.add(session)
        session.detach()
        for port in record.ports:
            self._ports.release(port)
        if record.attach is not None and not record.attach.done():
            # Let the attach finish (it never waits on the network), then close.
            record.attach.add_done_callback(lambda _t: self._close_transports(record))
        else:
            self._close_transports(record)
        if not self._sessions and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def aclose(self, timeout: float = 2.0) -> None:
        """Close every session and wait (at most ``timeout`` s) until their sockets are gone."""
        for session in list(self._sessions):
            self.close_session(session)
        deadline = self._loop.time() + timeout
        while self._live_sockets and self._loop.time() < deadline:
            await asyncio.sleep(0.005)

    # -- internals -----------------------------------------------------------------------

    def _bind_pair(self, record: _SessionSockets) -> int:
        for _ in range(self._ports.capacity):
            port = self._ports.allocate()  # raises PortRangeExhausted when all are taken
            try:
                rtp = self._bind(port)
            except OSError:
                self._ports.release(port)
                continue
            try:
                rtcp = self._bind(port + 1)
            except OSError:
                rtp.close()
                self._live_sockets -= 1
                self._ports.release(port)
                continue
            record.sockets += (rtp, rtcp)
            record.ports.append(port)
            return port
        raise PortRangeExhausted("no RTP port pair could be bound")

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            if self._socket_buffer:
                for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, opt, self._socket_buffer)
            if self._dscp is not None and self._family == socket.AF_INET:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, self._dscp << 2)
            sock.bind((self._settings.rtp_ip, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._live_sockets += 1
        return sock

    async def _attach(self, record: _SessionSockets) -> None:
        attached = 0
        try:
            for sock, proto in zip(record.sockets, record.protocols, strict=True):
                await self._loop.create_datagram_endpoint(lambda p=proto: p, sock=sock)
                attached += 1
        except Exception:
            log.exception("relay ports %s: attaching sockets failed", record.ports)
            # Sockets not wrapped by a transport are ours to close.
            for sock in record.sockets[attached:]:
                sock.close()
                self._live_sockets -= 1
            record.sockets = record.sockets[:attached]
            record.protocols = record.protocols[:attached]

    def _close_transports(self, record: _SessionSockets) -> None:
        for proto in record.protocols:
            proto.send = _discard
            if proto.transport is not None:
                proto.transport.close()  # connection_lost -> _socket_lost
        record.protocols = []
        record.sockets = []

    def _close_raw(self, record: _SessionSockets) -> None:
        for sock in record.sockets:
            sock.close()
            self._live_sockets -= 1
        for port in record.ports:
            self._ports.release(port)
        record.sockets = []
        record.ports = []

    def _socket_lost(self) -> None:
        self._live_sockets -= 1

    def _tick(self) -> None:
        now = self._loop.time()
        for session in self._sessions:
            session.tick(now)
        self._timer = (
            self._loop.call_later(self._tick_interval, self._tick) if self._sessions else None
        )
