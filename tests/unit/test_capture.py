"""SIP capture frames (checked by an RFC 1071 sum written here), pcap rotation, HEP3 chunks,
the JSON log format and the plain histogram the metrics read."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import struct
import sys
from pathlib import Path

import pytest

from softpbx.aio.capture import PcapWriter, SipCapture, frame, hep3
from softpbx.config.loader import load_config
from softpbx.config.schema import ConfigError, Transport
from softpbx.core.stats import CallStats, Histogram
from softpbx.logs import JsonFormatter
from softpbx.sip.events import Flow

ROOT = Path(__file__).resolve().parents[2]
INVITE = (b"INVITE sip:102@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKx\r\n"
          b"Call-ID: abc@h\r\nContent-Length: 0\r\n\r\n")


def inet_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@pytest.mark.parametrize("tcp", [False, True])
def test_ipv4_frame_lengths_and_checksums(tcp: bool) -> None:
    f = frame(("127.0.0.1", 5062), ("10.0.0.7", 5060), INVITE, tcp=tcp, seq=1000)
    assert f[12:14] == b"\x08\x00"
    ip = f[14:]
    assert int.from_bytes(ip[2:4], "big") == len(ip) and inet_sum(ip[:20]) == 0xFFFF
    l4 = ip[20:]
    proto = 6 if tcp else 17
    assert ip[9] == proto
    pseudo = ip[12:20] + bytes([0, proto]) + len(l4).to_bytes(2, "big")
    assert inet_sum(pseudo + l4) == 0xFFFF
    if tcp:
        assert int.from_bytes(l4[4:8], "big") == 1000 and l4[12] >> 4 == 5
        assert l4[20:] == INVITE
    else:
        assert int.from_bytes(l4[4:6], "big") == len(l4) and l4[8:] == INVITE
    assert int.from_bytes(l4[0:2], "big") == 5062 and int.from_bytes(l4[2:4], "big") == 5060


def test_ipv6_udp_frame() -> None:
    f = frame(("::1", 5062), ("2001:db8::5", 5060), INVITE)
    assert f[12:14] == b"\x86\xdd"
    ip = f[14:]
    assert ip[0] >> 4 == 6 and int.from_bytes(ip[4:6], "big") == len(ip) - 40 and ip[6] == 17
    assert ipaddress.ip_address(ip[24:40]) == ipaddress.ip_address("2001:db8::5")
    udp = ip[40:]
    pseudo = ip[8:40] + len(udp).to_bytes(4, "big") + b"\0\0\0\x11"
    assert inet_sum(pseudo + udp) == 0xFFFF


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert struct.unpack("=I", data[:4])[0] == 0xA1B2C3D4
    out, off = [], 24
    while off < len(data):
        _, _, incl, orig = struct.unpack("=IIII", data[off:off + 16])
        assert incl == orig
        out.append(data[off + 16:off + 16 + incl])
        off += 16 + incl
    assert off == len(data)
    return out


def test_pcap_rotates_and_keeps_the_newest_files(tmp_path: Path) -> None:
    path = tmp_path / "sip.pcap"
    w = PcapWriter(str(path), max_bytes=64 * 1024, files=3)
    body = INVITE + b"x" * (1000 - len(INVITE))
    for i in range(300):  # ~330 KB: five rotations, two dropped
        w.write(("127.0.0.1", 6000 + i), ("127.0.0.1", 5060), body, tcp=False, when=1e9 + i)
    w.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["sip.pcap", "sip.pcap.1", "sip.pcap.2"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 64 * 1024
        assert all(r[42:].startswith(b"INVITE") for r in _records(tmp_path / name))
    # The current file holds the newest frames, .1 the ones just before.
    last = _records(path)[-1]
    assert int.from_bytes(last[34:36], "big") == 6299
    first_of_current = int.from_bytes(_records(path)[0][34:36], "big")
    last_of_older = int.from_bytes(_records(tmp_path / "sip.pcap.1")[-1][34:36], "big")
    assert last_of_older == first_of_current - 1


def test_tcp_sequence_numbers_continue_per_direction(tmp_path: Path) -> None:
    w = PcapWriter(str(tmp_path / "t.pcap"), max_bytes=1 << 20, files=1)
    a, b = ("127.0.0.1", 40000), ("127.0.0.1", 5060)
    w.write(a, b, INVITE, tcp=True, when=1.0)
    w.write(b, a, b"SIP/2.0 100 Trying\r\n\r\n", tcp=True, when=1.1)
    w.write(a, b, INVITE, tcp=True, when=1.2)
    w.close()
    recs = _records(tmp_path / "t.pcap")
    seqs = [int.from_bytes(r[38:42], "big") for r in recs]
    assert seqs == [1, 1, 1 + len(INVITE)]


def test_hep3_chunks() -> None:
    pkt = hep3(("2001:db8::1", 5060), ("2001:db8::2", 5070), INVITE, tcp=True,
               when=1700000000.25, agent_id=9)
    assert pkt[:4] == b"HEP3" and int.from_bytes(pkt[4:6], "big") == len(pkt)
    chunks, off = {}, 6
    while off < len(pkt):
        vendor, kind, length = struct.unpack("!HHH", pkt[off:off + 6])
        assert vendor == 0
        chunks[kind] = pkt[off + 6:off + length]
        off += length
    assert chunks[1] == b"\x0a" and chunks[2] == b"\x06" and chunks[11] == b"\x01"
    assert ipaddress.ip_address(chunks[5]) == ipaddress.ip_address("2001:db8::1")
    assert int.from_bytes(chunks[7], "big") == 5060 and int.from_bytes(chunks[8], "big") == 5070
    assert int.from_bytes(chunks[9], "big") == 1700000000
    assert int.from_bytes(chunks[10], "big") == 250000
    assert int.from_bytes(chunks[12], "big") == 9 and chunks[15] == INVITE


def test_capture_sends_hep_and_skips_keepalives(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(2.0)
    loop = asyncio.new_event_loop()
    try:
        cap = SipCapture(loop=loop, trace=True, hep=sink.getsockname(), hep_agent_id=1)
        flow = Flow(Transport.UDP, ("127.0.0.1", 40000), ("127.0.0.1", 5060))
        got: list[bytes] = []
        receive = cap.wrap(lambda data, f, err: got.append(data))
        with caplog.at_level(logging.INFO, logger="softpbx.sip.trace"):
            receive(b"\r\n\r\n", flow, None)
            receive(INVITE, flow, None)
            cap.sent(b"SIP/2.0 100 Trying\r\n\r\n", flow)
        assert got == [b"\r\n\r\n", INVITE]  # the core still gets keep-alives
        first = sink.recv(65535)
        assert first.endswith(INVITE)
        assert sink.recv(65535).endswith(b"SIP/2.0 100 Trying\r\n\r\n")
        lines = [r.getMessage() for r in caplog.records]
        assert lines[0].startswith("received udp 127.0.0.1:5060 <- 127.0.0.1:40000 (")
        assert lines[1].startswith("sent udp 127.0.0.1:5060 -> 127.0.0.1:40000 (")
        assert len(lines) == 2
        cap.close()
    finally:
        loop.close()
        sink.close()


def test_json_formatter_lifts_the_call_id() -> None:
    cid = "in_" + "ab" * 20
    rec = logging.LogRecord("softpbx.call", logging.INFO, __file__, 1, "call %s ended: %s",
                            (cid, "answered"), None)
    obj = json.loads(JsonFormatter().format(rec))
    assert obj["call_id"] == cid and obj["level"] == "info" and obj["logger"] == "softpbx.call"
    assert obj["message"] == f"call {cid} ended: answered" and obj["time"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "no id\nsecond line", (),
                                sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    obj = json.loads(line)
    assert "call_id" not in obj and "ValueError: boom" in obj["exception"]


def test_histogram_buckets_are_cumulative_with_le_semantics() -> None:
    h = Histogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [(1.0, 2), (2.0, 3), (float("inf"), 4)]
    assert h.count == 4 and h.sum == 6.0
    stats = CallStats()
    stats.call_ended("inbound", "busy", 10.0, None)
    stats.call_ended("inbound", "answered", 10.0, 12.5)
    assert stats.ended == {("inbound", "busy"): 1, ("inbound", "answered"): 1}
    assert stats.setup.count == 1 and stats.setup.sum == 2.5


@pytest.mark.parametrize("value", ["127.0.0.1", "nohost:9060", "127.0.0.1:0", "127.0.0.1:x"])
def test_bad_hep_address_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="hep_address"):
        load_config(ROOT / "sip_profiles", [f'sip.hep_address="{value}"'])


def test_capture_keys_load() -> None:
    cfg = load_config(ROOT / "sip_profiles", ['sip.hep_address="[::1]:9060"', "sip.trace=true",
                                              'sip.capture_pcap="x.pcap"'])
    assert cfg.sip.hep_address == "[::1]:9060" and cfg.sip.trace
    assert cfg.sip.capture_files == 5 and cfg.sip.capture_max_mb == 20
