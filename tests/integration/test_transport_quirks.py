"""What real phones do, over real sockets: RFC 2069 digest, odd digest URIs, Contact flavours,
CRLF keep-alives, stale nonces, nc replays, SHA-256, rport, oversized and garbage input,
and the RFC 3261 §8.2 refusals (420, 501, 405)."""

from __future__ import annotations

import time

import pytest

from softpbx.sip.message import Response
from tests.conftest import PbxFactory
from tests.support.digest import authorization, parse_challenge, rfc_examples_hold
from tests.support.server import HOST, PbxProcess
from tests.support.sip_client import SipClient, challenges, parse_response, pick_challenge

pytestmark = pytest.mark.integration

ALLOWED = {"INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REGISTER"}
"""Methods a registrar/B2BUA must list in Allow at least."""

PBX_OVERRIDES = {"auth.algorithms": '["MD5", "SHA-256"]'}
"""SHA-256 (RFC 8760) is opt-in since the default became MD5 only: this module checks both."""


@pytest.fixture
def server(module_pbx: PbxProcess) -> PbxProcess:
    """The module's softpbx (shipped profiles)."""
    return module_pbx


def _allow(resp: Response) -> set[str]:
    return {m.strip() for v in resp.get_all("allow") for m in v.split(",") if m.strip()}


def _challenge(c: SipClient, headers: list[tuple[str, str]]) -> Response:
    first = c.request(c.build("REGISTER", f"sip:{HOST}", headers=headers))
    assert first is not None and first.status == 401, first
    return first


def _with_auth(c: SipClient, headers: list[tuple[str, str]], auth: str) -> Response:
    resp = c.request(c.build("REGISTER", f"sip:{HOST}",
                             headers=[*headers, ("Authorization", auth)]))
    assert resp is not None, "no answer"
    return resp


def test_digest_helper_matches_rfc_examples() -> None:
    """The tests' own digest code reproduces RFC 2617 §3.5 and RFC 7616 §3.9.1."""
    assert rfc_examples_hold()


# -- digest variants ----------------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_digest_without_qop_rfc2069(server: PbxProcess, transport: str) -> None:
    with SipClient(transport, server.sip_addr) as c:
        first, ok = c.register("101", "secret101", use_qop=False)
        assert first.status == 401
        assert ok.status == 200, ok


@pytest.mark.parametrize("digest_uri", [f"sip:{HOST};transport=UDP", "sip:{host}:{port}",
                                        "sip:101@{host}"])
def test_digest_uri_differs_from_request_uri(server: PbxProcess, digest_uri: str) -> None:
    """R-URI ``sip:127.0.0.1``; the phone hashed another form of it (pyVoIP, SIPp do)."""
    uri = digest_uri.format(host=HOST, port=server.sip_port)
    with SipClient("udp", server.sip_addr) as c:
        for use_qop in (False, True):
            _, ok = c.register("102", "secret102", uri=f"sip:{HOST}", digest_uri=uri,
                               use_qop=use_qop)
            assert ok.status == 200, (uri, use_qop, ok)


def test_quoted_qop_and_algorithm_in_credentials(server: PbxProcess) -> None:
    """Some phones quote auth-params RFC 2617 wants bare (``qop="auth"``,
    ``algorithm="MD5"``): still 200."""
    with SipClient("udp", server.sip_addr) as c:
        headers = [("Contact", c.contact("101")), ("Expires", "600")]
        ch = pick_challenge(_challenge(c, headers))
        auth = authorization(ch, username="101", password="secret101", method="REGISTER",
                             uri=f"sip:{HOST}")
        auth = auth.replace("qop=auth", 'qop="auth"').replace("algorithm=MD5", 'algorithm="MD5"')
        assert _with_auth(c, headers, auth).status == 200


def test_sha256_credentials(server: PbxProcess) -> None:
    """RFC 8760: answering the SHA-256 challenge works, with and without qop."""
    with SipClient("tcp", server.sip_addr) as c:
        for use_qop in (True, False):
            first, ok = c.register("103", "secret103", algorithm="SHA-256", use_qop=use_qop)
            assert pick_challenge(first, "SHA-256").qop == ("auth",)
            assert ok.status == 200, ok
        first, bad = c.register("103", "secret101", algorithm="SHA-256")
        assert bad.status == 403


def test_md5_response_labelled_sha256_is_refused(server: PbxProcess) -> None:
    """The algorithm named in the credentials is the one checked."""
    with SipClient("udp", server.sip_addr) as c:
        headers = [("Contact", c.contact("101")), ("Expires", "600")]
        ch = pick_challenge(_challenge(c, headers), "MD5")
        auth = authorization(ch, username="101", password="secret101", method="REGISTER",
                             uri=f"sip:{HOST}").replace("algorithm=MD5", "algorithm=SHA-256")
        assert _with_auth(c, headers, auth).status == 403


def test_nc_replay_is_refused(server: PbxProcess) -> None:
    """qop=auth: the same nonce with the same nc twice: 200, then 403; a higher nc is fine."""
    with SipClient("udp", server.sip_addr) as c:
        headers = [("Contact", c.contact("101")), ("Expires", "600")]
        ch = pick_challenge(_challenge(c, headers))
        creds = {"username": "101", "password": "secret101", "method": "REGISTER",
                 "uri": f"sip:{HOST}"}
        assert _with_auth(c, headers, authorization(ch, nc=1, **creds)).status == 200
        replay = _with_auth(c, headers, authorization(ch, nc=1, **creds))
        assert replay.status == 403
        assert replay.get("www-authenticate") is None
        assert _with_auth(c, headers, authorization(ch, nc=2, **creds)).status == 200
        assert _with_auth(c, headers, authorization(ch, nc=2, cnonce="other", **creds)).status == 403
    server.wait_for_log('user="101" reason=replay')


def test_stale_nonce_gets_stale_challenge(pbx_factory: PbxFactory) -> None:
    """auth.nonce_ttl=1: right credentials on an old nonce get 401 stale=true, not 403."""
    pbx = pbx_factory(overrides={"auth.nonce_ttl": "1"})
    with SipClient("udp", pbx.sip_addr) as c:
        headers = [("Contact", c.contact("101")), ("Expires", "600")]
        ch = pick_challenge(_challenge(c, headers))
        assert not ch.stale
        time.sleep(1.6)
        auth = authorization(ch, username="101", password="secret101", method="REGISTER",
                             uri=f"sip:{HOST}")
        stale = _with_auth(c, headers, auth)
        assert stale.status == 401, stale
        fresh = challenges(stale)
        assert fresh and all(x.stale for x in fresh)
        assert all(x.nonce != ch.nonce for x in fresh)
        auth = authorization(pick_challenge(stale), username="101", password="secret101",
                             method="REGISTER", uri=f"sip:{HOST}")
        assert _with_auth(c, headers, auth).status == 200
        # A wrong password on an old nonce is still a failure, not a stale retry.
        ch = pick_challenge(_challenge(c, headers))
        time.sleep(1.6)
        auth = authorization(ch, username="101", password="wrong", method="REGISTER",
                             uri=f"sip:{HOST}")
        assert _with_auth(c, headers, auth).status == 403
    assert pbx.registrations("101")


# -- Contact forms ------------------------------------------------------------------------------
def test_contact_with_transport_and_ob_is_stored(server: PbxProcess) -> None:
    """RFC 5626 phones: ``;transport=tcp;ob`` and ``+sip.instance``/``reg-id`` are kept."""
    with SipClient("tcp", server.sip_addr) as c:
        contact = (f"<sip:103@{HOST}:{c.local[1]};transport=tcp;ob>;reg-id=1;"
                   '+sip.instance="<urn:uuid:00000000-0000-1000-8000-000A95A0E128>"')
        _, ok = c.register("103", "secret103", contacts=[contact], extra=[("Supported", "outbound")])
        assert ok.status == 200, ok
        # Other tests of this module may have left bindings of 103: look at ours.
        listed = [v for v in ok.get_all("contact") if f":{c.local[1]};" in v]
        assert len(listed) == 1 and f"{c.local[1]};transport=tcp;ob>" in listed[0], listed
        assert "reg-id=1" in listed[0] and "+sip.instance" in listed[0], listed
        rows = [r for r in server.registrations("103") if r["source"] == f"tcp:{HOST}:{c.local[1]}"]
        assert [r["contact"] for r in rows] == [f"sip:103@{HOST}:{c.local[1]};transport=tcp;ob"]
        _, gone = c.register("103", "secret103", contacts=[contact], expires=0)
        assert gone.status == 200
        assert not [v for v in gone.get_all("contact") if f":{c.local[1]};" in v]
        assert not [r for r in server.registrations("103")
                    if r["source"] == f"tcp:{HOST}:{c.local[1]}"]


# -- transport behaviour -----------------------------------------------------------------------
def test_crlf_keepalive_on_tcp(server: PbxProcess) -> None:
    """RFC 5626 §3.5.1: a double-CRLF ping gets a single-CRLF pong; the connection lives on."""
    with SipClient("tcp", server.sip_addr) as c:
        for _ in range(2):
            c.send(b"\r\n\r\n")
            assert c.recv_raw(2.0) == b"\r\n"
        resp = c.options()
        assert resp is not None and resp.status == 200


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_rport_and_received(server: PbxProcess, transport: str) -> None:
    """RFC 3581: the answer's Via carries received= and rport=<our real port>, and comes back
    to the port the request left from (the sent-by claims another host and port)."""
    with SipClient(transport, server.sip_addr) as c:
        via = f"SIP/2.0/{transport.upper()} 192.0.2.7:5099;branch=z9hG4bKrport{c.local[1]};rport"
        resp = c.request(c.build("OPTIONS", f"sip:{HOST}", via=via))
        assert resp is not None, "the answer did not come back to the source port"
        assert resp.status == 200
        top = resp.top_via
        assert top.params.get("rport") == str(c.local[1])
        assert top.params.get("received") == HOST
        assert top.branch == f"z9hG4bKrport{c.local[1]}"


def test_oversized_tcp_message_gets_513_and_close(server: PbxProcess) -> None:
    """A 70 KB message over TCP (limit 64 KiB): 513, then the connection is closed."""
    with SipClient("tcp", server.sip_addr) as c:
        body = b"x" * (70 * 1024)
        c.send(c.build("MESSAGE", f"sip:102@{HOST}", headers=[("Content-Type", "text/plain")],
                       body=body))
        data = c.recv_message(3.0)
        assert data is not None, "no answer to the oversized message"
        assert parse_response(data).status == 513
        assert c.closed_by_peer(3.0), "connection left open after 513"
    with SipClient("tcp", server.sip_addr) as c:
        resp = c.options()
        assert resp is not None and resp.status == 200


def test_udp_garbage_is_dropped(server: PbxProcess) -> None:
    with SipClient("udp", server.sip_addr) as c:
        for junk in (b"\x00\xff" * 300, b"hello world\r\n\r\n", b"SIP/2.0 999 x\r\n\r\n",
                     bytes(range(256))):
            c.send(junk)
        assert c.recv_raw(0.7) is None, "garbage must be dropped silently"
        resp = c.options()
        assert resp is not None and resp.status == 200


def test_options_advertises_capabilities(server: PbxProcess) -> None:
    with SipClient("udp", server.sip_addr) as c:
        resp = c.options()
        assert resp is not None and resp.status == 200
        assert _allow(resp) >= ALLOWED
        assert resp.get("accept") is not None
        assert resp.get("supported") is not None


# -- RFC 3261 §8.2 refusals ----------------------------------------------------------------------
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_require_unknown_extension_gets_420(server: PbxProcess, transport: str) -> None:
    with SipClient(transport, server.sip_addr) as c:
        resp = c.request(c.build("OPTIONS", f"sip:{HOST}", headers=[("Require", "foo")]))
        assert resp is not None and resp.status == 420
        assert [v.strip() for v in resp.get_all("unsupported")] == ["foo"]
        # REGISTER too, before any challenge (RFC 3261 §8.2.2.3 comes before auth).
        resp = c.request(c.build("REGISTER", f"sip:{HOST}", headers=[
            ("Require", "foo, bar"), ("Contact", c.contact("101")), ("Expires", "600")]))
        assert resp is not None and resp.status == 420
        assert {x.strip() for v in resp.get_all("unsupported") for x in v.split(",")} == {"foo", "bar"}


def test_unknown_method_gets_501_with_allow(server: PbxProcess) -> None:
    with SipClient("udp", server.sip_addr) as c:
        resp = c.request(c.build("FROBNICATE", f"sip:{HOST}"))
        assert resp is not None and resp.status == 501
        assert _allow(resp) >= ALLOWED


def test_message_gets_405_with_allow(server: PbxProcess) -> None:
    with SipClient("udp", server.sip_addr) as c:
        resp = c.request(c.build("MESSAGE", f"sip:102@{HOST}",
                                 headers=[("Content-Type", "text/plain")], body=b"hi"))
        assert resp is not None and resp.status == 405
        allow = _allow(resp)
        assert allow >= ALLOWED and "MESSAGE" not in allow


def test_challenge_shape(server: PbxProcess) -> None:
    """Both algorithms offered when opted in, same nonce, qop="auth", realm = global.domain,
    in the configured order."""
    with SipClient("udp", server.sip_addr) as c:
        first = _challenge(c, [("Contact", c.contact("101")), ("Expires", "600")])
        raw = first.get_all("www-authenticate")
        parsed = [parse_challenge(v) for v in raw]
        assert [p.algorithm for p in parsed] == ["MD5", "SHA-256"]
        assert len({p.nonce for p in parsed}) == 1
        assert all(p.realm == HOST and p.qop == ("auth",) and not p.stale for p in parsed)


def test_tcp_message_split_over_segments(server: PbxProcess) -> None:
    """Stream framing: a REGISTER arriving in pieces (split inside a header and inside the
    blank line) is answered once, when complete."""
    with SipClient("tcp", server.sip_addr) as c:
        data = c.build("REGISTER", f"sip:{HOST}", from_user="102",
                       headers=[("Contact", c.contact("102")), ("Expires", "600")])
        cut = [0, 40, data.index(b"\r\n\r\n") + 2, len(data)]
        for a, b in zip(cut, cut[1:], strict=False):
            c.send(data[a:b])
            if b < len(data):
                assert c.recv_raw(0.2) is None, "answered before the message was complete"
        resp = c.recv(2.0)
        assert resp is not None and resp.status == 401
        assert c.recv_raw(0.3) is None, "answered twice"


def test_udp_retransmission_is_absorbed(server: PbxProcess) -> None:
    """RFC 3261 §17.2.2: the same REGISTER again gets the same final answer (same To tag),
    re-sent by the transaction, not a second processing."""
    with SipClient("udp", server.sip_addr) as c:
        headers = [("Contact", c.contact("102")), ("Expires", "600")]
        ch = pick_challenge(_challenge(c, headers))
        auth = authorization(ch, username="102", password="secret102", method="REGISTER",
                             uri=f"sip:{HOST}")
        data = c.build("REGISTER", f"sip:{HOST}", from_user="102",
                       headers=[*headers, ("Authorization", auth)])
        first = c.request(data)
        again = c.request(data)
        assert first is not None and again is not None
        assert first.status == 200, first
        # Had it been processed again, the nc replay check would have answered 403.
        assert again.status == 200
        assert again.to.tag == first.to.tag
        assert again.serialize() == first.serialize()


def test_configured_message_size_limit(pbx_factory: PbxFactory) -> None:
    """sip.max_message_size=4096: a 6 KB datagram is dropped, a 6 KB TCP message gets 513."""
    pbx = pbx_factory(overrides={"sip.max_message_size": "4096"})
    body = b"y" * 6000
    with SipClient("udp", pbx.sip_addr) as c:
        c.send(c.build("OPTIONS", f"sip:{HOST}", headers=[("Content-Type", "text/plain")],
                       body=body))
        assert c.recv_raw(0.7) is None
        resp = c.options()
        assert resp is not None and resp.status == 200
    with SipClient("tcp", pbx.sip_addr) as c:
        c.send(c.build("OPTIONS", f"sip:{HOST}", headers=[("Content-Type", "text/plain")],
                       body=body))
        data = c.recv_message(3.0)
        assert data is not None and parse_response(data).status == 513
        assert c.closed_by_peer(3.0)
