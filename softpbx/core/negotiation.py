"""SDP offer/answer of one call through the relay (RFC 3264), apart from the call's state.

A :class:`MediaNegotiation` holds the two parties' SDP in force, our ``o=`` towards each, and
a re-negotiation (re-INVITE/UPDATE: hold, resume, codec change) in progress. It rewrites
each party's SDP to point at the relay side the other party sees, applies an SDP to the relay
only once it is agreed (a 488/491 leaves the session as it was, RFC 3264 §8), and commands
the legs of the re-negotiation (``offer``, ``answer_offer``, ``cancel_offer``). What the call
does about a change (RTP timeout, hold, the recorder's codecs) it learns from the return
values: the sides that started sending.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from dataclasses import dataclass

from ..media.relay import RelaySession, RelaySide
from ..sip import sdp as sdpmod
from ..sip.sdp import Direction as MediaDirection
from ..sip.sdp import LocalOrigin, SdpError, SessionDescription
from .leg import Leg

log = logging.getLogger("softpbx.call")

Started = frozenset[str]
"""Sides (``"a"``, ``"b"``) that an adopted SDP made start sending RTP."""


@dataclass(slots=True)
class _Renegotiation:
    """A re-INVITE/UPDATE in progress between the two parties."""

    origin: Leg | None
    """The leg whose party offered; ``None`` for our own offer (a restore)."""
    target: Leg
    """The leg the offer was sent on."""
    offer: SessionDescription | None
    """The originator's offer, applied to the relay only once the answer is a 2xx."""
    cancelled: bool = False
    """The originator CANCELled its re-INVITE."""


def first_rtp(sdp: SessionDescription) -> int | None:
    """Index of the relayed stream: the first audio RTP ``m=`` line with a port. Video,
    T.38 (``m=image``) and the rest are refused with port 0 (:meth:`MediaNegotiation.
    rewrite`): the relay carries one audio stream."""
    return next((i for i, m in enumerate(sdp.media)
                 if m.is_rtp and m.port and m.media.lower() == "audio"), None)


def caller_offer(raw: bytes | None) -> SessionDescription | None:
    """The caller's offer from its INVITE's SDP; ``None`` for a late offer (no SDP: we
    offer in our 2xx, RFC 3261 §13.2.1). Raises :class:`SdpError` (``488``) for SDP that
    does not parse or has no audio stream to relay."""
    if raw is None:
        return None
    sdp = sdpmod.parse_sdp(raw)
    if first_rtp(sdp) is None:
        raise SdpError("no RTP audio stream")
    return sdp


def matching(answer: SessionDescription, offer: SessionDescription) -> SessionDescription:
    """``answer`` with exactly the ``m=`` lines of ``offer`` (RFC 3264 §6: the answer keeps
    the offer's count and order; a stream is refused with port 0 and a format of the offer).
    A callee that dropped the streams it refuses (some drop a video or T.38 line instead of
    zeroing it) has its lines matched to the offer's by media type, in order, and the
    missing ones put back as refused; lines the offer did not have are cut."""
    if len(answer.media) == len(offer.media):
        return answer  # positional, as RFC 3264 §6 has it
    out = answer.copy()
    rest = out.media
    out.media = []
    for m in offer.media:
        k = next((j for j, a in enumerate(rest) if a.media == m.media), None)
        out.media.append(rest.pop(k) if k is not None else
                         sdpmod.MediaDescription(m.media, 0, None, m.proto, m.formats[:1] or ["0"]))
    return out


def codec_map(sdp: SessionDescription | None) -> dict[int, str]:
    """Payload type -> encoding of the first RTP stream (the one relayed)."""
    if sdp is None:
        return {}
    i = first_rtp(sdp)
    return {} if i is None else {c.payload_type: c.encoding for c in sdp.media[i].codecs()}


def sends(own: SessionDescription | None, peer: SessionDescription | None) -> bool:
    """Whether the party whose SDP is ``own`` is expected to send RTP to the party whose SDP
    is ``peer``: both say ``sendrecv`` with a real address (RFC 3264 §5.1, §6.1)."""
    if own is None or peer is None:
        return False
    i, j = first_rtp(own), first_rtp(peer)
    if i is None or j is None:
        return False
    if sdpmod.media_address(own, i) is None or sdpmod.media_address(peer, j) is None:
        return False
    sendrecv = MediaDirection.SENDRECV
    return sdpmod.direction(own, i) is sendrecv and sdpmod.direction(peer, j) is sendrecv


_STATIC = {0: "PCMU/8000", 3: "GSM/8000", 8: "PCMA/8000", 9: "G722/8000", 18: "G729/8000"}


def build_offer(codecs: tuple[str, ...], address: str) -> SessionDescription:
    """An SDP offer of our own (a call softpbx originates: click-to-call), audio only, with
    ``codecs`` in order (names from ``[media] codecs``; ``telephone-event`` gets type 101),
    at the relay's ``address`` (a ``0.0.0.0`` placeholder would read as hold, RFC 3264
    §8.4). The port and ``o=`` are filled in by :meth:`MediaNegotiation.rewrite`."""
    pts: list[str] = []
    maps: list[str] = []
    for name in codecs:
        upper = name.upper()
        pt = next((p for p, n in _STATIC.items() if n.split("/")[0] == upper), None)
        if pt is not None:
            pts.append(str(pt))
            maps.append(f"a=rtpmap:{pt} {_STATIC[pt]}")
        elif name.lower() == "telephone-event":
            pts.append("101")
            maps += ["a=rtpmap:101 telephone-event/8000", "a=fmtp:101 0-16"]
    if not pts:
        pts, maps = ["0", "8"], ["a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000"]
    ip = "IP6" if ":" in address else "IP4"
    text = "\r\n".join(["v=0", f"o=- 0 0 IN {ip} {address}", "s=softpbx", f"c=IN {ip} {address}",
                        "t=0 0", f"m=audio 9 RTP/AVP {' '.join(pts)}", *maps, "a=ptime:20",
                        "a=sendrecv"]) + "\r\n"
    return sdpmod.parse_sdp(text)


_PRIVATE = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",                                  # RFC 6598 carrier-grade NAT
    "169.254.0.0/16", "fc00::/7", "fe80::/10"))       # link-local, RFC 4193 ULA


def _is_private(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(addr in net for net in _PRIVATE if net.version == addr.version)


def _behind_nat(sdp_ip: str, source: str) -> bool:
    """Whether an SDP address ``sdp_ip`` of a party signalling from ``source`` is a private
    address the party cannot be reached at from here: ``sdp_ip`` private, ``source``
    another address that is not (a LAN phone keeps its LAN address)."""
    if sdp_ip == source:
        return False
    try:
        sdp_addr, src_addr = ipaddress.ip_address(sdp_ip), ipaddress.ip_address(source)
    except ValueError:
        return False
    if sdp_addr.version != src_addr.version:
        return False
    return _is_private(sdp_addr) and not _is_private(src_addr)


class MediaNegotiation:
    """The SDP state of one relayed call (side A faces the ``a`` leg, side B the callee)."""

    def __init__(self, *, media: RelaySession, advertised_ip: str) -> None:
        self.media = media
        self.ip = advertised_ip
        sid = secrets.randbelow(2**62)
        self.origin_a = LocalOrigin(session_id=sid, address=advertised_ip)
        self.origin_b = LocalOrigin(session_id=sid + 1, address=advertised_ip)
        self.sdp_a: SessionDescription | None = None
        """The ``a`` party's SDP in force (its offer, then each re-negotiation's)."""
        self.sdp_b: SessionDescription | None = None
        """The callee's SDP in force (early media's, the answer's, then re-negotiations')."""
        self.own_offer: SessionDescription | None = None
        """Our offer to the callees when the caller's INVITE had no SDP (a late offer)."""
        self.pending: _Renegotiation | None = None
        self.source_a = ""
        """Signalling source IP of the ``a`` party (NAT detection), "" unknown."""
        self.source_b = ""
        """Signalling source IP of the callee that answered (or sent early media)."""

    # -- rewriting ----------------------------------------------------------------------------
    def rewrite(self, side: RelaySide, sdp: SessionDescription, origin: LocalOrigin) -> bytes:
        """``sdp`` as the party facing ``side`` must see it: the relayed stream at ``side``'s
        port, every other stream refused with port 0 (RFC 3264 §6), ICE dropped, our o=."""
        relayed = first_rtp(sdp)
        addrs = [(self.ip, side.rtp_port if i == relayed else 0) for i in range(len(sdp.media))]
        out = sdpmod.rewrite(sdp, addrs, drop_attributes=sdpmod.ICE_ATTRIBUTES)
        return origin.stamp(out).to_bytes()

    def set_remote(self, side: RelaySide, sdp: SessionDescription) -> None:
        """Point ``side`` of the relay at where ``sdp`` says its party receives. A private
        address from a party whose signalling comes from elsewhere is a phone behind NAT
        (Kamailio's ``fix_nated_sdp``): until RTP latching learns the real source, send to
        the signalling source's address with the SDP's ports, never into a private network
        that is not ours."""
        idx = first_rtp(sdp)
        if idx is None:
            side.set_remote(None)
            return
        rtp, rtcp = sdpmod.media_address(sdp, idx), sdpmod.rtcp_address(sdp, idx)
        source = self.source_a if side is self.media.a else self.source_b
        if rtp is not None and source and _behind_nat(rtp[0], source):
            rtp = (source, rtp[1])
            rtcp = (source, rtcp[1]) if rtcp is not None else None
        side.set_remote(rtp, rtcp)

    def facing(self, is_a: bool) -> tuple[RelaySide, LocalOrigin]:
        """The relay side and our SDP origin that the ``a`` party (or the callee) sees."""
        if is_a:
            return self.media.a, self.origin_a
        return self.media.b, self.origin_b

    # -- the initial exchange -----------------------------------------------------------------
    def set_a(self, sdp: SessionDescription) -> None:
        """The ``a`` party's SDP (the caller's offer, or a click-to-call employee's answer)."""
        self.sdp_a = sdp
        self.set_remote(self.media.a, sdp)

    def start_a(self, offer: SessionDescription | None, codecs: tuple[str, ...]) -> None:
        """The caller's offer (:func:`caller_offer`); for a late offer (``None``) the callee
        legs get our own of ``codecs``, and the caller the callee's answer as our offer in
        the 2xx, answered in its ACK (:meth:`on_late_answer`)."""
        if offer is None:
            self.own_offer = build_offer(codecs, self.ip)
        else:
            self.set_a(offer)

    def offer_for_b(self) -> bytes:
        """The ``a`` party's SDP as the callee legs are offered it (our own for a late
        offer, symmetric to :meth:`offer_for_a`)."""
        sdp = self.sdp_a if self.sdp_a is not None else self.own_offer
        assert sdp is not None
        return self.rewrite(self.media.b, sdp, self.origin_b)

    def offer_for_a(self, codecs: tuple[str, ...]) -> bytes:
        """Our own offer of ``codecs`` (:func:`build_offer`) as the ``a`` party sees it."""
        return self.rewrite(self.media.a, build_offer(codecs, self.ip), self.origin_a)

    def callee_answer(self, raw: bytes, call_id: str, source: str = "") -> bytes | None:
        """The callee's SDP, applied to side B and rewritten for the ``a`` party; ``None``
        when it does not parse."""
        try:
            answer = sdpmod.parse_sdp(raw)
        except SdpError as exc:
            log.warning("call %s: bad SDP from callee: %s", call_id, exc)
            return None
        self.sdp_b = answer
        self.source_b = source
        self.set_remote(self.media.b, answer)
        if self.sdp_a is not None:  # an answer to the caller's offer (else our offer to it)
            answer = matching(answer, self.sdp_a)
        return self.rewrite(self.media.a, answer, self.origin_a)

    def on_late_answer(self, raw: bytes | None, call_id: str) -> Started | None:
        """The caller's answer, in its ACK, to the offer our 2xx made (a late offer);
        ``None`` when there is none or it is unusable: the session failed (RFC 3261
        §13.2.2.4: the ACK must carry the answer)."""
        try:
            sdp = caller_offer(raw)
        except SdpError as exc:
            log.warning("call %s: bad SDP answer in the caller's ACK: %s", call_id, exc)
            return None
        if sdp is None:
            log.warning("call %s: the caller's ACK carried no SDP answer", call_id)
            return None
        return self.adopt({True: sdp})

    # -- state queries ------------------------------------------------------------------------
    def sending(self) -> dict[str, bool]:
        """Per side, whether its party is expected to send RTP now."""
        return {"a": sends(self.sdp_a, self.sdp_b), "b": sends(self.sdp_b, self.sdp_a)}

    def on_hold(self) -> bool:
        """Whether either party put the call on hold."""
        return any(s is not None and sdpmod.is_hold(s) for s in (self.sdp_a, self.sdp_b))

    def codecs(self) -> dict[int, str]:
        """Both parties' payload types merged (the callee's over the caller's)."""
        out = codec_map(self.sdp_a)
        out.update(codec_map(self.sdp_b))
        return out

    def silent_side(self, now: float, timeout: float, since: dict[str, float]) -> str:
        """``caller``/``callee`` when that side has sent no RTP for ``timeout`` seconds while
        it is expected to send, else "".

        Each side is watched on its own: a phone gone from Wi-Fi while the trunk keeps
        sending must time out. A side is expected to send when its own SDP and its peer's
        both say ``sendrecv`` with a real address (RFC 3264 §5.1, §6.1: the answer mirrors
        the offer). So nobody is watched while the call is on hold in either direction
        (``sendonly``/``recvonly``/``inactive``, ``c=0.0.0.0``): the holding phone says it
        sends music on hold, but many send nothing at all, and a held call must not drop
        (Asterisk keeps a separate ``rtpholdtimeout``, off by default). Silence counts from
        the answer, or from ``since[side]`` (when it was last expected to start sending
        again: a resume), whichever the relay saw last.
        """
        sending = self.sending()
        for key, side, who in (("a", self.media.a, "caller"), ("b", self.media.b, "callee")):
            if sending[key] and now - max(side.last_rx_at, since[key]) > timeout:
                return who
        return ""

    # -- re-negotiation (hold/resume) ---------------------------------------------------------
    def adopt(self, sdps: dict[bool, SessionDescription]) -> Started:
        """New SDP in force (key: ``is_a``); returns the sides that started sending."""
        before = self.sending()
        for is_a, sdp in sdps.items():
            if is_a:
                self.sdp_a = sdp
                self.set_remote(self.media.a, sdp)
            else:
                self.sdp_b = sdp
                self.set_remote(self.media.b, sdp)
        after = self.sending()
        return frozenset(k for k in ("a", "b") if after[k] and not before[k])

    def on_offer(self, leg: Leg, other: Leg, is_a: bool, raw: bytes | None, now: float) -> None:
        """``leg``'s party offers new SDP: pass it to ``other``'s party through the relay."""
        if self.pending is not None:
            leg.answer_offer(491, None, now)
            return
        if not raw:  # legs answer re-INVITEs and UPDATEs without SDP themselves
            leg.answer_offer(488, None, now)
            return
        try:
            offer = sdpmod.parse_sdp(raw)
        except SdpError:
            leg.answer_offer(488, None, now)
            return
        other_side, origin = self.facing(not is_a)
        self.pending = _Renegotiation(origin=leg, target=other, offer=offer)
        other.offer(self.rewrite(other_side, offer, origin), now)

    def on_offer_answered(self, leg: Leg, leg_is_a: bool, status: int, raw: bytes | None,
                          now: float, call_id: str) -> Started | None:
        """The answer on ``leg`` to an offer we sent; returns what :meth:`adopt` returned
        when SDP was adopted, else ``None``."""
        p = self.pending
        if p is None or p.target is not leg:
            return None
        self.pending = None
        answer = None
        if 200 <= status < 300 and raw:
            try:
                answer = sdpmod.parse_sdp(raw)
            except SdpError:
                log.warning("call %s: bad SDP in the answer of %s", call_id, leg.label)
        if p.cancelled or p.origin is None:
            # Nobody waits for this answer. The answering party now has the session it
            # accepted; after a withdrawn offer, it is offered back the one its peer kept.
            started = self.adopt({leg_is_a: answer}) if answer is not None else None
            if p.cancelled and 200 <= status < 300:
                self._restore(leg, leg_is_a, now)
            return started
        origin_leg = p.origin
        if answer is None:
            origin_leg.answer_offer(status if status >= 300 else 488, None, now)
            return None
        assert p.offer is not None
        started = self.adopt({not leg_is_a: p.offer, leg_is_a: answer})
        origin_side, origin = self.facing(not leg_is_a)
        shaped = matching(answer, p.offer)
        origin_leg.answer_offer(200, self.rewrite(origin_side, shaped, origin), now)
        return started

    def on_offer_cancelled(self, leg: Leg, now: float) -> None:
        """The originator withdrew its re-INVITE: withdraw ours; its relay address was
        never applied, and an answer that still comes is not passed on."""
        p = self.pending
        if p is None or p.origin is not leg:
            return
        p.cancelled = True
        p.target.cancel_offer(now)

    def _restore(self, leg: Leg, leg_is_a: bool, now: float) -> None:
        """Offer ``leg``'s party the session its peer still has (after a 2xx that crossed
        the CANCEL of the offer it answered), so that the two agree again."""
        peer_sdp = self.sdp_b if leg_is_a else self.sdp_a
        if peer_sdp is None:
            return
        side, origin = self.facing(leg_is_a)
        self.pending = _Renegotiation(origin=None, target=leg, offer=None)
        leg.offer(self.rewrite(side, peer_sdp, origin), now)

    def on_refresh_answered(self, leg_is_a: bool, raw: bytes, label: str,
                            call_id: str) -> Started | None:
        """The answer, in an ACK, to the SDP a leg offered back on a session refresh."""
        current = self.sdp_a if leg_is_a else self.sdp_b
        if current is not None and current.to_bytes() == raw:
            return None  # the usual case: nothing changed
        try:
            sdp = sdpmod.parse_sdp(raw)
        except SdpError:
            log.warning("call %s: bad SDP in the ACK of %s; ignored", call_id, label)
            return None
        return self.adopt({leg_is_a: sdp})
