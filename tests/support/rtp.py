"""RTP for integration tests: a UDP endpoint on 127.0.0.1 that sends numbered PCMU packets
with known payloads and collects whatever arrives (RFC 3550 §5.1 fixed header, no CSRCs).

::

    with RtpEndpoint() as rtp:
        sent = rtp.send_pcmu(relay_addr, count=50)
        got = rtp.wait_packets(50, timeout=3)
        assert {p.payload for p in got} == {p.payload for p in sent}
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass

HOST = "127.0.0.1"
PCMU = 0
SAMPLES_PER_PACKET = 160
"""20 ms of 8 kHz G.711."""


@dataclass(frozen=True, slots=True)
class RtpPacket:
    """One RTP packet as sent or received."""

    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False
    source: tuple[str, int] | None = None
    """Where a received packet came from."""

    def to_bytes(self) -> bytes:
        """The wire form: version 2, no padding, no extension, no CSRCs."""
        return struct.pack("!BBHII", 0x80, (0x80 if self.marker else 0) | self.payload_type,
                           self.sequence & 0xFFFF, self.timestamp & 0xFFFFFFFF, self.ssrc) + self.payload

    @classmethod
    def parse(cls, data: bytes, source: tuple[str, int] | None = None) -> RtpPacket | None:
        """The packet, or ``None`` when ``data`` is no RTP version 2 packet (RTCP included)."""
        if len(data) < 12 or data[0] >> 6 != 2:
            return None
        b0, b1, seq, ts, ssrc = struct.unpack_from("!BBHII", data)
        pt = b1 & 0x7F
        if 64 <= pt <= 95:  # RFC 5761 §4: RTCP packet types 192..223 land here
            return None
        offset = 12 + 4 * (b0 & 0x0F)
        if b0 & 0x10:  # header extension
            if len(data) < offset + 4:
                return None
            (words,) = struct.unpack_from("!H", data, offset + 2)
            offset += 4 + 4 * words
        end = len(data)
        if b0 & 0x20 and data:  # padding
            end -= data[-1]
        return cls(pt, seq, ts, ssrc, bytes(data[offset:end]), bool(b1 & 0x80), source)


def pattern_payload(index: int, size: int = SAMPLES_PER_PACKET) -> bytes:
    """A recognisable, non-silent PCMU payload, different for every packet index."""
    seed = (index * 37 + 11) & 0xFF
    return bytes((seed + 3 * i) & 0xFF for i in range(size))


class RtpEndpoint:
    """A UDP socket that collects every RTP packet it receives (in a background thread)."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, port))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.ssrc = secrets.randbits(32)
        self.received: list[RtpPacket] = []
        self.other: list[bytes] = []
        """Datagrams that were no RTP (RTCP, junk)."""
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rtp-{self.port}", daemon=True)
        self._thread.start()

    @property
    def addr(self) -> tuple[str, int]:
        """Where this endpoint receives."""
        return (HOST, self.port)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, src = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            pkt = RtpPacket.parse(data, src)
            with self._cond:
                if pkt is None:
                    self.other.append(data)
                else:
                    self.received.append(pkt)
                self._cond.notify_all()

    def send_pcmu(self, dest: tuple[str, int], count: int = 50, *, interval: float = 0.02,
                  first_sequence: int | None = None, payloads: list[bytes] | None = None,
                  ) -> list[RtpPacket]:
        """Send ``count`` PCMU packets to ``dest``, ``interval`` apart; return what was sent."""
        seq0 = first_sequence if first_sequence is not None else secrets.randbelow(30000)
        ts0 = secrets.randbits(31)
        sent = []
        start = time.monotonic()
        for i in range(count):
            payload = payloads[i] if payloads is not None else pattern_payload(seq0 + i)
            pkt = RtpPacket(PCMU, seq0 + i, ts0 + i * SAMPLES_PER_PACKET, self.ssrc, payload,
                            marker=i == 0)
            self.sock.sendto(pkt.to_bytes(), dest)
            sent.append(pkt)
            # Paced against the start so that scheduling delays do not add up.
            pause = start + (i + 1) * interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        return sent

    def send_raw(self, dest: tuple[str, int], data: bytes) -> None:
        """Send any datagram (RTCP, junk) from this endpoint."""
        self.sock.sendto(data, dest)

    def wait_packets(self, count: int, timeout: float = 3.0) -> list[RtpPacket]:
        """Wait (bounded) until ``count`` RTP packets arrived; return all received so far.

        Returns what arrived when the time is up, so that the caller's assertion shows it.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return list(self.received)

    def clear(self) -> None:
        """Forget what was received."""
        with self._cond:
            self.received.clear()
            self.other.clear()

    def close(self) -> None:
        """Stop the receiver thread and close the socket."""
        self._stop.set()
        self._thread.join(timeout=2.0)
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RtpEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
