"""CRM webhook bytes: the multipart body (read back by a real multipart parser) and
Zadarma's Signature (checked against the PHP formula computed independently)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from softpbx.crm.forms import SIGNATURE_FIELDS, encode_form, multipart_body, signature

START = (("event", "NOTIFY_START"), ("call_start", "2019-01-29 17:40:03"),
         ("pbx_call_id", "in_650cb316b6adab6df1b77bc34e973d20b9028da1"),
         ("caller_id", "79197018357"), ("called_did", "73422994393"))


def test_multipart_body_is_exactly_one_part_per_field() -> None:
    body = multipart_body((("event", "NOTIFY_END"), ("duration", "2")), "BOUND")
    assert body == (b'--BOUND\r\nContent-Disposition: form-data; name="event"\r\n\r\n'
                    b"NOTIFY_END\r\n"
                    b'--BOUND\r\nContent-Disposition: form-data; name="duration"\r\n\r\n'
                    b"2\r\n--BOUND--\r\n")


def parse_like_a_crm(body: bytes, content_type: str) -> list[tuple[str, str]]:
    """POST the bytes to a real aiohttp server whose handler reads the form as a CRM would."""
    got: list[tuple[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        form = await request.post()
        got.extend((k, str(v)) for k, v in form.items())
        return web.Response(text="")

    async def run() -> None:
        app = web.Application()
        app.router.add_post("/hook", handler)
        async with TestClient(TestServer(app)) as client:
            resp = await client.post("/hook", data=body, headers={"Content-Type": content_type})
            assert resp.status == 200

    asyncio.run(run())
    return got


@pytest.mark.parametrize("fields", [
    START,
    (("event", "NOTIFY_INTERNAL"), ("caller_id", "+7 (988) 000-00-00"), ("internal", "104")),
    # A caller name or value with UTF-8, quotes, CRLF and what looks like a boundary.
    (("event", "NOTIFY_END"), ("note", 'Иванов "Иван"\r\n--softpbx-0\r\n<script>')),
    (("event", "NOTIFY_RECORD"), ("record_link", "")),
])
def test_a_multipart_parser_reads_back_the_fields_in_order(
        fields: tuple[tuple[str, str], ...]) -> None:
    body, content_type = encode_form(fields)
    assert content_type.startswith("multipart/form-data; boundary=softpbx-")
    assert parse_like_a_crm(body, content_type) == list(fields)


def php_signature(text: str, secret: str) -> str:
    # base64_encode(hash_hmac('sha1', $text, $secret)): hash_hmac returns lowercase hex.
    return base64.b64encode(
        hmac.new(secret.encode(), text.encode(), hashlib.sha1).hexdigest().encode()).decode()


def test_signature_of_notify_start_is_zadarmas() -> None:
    got = signature("NOTIFY_START", START, "s3cret")
    assert got == php_signature("79197018357" "73422994393" "2019-01-29 17:40:03", "s3cret")
    # A known value, so a change in the formula cannot pass by changing both sides.
    assert got == base64.b64encode(hmac.new(
        b"s3cret", b"79197018357734229943932019-01-29 17:40:03", "sha1").hexdigest().encode()
    ).decode()


def test_signature_of_outbound_and_record_events() -> None:
    out = (("event", "NOTIFY_OUT_START"), ("call_start", "2019-01-29 13:46:22"),
           ("pbx_call_id", "out_811eb5c055f9d2edd102338454dbaa24ccde1589"), ("caller_id", "0"),
           ("internal", "100"), ("destination", "+79191010100"))
    assert signature("NOTIFY_OUT_START", out, "k") == php_signature(
        "100+791910101002019-01-29 13:46:22", "k")
    rec = (("event", "NOTIFY_RECORD"), ("pbx_call_id", "out_3b9a"),
           ("record_link", "https://pbx.example/rec/x.mp3"))
    assert signature("NOTIFY_RECORD", rec, "k") == php_signature(
        "out_3b9ahttps://pbx.example/rec/x.mp3", "k")
    # internal is optional: a missing field counts as empty.
    no_internal = tuple(f for f in out if f[0] != "internal")
    assert signature("NOTIFY_OUT_START", no_internal, "k") == php_signature(
        "+791910101002019-01-29 13:46:22", "k")
    assert set(SIGNATURE_FIELDS) == {"NOTIFY_START", "NOTIFY_INTERNAL", "NOTIFY_END",
                                     "NOTIFY_OUT_START", "NOTIFY_OUT_END", "NOTIFY_RECORD"}
