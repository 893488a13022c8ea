"""Load and validate a ``sip_profiles/`` directory into a frozen :class:`~.schema.Config`.

Strict by design: an unknown key, a wrong type, an out-of-range timer or a dial plan that
points at nothing stops start-up with :class:`~.schema.ConfigError` naming the file (relative
to the profiles dir), the dotted key and the problem. Stdlib only; imports nothing of ours
but :mod:`softpbx.config.schema`.

Command-line overrides (``softpbx --set``) are ``section.key=value`` strings applied to the
raw TOML before validation, so they are checked exactly like the file they patch.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
import typing
import zoneinfo
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from enum import Enum
from pathlib import Path
from typing import Any

from softpbx.config.schema import (
    CRM_EVENTS,
    AuthSettings,
    CallSettings,
    Config,
    ConfigError,
    CrmSettings,
    Dialplan,
    Extension,
    Gateway,
    GlobalSettings,
    HttpSettings,
    InboundRoute,
    MediaSettings,
    OutboundRoute,
    Profile,
    RecordingSettings,
    RegistrarSettings,
    Rewrite,
    RingGroup,
    SipSettings,
    Transport,
)
from softpbx.config.tls import check_gateway_tls, check_tls_files

__all__ = ["data_dir", "describe", "load_config", "resolve_path", "split_host_port"]

MAIN_FILE = "softpbx.toml"
OVERRIDE_FILE = "--set"

# TOML section of softpbx.toml -> (Config attribute, dataclass).
_MAIN_SECTIONS: dict[str, tuple[str, type]] = {
    "global": ("global_", GlobalSettings),
    "sip": ("sip", SipSettings),
    "auth": ("auth", AuthSettings),
    "registrar": ("registrar", RegistrarSettings),
    "media": ("media", MediaSettings),
    "recording": ("recording", RecordingSettings),
    "calls": ("calls", CallSettings),
    "http": ("http", HttpSettings),
    "crm": ("crm", CrmSettings),
}
_PROFILE_NAMES = ("internal", "external")
# ``--set`` sections naming one file of a folder: section -> (folder, its table, dataclass).
_FILE_SECTIONS: dict[str, tuple[str, str, type]] = {
    "directory": ("directory", "user", Extension),
    "gateways": ("gateways", "gateway", Gateway),
}

# Extension ids, gateway and ring group names end up in SIP user parts and destinations
# (``group:<name>``, ``gateway:<name>/<number>``), so they are kept to safe characters.
_NAME_RE = re.compile(r"^[A-Za-z0-9._+-]+$")
# hostname = *( domainlabel "." ) toplabel [ "." ]   (RFC 3261 §25.1)
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_DID_RE = re.compile(r"^\+?[A-Za-z0-9._*#-]+$")
_URL_RE = re.compile(r"^https?://[^\s/?#]+(?:[/?#]\S*)?$")
# Group references in a replacement template: \1 .. \99, \g<1>, \g<name>.
_TEMPLATE_REF_RE = re.compile(r"\\(?:\\|(\d{1,2})|g<([^>]*)>)")

_ALGORITHMS = ("SHA-256", "MD5")


# --------------------------------------------------------------------------- public API


def load_config(profiles_dir: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, override and validate the profiles directory ``profiles_dir``.

    ``overrides`` are ``section.key=value`` strings (see :func:`_apply_override`).
    Raises :class:`ConfigError` on the first problem found.
    """
    root = Path(profiles_dir)
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "does not exist"
        raise ConfigError(str(profiles_dir), "(dir)", f"profiles directory {problem}")
    main_path = root / MAIN_FILE
    if not main_path.is_file():
        raise ConfigError(MAIN_FILE, "(file)", f"required file is missing from {root}")

    raw: dict[str, dict[str, Any]] = {MAIN_FILE: _read_toml(root, MAIN_FILE)}
    for name in _PROFILE_NAMES:
        fname = f"{name}.toml"
        raw[fname] = _read_toml(root, fname) if (root / fname).is_file() else {}
    # The other files are read here too, so that overrides patch them like the rest.
    for folder, _, _ in _FILE_SECTIONS.values():
        for rel, _ in _toml_files(root, folder):
            raw[rel] = _read_toml(root, rel)
    if (root / "dialplan.toml").is_file():
        raw["dialplan.toml"] = _read_toml(root, "dialplan.toml")

    origins: dict[tuple[str, str], str] = {}
    before = _derived_sources(raw)
    for text in overrides:
        file, key = _apply_override(raw, text)
        origins[(file, key)] = text
    _follow_derived(raw, before)

    try:
        return _build_config(root, raw)
    except ConfigError as exc:
        origin = next(
            (
                text
                for (file, key), text in origins.items()
                if file == exc.file
                and (exc.key == key or exc.key.startswith((key + "[", key + ".")))
            ),
            None,
        )
        if origin is None:
            raise
        raise ConfigError(OVERRIDE_FILE, origin.split("=", 1)[0].strip(), exc.problem) from exc


def resolve_path(config: Config, p: str | Path) -> str:
    """``p`` as an absolute path: relative paths are taken from ``global.data_dir``.

    ``data_dir`` itself, when relative, is taken from the current directory, like any path
    on a command line (``softpbx --data-dir`` sets it, absolute): data never lands next to
    the configuration unless asked to (``--profiles /etc/softpbx`` does not write
    ``/etc/softpbx.db``). softpbx never changes its directory, so this is stable.
    """
    base = Path(config.global_.data_dir).expanduser()
    path = Path(p).expanduser()
    return str((path if path.is_absolute() else base.absolute() / path).resolve())


def data_dir(config: Config) -> str:
    """The data directory (database, recordings, pid file), absolute."""
    return resolve_path(config, ".")


def _derived_sources(raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What derived values are derived from, as the files say (before ``--set``)."""
    http = raw[MAIN_FILE].get("http")
    http = http if isinstance(http, dict) else {}
    d = HttpSettings()
    gateways = {}
    for rel, doc in raw.items():
        gw = doc.get("gateway") if rel.startswith("gateways/") else None
        if isinstance(gw, dict):
            gateways[rel] = (gw.get("proxy"), gw.get("inbound_addresses"))
    return {"http": (http.get("http_ip", d.http_ip), http.get("http_port", d.http_port),
                     http.get("public_base_url", d.public_base_url)),
            "gateways": gateways}


def _base_url(ip: Any, port: Any) -> str | None:
    """``http://<http_ip>:<http_port>`` (loopback for a wildcard address), or ``None`` when
    the values are not an address and a port (validation will say so)."""
    if not isinstance(ip, str) or isinstance(port, bool) or not isinstance(port, int) or not port:
        return None
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.is_unspecified:
        addr = ipaddress.ip_address("127.0.0.1" if addr.version == 4 else "::1")
    host = f"[{addr}]" if addr.version == 6 else str(addr)
    return f"http://{host}:{port}"


def _follow_derived(raw: dict[str, dict[str, Any]], before: dict[str, Any]) -> None:
    """Derived values follow what they derive from after ``--set``: ``public_base_url``
    (unset, or the URL of the file's own ``http_ip:http_port``) follows the HTTP address,
    and a gateway's ``inbound_addresses`` entries naming its old proxy follow the proxy
    (dropped when the new proxy is a host name: the resolved proxy address then applies).
    A value set to something else is the operator's: ``softpbx check`` says when it and
    what it derives from disagree."""
    http = raw[MAIN_FILE].get("http", {})
    if isinstance(http, dict):
        ip0, port0, url0 = before["http"]
        d = HttpSettings()
        new_url = _base_url(http.get("http_ip", d.http_ip), http.get("http_port", d.http_port))
        url = http.get("public_base_url")
        derived = url is None or (url == url0 and isinstance(url, str)
                                  and url.rstrip("/") == _base_url(ip0, port0))
        if new_url and derived and new_url != url and http.get("http_port") != 0:
            http["public_base_url"] = new_url
            raw[MAIN_FILE]["http"] = http
    for rel, (proxy0, inbound0) in before["gateways"].items():
        gw = raw[rel]["gateway"]
        proxy, inbound = gw.get("proxy"), gw.get("inbound_addresses")
        if (proxy == proxy0 or not isinstance(proxy, str) or not isinstance(proxy0, str)
                or inbound != inbound0 or not isinstance(inbound, list)):
            continue
        try:
            host0, host = split_host_port(proxy0)[0], split_host_port(proxy)[0]
            ipaddress.ip_address(host)
        except ValueError:
            host = None  # a host name: only its resolved address can say where it sends from
        moved: list[Any] = []
        for entry in inbound:
            if entry == proxy0:
                entry = proxy if host else None
            elif entry == host0 and host != host0:
                entry = host
            if entry is not None and entry not in moved:
                moved.append(entry)
        gw["inbound_addresses"] = moved


def split_host_port(text: str) -> tuple[str, int | None]:
    """Split ``host[:port]`` (IPv6 as ``[::1]:5070`` or bare ``::1``) into host and port.

    The host is returned without brackets. Raises ``ValueError`` on a malformed port.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("missing ']' after an IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError("expected ':port' after ']'")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        host, port_text = text, None  # bare IPv6 literal: no port can follow
    elif ":" in text:
        host, port_text = text.split(":", 1)
    else:
        host, port_text = text, None
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number in 1..65535")
    return host, int(port_text)


def describe(config: Config) -> str:
    """A plain-text summary of ``config``, as printed by ``softpbx check``."""
    g = config.global_
    out = [
        f"softpbx configuration from {config.profiles_dir}",
        f"  domain {g.domain}, timezone {g.timezone}, log level {g.log_level}",
        f"  data directory {data_dir(config)} (--data-dir; the pid file while it runs)",
        f"  database {resolve_path(config, g.db_path)}",
        "",
        "Listeners:",
    ]
    for prof in (config.internal, config.external):
        transports = "+".join(t.value for t in prof.transports)
        adv = f", advertised as {prof.ext_sip_ip}" if prof.ext_sip_ip else ""
        auth = "auth on" if prof.auth_calls else "auth off"
        out.append(
            f"  {prof.name:<9} {transports:<8} {_join_host_port(prof.sip_ip, prof.sip_port)}"
            f"  ({auth}{adv})"
        )
        if Transport.TLS in prof.transports:
            out.append(f"  {'':<9} {'tls':<8} {_join_host_port(prof.sip_ip, prof.tls_port)}"
                       f"  (certificate {prof.tls_cert}, verify peers: {_yes(prof.tls_verify)})")
    out += ["", f"Extensions ({len(config.extensions)}):"]
    for ext in config.extensions:
        flags = [f"record={_yes(ext.record)}"]
        if not ext.enabled:
            flags.append("DISABLED")
        if ext.outbound_caller_id_number:
            flags.append(f"outbound caller id {ext.outbound_caller_id_number}")
        name = f'"{ext.effective_caller_id_name}"' if ext.effective_caller_id_name else "-"
        out.append(f"  {ext.id:<8} {name:<20} {', '.join(flags)}")
    out += ["", f"Gateways ({len(config.gateways)}):"]
    for gw in config.gateways:
        inbound = ", ".join(gw.inbound_addresses) or f"{gw.proxy} (proxy)"
        out.append(
            f"  {gw.name}: proxy {gw.proxy} over {gw.transport.value}, "
            f"register={_yes(gw.register)}, inbound from {inbound}"
        )
    dp = config.dialplan
    out += ["", "Dial plan:"]
    for route in dp.inbound:
        line = f"  inbound {route.did} -> {route.destination}"
        if route.fallback:
            wait = route.no_answer_timeout or config.calls.no_answer_timeout
            line += f", no answer after {wait} s -> {route.fallback}"
        out.append(line)
    for group in dp.ring_groups:
        out.append(f"  ring group {group.name} ({group.strategy}): {', '.join(group.members)}")
    for rule in dp.outbound:
        line = f"  outbound {rule.name}: {rule.pattern} via {rule.gateway}"
        for rw in rule.rewrites:
            line += f", rewrite {rw.match} -> {rw.replace}"
        out.append(line)
    if not (dp.inbound or dp.ring_groups or dp.outbound):
        out.append("  (empty)")
    http = config.http
    rec = config.recording
    out += [
        "",
        "HTTP: "
        + (
            f"{_join_host_port(http.http_ip, http.http_port)}, public base {http.public_base_url}"
            if http.http_port
            else "disabled"
        ),
        f"CRM webhook: {config.crm.webhook_url or _inspector_url(http)}"
        + (f", click-to-call on (POST {config.crm.click_to_call_path})"
           if config.crm.click_to_call_token else ", click-to-call off (no token)"),
        "API auth: " + _api_auth(config),
        "Recording: "
        + (
            f"on, {'stereo' if rec.stereo else 'mono'} MP3 into {resolve_path(config, rec.dir)}"
            if rec.enabled
            else "off"
        ),
    ]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- reading


def _read_toml(root: Path, rel: str) -> dict[str, Any]:
    """Parse one TOML file, turning syntax errors into a ConfigError with the line."""
    try:
        with (root / rel).open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(
            rel, f"line {m.group(1)}" if m else "(toml)", f"TOML syntax error: {exc}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(rel, "(file)", f"not valid UTF-8: {exc}") from exc
    except OSError as exc:
        raise ConfigError(rel, "(file)", f"cannot read: {exc.strerror or exc}") from exc


def _apply_override(raw: dict[str, dict[str, Any]], text: str) -> tuple[str, str]:
    """Patch ``raw`` with one ``section.key=value``; return the (file, key) it touched.

    ``section`` is a ``softpbx.toml`` section, ``internal``/``external`` (their
    ``[profile]``), ``directory.<ext>`` / ``gateways.<name>`` (that file's table) or
    ``dialplan.<inbound|outbound|ring_group>[<i>]`` (the i-th such table of the dial plan). ``value`` is read as a TOML literal (``100``, ``true``, ``["MD5"]``,
    ``"x"``) and otherwise taken as a plain string; a string field always gets the text as
    written unless it was quoted, and a list field accepts ``a,b,c``.
    """
    if "=" not in text:
        raise ConfigError(OVERRIDE_FILE, text, "expected section.key=value")
    path, value_text = (part.strip() for part in text.split("=", 1))
    section, dot, key = path.partition(".")
    if not dot or not key:
        raise ConfigError(OVERRIDE_FILE, path, "expected section.key=value")
    index: int | None = None
    if section in _MAIN_SECTIONS:
        cls, file, table = _MAIN_SECTIONS[section][1], MAIN_FILE, section
    elif section in _PROFILE_NAMES:
        cls, file, table = Profile, f"{section}.toml", "profile"
    elif section in _FILE_SECTIONS:
        # directory.<ext>.<key>, gateways.<name>.<key>: the file's one table
        folder, table, cls = _FILE_SECTIONS[section]
        stem, dot, key = key.rpartition(".")
        if not dot or not stem or not key:
            raise ConfigError(OVERRIDE_FILE, path, f"expected {section}.<name>.key=value")
        file = f"{folder}/{stem}.toml"
        if file not in raw:
            raise ConfigError(OVERRIDE_FILE, path, f"no {file} in the profiles directory")
    elif section == "dialplan":
        # dialplan.<inbound|outbound|ring_group>[<i>].<key> (or .<i>.)
        m = re.fullmatch(r"(inbound|outbound|ring_group)(?:\[(\d+)\]|\.(\d+))\.(\w+)", key)
        if m is None:
            raise ConfigError(OVERRIDE_FILE, path,
                              "expected dialplan.<inbound|outbound|ring_group>[<i>].key=value")
        table, key = m.group(1), m.group(4)
        index = int(m.group(2) or m.group(3))
        cls = {"inbound": InboundRoute, "outbound": OutboundRoute, "ring_group": RingGroup}[table]
        file = "dialplan.toml"
        entries = raw.get(file, {}).get(table)
        if not isinstance(entries, list) or index >= len(entries):
            raise ConfigError(OVERRIDE_FILE, path, f"dialplan.toml has no [[{table}]] #{index}")
    else:
        allowed = ", ".join([*_MAIN_SECTIONS, *_PROFILE_NAMES, *_FILE_SECTIONS, "dialplan"])
        raise ConfigError(OVERRIDE_FILE, path, f"unknown section {section!r}; allowed: {allowed}")
    if section in _ALIASES:
        key = _ALIASES[section].get(key, key)
    hints = _field_types(cls)
    if key not in hints or key == "name":
        allowed = ", ".join(k for k in hints if k != "name")
        raise ConfigError(OVERRIDE_FILE, path, f"unknown key {key!r}; allowed: {allowed}")
    try:
        value: Any = tomllib.loads("v = " + value_text)["v"]
    except tomllib.TOMLDecodeError:
        value = value_text
    target = hints[key]
    if target is str and not isinstance(value, str):
        value = value_text  # "crm.token=12345" means the string, not the integer
    elif typing.get_origin(target) is tuple and not isinstance(value, list):
        value = [v.strip() for v in value_text.split(",") if v.strip()]
    if index is not None:
        tbl = raw[file][table][index]
        where = f"{table}[{index}]"
    else:
        tbl = raw[file].setdefault(table, {})
        where = table
        for old, new in _ALIASES.get(section, {}).items():
            if new == key and isinstance(tbl, dict):
                tbl.pop(old, None)  # the override replaces the file's value under either name
    if not isinstance(tbl, dict):
        raise ConfigError(file, where, "must be a table")
    tbl[key] = value
    return file, f"{where}.{key}"


# --------------------------------------------------------------------------- generic checks


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a schema dataclass (annotations are strings there)."""
    return typing.get_type_hints(cls)


def _convert(file: str, key: str, value: Any, hint: Any) -> Any:
    """Check a TOML value against a dataclass field type and convert it (lists -> tuples)."""
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list):
            raise ConfigError(file, key, f"must be an array, got {_kind(value)}")
        item_hint = typing.get_args(hint)[0]
        return tuple(_convert(file, f"{key}[{i}]", v, item_hint) for i, v in enumerate(value))
    if isinstance(hint, type) and issubclass(hint, Enum):
        choices = [m.value for m in hint]
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(file, key, f"unknown value {value!r}; allowed: {', '.join(choices)}")
        return hint(value.lower())
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(file, key, f"must be true or false, got {_kind(value)}")
        return value
    if hint is int:
        # TOML booleans are Python ints; ``port = true`` must not pass as 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(file, key, f"must be an integer, got {_kind(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(file, key, f"must be a number, got {_kind(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(file, key, f"must be a string, got {_kind(value)}")
        return value
    raise TypeError(f"no TOML conversion for {hint!r}")  # a schema field this loader lacks


def _kind(value: Any) -> str:
    """TOML-ish name of a parsed value's type, for error messages."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    names = {
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return next(
        (f"{n} ({value!r})" for t, n in names.items() if isinstance(value, t)), type(value).__name__
    )


def _build(
    cls: type,
    table: Any,
    file: str,
    prefix: str,
    *,
    derived: dict[str, Any] | None = None,
    special: dict[str, Callable[[str, Any], Any]] | None = None,
) -> Any:
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys and wrong types.

    ``derived`` fields come from outside the table (a file stem) and may not be written;
    ``special`` maps keys to their own converters (nested tables).
    """
    derived = derived or {}
    special = special or {}
    if not isinstance(table, dict):
        raise ConfigError(file, prefix, f"must be a table, got {_kind(table)}")
    hints = _field_types(cls)
    allowed = [k for k in hints if k not in derived]
    for key in table:
        if key not in allowed:
            raise ConfigError(
                file, f"{prefix}.{key}", f"unknown key; allowed keys: {', '.join(allowed)}"
            )
    kwargs: dict[str, Any] = dict(derived)
    for f in fields(cls):
        key = f"{prefix}.{f.name}"
        if f.name in derived:
            continue
        if f.name not in table:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(file, key, "required key is missing")
            continue
        value = table[f.name]
        conv = special.get(f.name)
        kwargs[f.name] = conv(key, value) if conv else _convert(file, key, value, hints[f.name])
        rule = _RULES.get(cls, {}).get(f.name)
        if rule is not None:
            rule(file, key, kwargs[f.name])
    return cls(**kwargs)


def _fail(file: str, key: str, problem: str) -> typing.NoReturn:
    """Raise the ConfigError for ``file``, ``key`` and ``problem``."""
    raise ConfigError(file, key, problem)


def _range(file: str, key: str, value: float, lo: float, hi: float | None = None) -> None:
    """Require ``lo <= value (<= hi)``."""
    if value < lo or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        _fail(file, key, f"out of range: {value} (must be {bounds})")


def _ip(file: str, key: str, value: str, *, allow_empty: bool = False) -> None:
    """Require an IPv4 or IPv6 literal (not a hostname)."""
    if allow_empty and value == "":
        return
    try:
        ipaddress.ip_address(value)
    except ValueError:
        _fail(file, key, f"invalid IP address {value!r} (an IPv4 or IPv6 literal is expected)")


def _url(file: str, key: str, value: str, *, allow_empty: bool) -> None:
    """Require an ``http(s)://host...`` URL."""
    if (value or not allow_empty) and not _URL_RE.match(value):
        _fail(file, key, f"invalid URL {value!r} (http:// or https:// expected)")


def _name(file: str, key: str, value: str, what: str) -> None:
    """Require a safe identifier (extension id, gateway or group name)."""
    if not _NAME_RE.match(value):
        _fail(file, key, f"invalid {what} {value!r}: only letters, digits and . _ + - allowed")


def _nonempty(file: str, key: str, value: str | tuple[Any, ...]) -> None:
    """Require a non-empty string or array."""
    if not value:
        _fail(file, key, "must not be empty")


# A rule checks one converted field value: (file, dotted key, value); it raises or returns.
_Rule = Callable[[str, str, Any], object]


def _between(lo: float, hi: float | None = None) -> _Rule:
    return lambda file, key, value: _range(file, key, value, lo, hi)


def _one_of(*choices: str) -> _Rule:
    def rule(file: str, key: str, value: str) -> None:
        if value not in choices:
            _fail(file, key, f"unknown value {value!r}; allowed: {', '.join(choices)}")

    return rule


def _each(rule: _Rule) -> _Rule:
    def check(file: str, key: str, values: tuple[Any, ...]) -> None:
        _nonempty(file, key, values)
        for i, value in enumerate(values):
            rule(file, f"{key}[{i}]", value)

    return check


def _algorithms(file: str, key: str, values: tuple[str, ...], *, allow_empty: bool = False) -> None:
    """Require digest algorithms softpbx knows (RFC 2617 MD5, RFC 8760 SHA-256), each once."""
    if not allow_empty:
        _nonempty(file, key, values)
    for i, alg in enumerate(values):
        if alg not in _ALGORITHMS or alg in values[:i]:
            why = "listed twice" if alg in _ALGORITHMS else "unknown digest algorithm"
            _fail(file, f"{key}[{i}]", f"{why}: {alg!r}; allowed: {', '.join(_ALGORITHMS)}")


def _unique(file: str, key: str, values: tuple[Any, ...]) -> None:
    _nonempty(file, key, values)
    if len(set(values)) != len(values):
        _fail(file, key, "an entry is listed twice")


_PORT = _between(1, 65535)
_POSITIVE = _between(1)
_NOT_NEGATIVE = _between(0)


def _ip_or_empty(file: str, key: str, value: str) -> None:
    _ip(file, key, value, allow_empty=True)


def _url_or_empty(file: str, key: str, value: str) -> None:
    _url(file, key, value, allow_empty=True)


def _crm_events(file: str, key: str, values: tuple[str, ...]) -> None:
    # Empty is allowed: it sends no event at all (the CRM integration off).
    for i, value in enumerate(values):
        if value not in CRM_EVENTS:
            _fail(file, f"{key}[{i}]", f"unknown event {value!r}; allowed: {', '.join(CRM_EVENTS)}")
        if value in values[:i]:
            _fail(file, f"{key}[{i}]", f"listed twice: {value!r}")


# Old key -> its new name, per softpbx.toml section: files and --set written before the
# rename keep working.
_ALIASES: dict[str, dict[str, str]] = {"crm": {"token": "click_to_call_token"}}
# HTTP paths served by softpbx itself, which click_to_call_path may not shadow.
_RESERVED_PATHS = ("/api", "/rec", "/crm", "/metrics", "/console", "/login", "/logout",
                   "/static")


def _http_path(file: str, key: str, value: str) -> None:
    """Require an absolute URL path of plain characters, outside softpbx's own routes."""
    # RFC 3986 §3.3 unreserved characters and "/"; no "{...}" (aiohttp route patterns),
    # no "%" escapes, no empty segment.
    if not re.fullmatch(r"/[A-Za-z0-9._~/-]*", value) or "//" in value:
        _fail(file, key, f"invalid path {value!r}: must start with / and hold only letters, "
                         "digits and . _ ~ - / (no empty segment)")
    for prefix in _RESERVED_PATHS:
        if value == prefix or value.startswith(prefix + "/"):
            _fail(file, key, f"path {value!r} is taken by softpbx ({prefix}/...)")


def _header_token(file: str, key: str, value: str) -> None:
    """Require a secret that fits an HTTP header unchanged (RFC 9110 §5.5: visible ASCII)."""
    if len(value) > 256 or not all("!" <= c <= "~" for c in value):
        _fail(file, key, "must be at most 256 visible ASCII characters (no spaces): it is "
                         "compared with an HTTP header")


def _host_port_or_empty(file: str, key: str, value: Any) -> None:
    """An ``ip:port`` (IPv6 in brackets) with a port, or empty."""
    if value == "":
        return
    try:
        host, port = split_host_port(value)
        ipaddress.ip_address(host.strip("[]"))
    except (ValueError, TypeError, AttributeError):
        _fail(file, key, f"must be an IP address and port like 127.0.0.1:9060, not {value!r}")
    if not port or not 0 < port < 65536:
        _fail(file, key, f"must name a port (1-65535), like 127.0.0.1:9060, not {value!r}")


# Per-field rules applied as each table is read; cross-field rules live in the loaders.
_RULES: dict[type, dict[str, _Rule]] = {
    GlobalSettings: {
        "domain": _nonempty,
        "data_dir": _nonempty,
        "db_path": _nonempty,
        "log_level": _one_of("debug", "info", "warning", "error"),
    },
    SipSettings: {
        "t1_ms": _between(1, 60_000),
        "t2_ms": _between(1, 600_000),
        "t4_ms": _between(1, 600_000),
        "max_message_size": _between(1500, 16 * 1024 * 1024),
        "tcp_idle_timeout": _POSITIVE,
        "tcp_max_connections": _between(1, 1_000_000),
        "tcp_max_connections_per_ip": _between(1, 1_000_000),
        "capture_max_mb": _between(1, 100_000),
        "capture_files": _between(1, 1000),
        "hep_address": _host_port_or_empty,
        "hep_capture_id": _between(0, 0xFFFFFFFF),
    },
    AuthSettings: {
        "nonce_ttl": _POSITIVE,
        "algorithms": _algorithms,
        "max_failures": _POSITIVE,
        "failure_window": _POSITIVE,
        "ban_time": _POSITIVE,
    },
    RegistrarSettings: {
        "min_expires": _POSITIVE,
        "max_expires": _POSITIVE,
        "default_expires": _POSITIVE,
        "max_contacts": _POSITIVE,
    },
    MediaSettings: {
        "rtp_ip": _ip,
        "ext_rtp_ip": _ip_or_empty,
        "rtp_start_port": _PORT,
        "rtp_end_port": _PORT,
        "rtp_timeout": _NOT_NEGATIVE,
        "codecs": _each(_nonempty),
    },
    RecordingSettings: {
        "dir": _nonempty,
        "compression_level": _between(0.0, 1.0),
        "bitrate_mode": _one_of("VARIABLE", "AVERAGE", "CONSTANT"),
        "max_age_days": _NOT_NEGATIVE,
        "max_total_mb": _NOT_NEGATIVE,
    },
    CallSettings: {"max_duration": _NOT_NEGATIVE, "no_answer_timeout": _POSITIVE},
    HttpSettings: {"http_ip": _ip, "http_port": _between(0, 65535), "api_token": _header_token,
                   "admin_user": _header_token, "admin_password": _header_token},
    CrmSettings: {
        "click_to_call_path": _http_path,
        "click_to_call_token": _header_token,
        "click_to_call_ring_s": _between(1, 600),
        "click_to_call_min_interval_s": _between(0, 3600),
        "webhook_url": _url_or_empty,
        "answer_timeout_ms": _between(0, 60_000),
        "events": _crm_events,
        "request_timeout_ms": _between(100, 600_000),
        "max_in_flight": _between(1, 1000),
        "retry_min_s": _between(0.01, 86_400),
        "retry_max_s": _between(0.01, 86_400),
        "give_up_after_h": _between(0.001, 24 * 365),
    },
    Profile: {
        "sip_ip": _ip,
        "sip_port": _PORT,
        "transports": _unique,
        "ext_sip_ip": _ip_or_empty,
        "tls_port": _PORT,
    },
    Extension: {
        "id": lambda file, key, value: _name(file, key, value, "extension id"),
        "password": _nonempty,
        # empty (the default): the [auth] list
        "auth_algorithms": lambda file, key, values: _algorithms(file, key, values,
                                                                 allow_empty=True),
        "pickup_group": lambda file, key, value: (
            _name(file, key, value, "pickup group name") if value else None),
    },
    Gateway: {
        "proxy": lambda file, key, value: _host_port(file, key, value, hostname=True),
        "expire_seconds": _POSITIVE,
        "retry_seconds": _POSITIVE,
        "max_calls": _NOT_NEGATIVE,
        "auth_algorithms": _algorithms,
        "inbound_addresses": lambda file, key, values: [
            _host_port(file, f"{key}[{i}]", v, hostname=False) for i, v in enumerate(values)
        ],
    },
    RingGroup: {
        "name": lambda file, key, value: _name(file, key, value, "ring group name"),
        "members": _unique,
        "strategy": _one_of("all", "sequential"),
        "member_timeout": _POSITIVE,
    },
    InboundRoute: {"no_answer_timeout": _NOT_NEGATIVE},
    OutboundRoute: {
        "name": _nonempty,
        "pattern": lambda file, key, value: _regex(file, key, value),
    },
}


def _regex(file: str, key: str, value: str) -> re.Pattern[str]:
    """Compile a dial-plan regex, naming the key when it does not compile."""
    try:
        return re.compile(value)
    except re.error as exc:
        _fail(file, key, f"regular expression does not compile: {exc}")


def _host_port(file: str, key: str, value: str, *, hostname: bool) -> None:
    """Require ``host[:port]``: an IP literal, or also a hostname when ``hostname``."""
    _nonempty(file, key, value)
    try:
        host, _port = split_host_port(value)
    except ValueError as exc:
        _fail(file, key, f"invalid address {value!r}: {exc}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if hostname and _HOSTNAME_RE.match(host) and not value.startswith("["):
            return
        what = "an IP address or hostname" if hostname else "an IP address"
        _fail(file, key, f"invalid address {value!r}: host must be {what}")
    if ip.version == 4 and value.startswith("["):
        _fail(file, key, f"invalid address {value!r}: brackets are for IPv6 only")


# --------------------------------------------------------------------------- files


def _build_config(root: Path, raw: dict[str, dict[str, Any]]) -> Config:
    """Validate the raw TOML of every file and assemble the Config."""
    main = raw[MAIN_FILE]
    for section in main:
        if section not in _MAIN_SECTIONS:
            _fail(MAIN_FILE, section, f"unknown section; allowed: {', '.join(_MAIN_SECTIONS)}")
        table = main[section]
        for old, new in _ALIASES.get(section, {}).items():
            if isinstance(table, dict) and old in table:
                if new in table:
                    _fail(MAIN_FILE, f"{section}.{old}", f"old name of {section}.{new}: "
                                                         "set only one of them")
                table[new] = table.pop(old)
    settings = {
        attr: _build(cls, main.get(section, {}), MAIN_FILE, section)
        for section, (attr, cls) in _MAIN_SECTIONS.items()
    }
    _check_settings(settings)
    profiles = {}
    for name in _PROFILE_NAMES:
        file = f"{name}.toml"
        table = _only_table(file, raw[file], "profile", required=False)
        profiles[name] = _build(Profile, table, file, "profile", derived={"name": name})
        prof: Profile = profiles[name]
        if ipaddress.ip_address(prof.sip_ip).is_unspecified and not prof.ext_sip_ip:
            _fail(file, "profile.ext_sip_ip", f"must be set when sip_ip is {prof.sip_ip} (the "
                                              "address written into Contact and Via)")
        check_tls_files(file, prof, root)
    extensions = _load_extensions(root, raw)
    gateways = _load_gateways(root, raw)
    for gw in gateways:
        check_gateway_tls(f"gateways/{gw.name}.toml", gw.transport, profiles["external"])
    dialplan = _load_dialplan(raw, {e.id for e in extensions}, {g.name for g in gateways})
    return Config(
        profiles_dir=str(root.resolve()),
        **settings,
        internal=profiles["internal"],
        external=profiles["external"],
        extensions=extensions,
        gateways=gateways,
        dialplan=dialplan,
    )


def _check_settings(s: dict[str, Any]) -> None:
    """Checks of ``softpbx.toml`` beyond the per-field rules in ``_RULES``."""
    f = MAIN_FILE
    tz = s["global_"].timezone
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        _fail(f, "global.timezone", f"unknown time zone {tz!r} (IANA name, e.g. Europe/Moscow)")
    sip: SipSettings = s["sip"]
    if sip.t2_ms <= sip.t1_ms:
        _fail(f, "sip.t2_ms", f"must be greater than sip.t1_ms ({sip.t2_ms} <= {sip.t1_ms})")
    if sip.tcp_max_connections_per_ip > sip.tcp_max_connections:
        _fail(f, "sip.tcp_max_connections_per_ip",
              f"must be at most sip.tcp_max_connections ({sip.tcp_max_connections_per_ip} > "
              f"{sip.tcp_max_connections})")
    reg: RegistrarSettings = s["registrar"]
    if reg.max_expires < reg.min_expires:
        _fail(f, "registrar.max_expires", f"must be at least min_expires ({reg.min_expires})")
    if not reg.min_expires <= reg.default_expires <= reg.max_expires:
        _fail(
            f,
            "registrar.default_expires",
            f"out of range: {reg.default_expires} (must be between min_expires "
            f"{reg.min_expires} and max_expires {reg.max_expires})",
        )
    media: MediaSettings = s["media"]
    if media.rtp_start_port % 2:
        _fail(
            f, "media.rtp_start_port", f"must be even (RTP even, RTCP odd): {media.rtp_start_port}"
        )
    if media.rtp_start_port >= media.rtp_end_port:
        _fail(f, "media.rtp_start_port", f"must be less than rtp_end_port ({media.rtp_end_port})")
    if ipaddress.ip_address(media.rtp_ip).is_unspecified and not media.ext_rtp_ip:
        # SDP would say c=0.0.0.0, which means "hold" (RFC 2543): nobody would hear anything.
        _fail(f, "media.ext_rtp_ip", f"must be set when rtp_ip is {media.rtp_ip} (the "
                                     "address phones and trunks send RTP to)")
    if not s["recording"].flush_seconds > 0:
        _fail(f, "recording.flush_seconds", "out of range: must be positive")
    http: HttpSettings = s["http"]
    if http.http_port:
        _url(f, "http.public_base_url", http.public_base_url, allow_empty=False)
        if bool(http.admin_user) != bool(http.admin_password):
            _fail(f, "http.admin_password" if http.admin_user else "http.admin_user",
                  "must be set with http.admin_user/admin_password (the console's login "
                  "needs both)")
        # No credential beyond loopback is not refused: the console, /api/* and /crm/ then
        # answer loopback clients only (softpbx.http.access) and `softpbx check` warns.
    crm: CrmSettings = s["crm"]
    if crm.retry_max_s < crm.retry_min_s:
        _fail(f, "crm.retry_max_s", f"must be at least retry_min_s ({crm.retry_min_s})")


def _toml_files(root: Path, sub: str) -> list[tuple[str, Path]]:
    """``(relative name, path)`` of the ``*.toml`` files in ``root/sub``, sorted."""
    folder = root / sub
    if not folder.is_dir():
        return []
    files = (p for p in folder.glob("*.toml") if p.is_file() and not p.name.startswith("."))
    return [(f"{sub}/{p.name}", p) for p in sorted(files)]


def _only_table(file: str, doc: dict[str, Any], table: str, *, required: bool = True) -> Any:
    """The one ``[table]`` a profile, directory or gateway file holds."""
    for section in doc:
        if section != table:
            _fail(file, section, f"unknown section; only [{table}] is allowed here")
    if required and table not in doc:
        _fail(file, table, f"missing [{table}] table")
    return doc.get(table, {})


def _load_extensions(root: Path, raw: dict[str, dict[str, Any]]) -> tuple[Extension, ...]:
    """``directory/*.toml``: one ``[user]`` each; ``id`` defaults to the file stem."""
    seen: dict[str, str] = {}
    out = []
    for rel, path in _toml_files(root, "directory"):
        table = _only_table(rel, raw[rel], "user")
        if isinstance(table, dict) and "id" not in table:
            table = {"id": path.stem, **table}
        ext: Extension = _build(Extension, table, rel, "user")
        if ext.id in seen:
            _fail(rel, "user.id", f"duplicate extension id {ext.id!r} (also in {seen[ext.id]})")
        seen[ext.id] = rel
        out.append(ext)
    return tuple(out)


def _load_gateways(root: Path, raw: dict[str, dict[str, Any]]) -> tuple[Gateway, ...]:
    """``gateways/*.toml``: one ``[gateway]`` each, named by the file stem."""
    out = []
    for rel, path in _toml_files(root, "gateways"):
        table = _only_table(rel, raw[rel], "gateway")
        _name(rel, "gateway", path.stem, "gateway name (the file name)")
        gw: Gateway = _build(Gateway, table, rel, "gateway", derived={"name": path.stem})
        if gw.register and not (gw.username and gw.password):
            key = "gateway.password" if gw.username else "gateway.username"
            _fail(rel, key, "must not be empty when register = true")
        out.append(gw)
    return tuple(out)


def _load_dialplan(raw: dict[str, dict[str, Any]], extensions: set[str],
                   gateways: set[str]) -> Dialplan:
    """``dialplan.toml``: ring groups first, so inbound routes can name them."""
    rel = "dialplan.toml"
    if rel not in raw:  # load_config read every file there is
        return Dialplan()
    doc = raw[rel]
    for section, value in doc.items():
        if section not in ("inbound", "ring_group", "outbound"):
            _fail(rel, section, "unknown section; allowed: [[inbound]] [[ring_group]] [[outbound]]")
        if not isinstance(value, list):
            _fail(rel, section, f"must be an array of tables ([[{section}]])")

    groups: dict[str, RingGroup] = {}
    for i, table in enumerate(doc.get("ring_group", [])):
        key = f"ring_group[{i}]"
        group: RingGroup = _build(RingGroup, table, rel, key)
        if group.name in groups:
            _fail(rel, f"{key}.name", f"duplicate ring group {group.name!r}")
        for j, member in enumerate(group.members):
            if member not in extensions:
                _fail(rel, f"{key}.members[{j}]", f"unknown extension {member!r}")
        groups[group.name] = group

    def check_destination(key: str, dest: str) -> None:
        kind, _, rest = dest.partition(":")
        if kind == "group" and rest:
            if rest not in groups:
                _fail(rel, key, f"unknown ring group {rest!r} (no [[ring_group]] named so)")
        elif kind == "gateway" and rest:
            gw, slash, number = rest.partition("/")
            if slash and not number:
                _fail(rel, key, f"invalid destination {dest!r}: use gateway:<name>/<number>, "
                                "or gateway:<name> to pass the dialled number on")
            if gw not in gateways:
                _fail(rel, key, f"unknown gateway {gw!r} (no gateways/{gw}.toml)")
        elif dest not in extensions:
            _fail(rel, key, f"unknown extension {dest!r} (no directory/{dest}.toml)")

    inbound: dict[str, InboundRoute] = {}
    for i, table in enumerate(doc.get("inbound", [])):
        key = f"inbound[{i}]"
        route: InboundRoute = _build(InboundRoute, table, rel, key)
        if route.did != "*" and not _DID_RE.match(route.did):
            _fail(rel, f"{key}.did", f"invalid DID {route.did!r} (digits, leading + or * for any)")
        if route.did in inbound:
            _fail(rel, f"{key}.did", f"duplicate DID {route.did!r}")
        check_destination(f"{key}.destination", route.destination)
        if route.fallback:
            check_destination(f"{key}.fallback", route.fallback)
        inbound[route.did] = route

    outbound: dict[str, OutboundRoute] = {}
    for i, table in enumerate(doc.get("outbound", [])):
        key = f"outbound[{i}]"
        special = {"rewrites": lambda k, v: _rewrites(rel, k, v)}
        rule: OutboundRoute = _build(OutboundRoute, table, rel, key, special=special)
        if rule.name in outbound:
            _fail(rel, f"{key}.name", f"duplicate outbound rule name {rule.name!r}")
        if rule.gateway not in gateways:
            _fail(
                rel, f"{key}.gateway", f"unknown gateway {rule.gateway!r} (no such gateways/*.toml)"
            )
        outbound[rule.name] = rule
    return Dialplan(
        inbound=tuple(inbound.values()),
        ring_groups=tuple(groups.values()),
        outbound=tuple(outbound.values()),
    )


def _rewrites(file: str, key: str, value: Any) -> tuple[Rewrite, ...]:
    """``rewrites``: an array of ``{match, replace}`` tables, each regex checked."""
    if not isinstance(value, list):
        _fail(file, key, f"must be an array of {{match, replace}} tables, got {_kind(value)}")
    out = []
    for i, table in enumerate(value):
        k = f"{key}[{i}]"
        rw: Rewrite = _build(Rewrite, table, file, k)
        pattern = _regex(file, f"{k}.match", rw.match)
        for m in _TEMPLATE_REF_RE.finditer(rw.replace):
            ref = m.group(1) or m.group(2)
            if ref is None:
                continue  # an escaped backslash
            if not (int(ref) <= pattern.groups if ref.isdigit() else ref in pattern.groupindex):
                _fail(file, f"{k}.replace", f"refers to group {ref!r}, which match does not have")
        out.append(rw)
    return tuple(out)


# --------------------------------------------------------------------------- describe helpers


def _join_host_port(host: str, port: int) -> str:
    """``ip:port`` with IPv6 in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _inspector_url(http: HttpSettings) -> str:
    """Where the built-in CRM inspector is (``webhook_url`` empty)."""
    if not http.http_port:
        return "none (no webhook_url and HTTP disabled: events are not sent)"
    return f"built-in inspector at http://{_join_host_port(http.http_ip, http.http_port)}/crm/"


def _api_auth(config: Config) -> str:
    """Which rule guards the console, ``/api/*`` and ``/crm/`` (``softpbx.http.access``
    applies the same one)."""
    http = config.http
    if not http.http_port:
        return "none (HTTP disabled)"
    login = bool(http.admin_user and http.admin_password)
    if login or http.api_token:
        ways = (["console login (http.admin_user)"] if login else []) + \
            (["bearer token (http.api_token)"] if http.api_token else [])
        return " or ".join(ways) + " required for the console, /api/* and /crm/"
    if not ipaddress.ip_address(http.http_ip).is_loopback:
        return (f"WARNING: no http.admin_password or http.api_token while http_ip "
                f"{http.http_ip} is not loopback: the console, /api/* and /crm/ answer "
                f"loopback clients only")
    return ("none (the console, /api/* and /crm/ answer loopback clients only; set "
            "http.admin_user/admin_password or http.api_token to open them)")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
