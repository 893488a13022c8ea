"""The stdlib ``ssl`` contexts of a profile's SIP over TLS (RFC 3261 §26.2.1, RFC 5630).

TLS 1.2 is the floor both ways (RFC 8996 deprecates 1.0 and 1.1; RFC 7525 §3.1.1). The server
side asks phones for no certificate: they authenticate with digest as over UDP and TCP. The
client side (gateways, a phone reconnected to) verifies chain and host name unless the
profile says ``tls_verify = false`` (self-signed carrier lab boxes, phones with factory
certificates).
"""

from __future__ import annotations

import ssl

from ..config.schema import Profile
from ..config.tls import tls_path


def server_context(profile: Profile, profiles_dir: str) -> ssl.SSLContext:
    """The listener's context: our certificate and key, TLS 1.2+."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls_path(profiles_dir, profile.tls_cert),
                        tls_path(profiles_dir, profile.tls_key))
    return ctx


def client_context(profile: Profile, profiles_dir: str) -> ssl.SSLContext:
    """The context of the connections softpbx opens from ``profile``: TLS 1.2+, the peer
    verified per ``tls_verify`` against ``tls_ca_file`` (else the system's trust store); our
    own certificate is offered to peers that ask for one (mutual TLS with a carrier)."""
    if profile.tls_verify:
        cafile = tls_path(profiles_dir, profile.tls_ca_file) if profile.tls_ca_file else None
        ctx = ssl.create_default_context(cafile=cafile)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if profile.tls_cert and profile.tls_key:
        ctx.load_cert_chain(tls_path(profiles_dir, profile.tls_cert),
                            tls_path(profiles_dir, profile.tls_key))
    return ctx
