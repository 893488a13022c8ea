"""``GET /metrics``, the SIP trace, the pcap capture and HEP v3 against a softpbx process.

One call 101 -> 102 by the raw test phones, with RTP both ways: the Prometheus text parses
with ``prometheus_client``'s own parser and its counters move by what the call did; the pcap
written meanwhile is read back by a reader written here (not softpbx's writer) that checks the
IPv4 and UDP checksums and finds the INVITE; a UDP socket in the test receives HEP3 packets
whose chunks carry the same INVITE.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.phone import Phone, make_sdp, sdp_audio_address
from tests.support.rtp import RtpEndpoint
from tests.support.server import HOST, RUNNING_MARK, PbxProcess

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(pbx: PbxProcess, token: str | None = None) -> tuple[Samples, str]:
    """``GET /metrics`` parsed by prometheus_client: {(sample name, labels): value}."""
    req = urllib.request.Request(f"http://{HOST}:{pbx.http_port}/metrics")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - 127.0.0.1 only
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out, text


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(pred, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- an independent pcap / HEP reader ---------------------------------------------------------
def inet_sum(data: bytes) -> int:
    """Ones' complement sum of big-endian 16-bit words (RFC 1071), folded."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def read_pcap(path: Path) -> list[tuple[tuple[str, int], tuple[str, int], bytes]]:
    """(src, dst, UDP payload) of every frame; asserts headers, lengths and checksums."""
    data = path.read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic == 0xA1B2C3D4 else ">"
    assert struct.unpack(endian + "I", data[:4])[0] == 0xA1B2C3D4, "not a pcap file"
    major, minor, _, _, snaplen, linktype = struct.unpack(endian + "HHiIII", data[4:24])
    assert (major, minor, linktype) == (2, 4, 1) and snaplen >= 65535
    out = []
    off = 24
    while off < len(data):
        _, _, incl, orig = struct.unpack(endian + "IIII", data[off:off + 16])
        assert incl == orig
        pkt = data[off + 16:off + 16 + incl]
        assert len(pkt) == incl, "truncated record"
        off += 16 + incl
        assert pkt[12:14] == b"\x08\x00", "not IPv4"
        ip = pkt[14:]
        ihl = (ip[0] & 0x0F) * 4
        total_len = int.from_bytes(ip[2:4], "big")
        assert ip[0] >> 4 == 4 and ihl == 20 and total_len == len(ip)
        assert inet_sum(ip[:ihl]) == 0xFFFF, "bad IPv4 header checksum"
        assert ip[9] == 17, "not UDP"
        udp = ip[ihl:]
        assert int.from_bytes(udp[4:6], "big") == len(udp)
        pseudo = ip[12:20] + b"\x00\x11" + len(udp).to_bytes(2, "big")
        assert inet_sum(pseudo + udp) == 0xFFFF, "bad UDP checksum"
        src = (socket.inet_ntoa(ip[12:16]), int.from_bytes(udp[0:2], "big"))
        dst = (socket.inet_ntoa(ip[16:20]), int.from_bytes(udp[2:4], "big"))
        out.append((src, dst, udp[8:]))
    return out


def read_hep3(packet: bytes) -> dict[int, bytes]:
    """HEP3 chunk type -> value (vendor 0 only); asserts the framing."""
    assert packet[:4] == b"HEP3"
    assert int.from_bytes(packet[4:6], "big") == len(packet)
    chunks: dict[int, bytes] = {}
    off = 6
    while off < len(packet):
        vendor, kind, length = struct.unpack("!HHH", packet[off:off + 6])
        assert length >= 6 and off + length <= len(packet)
        if vendor == 0:
            chunks[kind] = packet[off + 6:off + length]
        off += length
    return chunks


# -- the test ---------------------------------------------------------------------------------
def test_a_call_moves_the_metrics_and_is_captured(tmp_path: Path) -> None:
    hep_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    hep_sock.bind((HOST, 0))
    hep_sock.settimeout(0.2)
    hep_port = hep_sock.getsockname()[1]
    # T1 of 2 s: no INVITE or 200 is retransmitted on a slow CI machine, so every SIP counter
    # below moves by an exact amount.
    pbx = PbxProcess.create(tmp_path / "pbx", overrides={
        "sip.t1_ms": "2000", "sip.t2_ms": "8000", "sip.trace": "true",
        "sip.capture_pcap": "capture/sip.pcap", "sip.hep_address": f"{HOST}:{hep_port}",
        "sip.hep_capture_id": "77"})
    pbx.start()
    try:
        with Phone(user="101", pbx=pbx.sip_addr, password="secret101") as alice, \
                Phone(user="102", pbx=pbx.sip_addr, password="secret102") as bob, \
                Phone(user="101", pbx=pbx.sip_addr, password="wrong") as mallory, \
                RtpEndpoint() as a_rtp, RtpEndpoint() as b_rtp:
            alice.register()
            bob.register()
            before, _ = scrape(pbx)
            assert value(before, "softpbx_registrations", transport="udp") == 2
            assert value(before, "softpbx_calls_active", direction="internal") == 0
            with pytest.raises(AssertionError, match="403"):
                mallory.register()

            call = alice.call("102", sdp=make_sdp(a_rtp.port))
            inc = bob.wait_invite()
            inc.answer(make_sdp(b_rtp.port))
            final = call.wait_final()
            assert final.status == 200
            during, _ = scrape(pbx)
            assert value(during, "softpbx_calls_active", direction="internal") == 1
            assert value(during, "softpbx_relay_sessions") == 1
            # Media both ways through the relay: 20 packets each, all delivered.
            a_rtp.send_pcmu(sdp_audio_address(final.body), count=20, interval=0.005)
            b_rtp.send_pcmu(sdp_audio_address(inc.request.body), count=20, interval=0.005)
            assert len(b_rtp.wait_packets(20)) == 20 and len(a_rtp.wait_packets(20)) == 20
            call.bye()
            wait_for(lambda: value(scrape(pbx)[0], "softpbx_recordings_finished_total")
                     - value(before, "softpbx_recordings_finished_total") == 1,
                     "the call's recording to be published")
            after, text = scrape(pbx)

            def delta(name: str, **labels: str) -> float:
                return value(after, name, **labels) - value(before, name, **labels)

            assert delta("softpbx_calls_ended_total", direction="internal",
                         disposition="answered") == 1, text
            assert value(after, "softpbx_calls_active", direction="internal") == 0
            assert delta("softpbx_call_setup_seconds_count") == 1
            assert 0 < delta("softpbx_call_setup_seconds_sum") < 5
            assert value(after, "softpbx_call_setup_seconds_bucket", le="+Inf") == value(
                after, "softpbx_call_setup_seconds_count")
            # The caller's INVITE twice (challenged, then with credentials), one to the callee.
            assert delta("softpbx_sip_requests_total", direction="in", method="INVITE") == 2
            assert delta("softpbx_sip_requests_total", direction="out", method="INVITE") == 1
            assert delta("softpbx_sip_requests_total", direction="in", method="BYE") == 1
            assert delta("softpbx_sip_requests_total", direction="out", method="BYE") == 1
            assert delta("softpbx_sip_requests_total", direction="in", method="REGISTER") == 2
            # In: the callee's 200s to INVITE and BYE; out: 401 + 403 (mallory) + 401 (INVITE).
            assert delta("softpbx_sip_responses_total", direction="in", status_class="2xx") == 2
            assert delta("softpbx_sip_responses_total", direction="out",
                         status_class="4xx") == 3
            assert delta("softpbx_auth_failures_total") == 1
            assert delta("softpbx_auth_bans_total") == 0
            assert delta("softpbx_rtp_packets_relayed_total") == 40
            assert delta("softpbx_rtp_packets_dropped_total", reason="source") == 0
            assert delta("softpbx_relay_sessions_opened_total") == 1
            assert value(after, "softpbx_relay_sessions") == 0
            assert value(after, "softpbx_recordings_in_progress") == 0
            # Families that exist whatever the call did.
            for name in ("softpbx_event_loop_lag_seconds", "softpbx_webhook_outbox_depth",
                         "softpbx_webhooks_delivered_total", "softpbx_recording_encode_queue",
                         "process_cpu_seconds_total", "softpbx_webhook_latency_seconds_count"):
                assert any(k[0] == name for k in after), f"{name} missing:\n{text}"
            sip_call_id = call.call_id
        pbx.stop()  # flushes and closes the pcap
        log = pbx.log_text()
        # The trace: direction, transport, addresses, then the message.
        assert f"received udp {HOST}:{pbx.sip_port} <- {HOST}:" in log
        assert f"sent udp {HOST}:{pbx.sip_port} -> {HOST}:" in log
        assert "INVITE sip:102@" in log

        frames = read_pcap(tmp_path / "pbx" / "capture" / "sip.pcap")
        invites = [(src, dst, p) for src, dst, p in frames
                   if p.startswith(b"INVITE sip:102@") and sip_call_id.encode() in p]
        assert len(invites) == 2, [p[:60] for _, _, p in frames]
        src, dst, _ = invites[0]
        assert dst == (HOST, pbx.sip_port) and src[0] == HOST
        assert any(p.startswith(b"SIP/2.0 200") for _, _, p in frames)
        assert any(p.startswith(b"BYE ") for _, _, p in frames)

        heps = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                heps.append(read_hep3(hep_sock.recv(65535)))
            except TimeoutError:
                if heps:
                    break
        hep_invites = [c for c in heps if c.get(15, b"").startswith(b"INVITE sip:102@")
                       and sip_call_id.encode() in c[15]]
        assert len(hep_invites) == 2, len(heps)
        c = hep_invites[0]
        assert c[1] == b"\x02" and c[2] == bytes([17]) and c[11] == b"\x01"
        assert socket.inet_ntoa(c[3]) == HOST and socket.inet_ntoa(c[4]) == HOST
        assert int.from_bytes(c[8], "big") == pbx.sip_port
        assert int.from_bytes(c[12], "big") == 77
        assert abs(int.from_bytes(c[9], "big") - time.time()) < 120
    finally:
        pbx.kill()
        hep_sock.close()


def test_metrics_follow_the_api_access_rule(tmp_path: Path) -> None:
    token = "metrics-test-token-0123456789"
    pbx = PbxProcess.create(tmp_path / "pbx", overrides={"http.api_token": token,
                                                         "recording.enabled": "false"})
    with pbx:
        for given in (None, "not-the-token"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                scrape(pbx, given)
            assert refused.value.code == 401
        samples, _ = scrape(pbx, token)
        assert value(samples, "softpbx_calls_active", direction="inbound") == 0
        # The wrong token counted as an authentication failure, as on /api/* (a missing
        # one may count too).
        assert value(samples, "softpbx_auth_failures_total") >= 1


def test_json_log_format(tmp_path: Path) -> None:
    pbx = PbxProcess.create(tmp_path / "pbx", overrides={"recording.enabled": "false"})
    cmd = [*pbx.command(), "--log-format", "json"]
    log_path = tmp_path / "json.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=pbx.workdir)
    try:
        wait_for(lambda: RUNNING_MARK in log_path.read_text(), "the running line")
        with Phone(user="101", pbx=pbx.sip_addr, password="secret101") as alice, \
                Phone(user="102", pbx=pbx.sip_addr, password="secret102") as bob:
            bob.register()
            call = alice.call("102", sdp=make_sdp(40000))
            inc = bob.wait_invite()
            inc.answer(make_sdp(40002))
            assert call.wait_final().status == 200
            call.bye()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    lines = log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    ended = [r for r in records if " ended: answered" in r["message"]]
    assert len(ended) == 1, lines
    assert ended[0]["call_id"].startswith("int_") and ended[0]["call_id"] in ended[0]["message"]
    assert "caller hung up" in ended[0]["message"]
    assert any(r["message"] == "stopped" and r["level"] == "info" for r in records)
