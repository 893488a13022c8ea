"""SDP parsing, byte-exact serialization, offer/answer rewrites; one table of real bodies."""

from __future__ import annotations

import random

import pytest

from softpbx.sip.sdp import (
    ICE_ATTRIBUTES,
    Codec,
    Connection,
    Direction,
    LocalOrigin,
    SdpError,
    answer_direction,
    direction,
    is_hold,
    media_address,
    parse_sdp,
    rewrite,
    rtcp_address,
    set_direction,
)


def crlf(text: str) -> bytes:
    return text.strip("\n").replace("\n", "\r\n").encode() + b"\r\n"


# name -> (body, expected (host, port) of media 0, codec names of media 0, direction of media 0)
REAL_SDPS: dict[str, tuple[bytes, tuple[str, int] | None, list[str], Direction]] = {
    "linphone": (
        crlf("""
v=0
o=alice 1234 567 IN IP4 192.168.1.10
s=Talk
c=IN IP4 192.168.1.10
t=0 0
a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics
m=audio 7078 RTP/AVP 96 97 98 0 8 18 101 99 100
a=rtpmap:96 opus/48000/2
a=fmtp:96 useinbandfec=1
a=rtpmap:97 speex/16000
a=fmtp:97 vbr=on
a=rtpmap:98 speex/8000
a=fmtp:98 vbr=on
a=fmtp:18 annexb=yes
a=rtpmap:101 telephone-event/48000
a=rtpmap:99 telephone-event/16000
a=rtpmap:100 telephone-event/8000
a=rtcp-fb:* trr-int 1000
a=rtcp-fb:* ccm tmmbr
m=video 9078 RTP/AVP 96 97
a=rtpmap:96 VP8/90000
a=rtpmap:97 H264/90000
a=fmtp:97 profile-level-id=42801F
a=rtcp-fb:* ccm fir
"""),
        ("192.168.1.10", 7078),
        [
            "opus",
            "speex",
            "speex",
            "PCMU",
            "PCMA",
            "G729",
            "telephone-event",
            "telephone-event",
            "telephone-event",
        ],
        Direction.SENDRECV,
    ),
    "zoiper": (
        crlf("""
v=0
o=Z 0 0 IN IP4 10.0.0.5
s=Z
c=IN IP4 10.0.0.5
t=0 0
m=audio 8000 RTP/AVP 106 9 98 101 0 8 3
a=rtpmap:106 opus/48000/2
a=fmtp:106 sprop-maxcapturerate=16000; minptime=20; useinbandfec=1
a=rtpmap:98 telephone-event/48000
a=fmtp:98 0-16
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=sendrecv
a=rtcp-mux
"""),
        ("10.0.0.5", 8000),
        ["opus", "G722", "telephone-event", "telephone-event", "PCMU", "PCMA", "GSM"],
        Direction.SENDRECV,
    ),
    "asterisk": (
        crlf("""
v=0
o=- 1608235282 1608235282 IN IP4 203.0.113.5
s=Asterisk
c=IN IP4 203.0.113.5
t=0 0
m=audio 14408 RTP/AVP 0 8 101
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=ptime:20
a=maxptime:150
a=sendrecv
"""),
        ("203.0.113.5", 14408),
        ["PCMU", "PCMA", "telephone-event"],
        Direction.SENDRECV,
    ),
    "pyvoip": (
        crlf("""
v=0
o=pyVoIP 1699000000 1699000002 IN IP4 127.0.0.1
s=pyVoIP 1.6.8
c=IN IP4 127.0.0.1
t=0 0
m=audio 10000 RTP/AVP 0 8 101
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-15
a=ptime:20
a=maxptime:150
a=sendrecv
"""),
        ("127.0.0.1", 10000),
        ["PCMU", "PCMA", "telephone-event"],
        Direction.SENDRECV,
    ),
    # SIPp's built-in uac; bare LF line endings as some stacks send them.
    "sipp_uac_lf": (
        b"v=0\no=user1 53655765 2353687637 IN IP4 127.0.0.1\ns=-\nc=IN IP4 127.0.0.1\n"
        b"t=0 0\nm=audio 6000 RTP/AVP 0\na=rtpmap:0 PCMU/8000\n",
        ("127.0.0.1", 6000),
        ["PCMU"],
        Direction.SENDRECV,
    ),
    "hold_sendonly": (
        crlf("""
v=0
o=- 1608235282 1608235283 IN IP4 203.0.113.5
s=Asterisk
c=IN IP4 203.0.113.5
t=0 0
m=audio 14408 RTP/AVP 0 101
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=ptime:20
a=sendonly
"""),
        ("203.0.113.5", 14408),
        ["PCMU", "telephone-event"],
        Direction.SENDONLY,
    ),
    # RFC 2543 hold; session-level direction; no trailing line ending.
    "hold_rfc2543": (
        b"v=0\r\no=- 1 2 IN IP4 192.0.2.7\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\n"
        b"a=inactive\r\nm=audio 4000 RTP/AVP 8 0\r\na=rtpmap:8 PCMA/8000",
        None,
        ["PCMA", "PCMU"],
        Direction.INACTIVE,
    ),
    "ipv6": (
        crlf("""
v=0
o=- 2890844526 2890842807 IN IP6 2001:db8::10
s=-
c=IN IP6 2001:DB8::10
t=0 0
m=audio 49170 RTP/AVP 0 101
a=rtpmap:101 telephone-event/8000
a=rtcp:49171 IN IP6 2001:db8::10
a=recvonly
"""),
        ("2001:DB8::10", 49170),
        ["PCMU", "telephone-event"],
        Direction.RECVONLY,
    ),
    # Media-level c= only, a rejected video stream, rtcp on a separate port.
    "media_level_c": (
        crlf("""
v=0
o=carrier 4858 4859 IN IP4 198.51.100.1
s=SBC
t=0 0
m=audio 30000 RTP/AVP 18 101 13
c=IN IP4 198.51.100.2
b=AS:64
a=rtpmap:18 G729/8000
a=fmtp:18 annexb=no
a=rtpmap:101 telephone-event/8000
a=rtcp:30011
m=video 0 RTP/AVP 31
"""),
        ("198.51.100.2", 30000),
        ["G729", "telephone-event", "CN"],
        Direction.SENDRECV,
    ),
}

CASES = sorted(REAL_SDPS)


@pytest.mark.parametrize("name", CASES)
def test_round_trip_is_byte_exact(name: str) -> None:
    body = REAL_SDPS[name][0]
    sdp = parse_sdp(body)
    assert sdp.to_bytes() == body
    assert parse_sdp(body.decode()).to_bytes() == body
    assert sdp.copy().to_bytes() == body


@pytest.mark.parametrize("name", CASES)
def test_model(name: str) -> None:
    body, addr, codec_names, want_dir = REAL_SDPS[name]
    sdp = parse_sdp(body)
    assert media_address(sdp, 0) == addr
    assert [c.encoding for c in sdp.media[0].codecs()] == codec_names
    assert direction(sdp, 0) is want_dir
    assert sdp.media[0].media == "audio"
    assert sdp.origin.session_version >= 0


def test_codec_details() -> None:
    sdp = parse_sdp(REAL_SDPS["linphone"][0])
    codecs = sdp.media[0].codecs()
    assert codecs[0] == Codec(96, "opus", 48000, 2, "useinbandfec=1")
    assert codecs[3] == Codec(0, "PCMU", 8000)
    assert codecs[5] == Codec(18, "G729", 8000, 1, "annexb=yes")
    assert codecs[-1] == Codec(100, "telephone-event", 8000)
    video = sdp.media[1]
    assert [c.encoding for c in video.codecs()] == ["VP8", "H264"]  # same PTs, own section
    asterisk = parse_sdp(REAL_SDPS["asterisk"][0])
    assert asterisk.media[0].ptime == 20.0
    assert asterisk.media[0].codecs()[2].fmtp == "0-16"


def test_static_payload_types_without_rtpmap() -> None:
    sdp = parse_sdp(
        crlf(
            "v=0\no=- 1 1 IN IP4 1.2.3.4\ns=-\nc=IN IP4 1.2.3.4\nt=0 0\nm=audio 5 RTP/AVP 0 8 9 13 18 96"
        )
    )
    names = [(c.payload_type, c.encoding, c.clock_rate) for c in sdp.media[0].codecs()]
    # 96 has no rtpmap: left out.
    assert names == [
        (0, "PCMU", 8000),
        (8, "PCMA", 8000),
        (9, "G722", 8000),
        (13, "CN", 8000),
        (18, "G729", 8000),
    ]


def test_rtcp_and_connection_accessors() -> None:
    sdp = parse_sdp(REAL_SDPS["media_level_c"][0])
    assert sdp.connection is None
    assert sdp.media[0].connection == Connection("IN", "IP4", "198.51.100.2")
    assert rtcp_address(sdp, 0) == ("198.51.100.2", 30011)
    assert media_address(sdp, 1) is None  # rejected video
    ipv6 = parse_sdp(REAL_SDPS["ipv6"][0])
    assert rtcp_address(ipv6, 0) == ("2001:db8::10", 49171)
    asterisk = parse_sdp(REAL_SDPS["asterisk"][0])
    assert rtcp_address(asterisk, 0) == ("203.0.113.5", 14409)


def test_hold_detection() -> None:
    assert not is_hold(parse_sdp(REAL_SDPS["asterisk"][0]))
    assert is_hold(parse_sdp(REAL_SDPS["hold_sendonly"][0]))
    held = parse_sdp(REAL_SDPS["hold_rfc2543"][0])
    assert is_hold(held) and is_hold(held, 0)
    assert held.connection is not None and held.connection.is_unspecified
    # c=0.0.0.0 alone (with sendrecv) is the old-style hold too.
    old = parse_sdp(
        crlf("v=0\no=- 1 1 IN IP4 1.2.3.4\ns=-\nc=IN IP4 0.0.0.0\nt=0 0\nm=audio 5 RTP/AVP 0")
    )
    assert is_hold(old) and media_address(old, 0) is None
    assert not is_hold(parse_sdp(REAL_SDPS["ipv6"][0]))  # recvonly is not hold


def test_direction_set_and_answer() -> None:
    sdp = parse_sdp(REAL_SDPS["asterisk"][0])
    held = set_direction(sdp, Direction.SENDONLY)
    assert direction(held, 0) is Direction.SENDONLY and is_hold(held)
    assert direction(sdp, 0) is Direction.SENDRECV  # the input is untouched
    body = held.to_bytes()
    assert body.count(b"a=sendonly\r\n") == 1 and b"a=sendrecv" not in body
    assert body == REAL_SDPS["asterisk"][0].replace(b"a=sendrecv", b"a=sendonly")
    # No media-level attribute yet: appended to the section; session level is overridden.
    no_attr = parse_sdp(REAL_SDPS["hold_rfc2543"][0])
    resumed = set_direction(no_attr, Direction.SENDRECV)
    assert direction(resumed, 0) is Direction.SENDRECV
    assert resumed.to_bytes().endswith(b"a=rtpmap:8 PCMA/8000\r\na=sendrecv")
    assert parse_sdp(resumed.to_bytes()).to_bytes() == resumed.to_bytes()
    assert answer_direction(Direction.SENDONLY) is Direction.RECVONLY
    assert answer_direction(Direction.RECVONLY) is Direction.SENDONLY
    assert answer_direction(Direction.INACTIVE) is Direction.INACTIVE
    assert answer_direction(Direction.SENDRECV) is Direction.SENDRECV


def test_rewrite_points_at_relay() -> None:
    body = REAL_SDPS["asterisk"][0]
    sdp = parse_sdp(body)
    out = rewrite(sdp, [("10.9.8.7", 20000)])
    expected = body.replace(b"c=IN IP4 203.0.113.5", b"c=IN IP4 10.9.8.7").replace(
        b"m=audio 14408 ", b"m=audio 20000 "
    )
    assert out.to_bytes() == expected
    assert sdp.to_bytes() == body  # not modified


def test_rewrite_keeps_codecs_and_unknown_lines() -> None:
    sdp = parse_sdp(REAL_SDPS["linphone"][0])
    out = rewrite(sdp, [("10.0.0.1", 20000), ("10.0.0.1", 20002)])
    text = out.to_bytes().decode()
    assert "m=audio 20000 RTP/AVP 96 97 98 0 8 18 101 99 100\r\n" in text
    assert "m=video 20002 RTP/AVP 96 97\r\n" in text
    assert "a=rtpmap:100 telephone-event/8000\r\n" in text
    assert "a=rtcp-xr:rcvr-rtt=all:10000 stat-summary=loss,dup,jitt,TTL voip-metrics\r\n" in text
    assert "192.168.1.10" in text  # only in o=, which is not ours to change here
    assert text.count("192.168.1.10") == 1
    assert [c.encoding for c in out.media[0].codecs()] == REAL_SDPS["linphone"][2]


def test_rewrite_ipv6_and_rtcp() -> None:
    sdp = parse_sdp(REAL_SDPS["ipv6"][0])
    out = rewrite(sdp, [("127.0.0.1", 20000)])
    text = out.to_bytes().decode()
    assert "c=IN IP4 127.0.0.1\r\n" in text
    assert "a=rtcp:20001 IN IP4 127.0.0.1\r\n" in text
    v6 = rewrite(parse_sdp(REAL_SDPS["asterisk"][0]), [("fd00::5", 20000)]).to_bytes()
    assert b"c=IN IP6 fd00::5\r\n" in v6
    dropped = rewrite(sdp, [("127.0.0.1", 20000)], rtcp="drop").to_bytes()
    assert b"a=rtcp:" not in dropped


def test_rewrite_media_level_c_and_rejected_stream() -> None:
    sdp = parse_sdp(REAL_SDPS["media_level_c"][0])
    out = rewrite(sdp, [("10.1.1.1", 20000), ("10.1.1.1", 20002)])
    text = out.to_bytes().decode()
    assert "m=audio 20000 RTP/AVP 18 101 13\r\nc=IN IP4 10.1.1.1\r\nb=AS:64\r\n" in text
    assert "a=rtcp:20001\r\n" in text
    assert "m=video 0 RTP/AVP 31\r\n" in text  # stays rejected, no c= added
    assert media_address(out, 0) == ("10.1.1.1", 20000)


def test_rewrite_adds_media_connection_when_hosts_differ() -> None:
    sdp = parse_sdp(REAL_SDPS["linphone"][0])
    out = rewrite(sdp, [("10.0.0.1", 20000), ("10.0.0.2", 20002)])
    assert media_address(out, 0) == ("10.0.0.1", 20000)
    assert media_address(out, 1) == ("10.0.0.2", 20002)
    assert out.media[1].lines[0].render() == "c=IN IP4 10.0.0.2\r\n"
    disabled = rewrite(sdp, [("10.0.0.1", 20000), ("10.0.0.1", 0)])
    assert disabled.media[1].port == 0 and media_address(disabled, 1) is None


def test_rewrite_keeps_rfc2543_hold() -> None:
    sdp = parse_sdp(REAL_SDPS["hold_rfc2543"][0])
    out = rewrite(sdp, [("10.0.0.1", 20000)])
    assert out.connection == Connection("IN", "IP4", "0.0.0.0")
    assert is_hold(out) and out.media[0].port == 20000
    plain = rewrite(sdp, [("10.0.0.1", 20000)], keep_hold=False)
    assert media_address(plain, 0) == ("10.0.0.1", 20000)


def test_rewrite_drops_ice_and_sets_origin() -> None:
    body = crlf("""
v=0
o=- 5 5 IN IP4 192.168.0.3
s=-
c=IN IP4 192.168.0.3
t=0 0
a=ice-lite
m=audio 5000 RTP/AVP 0
a=ice-ufrag:abcd
a=ice-pwd:0123456789abcdef012345
a=candidate:1 1 UDP 2130706431 192.168.0.3 5000 typ host
a=sendrecv
""")
    ours = LocalOrigin(session_id=777, address="10.0.0.1")
    out = rewrite(
        parse_sdp(body),
        [("10.0.0.1", 20000)],
        drop_attributes=ICE_ATTRIBUTES,
        origin=ours.current(),
    )
    text = out.to_bytes().decode()
    assert "ice" not in text and "candidate" not in text and "192.168.0.3" not in text
    assert text.startswith("v=0\r\no=- 777 777 IN IP4 10.0.0.1\r\n")
    assert text.endswith("a=sendrecv\r\n")


def test_rewrite_needs_one_address_per_section() -> None:
    with pytest.raises(ValueError):
        rewrite(parse_sdp(REAL_SDPS["linphone"][0]), [("10.0.0.1", 20000)])


def test_local_origin_versions() -> None:
    origin = LocalOrigin(session_id=1000, address="10.0.0.1", version=1)
    offer = rewrite(parse_sdp(REAL_SDPS["asterisk"][0]), [("10.0.0.1", 20000)])
    first = origin.stamp(offer)
    assert first.origin.session_version == 1 and first.origin.session_id == "1000"
    assert origin.stamp(offer).origin.session_version == 1  # unchanged SDP: same version
    hold = origin.stamp(set_direction(offer, Direction.SENDONLY))
    assert hold.origin.session_version == 2
    assert origin.bump().session_version == 3
    assert LocalOrigin(session_id=5, address="::1").current().addr_type == "IP6"


MALFORMED = [
    b"",
    b"\r\n\r\n",
    b"o=- 1 1 IN IP4 1.2.3.4\r\nv=0\r\n",
    b"v=1\r\no=- 1 1 IN IP4 1.2.3.4\r\n",
    b"v=0\r\ns=-\r\n",  # no o=
    b"v=0\r\no=- 1 IN IP4 1.2.3.4\r\n",  # o= short
    b"v=0\r\no=- 1 x IN IP4 1.2.3.4\r\n",  # version not a number
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nbogus line\r\n",
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nX=upper\r\n",
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4\r\n",
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio\r\n",
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 70000 RTP/AVP 0\r\n",
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio -1 RTP/AVP 0\r\n",
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 5/0 RTP/AVP 0\r\n",
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 5 RTP/AVP PCMU\r\n",
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 5 RTP/AVP 128\r\n",
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nm=audio 5 RTP/AVP 0\r\n",  # no c= anywhere
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 5 RTP/AVP 0\r\na=rtpmap:0\r\n",
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 5 RTP/AVP 0\r\na=rtpmap:0 PCMU\r\n",
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 5 RTP/AVP 0\r\na=rtpmap:x PCMU/8000\r\n",
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 5 RTP/AVP 0\r\na=ptime:abc\r\n",
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 5 RTP/AVP 0\r\na=rtcp:x\r\n",
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 5 RTP/AVP 0\r\na=rtcp:5 IN\r\n",
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 5 RTP/AVP 0\r\na=fmtp:\r\n",
    b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio \xd9\xa1 RTP/AVP 0\r\n",
]


@pytest.mark.parametrize("body", MALFORMED)
def test_malformed_raises_sdp_error(body: bytes) -> None:
    with pytest.raises(SdpError) as info:
        parse_sdp(body)
    assert info.value.status_hint == 488


def test_non_text_input_types() -> None:
    with pytest.raises(SdpError):
        parse_sdp("v=0\r\no=- 1 1 IN IP4 \ud800\r\n")
    with pytest.raises(SdpError):
        parse_sdp(123)  # type: ignore[arg-type]


def _exercise(body: bytes | str) -> None:
    """Everything a caller may do with a parsed SDP; only SdpError may come out."""
    try:
        sdp = parse_sdp(body)
    except SdpError:
        return
    raw = body if isinstance(body, bytes) else body.encode("utf-8", "surrogateescape")
    assert sdp.to_bytes() == raw
    assert parse_sdp(sdp.to_bytes()).to_bytes() == raw
    _ = sdp.origin, sdp.connection, sdp.direction, is_hold(sdp)
    for i, media in enumerate(sdp.media):
        _ = media.codecs(), media.ptime, media.rtcp, media.connection
        _ = direction(sdp, i), media_address(sdp, i), rtcp_address(sdp, i), is_hold(sdp, i)
    addrs = [("10.0.0.1", 20000 + 2 * i) for i in range(len(sdp.media))]
    for out in (
        rewrite(sdp, addrs, origin=LocalOrigin(session_id=1, address="10.0.0.1").current()),
        rewrite(
            sdp, [("fd00::1", 0)] * len(sdp.media), rtcp="drop", drop_attributes=ICE_ATTRIBUTES
        ),
        set_direction(sdp, Direction.INACTIVE),
    ):
        again = parse_sdp(out.to_bytes())  # what we produce parses back, unchanged
        assert again.to_bytes() == out.to_bytes()


def _mutate(rng: random.Random, body: bytes) -> bytes:
    data = bytearray(body)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 1:
            data[pos:pos] = bytes([rng.choice(b" =/:\r\n0123456789-amcov\x00\xff")])
        elif op == 2:
            del data[pos : pos + rng.randint(1, 12)]
        elif op == 3:
            lines = bytes(data).split(b"\n")
            i = rng.randrange(len(lines))
            lines.insert(rng.randrange(len(lines) + 1), lines[i])
            data = bytearray(b"\n".join(lines))
        elif op == 4:
            lines = bytes(data).split(b"\n")
            del lines[rng.randrange(len(lines))]
            data = bytearray(b"\n".join(lines))
        else:
            data = data[:pos]
    return bytes(data)


def test_fuzz_only_sdp_error() -> None:
    rng = random.Random(4566)
    seeds = [case[0] for case in REAL_SDPS.values()]
    for _ in range(3000):
        _exercise(_mutate(rng, rng.choice(seeds)))
    for _ in range(500):
        _exercise(bytes(rng.randrange(256) for _ in range(rng.randrange(64))))
        _exercise(b"v=0\r\n" + bytes(rng.randrange(256) for _ in range(rng.randrange(200))))
    for seed in seeds:
        _exercise(seed.decode())
