"""The bytes of a CRM webhook: the ``multipart/form-data`` body (crm-telephony-api.md §1)
and Zadarma's ``Signature`` header. Pure functions, no IO.

The body is built here rather than by aiohttp's ``FormData`` so that it is exactly the
spec's fields, in order, one part per field, UTF-8, with nothing added (no per-part
``Content-Type``, no filename), and so a test can compare it byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import secrets
from collections.abc import Iterable, Mapping

SIGNATURE_FIELDS: Mapping[str, tuple[str, ...]] = {
    "NOTIFY_START": ("caller_id", "called_did", "call_start"),
    "NOTIFY_INTERNAL": ("caller_id", "called_did", "call_start"),
    "NOTIFY_END": ("caller_id", "called_did", "call_start"),
    "NOTIFY_OUT_START": ("internal", "destination", "call_start"),
    "NOTIFY_OUT_END": ("internal", "destination", "call_start"),
    # Zadarma signs pbx_call_id + call_id_with_rec; our NOTIFY_RECORD carries the recording
    # as record_link (the spec's field), so that is what is signed in its place.
    "NOTIFY_RECORD": ("pbx_call_id", "record_link"),
}
"""Fields whose values, concatenated in this order (a missing one counts as ""), Zadarma
signs for each event (zadarma/user-api-v1 ``lib/Webhook/Notify*.php`` getSignatureString)."""


_PREFIX = "softpbx-" + secrets.token_hex(12) + "-"
_serial = itertools.count(1)


def new_boundary() -> str:
    """A multipart boundary no field value will contain by chance (RFC 2046 §5.1.1: at most
    70 characters from a safe set): a random per-process prefix and a serial number. (A
    fresh ``secrets`` token per request cost a getrandom() call, ~0.15 ms under load, for
    nothing: unpredictability is not needed, only uniqueness.)"""
    return f"{_PREFIX}{next(_serial)}"


def _quote_name(name: str) -> str:
    # RFC 7578 §4.2: the name is a quoted-string; field names are the spec's ASCII names,
    # but escape anyway so a bad one can never break the part header.
    return name.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "").replace("\n", "")


def multipart_body(fields: Iterable[tuple[str, str]], boundary: str) -> bytes:
    """``fields`` as a ``multipart/form-data`` body (RFC 7578), one part per field, UTF-8.

    RFC 7578 §4.4: a text part without ``Content-Type`` is ``text/plain``; its charset is
    the form's (UTF-8 here, as the spec says), which is what PHP, Django and aiohttp read.
    A value with the boundary in it would end its part early: :func:`new_boundary` makes
    that practically impossible, and :func:`encode_form` checks it anyway.
    """
    dash = b"--" + boundary.encode("ascii")
    out = bytearray()
    for name, value in fields:
        out += dash + b"\r\n"
        out += f'Content-Disposition: form-data; name="{_quote_name(name)}"\r\n\r\n'.encode()
        out += value.encode("utf-8", "surrogateescape") + b"\r\n"
    out += dash + b"--\r\n"
    return bytes(out)


def encode_form(fields: Iterable[tuple[str, str]]) -> tuple[bytes, str]:
    """(body, Content-Type header value) of one webhook POST."""
    pairs = list(fields)
    while True:
        boundary = new_boundary()
        if not any(boundary in v for _, v in pairs):
            break
    return multipart_body(pairs, boundary), f"multipart/form-data; boundary={boundary}"


def signature(event: str, fields: Iterable[tuple[str, str]], secret: str) -> str:
    """Zadarma's ``Signature`` header: base64 of the lowercase hex HMAC-SHA1, keyed with
    ``secret``, of the event's :data:`SIGNATURE_FIELDS` values concatenated (PHP:
    ``base64_encode(hash_hmac('sha1', $caller_id . $called_did . $call_start, $secret))``)."""
    values = dict(fields)
    text = "".join(values.get(name, "") for name in SIGNATURE_FIELDS.get(event, ()))
    digest = hmac.new(secret.encode("utf-8"), text.encode("utf-8", "surrogateescape"),
                      hashlib.sha1).hexdigest()
    return base64.b64encode(digest.encode("ascii")).decode("ascii")
