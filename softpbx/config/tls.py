"""The TLS files of a profile: where they are and whether they load (``softpbx check``).

A profile listing ``"tls"`` in ``transports`` needs ``tls_cert`` and ``tls_key`` (PEM; paths
relative to the profiles directory); both must exist and load as one certificate/key pair
(:meth:`ssl.SSLContext.load_cert_chain`), and ``tls_ca_file``, when set, must load as CA
certificates. The checks run when the configuration is loaded, so a bad file stops
``softpbx run`` and ``softpbx check`` alike with ``file: key: problem``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from .schema import ConfigError, Profile, Transport


def tls_path(profiles_dir: str | Path, p: str) -> str:
    """``p`` as an absolute path; relative paths are taken from the profiles directory
    (where the profile files naming them are)."""
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else (Path(profiles_dir) / path).resolve())


def check_tls_files(file: str, profile: Profile, profiles_dir: str | Path) -> None:
    """Raise :class:`ConfigError` when ``profile``'s TLS settings cannot work."""
    if Transport.TLS not in profile.transports:
        return
    if profile.tls_port == profile.sip_port and Transport.TCP in profile.transports:
        raise ConfigError(file, "profile.tls_port", f"must differ from sip_port "
                                                    f"({profile.sip_port}): TCP listens there")
    for key in ("tls_cert", "tls_key"):
        value = getattr(profile, key)
        if not value:
            raise ConfigError(file, f"profile.{key}", 'required when transports has "tls"')
        path = Path(tls_path(profiles_dir, value))
        if not path.is_file():
            raise ConfigError(file, f"profile.{key}", f"file not found: {path}")
    cert = tls_path(profiles_dir, profile.tls_cert)
    key = tls_path(profiles_dir, profile.tls_key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        # OpenSSL says which: no PEM certificate, no key, or a key of another certificate.
        raise ConfigError(file, "profile.tls_key", f"{cert} and {key} do not load as a PEM "
                                                   f"certificate and its key: {exc}") from exc
    except OSError as exc:
        raise ConfigError(file, "profile.tls_cert", f"cannot read: {exc}") from exc
    if profile.tls_ca_file:
        ca = Path(tls_path(profiles_dir, profile.tls_ca_file))
        if not ca.is_file():
            raise ConfigError(file, "profile.tls_ca_file", f"file not found: {ca}")
        try:
            ssl.create_default_context(cafile=str(ca))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(file, "profile.tls_ca_file",
                              f"does not load as PEM CA certificates: {exc}") from exc


def check_gateway_tls(file: str, transport: Transport, external: Profile) -> None:
    """A gateway reached over TLS needs the external profile to speak TLS (its connections
    are labelled with that profile's TLS address and use its ``tls_verify``)."""
    if transport is Transport.TLS and Transport.TLS not in external.transports:
        raise ConfigError(file, "gateway.transport", '"tls" needs "tls" in external.toml '
                                                     "profile.transports (and its certificate)")
