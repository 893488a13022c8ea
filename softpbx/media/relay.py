"""Media relay decisions for one call, sans-IO: latching, source checks, where to forward.

A :class:`RelaySession` has two sides, A and B (the two legs of the B2BUA). Each side owns an
RTP port and an RTCP port (RTP + 1) on the relay, and for each of them a :class:`RelayStream`
that decides about the packets arriving there: a packet received on side A's port is sent out
of side B's socket of the same kind, to B's remote address, and the other way round.

Symmetric RTP (RFC 4961) with latching: the remote address in a side's SDP is often not where
its packets come from (a phone behind a NAT writes its private address). The first packet from
an acceptable source *latches* that source: later packets are taken only from it (or from the
SDP address), and media for that side goes back to it. Another source may take over after the
latched one has been silent for ``relatch_after`` seconds, or when the SDP address changes
(re-INVITE). :class:`LatchPolicy` sets how strict the source check is.

Hot path: the shell calls :meth:`RelayStream.receive` from ``datagram_received`` and sends the
bytes to the address it returns. On the latched path that is one tuple compare, two counter
updates, a ``tap`` check and an attribute read -- no allocation, no clock read. Time only
enters through :meth:`RelaySession.tick` (the shell calls it every fraction of a second): it
turns "the packet counter moved" into ``last_rx_at = now``, which is what the RTP timeout and
the re-latch rule need, to within the tick interval.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "Address",
    "LatchPolicy",
    "RelaySession",
    "RelaySide",
    "RelayStream",
    "RelayTotals",
    "Side",
    "SideCounters",
    "StreamKind",
    "Tap",
]

Address = tuple[Any, ...]
"""A socket address as the transport reports it: ``(host, port)`` or IPv6's 4-tuple."""


class Side(StrEnum):
    """The two legs of a relayed call."""

    A = "a"
    B = "b"


class StreamKind(StrEnum):
    """What a relay port carries."""

    RTP = "rtp"
    RTCP = "rtcp"


class LatchPolicy(StrEnum):
    """How a side picks and checks the source of its packets."""

    SYMMETRIC = "symmetric"
    """Any source may latch (NAT traversal, the default); media to the side goes to the latched
    source, else to the SDP address."""
    SAME_IP = "same_ip"
    """Only sources with the SDP's IP may latch (the port may differ: a NAT that keeps the IP);
    media goes to the latched source."""
    SDP_ONLY = "sdp_only"
    """Only the SDP address itself is accepted, media goes there; no latching."""
    ASYMMETRIC = "asymmetric"
    """Packets are accepted from any source (the latest one is remembered), media always goes to
    the SDP address (rtpengine's ``asymmetric`` flag; one-way streams, benchmarks)."""


Tap = Callable[[Side, bytes], None]
"""Called with ``(side, packet)`` for each RTP packet accepted from ``side`` (the recorder)."""


def _canonical(addr: Address | None) -> tuple[str, int] | None:
    # SDP may write an IPv6 address in any case/compression; the socket reports it compressed.
    if addr is None:
        return None
    host, port = str(addr[0]), int(addr[1])
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host, port
    if ip.is_unspecified or port == 0:
        return None  # RFC 2543 hold (c=0.0.0.0) or a disabled stream: send nothing
    return ip.compressed, port


class _Nowhere:
    """The peer of a detached stream: it has no address, so nothing is forwarded."""

    __slots__ = ()
    dest: Address | None = None
    packets_in = bytes_in = unroutable = unroutable_bytes = 0


NOWHERE: RelayStream = _Nowhere()  # type: ignore[assignment]
"""Where a closed session's streams forward to (immutable: it only answers ``dest``)."""


class RelayStream:
    """The packets arriving on one relay port (one side's RTP or RTCP port)."""

    __slots__ = (
        "_now",
        "_seen",
        "bytes_in",
        "dest",
        "kind",
        "last_rx_at",
        "latches",
        "packets_in",
        "peer",
        "policy",
        "rejected",
        "relatch_after",
        "sdp",
        "side",
        "source",
        "tap",
        "unroutable",
        "unroutable_bytes",
    )

    def __init__(
        self,
        *,
        side: Side,
        kind: StreamKind,
        policy: LatchPolicy,
        relatch_after: float,
        now: float,
    ) -> None:
        self.side = side
        self.kind = kind
        self.policy = policy
        self.relatch_after = relatch_after
        """Seconds of silence from the latched source after which another may latch."""
        self.peer: RelayStream = self
        """The other side's stream of the same kind (set by :class:`RelaySession`)."""
        self.sdp: tuple[str, int] | None = None
        """The address the side's SDP names for this stream."""
        self.source: Address | None = None
        """The latched source: packets from it take the fast path."""
        self.dest: Address | None = None
        """Where packets *for* this side are sent: the latched source or the SDP address."""
        self.tap: Tap | None = None
        self.packets_in = 0
        self.bytes_in = 0
        self.rejected = 0
        """Packets dropped because their source was not acceptable."""
        self.unroutable = 0
        """Packets accepted but dropped because the other side has no address yet."""
        self.unroutable_bytes = 0
        self.latches = 0
        """How many times a source was latched."""
        self.last_rx_at = now
        """Loop time at which packets were last seen (to within the tick interval)."""
        self._seen = 0
        self._now = now

    def receive(self, data: bytes, addr: Address) -> Address | None:
        """A packet ``data`` arrived from ``addr``: where to send it (out of the peer side's
        socket of the same kind), or ``None`` to drop it. The hot path."""
        if addr != self.source:
            return self._admit(data, addr)
        self.packets_in += 1
        self.bytes_in += len(data)
        if self.tap is not None:
            self.tap(self.side, data)
        dest = self.peer.dest
        if dest is None:
            self.unroutable += 1
            self.unroutable_bytes += len(data)
        return dest

    def _admit(self, data: bytes, addr: Address) -> Address | None:
        # The slow path: a first packet, or one from a source other than the latched one.
        hp = (addr[0], addr[1])
        sdp = self.sdp
        policy = self.policy
        if policy is LatchPolicy.SDP_ONLY:
            allowed = hp == sdp
        elif policy is LatchPolicy.SAME_IP:
            allowed = sdp is not None and hp[0] == sdp[0]
        else:
            allowed = True
        if allowed and self.source is not None and policy is not LatchPolicy.ASYMMETRIC:
            # Someone else holds the latch: only the SDP address or a silent latch yields it.
            allowed = hp == sdp or self._latched_is_silent()
        if not allowed:
            self.rejected += 1
            return None
        self.source = addr
        self.latches += 1
        if policy is LatchPolicy.SYMMETRIC or policy is LatchPolicy.SAME_IP:
            self.dest = hp
        return self.receive(data, addr)

    def _latched_is_silent(self) -> bool:
        return self.packets_in == self._seen and self._now - self.last_rx_at >= self.relatch_after

    def set_remote(self, addr: Address | None) -> None:
        """The side's SDP names ``addr`` for this stream (``None``/port 0/``0.0.0.0``: nothing).

        A changed address drops the latch, so the next packet latches afresh.
        """
        new = _canonical(addr)
        if new == self.sdp and self.dest is not None:
            return
        self.sdp = new
        self.source = None
        self.dest = new

    def set_policy(self, policy: LatchPolicy) -> None:
        """Change the policy; the latch is dropped."""
        self.policy = policy
        self.source = None
        self.dest = self.sdp

    def tick(self, now: float) -> None:
        """Note the time: if packets arrived since the last tick, they arrived 'now'."""
        if self.packets_in != self._seen:
            self._seen = self.packets_in
            self.last_rx_at = now
        self._now = now


@dataclass(frozen=True, slots=True)
class SideCounters:
    """A snapshot of one side's traffic (RTP and RTCP together)."""

    packets_in: int
    """Packets accepted from the side."""
    bytes_in: int
    """Bytes accepted from the side."""
    packets_out: int
    """Packets sent to the side."""
    bytes_out: int
    """Bytes sent to the side."""
    rejected: int
    """Packets dropped because of their source."""
    latched: Address | None
    """The latched RTP source, if any."""


class RelaySide:
    """One leg's end of the relay: its RTP/RTCP ports and the two streams arriving there."""

    __slots__ = ("rtcp", "rtp", "rtp_port", "side")

    def __init__(
        self, *, side: Side, rtp_port: int, policy: LatchPolicy, relatch_after: float, now: float
    ) -> None:
        self.side = side
        self.rtp_port = rtp_port
        self.rtp = RelayStream(
            side=side, kind=StreamKind.RTP, policy=policy, relatch_after=relatch_after, now=now
        )
        self.rtcp = RelayStream(
            side=side, kind=StreamKind.RTCP, policy=policy, relatch_after=relatch_after, now=now
        )

    @property
    def rtcp_port(self) -> int:
        """The relay's RTCP port for this side: RTP + 1 (RFC 3550 §11)."""
        return self.rtp_port + 1

    def set_remote(self, rtp: Address | None, rtcp: Address | None = None) -> None:
        """The side's SDP (offer or answer) names ``rtp`` and optionally ``rtcp`` (RFC 3605
        ``a=rtcp``; default RTP port + 1). ``None`` stops media towards the side (hold with
        ``c=0.0.0.0``, a disabled stream)."""
        if rtcp is None and rtp is not None:
            rtcp = (rtp[0], int(rtp[1]) + 1)
        self.rtp.set_remote(rtp)
        self.rtcp.set_remote(rtcp if rtp is not None else None)

    def set_policy(self, policy: LatchPolicy) -> None:
        """Change the latch policy of both streams."""
        self.rtp.set_policy(policy)
        self.rtcp.set_policy(policy)

    @property
    def last_rx_at(self) -> float:
        """Loop time of the last RTP from this side (to within the tick interval)."""
        return self.rtp.last_rx_at

    def counters(self) -> SideCounters:
        """A snapshot of this side's traffic."""
        rtp, rtcp = self.rtp, self.rtcp
        out_p = out_b = 0
        for s in (rtp.peer, rtcp.peer):
            out_p += s.packets_in - s.unroutable
            out_b += s.bytes_in - s.unroutable_bytes
        return SideCounters(
            packets_in=rtp.packets_in + rtcp.packets_in,
            bytes_in=rtp.bytes_in + rtcp.bytes_in,
            packets_out=out_p,
            bytes_out=out_b,
            rejected=rtp.rejected + rtcp.rejected,
            latched=rtp.source,
        )


class RelaySession:
    """One call's media through the relay: side A and side B, RTP and RTCP each."""

    __slots__ = ("_tap", "a", "b", "created_at")

    def __init__(
        self,
        *,
        a_port: int,
        b_port: int,
        now: float,
        policy: LatchPolicy = LatchPolicy.SYMMETRIC,
        relatch_after: float = 2.0,
    ) -> None:
        """``a_port``/``b_port``: the relay's RTP ports for each side (RTCP is + 1)."""
        self.created_at = now
        self.a = RelaySide(
            side=Side.A, rtp_port=a_port, policy=policy, relatch_after=relatch_after, now=now
        )
        self.b = RelaySide(
            side=Side.B, rtp_port=b_port, policy=policy, relatch_after=relatch_after, now=now
        )
        self.a.rtp.peer, self.b.rtp.peer = self.b.rtp, self.a.rtp
        self.a.rtcp.peer, self.b.rtcp.peer = self.b.rtcp, self.a.rtcp
        self._tap: Tap | None = None

    def detach(self) -> None:
        """Unlink the two sides (they point at each other) once the session is closed, so that
        it is freed at once rather than by the garbage collector. A packet still on its way
        in is dropped (its peer is :data:`NOWHERE`)."""
        self.tap = None
        for stream in self.streams():
            stream.peer = NOWHERE  # not ``stream`` itself: a self-reference is a cycle too

    def side(self, side: Side) -> RelaySide:
        """Side ``A`` or ``B``."""
        return self.a if side is Side.A else self.b

    @property
    def tap(self) -> Tap | None:
        """Called with ``(side, packet)`` for every RTP packet accepted; ``None``: no cost."""
        return self._tap

    @tap.setter
    def tap(self, tap: Tap | None) -> None:
        self._tap = tap
        self.a.rtp.tap = tap
        self.b.rtp.tap = tap

    def streams(self) -> tuple[RelayStream, RelayStream, RelayStream, RelayStream]:
        """A-RTP, A-RTCP, B-RTP, B-RTCP."""
        return self.a.rtp, self.a.rtcp, self.b.rtp, self.b.rtcp

    def tick(self, now: float) -> None:
        """Advance the session's clock; call it every fraction of a second."""
        self.a.rtp.tick(now)
        self.a.rtcp.tick(now)
        self.b.rtp.tick(now)
        self.b.rtcp.tick(now)

    @property
    def last_media_at(self) -> float:
        """Loop time of the last RTP from either side (session creation if none yet): an
        answered call is hung up when ``now - last_media_at`` passes ``rtp_timeout``."""
        return max(self.a.rtp.last_rx_at, self.b.rtp.last_rx_at)


class RelayTotals:
    """Traffic of the relay's closed sessions, summed when each closes (metrics: the live
    sessions' stream counters are added at scrape time, so the hot path counts nothing more)."""

    __slots__ = ("bytes_in", "opened", "packets_in", "rejected", "unroutable")

    def __init__(self) -> None:
        self.opened = 0
        """Sessions opened since start."""
        self.packets_in = 0
        """Packets accepted from a latched or acceptable source (RTP and RTCP)."""
        self.bytes_in = 0
        self.rejected = 0
        """Packets dropped because of their source."""
        self.unroutable = 0
        """Packets accepted but dropped: the other side had no address yet."""

    def add(self, session: RelaySession) -> None:
        """Fold a closing session's counters in."""
        for stream in session.streams():
            self.packets_in += stream.packets_in
            self.bytes_in += stream.bytes_in
            self.rejected += stream.rejected
            self.unroutable += stream.unroutable
