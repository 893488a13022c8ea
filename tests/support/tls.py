"""Self-signed certificates for the TLS tests, made by the ``openssl`` command line (Debian's
``openssl`` package; a P-256 key takes milliseconds, so every test makes its own)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def openssl_binary() -> str | None:
    """Path of ``openssl``, or ``None`` when it is not installed."""
    return shutil.which("openssl")


def make_cert(directory: Path, name: str = "server", *, cn: str = "127.0.0.1",
              sans: str = "IP:127.0.0.1,DNS:localhost") -> tuple[Path, Path]:
    """Write ``<name>.crt`` and ``<name>.key`` (PEM, self-signed, valid two days) under
    ``directory``; return their paths. ``sans`` is the subjectAltName list."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={cn}",
         "-addext", f"subjectAltName={sans}"],
        check=True, capture_output=True, timeout=20)
    return cert, key
