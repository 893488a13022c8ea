"""The parser and serializer as inverses, and the structured fields, from one table of real bytes."""

from __future__ import annotations

import contextlib
import random

import pytest

from softpbx.sip.errors import ParseError, SipError, VersionError
from softpbx.sip.framing import PING, StreamFramer
from softpbx.sip.headers import parse_name_addr, parse_via, split_comma
from softpbx.sip.message import Request, Response, make_response
from softpbx.sip.parser import parse_message
from softpbx.sip.uri import parse_uri

from .sipkit import crlf

LINPHONE_REGISTER = crlf("""REGISTER sip:127.0.0.1 SIP/2.0
Via: SIP/2.0/UDP 192.168.1.20:5060;branch=z9hG4bK.Zx1x8e1mD;rport
From: <sip:101@127.0.0.1>;tag=9tGbjTO~3
To: sip:101@127.0.0.1
CSeq: 20 REGISTER
Call-ID: 4SFLd2aq4C
Max-Forwards: 70
Supported: replaces, outbound, gruu, path
Accept: application/sdp
Accept: text/plain
Accept: application/vnd.gsma.rcs-ft-http+xml
Contact: <sip:101@192.168.1.20;transport=udp>;+sip.instance="<urn:uuid:2a3c6e49-1b06-4a6e-9d0c-4bb0e40b2e9f>";+org.linphone.specs="lime";reg-id=1;ob
Expires: 3600
User-Agent: Linphone-Desktop/5.2.0 (x86_64) Debian GNU/Linux 12, Qt 5.15.8 LinphoneSDK/5.3.0
Content-Length: 0

""")

ZOIPER_INVITE = crlf("""INVITE sip:102@127.0.0.1;transport=UDP SIP/2.0
Via: SIP/2.0/UDP 10.0.0.5:52714;branch=z9hG4bK-524287-1---8c7a4dbd6b1ea0d8;rport
Max-Forwards: 70
Contact: <sip:101@10.0.0.5:52714;transport=UDP>
To: <sip:102@127.0.0.1;transport=UDP>
From: "Alice"<sip:101@127.0.0.1;transport=UDP>;tag=1c8d1f4a
Call-ID: YTM5ZGU4ZTc3MjUxNzBlZDM3ZWMyOWQ3ZTIzOGI1NmU
CSeq: 2 INVITE
Allow: INVITE, ACK, CANCEL, BYE, NOTIFY, REFER, MESSAGE, OPTIONS, INFO, SUBSCRIBE
Content-Type: application/sdp
Supported: replaces, norefersub, extended-refer, timer, sec-agree, outbound, path, X-cisco-serviceuri
User-Agent: Z 5.6.1 v2.10.19.9
Authorization: Digest username="101",realm="127.0.0.1",nonce="18c2.ab",uri="sip:102@127.0.0.1;transport=UDP",response="6629fae49393a05397450978507c4ef1",cnonce="f3b1",nc=00000001,qop=auth,algorithm=MD5
Allow-Events: presence, kpml, talk
Content-Length: 126

v=0
o=Z 0 1 IN IP4 10.0.0.5
s=Z
c=IN IP4 10.0.0.5
t=0 0
m=audio 8000 RTP/AVP 0 8 101
a=rtpmap:101 telephone-event/8000
""")

RESPONSE_180 = crlf("""SIP/2.0 180 Ringing
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKabc;received=127.0.0.1;rport=5060
From: <sip:101@127.0.0.1>;tag=a1
To: <sip:102@127.0.0.1>;tag=b2
Call-ID: c1@127.0.0.1
CSeq: 1 INVITE
Contact: <sip:102@127.0.0.1:5062>
Content-Length: 0

""")

IPV6_OPTIONS = crlf("""OPTIONS sip:[2001:db8::10]:5060 SIP/2.0
Via: SIP/2.0/TCP [2001:db8::9]:5070;branch=z9hG4bK776asdhds
Max-Forwards: 70
To: <sip:[2001:db8::10]>
From: "Bob \\"the builder\\"" <sip:bob@[2001:db8::9]:5070>;tag=1928301774
Call-ID: a84b4c76e66710@pc33.example.com
CSeq: 63104 OPTIONS
Content-Length: 0

""")

COMPACT_FOLDED = crlf("""INVITE sip:bob@biloxi.example.com SIP/2.0
v: SIP/2.0/UDP 192.0.2.1:5060
 ;branch=z9hG4bKnashds8
f: Alice <sip:alice@atlanta.example.com>;tag=88sja8x
t: Bob <sip:bob@biloxi.example.com>
i: 98asjd8@pc33.atlanta.example.com
CSeq: 1 INVITE
m: <sip:alice@192.0.2.1>
l: 0
k: 100rel
s: Weekend plans

""")

TABLE = {
    "linphone_register": LINPHONE_REGISTER,
    "zoiper_invite": ZOIPER_INVITE,
    "response_180": RESPONSE_180,
    "ipv6_options": IPV6_OPTIONS,
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_serialize_is_inverse_of_parse(name: str) -> None:
    data = TABLE[name]
    msg = parse_message(data)
    assert msg.serialize() == data
    again = parse_message(msg.serialize())
    assert again.headers == msg.headers and again.body == msg.body


def test_linphone_register_fields() -> None:
    m = parse_message(LINPHONE_REGISTER)
    assert isinstance(m, Request) and m.method == "REGISTER"
    assert m.uri.host == "127.0.0.1" and m.uri.user == ""
    assert m.to.uri.user == "101" and m.to.angle is False
    assert m.from_.tag == "9tGbjTO~3"
    assert m.cseq.number == 20 and m.cseq.method == "REGISTER"
    assert m.top_via.branch == "z9hG4bK.Zx1x8e1mD" and "rport" in m.top_via.params
    assert m.top_via.params["rport"] is None
    (c,) = m.contacts
    assert c.uri.transport == "udp" and "ob" in c.params
    assert c.params["+sip.instance"] == '"<urn:uuid:2a3c6e49-1b06-4a6e-9d0c-4bb0e40b2e9f>"'
    assert c.params["reg-id"] == "1"
    assert m.expires == 3600
    assert m.values("accept") == ["application/sdp", "text/plain",
                                  "application/vnd.gsma.rcs-ft-http+xml"]
    assert m.values("supported") == ["replaces", "outbound", "gruu", "path"]


def test_zoiper_invite_body_and_display_without_space() -> None:
    m = parse_message(ZOIPER_INVITE)
    assert m.from_.display == "Alice" and m.from_.uri.user == "101"
    assert m.body.startswith(b"v=0\r\n") and len(m.body) == 126
    assert m.content_type == "application/sdp"
    assert m.uri.params == {"transport": "UDP"} and m.uri.transport == "udp"


def test_ipv6_hosts_and_escaped_quotes() -> None:
    m = parse_message(IPV6_OPTIONS)
    assert m.uri.host == "[2001:db8::10]" and m.uri.port == 5060
    assert m.uri.host_bare == "2001:db8::10"
    assert m.top_via.host == "[2001:db8::9]" and m.top_via.port == 5070
    assert m.top_via.transport == "TCP"
    assert m.from_.display == 'Bob "the builder"'
    assert m.from_.uri.host == "[2001:db8::9]" and m.from_.uri.port == 5070


def test_compact_forms_and_folding() -> None:
    m = parse_message(COMPACT_FOLDED)
    assert m.call_id == "98asjd8@pc33.atlanta.example.com"
    assert m.get("Call-ID") == m.get("i") == m.get("CALL-ID")
    assert m.top_via.branch == "z9hG4bKnashds8"
    assert m.from_.display == "Alice" and m.to.display == "Bob"
    assert m.contacts[0].uri.host == "192.0.2.1"
    assert m.values("supported") == ["100rel"]
    assert m.get("subject") == "Weekend plans"


def test_odd_spacing_everywhere() -> None:
    data = crlf("""OPTIONS sip:u@h SIP/2.0
Via  :  SIP / 2.0 / UDP   host.example.com : 5070 ;  branch = z9hG4bKx1 ; rport
TO :
 <sip:u@h> ;  tag = t1
fRoM:"A"<sip:a@h>;tag=f1
call-id: x
cseq: 0009
  OPTIONS
Content-Length   : 0

""")
    m = parse_message(data)
    v = m.top_via
    assert (v.transport, v.host, v.port, v.branch) == ("UDP", "host.example.com", 5070, "z9hG4bKx1")
    assert m.to.tag == "t1" and m.from_.display == "A" and m.cseq.number == 9


def test_response_fields() -> None:
    r = parse_message(RESPONSE_180)
    assert isinstance(r, Response) and r.status == 180 and r.reason == "Ringing"
    assert r.top_via.params["received"] == "127.0.0.1" and r.top_via.params["rport"] == "5060"
    assert r.to.tag == "b2"


def test_udp_extra_octets_ignored_and_bare_lf_accepted() -> None:
    data = LINPHONE_REGISTER + b"INVITE sip:x SIP/2.0\r\n"
    m = parse_message(data)
    assert m.method == "REGISTER" and m.body == b""
    lf = LINPHONE_REGISTER.replace(b"\r\n", b"\n")
    assert parse_message(lf).call_id == "4SFLd2aq4C"


def test_leading_crlf_ignored() -> None:
    assert parse_message(b"\r\n\r\n" + RESPONSE_180).status == 180


@pytest.mark.parametrize(("mutate", "status", "words"), [
    (lambda d: d.replace(b"CSeq: 20 REGISTER", b"CSeq: 20 INVITE"), 400, "CSeq method"),
    (lambda d: d.replace(b"Call-ID: 4SFLd2aq4C\r\n", b""), 400, "Missing Call-ID"),
    (lambda d: d.replace(b"Content-Length: 0", b"Content-Length: 10"), 400, "Content-Length larger"),
    (lambda d: d.replace(b"Content-Length: 0", b"Content-Length: -1"), 400, "Negative"),
    (lambda d: d.replace(b"Content-Length: 0", b"Content-Length: 0\r\nl: 0"), 400, "Multiple Content-Length"),
    (lambda d: d.replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1), 505, "Version"),
    (lambda d: d.replace(b"REGISTER sip:127.0.0.1", b"REGISTER <sip:127.0.0.1>"), 400, "Request-URI"),
    (lambda d: d.replace(b"REGISTER sip:127.0.0.1 ", b"REGISTER  sip:127.0.0.1 "), 400, "Request-Line"),
    (lambda d: d.replace(b"CSeq: 20", b"CSeq: 99999999999"), 400, "CSeq"),
    (lambda d: d.replace(b"Max-Forwards: 70", b"Max-Forwards: 256"), 400, "Max-Forwards"),
    (lambda d: d.replace(b"To: sip:101@127.0.0.1", b'To: "unterminated <sip:101@127.0.0.1>'), 400, "quoted"),
    (lambda d: d.replace(b"Expires: 3600", b"Expires 3600"), 400, "header line"),
    (lambda d: d.replace(b"To: sip:101@127.0.0.1", b"To: sip:101@127.0.0.1\r\nTo: sip:102@h"), 400, "Multiple To"),
])
def test_malformed_requests_carry_their_answer(mutate, status: int, words: str) -> None:
    with pytest.raises(SipError) as ei:
        parse_message(mutate(LINPHONE_REGISTER))
    assert ei.value.status_hint == status
    assert words.lower() in ei.value.reason.lower()
    # the partial request is kept so that the answer can be built
    assert isinstance(getattr(ei.value, "message", None), Request)


def test_version_error_type() -> None:
    with pytest.raises(VersionError):
        parse_message(LINPHONE_REGISTER.replace(b"SIP/2.0\r\n", b"SIP/2.1\r\n", 1))


def test_stream_requires_content_length() -> None:
    data = LINPHONE_REGISTER.replace(b"Content-Length: 0\r\n", b"")
    assert parse_message(data).method == "REGISTER"
    with pytest.raises(ParseError, match="Missing Content-Length"):
        parse_message(data, stream=True)


def test_fuzzed_bytes_never_raise_anything_but_sip_error() -> None:
    rng = random.Random(4475)
    seeds = list(TABLE.values()) + [COMPACT_FOLDED]
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            op = rng.random()
            pos = rng.randrange(len(data))
            if op < 0.4:
                data[pos] = rng.randrange(256)
            elif op < 0.7:
                del data[pos : pos + rng.randint(1, 20)]
            else:
                data[pos:pos] = rng.choice([b"\r\n", b";", b":", b"<", b'"', b",", b" ", b"\x00", b"%"])
        try:
            m = parse_message(bytes(data))
        except SipError:
            continue
        # whatever parsed must serialize and expose its lazily parsed fields without crashing
        m.serialize()
        for attr in ("contacts", "expires", "content_type"):
            with contextlib.suppress(SipError):
                getattr(m, attr)


def test_uri_forms() -> None:
    u = parse_uri("sip:alice:pw@[::1]:5070;transport=tcp;lr?subject=hi")
    assert (u.user, u.password, u.host, u.port) == ("alice", "pw", "[::1]", 5070)
    assert u.params == {"transport": "tcp", "lr": None} and u.headers == "subject=hi"
    assert str(u) == "sip:alice:pw@[::1]:5070;transport=tcp;lr?subject=hi"
    assert parse_uri("sip:user;par=u%40example.net@example.com").user == "user;par=u%40example.net"
    assert parse_uri("sip:null-%00-null@example.com").unescaped_user == "null-\x00-null"
    tel = parse_uri("tel:+74950000000")
    assert not tel.is_sip and tel.opaque == "+74950000000"
    for bad in ("sip:", "sip:@host", "sip:host:99999", "sip:host:abc", "1sip:host", "sip:a b@h"):
        with pytest.raises(ParseError):
            parse_uri(bad)


def test_name_addr_forms() -> None:
    a = parse_name_addr('"Ivanov \\"Ivan\\"" <sip:101@pbx>;tag=1;x="a;b"')
    assert a.display == 'Ivanov "Ivan"' and a.params == {"tag": "1", "x": '"a;b"'}
    assert str(a) == '"Ivanov \\"Ivan\\"" <sip:101@pbx>;tag=1;x="a;b"'
    b = parse_name_addr("sip:101@pbx;tag=9")
    assert b.uri.params == {} and b.tag == "9"
    c = parse_name_addr("Anonymous <sip:anonymous@anonymous.invalid>")
    assert c.display == "Anonymous"
    with pytest.raises(ParseError):
        parse_name_addr("sip:u@h?Route=x")


def test_split_comma_respects_quotes_and_brackets() -> None:
    assert split_comma('"a, b" <sip:x@h>, <sip:y@h;p=1,2>') == ['"a, b" <sip:x@h>', "<sip:y@h;p=1,2>"]
    assert split_comma("a,,b ,") == ["a", "b"]


def test_via_forms() -> None:
    v = parse_via("SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bK1;received=2001:db8::2")
    assert (v.transport, v.host, v.port) == ("TLS", "[2001:db8::1]", 5061)
    v2 = parse_via("SIP / 2.0 / UNKNOWN t4.example.com;branch=z9hG4bKasd0f3en")
    assert v2.transport == "UNKNOWN"
    for bad in ("SIP/2.0/UDP", "SIP/3.0/UDP h", "SIP/2.0/UDP h:99999", "SIP/2.0/UDP h;;"):
        with pytest.raises(ParseError):
            parse_via(bad)


def test_make_response_copies_and_tags() -> None:
    req = parse_message(LINPHONE_REGISTER)
    r = make_response(req, 200, to_tag="zz", headers=[("Contact", "<sip:101@h>;expires=60")])
    out = parse_message(r.serialize())
    assert out.status == 200 and out.to.tag == "zz" and out.call_id == req.call_id
    assert out.cseq == req.cseq and out.top_via.branch == req.top_via.branch
    assert out.get("contact") == "<sip:101@h>;expires=60"
    # a To that already has a tag keeps it
    req2 = parse_message(RESPONSE_180.replace(b"SIP/2.0 180 Ringing", b"BYE sip:x@h SIP/2.0")
                         .replace(b"1 INVITE", b"1 BYE"))
    assert make_response(req2, 200, to_tag="new").to.tag == "b2"


def test_framer_splits_stream_and_pings() -> None:
    f = StreamFramer(max_size=65536)
    z = ZOIPER_INVITE
    stream = PING + z + b"\r\n" + LINPHONE_REGISTER + z[:100]
    out = []
    for i in range(0, len(stream), 37):  # arbitrary chunking
        out += f.feed(stream[i : i + 37])
    assert out == [PING, z, LINPHONE_REGISTER]
    assert f.pending == 100 and f.broken is None
    assert f.feed(z[100:]) == [z]


@pytest.mark.parametrize(("data", "reason"), [
    (LINPHONE_REGISTER.replace(b"Content-Length: 0\r\n", b""), "Missing Content-Length"),
    (LINPHONE_REGISTER.replace(b"Content-Length: 0", b"Content-Length: -5"), "Bad Content-Length"),
    (LINPHONE_REGISTER.replace(b"Content-Length: 0", b"Content-Length: 0\r\nl: 0"), "Multiple"),
    (LINPHONE_REGISTER.replace(b"Content-Length: 0", b"Content-Length: 900000"), "too large"),
])
def test_framer_breaks_on_unframeable(data: bytes, reason: str) -> None:
    f = StreamFramer(max_size=65536)
    out = f.feed(data + LINPHONE_REGISTER)
    assert len(out) == 1 and reason.lower() in (f.broken or "").lower()
    assert f.feed(LINPHONE_REGISTER) == []  # nothing more once broken


def test_framer_eof_returns_rest_and_size_limit() -> None:
    f = StreamFramer(max_size=2000)
    assert f.feed(b"OPTIONS sip:x SIP/2.0\r\nVia: x\r\n") == []
    assert f.feed_eof() == b"OPTIONS sip:x SIP/2.0\r\nVia: x\r\n"
    g = StreamFramer(max_size=2000)
    out = g.feed(b"X" * 2500)
    assert g.broken == "Message too large" and len(out) == 1


@pytest.mark.parametrize(("junk", "glued"), [
    (b"\r\n\rX", b"X"), (b"\r\n\r\r\n", b""), (b"\r\n\r\r\r\r", b""), (b"\r\r\n\r", b""),
])
def test_framer_never_spins_on_stray_crs(junk: bytes, glued: bytes) -> None:
    # "\r\n\r" followed by anything but "\n" once looped for ever without consuming a byte
    # (one 4-byte TCP segment froze the whole process). Stray CR/LF are skipped; other bytes
    # become the start of the next message (which the stack then answers with 400).
    f = StreamFramer(max_size=65536)
    out = f.feed(junk)
    out += f.feed(LINPHONE_REGISTER)
    assert out == [glued + LINPHONE_REGISTER] and f.broken is None


def test_framer_waits_on_a_partial_ping() -> None:
    f = StreamFramer(max_size=65536)
    assert f.feed(b"\r\n\r") == []
    assert f.feed(b"\n") == [PING]


def test_via_port_with_thousands_of_digits_is_a_parse_error() -> None:
    # int() of over 4300 digits raises ValueError (CPython's limit): it must be a 400, not a crash
    with pytest.raises(ParseError):
        parse_via("SIP/2.0/UDP host : " + "9" * 5000 + ";branch=z9hG4bK1")
    with pytest.raises(ParseError):
        parse_via("SIP/2.0/UDP host:" + "9" * 5000)


@pytest.mark.parametrize("version", [b"sip/2.0", b"Sip/2.0", b"SIP/2.0"])
def test_sip_version_is_case_insensitive_on_receipt(version: bytes) -> None:
    """RFC 3261 §7.1: request line, status line and Via; we always send ``SIP/2.0``."""
    req = parse_message(LINPHONE_REGISTER.replace(b" SIP/2.0\r\n", b" " + version + b"\r\n", 1)
                        .replace(b"Via: SIP/2.0/UDP", b"Via: " + version + b"/udp"))
    assert req.method == "REGISTER" and req.top_via.transport == "UDP"
    assert req.serialize().startswith(b"REGISTER sip:127.0.0.1 SIP/2.0\r\n")
    resp = parse_message(RESPONSE_180.replace(b"SIP/2.0 180", version + b" 180", 1))
    assert isinstance(resp, Response) and resp.status == 180
    assert resp.serialize().startswith(b"SIP/2.0 180 Ringing\r\n")


@pytest.mark.parametrize("version", [b"sip/3.0", b"Sip/1.0"])
def test_other_versions_in_any_case_are_still_505(version: bytes) -> None:
    with pytest.raises(VersionError):
        parse_message(LINPHONE_REGISTER.replace(b" SIP/2.0\r\n", b" " + version + b"\r\n", 1))
    with pytest.raises(VersionError):
        parse_message(RESPONSE_180.replace(b"SIP/2.0 180", version + b" 180", 1))
