"""``softpbx check`` warnings: settings that load fine but are risky or inconsistent.

The loader refuses what cannot work; these are what works but should not stay so (an open
console, a trunk that forwards any number back out, a recording folder softpbx cannot
write, a derived value that no longer follows what it derives from). Each warning names the
file and key to change, like a :class:`~.schema.ConfigError`.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse

from .loader import data_dir, resolve_path, split_host_port
from .schema import Config


def config_warnings(config: Config) -> list[str]:
    """Every warning for ``config``, one line each (empty: nothing to say)."""
    out = _http_warnings(config)
    for i, route in enumerate(config.dialplan.inbound):
        for key, dest in (("destination", route.destination), ("fallback", route.fallback)):
            if route.did == "*" and dest.startswith("gateway:"):
                out.append(f"dialplan.toml: inbound[{i}].{key}: did = \"*\" sends ANY number "
                           f"a trunk delivers out through {dest} (toll fraud, call loops): "
                           "name the DIDs")
    for gw in config.gateways:
        out += _gateway_warnings(config, gw.name, gw.proxy, gw.inbound_addresses)
    dirs = {data_dir(config): "global.data_dir"}
    dirs.setdefault(os.path.dirname(resolve_path(config, config.global_.db_path)), "global.db_path")
    if config.recording.enabled:
        dirs.setdefault(resolve_path(config, config.recording.dir), "recording.dir")
    failed: list[str] = []
    for path, key in dirs.items():
        if any(path.startswith(f + os.sep) for f in failed):
            continue  # one warning per cause: a folder under one already named
        if warning := _writable(key, path):
            failed.append(path)
            out += warning
    return out


def _http_warnings(config: Config) -> list[str]:
    http = config.http
    if not http.http_port:
        return []
    out = []
    loopback = ipaddress.ip_address(http.http_ip).is_loopback
    # The rules of softpbx.http.access: with no credential at all the console, /api/* and
    # /crm/ answer loopback clients only, and without any login.
    login = bool(getattr(http, "admin_user", "") and getattr(http, "admin_password", ""))
    if not (login or http.api_token):
        where = ("" if loopback else
                 f"; HTTP listens on {http.http_ip}, but every other client is refused")
        out.append("softpbx.toml: http: no login (admin_user/admin_password) and no api_token: "
                   "the console, /api/* and /crm/ are open without a password to anyone on "
                   f"this host{where}")
    elif not loopback and not login:
        out.append(f"softpbx.toml: http.admin_password: the console on {http.http_ip} has no "
                   "browser login (only the api_token bearer): set admin_user/admin_password")
    url = urllib.parse.urlsplit(http.public_base_url)
    try:
        url_port = url.port or (443 if url.scheme == "https" else 80)
        url_host = url.hostname or ""
    except ValueError:
        return out
    same_host = url_host in (http.http_ip, "127.0.0.1", "localhost", "::1")
    if same_host and url_port != http.http_port:
        out.append(f"softpbx.toml: http.public_base_url: {http.public_base_url} names port "
                   f"{url_port}, but HTTP listens on {http.http_port}: recording links will "
                   "not work")
    if not loopback and _is_loopback(url_host):
        out.append(f"softpbx.toml: http.public_base_url: {http.public_base_url} is a loopback "
                   f"address, but HTTP listens on {http.http_ip}: a CRM elsewhere cannot "
                   "fetch the recordings")
    return out


def _gateway_warnings(config: Config, name: str, proxy: str,
                      inbound: tuple[str, ...]) -> list[str]:
    """A gateway whose ``inbound_addresses`` leave out its own proxy: its requests are
    challenged as a stranger's (a moved proxy whose inbound list was not moved along)."""
    if not inbound:
        return []
    host, port = split_host_port(proxy)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return []  # resolved at start-up; the list is the operator's word
    for entry in inbound:
        try:
            h, p = split_host_port(entry)
        except ValueError:
            h, p = entry, None
        if h.lower() == host.lower() and (p is None or p == (port or 5060)):
            return []
    return [f"gateways/{name}.toml: gateway.inbound_addresses: {', '.join(inbound)} does not "
            f"include the proxy {proxy}: requests from the trunk's proxy will be challenged "
            "as a stranger's"]


def _writable(key: str, path: str) -> list[str]:
    """A warning when softpbx could not create or write ``path`` (a directory)."""
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK):
        return []
    why = "is not writable" if os.path.isdir(probe) else "is not a directory"
    what = why if probe == path else f"cannot be created ({probe} {why})"
    return [f"softpbx.toml: {key}: {path} {what} by this user (uid {os.getuid()})"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
