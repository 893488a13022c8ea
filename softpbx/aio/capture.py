"""SIP capture: every message sent and received, as a trace log, a pcap file and/or HEP v3.

The transports call :meth:`SipCapture.received` and :meth:`SipCapture.sent` (only when a
capture is configured: with none, the transports hold ``None`` and pay one attribute check per
message sent, nothing per message received).

- ``[sip] trace`` (or ``softpbx run -v``) logs each message like sngrep shows it: direction,
  transport, addresses, then the message text (logger ``softpbx.sip.trace``).
- ``[sip] capture_pcap`` writes classic libpcap files (Ethernet, LINKTYPE_ETHERNET = 1) that
  Wireshark and ``sngrep -I`` open: each message is one frame with a made-up Ethernet header,
  a real IPv4 or IPv6 header and a UDP datagram or a TCP segment, lengths and checksums
  right (RFC 791, RFC 8200, RFC 768, RFC 9293; RFC 1071 checksum). TCP segments carry a
  sequence number per direction of each connection, so Wireshark reassembles the stream.
  The file rotates at ``capture_max_mb``: ``x.pcap`` becomes ``x.pcap.1`` (the older ones
  shift up) and at most ``capture_files`` files are kept.
- ``[sip] hep_address`` sends each message in a HEP v3 packet over UDP to a Homer / sngrep
  collector (https://github.com/sipcapture/HEP, "HEP3 Network Protocol Specification").

Writes go to a buffered file on the loop thread (a memory copy per message; the kernel's page
cache takes the flush) and are flushed within :data:`FLUSH_S`. A disk error stops the pcap
with one log line; the switch goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import struct
import time
from array import array
from collections.abc import Callable
from typing import BinaryIO, Protocol

from ..config.loader import resolve_path, split_host_port
from ..config.schema import Config
from ..sip.events import Flow

Receiver = Callable[[bytes, Flow, "str | None"], None]

log = logging.getLogger("softpbx.capture")
trace_log = logging.getLogger("softpbx.sip.trace")

FLUSH_S = 0.5
"""At most this long between a message and its bytes reaching the pcap file."""
LINKTYPE_ETHERNET = 1
PCAP_MAGIC = 0xA1B2C3D4
"""Microsecond timestamps, written in our byte order (readers detect it from the magic)."""
SNAPLEN = 262144
_MAX_SEGMENT = 65000
"""TCP payload per frame: an IPv4 packet is at most 65535 bytes."""
_MAX_UDP = 65535 - 8 - 40
_ETH_SRC = bytes.fromhex("020000000001")
_ETH_DST = bytes.fromhex("020000000002")

# HEP v3 chunk types (vendor 0x0000, "generic").
HEP_FAMILY, HEP_PROTO, HEP_SRC4, HEP_DST4, HEP_SRC6, HEP_DST6 = 1, 2, 3, 4, 5, 6
HEP_SPORT, HEP_DPORT, HEP_TS, HEP_TS_USEC, HEP_PROTO_TYPE, HEP_AGENT = 7, 8, 9, 10, 11, 12
HEP_PAYLOAD = 15
HEP_PROTO_SIP = 1


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum of ``data`` (the value to store, in network order)."""
    if len(data) % 2:
        data += b"\0"
    words = array("H", data)
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    value = ~total & 0xFFFF
    # The sum was taken over native-order words; RFC 1071 §2(B): byte order independence.
    return int.from_bytes(struct.pack("=H", value), "big")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return ipaddress.IPv4Address("0.0.0.0")


def frame(src: tuple[str, int], dst: tuple[str, int], payload: bytes, *, tcp: bool = False,
          seq: int = 0) -> bytes:
    """One Ethernet frame carrying ``payload`` from ``src`` to ``dst`` over UDP or TCP."""
    s_ip, d_ip = _ip(src[0]), _ip(dst[0])
    if s_ip.version != d_ip.version:  # a v4-mapped oddity: write both as IPv6
        s_ip = ipaddress.IPv6Address(f"::ffff:{s_ip}") if s_ip.version == 4 else s_ip
        d_ip = ipaddress.IPv6Address(f"::ffff:{d_ip}") if d_ip.version == 4 else d_ip
    proto = 6 if tcp else 17
    sport, dport = src[1] & 0xFFFF, dst[1] & 0xFFFF
    if tcp:
        # RFC 9293 §3.1: data offset 5 words, PSH+ACK, a full window.
        l4 = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, 1, 5 << 4, 0x18,
                         65535, 0, 0) + payload
        csum_at = 16
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        csum_at = 6
    if s_ip.version == 4:
        pseudo = s_ip.packed + d_ip.packed + struct.pack("!BBH", 0, proto, len(l4))
    else:
        pseudo = s_ip.packed + d_ip.packed + struct.pack("!IxxxB", len(l4), proto)
    c = checksum(pseudo + l4)
    if not tcp and c == 0:
        c = 0xFFFF  # RFC 768: a computed zero is sent as all ones
    l4 = l4[:csum_at] + struct.pack("!H", c) + l4[csum_at + 2:]
    if s_ip.version == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0,
                          s_ip.packed, d_ip.packed)
        hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
        return _ETH_DST + _ETH_SRC + b"\x08\x00" + hdr + l4
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, s_ip.packed, d_ip.packed)
    return _ETH_DST + _ETH_SRC + b"\x86\xdd" + hdr + l4


def hep3(src: tuple[str, int], dst: tuple[str, int], payload: bytes, *, tcp: bool,
         when: float, agent_id: int) -> bytes:
    """A HEP v3 packet carrying one SIP message."""
    s_ip, d_ip = _ip(src[0]), _ip(dst[0])
    v6 = s_ip.version == 6 or d_ip.version == 6
    if v6:
        s_ip = ipaddress.IPv6Address(f"::ffff:{s_ip}") if s_ip.version == 4 else s_ip
        d_ip = ipaddress.IPv6Address(f"::ffff:{d_ip}") if d_ip.version == 4 else d_ip
    sec = int(when)
    usec = int((when - sec) * 1_000_000)
    chunks = [
        _chunk(HEP_FAMILY, struct.pack("!B", 10 if v6 else 2)),
        _chunk(HEP_PROTO, struct.pack("!B", 6 if tcp else 17)),
        _chunk(HEP_SRC6 if v6 else HEP_SRC4, s_ip.packed),
        _chunk(HEP_DST6 if v6 else HEP_DST4, d_ip.packed),
        _chunk(HEP_SPORT, struct.pack("!H", src[1] & 0xFFFF)),
        _chunk(HEP_DPORT, struct.pack("!H", dst[1] & 0xFFFF)),
        _chunk(HEP_TS, struct.pack("!I", sec & 0xFFFFFFFF)),
        _chunk(HEP_TS_USEC, struct.pack("!I", usec)),
        _chunk(HEP_PROTO_TYPE, struct.pack("!B", HEP_PROTO_SIP)),
        _chunk(HEP_AGENT, struct.pack("!I", agent_id & 0xFFFFFFFF)),
        _chunk(HEP_PAYLOAD, payload),
    ]
    body = b"".join(chunks)
    return b"HEP3" + struct.pack("!H", 6 + len(body)) + body


def _chunk(kind: int, value: bytes) -> bytes:
    return struct.pack("!HHH", 0, kind, 6 + len(value)) + value


class PcapWriter:
    """Rotating, size-capped libpcap files."""

    def __init__(self, path: str, *, max_bytes: int, files: int) -> None:
        self.path = path
        self.max_bytes = max(max_bytes, 64 * 1024)
        self.files = max(1, files)
        self._f: BinaryIO | None = None
        self._size = 0
        self._tcp_seq: dict[tuple[tuple[str, int], tuple[str, int]], int] = {}
        self.frames = 0
        self._open()

    def _open(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._f = open(self.path, "wb", buffering=256 * 1024)  # noqa: SIM115 - kept open
        # pcap global header: magic, v2.4, thiszone, sigfigs, snaplen, linktype.
        self._f.write(struct.pack("=IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN,
                                  LINKTYPE_ETHERNET))
        self._size = 24

    def _rotate(self) -> None:
        assert self._f is not None
        self._f.close()
        # Shift x.pcap.(n-2) -> x.pcap.(n-1) ... x.pcap -> x.pcap.1 (the oldest falls off).
        for i in range(self.files - 1, 0, -1):
            src = self.path if i == 1 else f"{self.path}.{i - 1}"
            with contextlib.suppress(FileNotFoundError):
                os.replace(src, f"{self.path}.{i}")
        if self.files == 1:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        self._tcp_seq.clear()
        self._open()

    def write(self, src: tuple[str, int], dst: tuple[str, int], payload: bytes, *, tcp: bool,
              when: float) -> None:
        """One message as one frame (a TCP message larger than a segment as several)."""
        if tcp:
            key = (src, dst)
            seq = self._tcp_seq.get(key)
            if seq is None:
                if len(self._tcp_seq) > 10_000:
                    self._tcp_seq.clear()  # bounded: a new stream start is all that is lost
                seq = 1
            for off in range(0, len(payload), _MAX_SEGMENT):
                part = payload[off:off + _MAX_SEGMENT]
                self._frame(frame(src, dst, part, tcp=True, seq=seq), when)
                seq += len(part)
            self._tcp_seq[key] = seq
        else:
            self._frame(frame(src, dst, payload[:_MAX_UDP]), when)

    def _frame(self, data: bytes, when: float) -> None:
        if self._size + 16 + len(data) > self.max_bytes and self._size > 24:
            self._rotate()
        f = self._f
        assert f is not None
        sec = int(when)
        f.write(struct.pack("=IIII", sec, int((when - sec) * 1_000_000), len(data), len(data)))
        f.write(data)
        self._size += 16 + len(data)
        self.frames += 1

    def flush(self) -> None:
        """Push buffered frames to the file."""
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        """Flush and close."""
        if self._f is not None:
            self._f.close()
            self._f = None


class SipCapture:
    """The transports' capture hook: trace lines, pcap frames, HEP packets."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, trace: bool = False,
                 pcap: PcapWriter | None = None, hep: tuple[str, int] | None = None,
                 hep_agent_id: int = 2001) -> None:
        self.loop = loop
        self.trace = trace
        self.pcap = pcap
        self.hep = hep
        self.hep_agent_id = hep_agent_id
        self._hep_sock: socket.socket | None = None
        if hep is not None:
            family = socket.AF_INET6 if ":" in hep[0] else socket.AF_INET
            self._hep_sock = socket.socket(family, socket.SOCK_DGRAM)
            self._hep_sock.setblocking(False)
        self._flush_handle: asyncio.TimerHandle | None = None
        self.hep_errors = 0

    def wrap(self, receiver: Receiver) -> Receiver:
        """``receiver`` with every message captured first (the transports' receive path)."""
        received = self.received

        def capturing(data: bytes, flow: Flow, framing_error: str | None) -> None:
            received(data, flow)
            receiver(data, flow, framing_error)

        return capturing

    def received(self, data: bytes, flow: Flow) -> None:
        """A message (or keep-alive) from ``flow.remote`` to ``flow.local``."""
        self._capture("received", flow, flow.remote, flow.local, data)

    def sent(self, data: bytes, flow: Flow, remote: tuple[str, int] | None = None) -> None:
        """A message to ``remote`` (default ``flow.remote``) from ``flow.local``."""
        self._capture("sent", flow, flow.local, remote or flow.remote, data)

    def _capture(self, what: str, flow: Flow, src: tuple[str, int], dst: tuple[str, int],
                 data: bytes) -> None:
        if not data.strip():
            return  # CRLF keep-alives (RFC 5626 §3.5.1) are no SIP message
        when = time.time()
        tcp = flow.reliable
        if self.trace:
            arrow = "<-" if what == "received" else "->"
            local, remote = (dst, src) if what == "received" else (src, dst)
            trace_log.info("%s %s %s %s %s (%d bytes)\n%s", what, flow.transport.value,
                           _fmt(local), arrow, _fmt(remote), len(data),
                           data.decode("utf-8", "replace").rstrip("\r\n"))
        if self.pcap is not None:
            try:
                self.pcap.write(src, dst, data, tcp=tcp, when=when)
            except OSError as exc:
                log.error("SIP capture to %s stopped: %s", self.pcap.path, exc)
                with contextlib.suppress(OSError):
                    self.pcap.close()
                self.pcap = None
            else:
                if self._flush_handle is None:
                    self._flush_handle = self.loop.call_later(FLUSH_S, self._flush)
        if self._hep_sock is not None and self.hep is not None:
            try:
                self._hep_sock.sendto(hep3(src, dst, data, tcp=tcp, when=when,
                                           agent_id=self.hep_agent_id), self.hep)
            except OSError:
                self.hep_errors += 1  # a collector that is down must not cost the switch

    def _flush(self) -> None:
        self._flush_handle = None
        if self.pcap is not None:
            try:
                self.pcap.flush()
            except OSError as exc:
                log.error("SIP capture to %s stopped: %s", self.pcap.path, exc)
                self.pcap = None

    def close(self) -> None:
        """Flush the pcap, close the HEP socket."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self.pcap is not None:
            with contextlib.suppress(OSError):
                self.pcap.close()
        if self._hep_sock is not None:
            self._hep_sock.close()
            self._hep_sock = None


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Transports(Protocol):
    receiver: Receiver
    capture: SipCapture | None


def install_capture(config: Config, transports: _Transports,
                    loop: asyncio.AbstractEventLoop) -> SipCapture | None:
    """Hook a capture into ``transports`` when ``[sip]`` asks for one (before they listen:
    the listeners take the receiver as it is then). Logs one line per capture."""
    sip = config.sip
    if not (sip.trace or sip.capture_pcap or sip.hep_address):
        return None
    pcap = None
    if sip.capture_pcap:
        path = resolve_path(config, sip.capture_pcap)
        pcap = PcapWriter(path, max_bytes=sip.capture_max_mb * 1024 * 1024,
                          files=sip.capture_files)
        log.info("SIP capture to %s (rotating at %d MB, %d files kept)", path,
                 sip.capture_max_mb, sip.capture_files)
    hep = None
    if sip.hep_address:
        host, port = split_host_port(sip.hep_address)
        hep = (host, port or 9060)
        log.info("SIP capture as HEP v3 to %s (capture id %d)", _fmt(hep), sip.hep_capture_id)
    if sip.trace:
        log.info("SIP trace on: every message sent and received is logged")
    capture = SipCapture(loop=loop, trace=sip.trace, pcap=pcap, hep=hep,
                         hep_agent_id=sip.hep_capture_id)
    transports.capture = capture
    transports.receiver = capture.wrap(transports.receiver)
    return capture
