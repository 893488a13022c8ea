"""Sans-IO per-call recorder: relayed RTP packets in, aligned int16 PCM out.

A :class:`CallRecorder` taps the relay's hot path. ``feed(side, packet, now)`` only appends the
packet and its arrival time to a list, so recording costs the relay one list append per packet.
Every few seconds the shell calls ``flush(now)``; that is where the work happens, batched:

* parse the RTP header (RFC 3550 §5.1: CSRCs, header extension, padding) and drop anything that
  is not RTP version 2 (including RTCP multiplexed on the RTP port, RFC 5761 §4);
* skip ``telephone-event`` (RFC 4733) and comfort noise (``CN``, RFC 3389): they are not audio,
  and their silence is what the gap becomes anyway;
* place each packet's samples by RTP timestamp relative to a per-stream anchor, so loss becomes
  silence, reordered packets land in place, and duplicates write the same samples twice;
* decode G.711 (PCMU/PCMA) with numpy lookup tables, one table lookup per flush and codec;
* hand back the span that is now final as ``int16`` PCM: shape ``(n, 2)`` (caller left, callee
  right) or ``(n,)`` (mono mix).

Timing model. Output sample 0 is the recorder's ``start`` (the answer time). Each stream (one
SSRC on one side) is anchored at the arrival time of its first packet, so the two sides are
aligned by arrival time even though their RTP clocks are unrelated. After that a packet's place
is ``anchor + (timestamp - anchor timestamp)``, with timestamps unwrapped modulo 2^32. A packet
cannot arrive before it was sent, so a new packet that arrives *earlier* than its place means
the anchor came from a delayed packet: the anchor is pulled back to that packet's arrival. The
anchor so settles on the least-delayed packet seen, and since jitter only ever delays packets it
cannot make the anchor drift; the two channels end up aligned to within the difference of the
two paths' smallest delays, not ``resync_threshold``. A new packet (the newest timestamp so
far) whose place strays from its arrival time by more than ``resync_threshold``, or which would
land in audio already flushed, re-anchors its stream at its arrival time (a jump backwards is
confirmed by a second packet, so one very late packet is dropped rather than mistaken for a
jump): that absorbs timestamp jumps (re-INVITE, hold, buggy senders) and a sender clock that
runs slow. An SSRC change starts a new stream anchored by arrival; a late packet of the previous
SSRC still lands by its old anchor.

Finality. ``flush(now)`` emits everything older than ``now - jitter_window``; the rest is held so
late and reordered packets still land. ``finish(now)`` emits everything up to ``now``, so the
recording's length is exactly the talk time. Only the un-flushed window is held: memory is bounded
by the flush cadence, not the call length.

Failure. Audio in a payload type that is neither G.711, DTMF nor CN (``G722``, ``opus``, an
unmapped dynamic type ...) makes the recording fail: :attr:`CallRecorder.failure` gives the
reason, the recorder drops its buffers and ignores further input, and the shell should abort the
MP3 file and mark the call "not recorded". A partly recorded call is never published as if
complete. A side fails once it has sent ``UNDECODABLE_LIMIT`` such packets (half a second of
20 ms packets), or at ``finish`` if they outnumber its decodable ones; fewer, among good audio,
are stray packets (a keep-alive in an unnegotiated type, a burst during a codec switch) and
become silence. Packets with no payload (RFC 6263 keep-alives) are skipped whatever their type.

Threads. The recorder is not thread-safe: ``feed``, ``flush`` and ``finish`` are meant to run on
the event loop thread. ``flush`` takes well under a millisecond for a few seconds of a call; the
arrays it returns are fresh and never touched again by the recorder, so they can be handed to a
worker thread for MP3 encoding (:mod:`softpbx.media.mp3`).

Sans-IO: stdlib + numpy + config only; time is always an argument.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

import numpy as np
import numpy.typing as npt

from softpbx.config.schema import RecordingSettings
from softpbx.media.g711 import decoder_table
from softpbx.media.rtp import payload_bounds

__all__ = [
    "SAMPLE_RATE",
    "STATIC_PAYLOAD_TYPES",
    "CallRecorder",
    "RecorderStats",
    "RtpPayload",
    "Side",
    "parse_rtp",
]

SAMPLE_RATE: Final = 8000
"""G.711 sample rate and RTP clock rate (RFC 3551 §4.5.14), and the recording's rate."""

STATIC_PAYLOAD_TYPES: Final[Mapping[int, str]] = {
    0: "PCMU",
    3: "GSM",
    4: "G723",
    5: "DVI4",
    6: "DVI4",
    7: "LPC",
    8: "PCMA",
    9: "G722",
    10: "L16",
    11: "L16",
    12: "QCELP",
    13: "CN",
    14: "MPA",
    15: "G728",
    16: "DVI4",
    17: "DVI4",
    18: "G729",
}
"""RFC 3551 §6 static audio payload types; an SDP ``rtpmap`` may still override them."""

_NOT_AUDIO: Final = frozenset({"TELEPHONE-EVENT", "CN"})
"""Encodings that ride the audio stream but are not audio (RFC 4733, RFC 3389)."""

_STREAMS_PER_SIDE: Final = 4
"""SSRCs remembered per side, so a late packet of a replaced stream still lands in place."""


Int16Array = npt.NDArray[np.int16]


class Side(IntEnum):
    """Which party a packet comes from; also the stereo channel it is recorded on."""

    CALLER = 0
    """The calling party (a-leg): left channel."""
    CALLEE = 1
    """The called party (b-leg): right channel."""


@dataclass(frozen=True, slots=True)
class RtpPayload:
    """The parts of an RTP packet (RFC 3550 §5.1) the recorder needs."""

    payload_type: int
    """PT, 7 bits."""
    timestamp: int
    """RTP timestamp, 32 bits, in RTP clock units (samples for G.711)."""
    ssrc: int
    """Synchronisation source, 32 bits."""
    payload: bytes
    """Payload after CSRCs and the header extension, without padding."""


def parse_rtp(packet: bytes) -> RtpPayload | None:
    """Parse an RTP packet; ``None`` when it is not RTP v2, is RTCP, or is truncated.

    RFC 3550 §5.1::

        V=2 P X CC(4) | M PT(7) | sequence number (16) | timestamp (32) | SSRC (32)
        CSRC list (CC x 32) | [ext profile (16) length-in-words (16) ext (length x 32)]
        payload ... [padding, last octet = padding count]
    """
    parsed = _parse_rtp(packet)
    return None if parsed is None else RtpPayload(*parsed)


def _parse_rtp(packet: bytes) -> tuple[int, int, int, bytes] | None:
    # parse_rtp() without the result object: the flush loop calls this once per packet.
    fields = payload_bounds(packet)
    if fields is None:
        return None
    _, second, _, timestamp, ssrc, start, end = fields
    if 192 <= second <= 223:  # RFC 5761 §4: RTCP multiplexed on the RTP port
        return None
    return second & 0x7F, timestamp, ssrc, bytes(packet[start:end])


@dataclass(frozen=True, slots=True)
class RecorderStats:
    """Counters of one recorder, both sides together (for logs and benchmarks)."""

    packets: int
    """Packets parsed so far (fed packets still pending are not counted yet)."""
    placed: int
    """Audio packets whose samples were placed (at least partly)."""
    late: int
    """Audio packets that arrived after their place had been flushed (dropped)."""
    ignored: int
    """DTMF (RFC 4733) and comfort-noise packets skipped."""
    malformed: int
    """Packets that were not RTP v2 (or were RTCP, or truncated)."""
    resyncs: int
    """Times a stream was re-anchored by arrival time (timestamp jump or drift)."""
    streams: int
    """Streams (SSRCs) started, both sides."""
    pulls: int = 0
    """Times a stream's anchor was pulled earlier by a packet that arrived before its place
    (the anchor packet had been delayed)."""


class _Stream:
    """Mutable placement state of one SSRC on one side (internal; no per-packet objects)."""

    __slots__ = ("anchor_ext", "anchor_pos", "behind", "highest_ext", "highest_ts")

    def __init__(self, timestamp: int, position: int) -> None:
        self.anchor_ext = timestamp
        """Unwrapped RTP timestamp of the anchor packet."""
        self.anchor_pos = position
        """Absolute output sample index the anchor packet was placed at."""
        self.highest_ext = timestamp
        """Unwrapped timestamp of the newest packet so far."""
        self.highest_ts = timestamp
        """The same, as the 32-bit wire value (unwrapping is relative to it)."""
        self.behind: int | None = None
        """Timestamp-minus-arrival offset of the last packet far behind the newest, if the
        packet before this one was such a packet (a possible backward jump)."""


UNDECODABLE_LIMIT: Final = 25
"""Undecodable audio packets from one side after which the call cannot be recorded."""

# What a payload type resolves to on one side: a decode table, ``None`` (not audio: skip), or
# a string (the reason the recording cannot be made).
_Resolved = npt.NDArray[np.int16] | str | None


class _Track:
    """One side's pending packets, streams and un-flushed samples (internal)."""

    __slots__ = ("buffer", "codecs", "decodable", "pending", "resolved", "streams",
                 "undecodable", "undecodable_reason")

    def __init__(self, codecs: Mapping[int, str]) -> None:
        self.pending: list[tuple[bytes, float]] = []
        self.decodable = 0
        """Audio packets of this side that could be decoded."""
        self.undecodable = 0
        """Audio packets of this side in a codec that cannot be decoded."""
        self.undecodable_reason = ""
        self.streams: dict[int, _Stream] = {}
        self.codecs: dict[int, str] = dict(codecs)
        self.resolved: dict[int, _Resolved] = {}
        self.buffer: Int16Array = np.zeros(0, dtype=np.int16)
        """Samples from the recorder's flushed position on (zeros are silence)."""

    def resolve(self, payload_type: int) -> _Resolved:
        """Map a payload type to a decode table, ``None`` (skip) or a failure reason."""
        try:
            return self.resolved[payload_type]
        except KeyError:
            pass
        name = self.codecs.get(payload_type) or STATIC_PAYLOAD_TYPES.get(payload_type)
        result: _Resolved
        if name is None:
            result = f"payload type {payload_type} is not in the negotiated codecs"
        else:
            encoding = name.split("/", 1)[0].strip().upper()
            table = decoder_table(encoding)
            if table is not None:
                result = table
            elif encoding in _NOT_AUDIO:
                result = None
            else:
                result = f"codec {name} (payload type {payload_type}) cannot be recorded"
        self.resolved[payload_type] = result
        return result


class CallRecorder:
    """Turns the relayed RTP of one call's two sides into aligned PCM, a flush at a time.

    Drive it from the event loop thread: ``feed()`` for every relayed packet, ``flush(now)``
    every ``flush_seconds`` (hand the returned array to the MP3 writer's worker thread),
    ``finish(now)`` when the call ends. Check :attr:`failure` after each flush.
    """

    def __init__(
        self,
        *,
        start: float,
        stereo: bool = True,
        codecs: Mapping[int, str] | None = None,
        jitter_window: float = 0.2,
        resync_threshold: float | None = None,
    ) -> None:
        """Create a recorder whose output begins at ``start`` (loop time, seconds).

        ``codecs`` maps dynamic (or overridden static) payload types to SDP encoding names
        (``{101: "telephone-event", 96: "PCMA/8000"}``) for both sides; static types 0/8/13 need
        no entry. ``jitter_window`` is how long audio is held back for late packets;
        ``resync_threshold`` (default: ``jitter_window``) is how far a stream may stray from its
        arrival times before it is re-anchored.
        """
        if jitter_window < 0:
            raise ValueError("jitter_window must be >= 0")
        threshold = jitter_window if resync_threshold is None else resync_threshold
        if threshold <= 0:
            raise ValueError("resync_threshold must be > 0")
        self._start = start
        self._stereo = stereo
        self._jitter_window = jitter_window
        self._resync = int(threshold * SAMPLE_RATE)
        self._tracks = (_Track(codecs or {}), _Track(codecs or {}))
        self._pending = (self._tracks[0].pending, self._tracks[1].pending)
        self._flushed = 0
        """Absolute sample index up to which output has been emitted."""
        self._closed = False
        self._failure: str | None = None
        self._packets = 0
        self._placed = 0
        self._late = 0
        self._ignored = 0
        self._malformed = 0
        self._resyncs = 0
        self._pulls = 0
        self._streams = 0

    @classmethod
    def from_settings(
        cls,
        settings: RecordingSettings,
        *,
        start: float,
        codecs: Mapping[int, str] | None = None,
    ) -> CallRecorder:
        """A recorder configured from ``[recording]`` (stereo or mono mix)."""
        return cls(start=start, stereo=settings.stereo, codecs=codecs)

    # ---------------------------------------------------------------- inputs

    def feed(self, side: Side, packet: bytes, now: float) -> None:
        """Take one relayed RTP packet of ``side`` that arrived at ``now``.

        The hot path: one list append. ``packet`` must be immutable (``bytes``), since it is
        only parsed at the next flush.
        """
        if not self._closed:
            self._pending[side].append((packet, now))

    def set_codecs(self, codecs: Mapping[int, str], side: Side | None = None) -> None:
        """Replace the payload type map (from a new SDP offer/answer) of one or both sides.

        Packets fed before this call are placed with the old map first.
        """
        for index in (0, 1) if side is None else (int(side),):
            track = self._tracks[index]
            self._place(track)
            track.codecs = dict(codecs)
            track.resolved = {}

    def flush(self, now: float) -> Int16Array:
        """Place pending packets and return the audio older than ``now - jitter_window``.

        Returns int16 of shape ``(n, 2)`` (stereo) or ``(n,)`` (mono); ``n`` may be 0. Empty
        once the recorder has failed or finished.
        """
        if self._closed:
            return self._empty()
        for track in self._tracks:
            self._place(track)
        if self._failure is not None:
            return self._empty()
        end = math.floor((now - self._start - self._jitter_window) * SAMPLE_RATE)
        return self._emit(end)

    def finish(self, now: float) -> Int16Array:
        """Return everything up to ``now`` (the end of the call) and stop recording.

        With the earlier flushes the output then totals exactly ``now - start`` seconds.
        """
        if self._closed:
            return self._empty()
        for track in self._tracks:
            self._place(track)
            if self._failure is None and track.undecodable > track.decodable:
                self._fail(track.undecodable_reason)
        self._closed = True
        if self._failure is not None:
            return self._empty()
        pcm = self._emit(round((now - self._start) * SAMPLE_RATE))
        for track in self._tracks:
            track.buffer = np.zeros(0, dtype=np.int16)
            track.streams.clear()
        return pcm

    # ---------------------------------------------------------------- queries

    @property
    def failure(self) -> str | None:
        """Why this call cannot be recorded (an undecodable codec), or ``None``."""
        return self._failure

    @property
    def stereo(self) -> bool:
        """``True`` for two channels (caller left, callee right), ``False`` for a mono mix."""
        return self._stereo

    @property
    def channels(self) -> int:
        """Channels of the PCM that ``flush`` returns: 2 or 1."""
        return 2 if self._stereo else 1

    @property
    def start(self) -> float:
        """Loop time of output sample 0."""
        return self._start

    @property
    def emitted_seconds(self) -> float:
        """Audio handed out so far, in seconds."""
        return self._flushed / SAMPLE_RATE

    @property
    def held_samples(self) -> int:
        """Samples held un-flushed, both sides (for memory checks)."""
        return sum(len(track.buffer) for track in self._tracks)

    @property
    def pending_packets(self) -> int:
        """Packets fed but not yet placed, both sides."""
        return sum(len(track.pending) for track in self._tracks)

    def stats(self) -> RecorderStats:
        """Counters so far."""
        return RecorderStats(
            packets=self._packets,
            placed=self._placed,
            late=self._late,
            ignored=self._ignored,
            malformed=self._malformed,
            resyncs=self._resyncs,
            streams=self._streams,
            pulls=self._pulls,
        )

    # ---------------------------------------------------------------- internals

    def _empty(self) -> Int16Array:
        return np.zeros((0, 2) if self._stereo else 0, dtype=np.int16)

    def _fail(self, reason: str) -> None:
        self._failure = reason
        self._closed = True
        for track in self._tracks:
            track.pending.clear()
            track.streams.clear()
            track.buffer = np.zeros(0, dtype=np.int16)

    def _place(self, track: _Track) -> None:
        """Parse the track's pending packets and write their samples into its buffer."""
        if not track.pending or self._failure is not None:
            track.pending.clear()
            return
        entries = track.pending[:]
        track.pending.clear()  # the same list object stays shared with feed()'s fast path
        self._packets += len(entries)
        rate = SAMPLE_RATE
        start = self._start
        flushed = self._flushed
        resync = self._resync
        streams = track.streams
        # One group per decode table (normally just one): payloads, positions, lengths.
        groups: dict[int, tuple[Int16Array, list[bytes], list[int]]] = {}
        for packet, arrival in entries:
            rtp = _parse_rtp(packet)
            if rtp is None:
                self._malformed += 1
                continue
            payload_type, timestamp, ssrc, payload = rtp
            if not payload:
                continue  # a keep-alive (RFC 6263 §4.6) carries no audio, whatever its type
            table = track.resolve(payload_type)
            if table is None:
                self._ignored += 1
                continue
            if isinstance(table, str):
                track.undecodable += 1
                track.undecodable_reason = table
                if track.undecodable >= UNDECODABLE_LIMIT:
                    self._fail(table)
                    return
                continue
            track.decodable += 1
            arrival_pos = round((arrival - start) * rate)
            stream = streams.get(ssrc)
            if stream is None:
                stream = streams[ssrc] = _Stream(timestamp, arrival_pos)
                self._streams += 1
                if len(streams) > _STREAMS_PER_SIDE:
                    del streams[next(iter(streams))]
                position = arrival_pos
            else:
                # Unwrap: the signed 32-bit distance from the newest timestamp (RFC 3550
                # timestamps wrap at 2^32; a step of more than 2^31 is taken as backwards).
                delta = ((timestamp - stream.highest_ts + 0x80000000) & 0xFFFFFFFF) - 0x80000000
                extended = stream.highest_ext + delta
                position = stream.anchor_pos + extended - stream.anchor_ext
                if delta > 0:
                    # A new packet: check it against its arrival (a reordered packet, with a
                    # small negative delta, is never a jump).
                    stream.behind = None
                    if abs(position - arrival_pos) > resync or position < flushed <= arrival_pos:
                        stream.anchor_ext = extended
                        stream.anchor_pos = position = arrival_pos
                        self._resyncs += 1
                    elif position > arrival_pos:
                        # Here before its place: the anchor packet was delayed (by less than
                        # the threshold). Pull the anchor back; bounded by the threshold (more
                        # is a resync above), and late packets never move it.
                        stream.anchor_pos -= position - arrival_pos
                        position = arrival_pos
                        self._pulls += 1
                    stream.highest_ext = extended
                    stream.highest_ts = timestamp
                elif delta < -resync:
                    # Far behind the newest: a very late packet, or the sender's clock went
                    # backwards. One is taken as late; a second one in a row with the same
                    # timestamp-to-arrival offset confirms a backward jump.
                    offset = extended - arrival_pos
                    if stream.behind is not None and abs(offset - stream.behind) <= resync:
                        stream.anchor_ext = stream.highest_ext = extended
                        stream.highest_ts = timestamp
                        stream.anchor_pos = position = arrival_pos
                        stream.behind = None
                        self._resyncs += 1
                    else:
                        stream.behind = offset
            if position + len(payload) <= flushed:
                self._late += 1
                continue
            group = groups.get(id(table))
            if group is None:
                group = groups[id(table)] = (table, [], [])
            group[1].append(payload)
            group[2].append(position)
        for table, payloads, positions in groups.values():
            self._write(track, table, payloads, positions)

    def _write(
        self, track: _Track, table: Int16Array, payloads: list[bytes], positions: list[int]
    ) -> None:
        """Decode a batch of payloads with one table lookup and scatter them into place."""
        codes = np.frombuffer(b"".join(payloads), dtype=np.uint8)
        samples = table[codes]
        lengths = np.fromiter(map(len, payloads), dtype=np.int64, count=len(payloads))
        starts = np.asarray(positions, dtype=np.int64) - self._flushed
        # Index of every sample: its packet's start plus its offset within the packet.
        offsets = np.cumsum(lengths) - lengths
        index = np.arange(len(samples), dtype=np.int64) + np.repeat(starts - offsets, lengths)
        keep = index >= 0  # the part of a straddling packet that was already flushed is dropped
        if not keep.all():
            index = index[keep]
            samples = samples[keep]
        self._placed += len(payloads)
        if len(index) == 0:
            return
        needed = int(index.max()) + 1
        if needed > len(track.buffer):
            grown = np.zeros(max(needed, len(track.buffer) + SAMPLE_RATE), dtype=np.int16)
            grown[: len(track.buffer)] = track.buffer
            track.buffer = grown
        # Duplicates write identical samples twice; reordered packets simply land in place.
        track.buffer[index] = samples

    def _emit(self, end: int) -> Int16Array:
        """Hand out samples ``[flushed, end)`` of both tracks and drop them from the buffers."""
        count = end - self._flushed
        if count <= 0:
            return self._empty()
        left = self._take(self._tracks[0], count)
        right = self._take(self._tracks[1], count)
        self._flushed = end
        if self._stereo:
            return np.column_stack((left, right))
        mixed = left.astype(np.int32)
        mixed += right
        np.clip(mixed, -32768, 32767, out=mixed)
        return mixed.astype(np.int16)

    @staticmethod
    def _take(track: _Track, count: int) -> Int16Array:
        buffer = track.buffer
        if len(buffer) >= count:
            # The remainder is copied so the emitted view's memory is never written again.
            track.buffer = buffer[count:].copy()
            return buffer[:count]
        out = np.zeros(count, dtype=np.int16)
        out[: len(buffer)] = buffer
        track.buffer = np.zeros(0, dtype=np.int16)
        return out
