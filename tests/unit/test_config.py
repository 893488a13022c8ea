"""softpbx.config: the shipped sample, overrides, the table of broken configs, describe()."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest

from softpbx.config import (
    Config,
    ConfigError,
    Extension,
    Gateway,
    InboundRoute,
    OutboundRoute,
    Profile,
    RingGroup,
    Transport,
    describe,
    load_config,
    resolve_path,
    split_host_port,
)
from softpbx.config.loader import _MAIN_SECTIONS

SAMPLE = Path(__file__).resolve().parents[2] / "sip_profiles"


@pytest.fixture
def profiles(tmp_path: Path) -> Path:
    """A writable copy of the shipped sample."""
    dest = tmp_path / "sip_profiles"
    shutil.copytree(SAMPLE, dest)
    return dest


def write(root: Path, files: dict[str, str | None]) -> None:
    """Replace (or with ``None`` delete) files of a profiles dir."""
    for rel, text in files.items():
        path = root / rel
        if text is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- the sample


def test_sample_loads_with_what_it_promises() -> None:
    cfg = load_config(SAMPLE)
    assert cfg.profiles_dir == str(SAMPLE)
    assert cfg.global_.domain == "127.0.0.1"
    assert cfg.global_.timezone == "Europe/Moscow"
    assert (cfg.global_.db_path, cfg.global_.data_dir) == ("softpbx.db", ".")
    assert (cfg.http.http_ip, cfg.http.http_port) == ("127.0.0.1", 8080)
    assert cfg.http.public_base_url == "http://127.0.0.1:8080"
    assert cfg.crm.webhook_url == ""
    assert cfg.recording.enabled and cfg.recording.dir == "recordings"
    for prof, name in ((cfg.internal, "internal"), (cfg.external, "external")):
        assert prof == Profile(
            name=name, sip_ip="127.0.0.1", sip_port=5060, transports=(Transport.UDP, Transport.TCP)
        )
        assert prof.auth_calls
    assert [e.id for e in cfg.extensions] == ["101", "102", "103"]
    alice = cfg.extension("101")
    assert alice is not None
    assert alice.password == "secret101"
    assert alice.effective_caller_id_name == "Alice 101"
    assert alice.outbound_caller_id_number == "74950000101"
    assert all(e.record and e.enabled and e.password == f"secret{e.id}" for e in cfg.extensions)
    assert cfg.gateways == (
        Gateway(
            name="carrier",
            proxy="127.0.0.1:5070",
            transport=Transport.UDP,
            register=False,
            inbound_addresses=("127.0.0.1:5070",),
            record=True,  # the sample records every call: its extensions and trunk say so
        ),
    )
    dp = cfg.dialplan
    assert dp.inbound == (
        InboundRoute(did="74950000000", destination="101", no_answer_timeout=30, fallback="102"),
    )
    assert dp.ring_groups == (RingGroup(name="sales", members=("101", "102")),)
    (rule,) = dp.outbound
    assert (rule.name, rule.gateway) == ("outside", "carrier")
    assert re.fullmatch(rule.pattern, "+74951234567") and not re.fullmatch(rule.pattern, "101")
    (rw,) = rule.rewrites
    assert re.sub(rw.match, rw.replace, "84951234567") == "+74951234567"


def test_sample_documents_every_schema_key() -> None:
    """Users read the sample: each key of the model appears in it, set or commented out."""
    text = {p.relative_to(SAMPLE).as_posix(): p.read_text() for p in SAMPLE.rglob("*.toml")}

    def assert_keys(cls: type, rel: str, skip: tuple[str, ...] = ()) -> None:
        for f in dataclasses.fields(cls):
            if f.name not in skip:
                assert re.search(rf"^(# )?{f.name} = ", text[rel], re.M), f"{rel}: {f.name}"

    for _section, (_attr, cls) in _MAIN_SECTIONS.items():
        assert_keys(cls, "softpbx.toml")
    assert_keys(Profile, "internal.toml", skip=("name",))
    assert_keys(Profile, "external.toml", skip=("name",))
    assert_keys(Extension, "directory/101.toml")
    assert_keys(Gateway, "gateways/carrier.toml", skip=("name",))
    for cls in (InboundRoute, RingGroup, OutboundRoute):
        assert_keys(cls, "dialplan.toml")
    for name in ("match", "replace"):
        assert re.search(rf"^{name} = ", text["dialplan.toml"], re.M)


def test_describe_mentions_listeners_extensions_gateway_and_plan() -> None:
    text = describe(load_config(SAMPLE))
    for needle in (
        "internal",
        "external",
        "127.0.0.1:5060",
        "udp+tcp",
        "101",
        "Alice 101",
        "Carol 103",
        "carrier",
        "127.0.0.1:5070",
        "74950000000 -> 101",
        "sales",
        "outside",
        "built-in inspector",
    ):
        assert needle in text


def test_only_softpbx_toml_means_defaults(tmp_path: Path) -> None:
    write(tmp_path, {"softpbx.toml": ""})
    cfg = load_config(tmp_path)
    assert cfg == Config(profiles_dir=str(tmp_path.resolve()))


def test_missing_dir_or_main_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path)
    assert exc.value.file == "softpbx.toml" and "missing" in exc.value.problem


def test_extension_id_from_file_stem_or_explicit(profiles: Path) -> None:
    write(profiles, {"directory/alice.toml": '[user]\nid = "200"\npassword = "x"\n'})
    write(profiles, {"directory/300.toml": '[user]\npassword = "y"\n'})
    ids = [e.id for e in load_config(profiles).extensions]
    assert ids == ["101", "102", "103", "300", "200"]  # sorted by file name


def test_rewrites_as_inline_array(profiles: Path) -> None:
    write(
        profiles,
        {
            "dialplan.toml": """
[[outbound]]
name = "x"
pattern = '^\\d+$'
gateway = "carrier"
rewrites = [{match = '^8(\\d+)$', replace = '+7\\1'}, {match = '^00', replace = '+'}]
"""
        },
    )
    (rule,) = load_config(profiles).dialplan.outbound
    assert [(r.match, r.replace) for r in rule.rewrites] == [(r"^8(\d+)$", r"+7\1"), ("^00", "+")]


# --------------------------------------------------------------------------- overrides


def test_overrides(profiles: Path) -> None:
    cfg = load_config(
        profiles,
        [
            "crm.webhook_url=http://127.0.0.1:8099/hook",
            "sip.t1_ms=100",
            "internal.sip_port=5062",
            "global.db_path=/tmp/x.db",
            "recording.enabled=false",
            "crm.token=12345",
            "auth.algorithms=MD5",
            'external.transports=["tcp"]',
            "recording.compression_level = 0.2",
            "global.timezone=UTC",
        ],
    )
    assert cfg.crm.webhook_url == "http://127.0.0.1:8099/hook"
    assert cfg.sip.t1_ms == 100
    assert cfg.internal.sip_port == 5062 and cfg.external.sip_port == 5060
    assert cfg.global_.db_path == "/tmp/x.db"
    assert cfg.recording.enabled is False
    assert cfg.crm.click_to_call_token == "12345"  # the old key name; digits as text
    assert cfg.auth.algorithms == ("MD5",)
    assert cfg.external.transports == (Transport.TCP,)
    assert cfg.recording.compression_level == 0.2
    assert cfg.global_.timezone == "UTC"


def test_override_creates_missing_profile_file(tmp_path: Path) -> None:
    write(tmp_path, {"softpbx.toml": ""})
    cfg = load_config(tmp_path, ["external.sip_port=5080", "sip.t2_ms=8000"])
    assert cfg.external.sip_port == 5080 and cfg.sip.t2_ms == 8000


@pytest.mark.parametrize(
    ("override", "key", "word"),
    [
        ("sip.t1_ms", "sip.t1_ms", "expected"),
        ("sip=1", "sip", "expected"),
        ("nope.x=1", "nope.x", "unknown section"),
        ("sip.nope=1", "sip.nope", "unknown key"),
        ("internal.name=x", "internal.name", "unknown key"),
        ("sip.t1_ms=true", "sip.t1_ms", "integer"),
        ("media.rtp_start_port=16385", "media.rtp_start_port", "even"),
        ("auth.algorithms=MD5,SHA-1", "auth.algorithms", "algorithm"),
        ("internal.sip_ip=localhost", "internal.sip_ip", "IP"),
    ],
)
def test_bad_override(profiles: Path, override: str, key: str, word: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(profiles, [override])
    assert (exc.value.file, exc.value.key) == ("--set", key)
    assert word in exc.value.problem


def test_overrides_reach_directory_gateways_and_dialplan(profiles: Path) -> None:
    cfg = load_config(profiles, ["directory.101.password=newpw",
                                 "gateways.carrier.proxy=127.0.0.1:5071",
                                 "dialplan.inbound[0].destination=102",
                                 "dialplan.ring_group.0.strategy=sequential"])
    assert {e.id: e.password for e in cfg.extensions}["101"] == "newpw"
    assert cfg.gateways[0].proxy == "127.0.0.1:5071"
    assert cfg.dialplan.inbound[0].destination == "102"
    assert cfg.dialplan.ring_groups[0].strategy == "sequential"
    assert (profiles / "directory" / "101.toml").read_text().count("newpw") == 0  # run only


@pytest.mark.parametrize(
    ("override", "key", "word"),
    [
        ("directory.999.password=x", "directory.999.password", "no directory/999.toml"),
        ("directory.101.password=", "directory.101.password", "must not be empty"),
        ("gateways.carrier.nokey=1", "gateways.carrier.nokey", "unknown key"),
        ("gateways.carrier=1", "gateways.carrier", "expected gateways.<name>.key"),
        ("dialplan.inbound[9].did=1", "dialplan.inbound[9].did", "no [[inbound]] #9"),
        ("dialplan.inbound.did=1", "dialplan.inbound.did", "expected dialplan."),
        ("dialplan.inbound[0].destination=777", "dialplan.inbound[0].destination",
         "unknown extension"),
    ],
)
def test_bad_file_override(profiles: Path, override: str, key: str, word: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(profiles, [override])
    assert (exc.value.file, exc.value.key) == ("--set", key)
    assert word in exc.value.problem


@pytest.mark.parametrize(("override", "file", "key"), [
    ("media.rtp_ip=0.0.0.0", "softpbx.toml", "media.ext_rtp_ip"),
    ("internal.sip_ip=0.0.0.0", "internal.toml", "profile.ext_sip_ip"),
])
def test_wildcard_address_needs_the_advertised_one(profiles: Path, override: str, file: str,
                                                    key: str) -> None:
    # c=0.0.0.0 would put every call on hold; Contact 0.0.0.0 reaches nobody
    with pytest.raises(ConfigError) as exc:
        load_config(profiles, [override])
    assert (exc.value.file, exc.value.key) == (file, key)
    base = override.split("=")[0].rsplit(".", 1)[0]
    ext = "ext_rtp_ip" if base == "media" else "ext_sip_ip"
    load_config(profiles, [override, f"{base}.{ext}=192.0.2.10"])


# --------------------------------------------------------------------------- broken configs

MAIN = "softpbx.toml"
DIR = "directory/101.toml"
GW = "gateways/carrier.toml"
DP = "dialplan.toml"
GW_OK = '[gateway]\nproxy = "127.0.0.1:5070"\n'
USER_OK = '[user]\npassword = "pw"\n'


def dialplan(inbound: str = "", ring_group: str = "", outbound: str = "") -> str:
    """A dialplan.toml with one of each section, parts replaced as given."""
    inbound = inbound or 'did = "1"\ndestination = "101"'
    ring_group = ring_group or 'name = "sales"\nmembers = ["101", "102"]'
    outbound = outbound or 'name = "out"\npattern = \'^\\d+$\'\ngateway = "carrier"'
    return f"[[ring_group]]\n{ring_group}\n[[inbound]]\n{inbound}\n[[outbound]]\n{outbound}\n"


BROKEN = [
    # softpbx.toml
    ("syntax", {MAIN: "[sip]\nt1_ms = \n"}, MAIN, "line 2", "syntax"),
    ("unknown section", {MAIN: "[sipp]\n"}, MAIN, "sipp", "unknown"),
    ("top-level key", {MAIN: 'domain = "x"\n'}, MAIN, "domain", "unknown"),
    ("section not a table", {MAIN: "sip = 5\n"}, MAIN, "sip", "table"),
    ("unknown key", {MAIN: "[sip]\nt1 = 5\n"}, MAIN, "sip.t1", "unknown"),
    ("bool as int", {MAIN: "[sip]\nt1_ms = true\n"}, MAIN, "sip.t1_ms", "integer"),
    ("str as int", {MAIN: '[http]\nhttp_port = "80"\n'}, MAIN, "http.http_port", "integer"),
    (
        "float as int",
        {MAIN: "[calls]\nmax_duration = 1.5\n"},
        MAIN,
        "calls.max_duration",
        "integer",
    ),
    ("int as str", {MAIN: "[global]\ndomain = 5\n"}, MAIN, "global.domain", "string"),
    (
        "int as bool",
        {MAIN: "[recording]\nenabled = 1\n"},
        MAIN,
        "recording.enabled",
        "true or false",
    ),
    ("str as array", {MAIN: '[auth]\nalgorithms = "MD5"\n'}, MAIN, "auth.algorithms", "array"),
    ("t1 >= t2", {MAIN: "[sip]\nt1_ms = 5000\nt2_ms = 4000\n"}, MAIN, "sip.t2_ms", "greater"),
    ("t1 zero", {MAIN: "[sip]\nt1_ms = 0\n"}, MAIN, "sip.t1_ms", "range"),
    ("http port", {MAIN: "[http]\nhttp_port = 65536\n"}, MAIN, "http.http_port", "range"),
    ("rtp odd", {MAIN: "[media]\nrtp_start_port = 16385\n"}, MAIN, "media.rtp_start_port", "even"),
    (
        "rtp start >= end",
        {MAIN: "[media]\nrtp_start_port = 20000\nrtp_end_port = 10000\n"},
        MAIN,
        "media.rtp_start_port",
        "less",
    ),
    ("rtp port 0", {MAIN: "[media]\nrtp_end_port = 0\n"}, MAIN, "media.rtp_end_port", "range"),
    (
        "default < min expires",
        {MAIN: "[registrar]\nmin_expires = 60\ndefault_expires = 30\n"},
        MAIN,
        "registrar.default_expires",
        "range",
    ),
    (
        "max < min expires",
        {MAIN: "[registrar]\nmin_expires = 600\nmax_expires = 300\n"},
        MAIN,
        "registrar.max_expires",
        "least",
    ),
    ("rtp_ip hostname", {MAIN: '[media]\nrtp_ip = "localhost"\n'}, MAIN, "media.rtp_ip", "IP"),
    ("http_ip bad", {MAIN: '[http]\nhttp_ip = "1.2.3"\n'}, MAIN, "http.http_ip", "IP"),
    ("timezone", {MAIN: '[global]\ntimezone = "Mars/Base"\n'}, MAIN, "global.timezone", "zone"),
    ("log level", {MAIN: '[global]\nlog_level = "loud"\n'}, MAIN, "global.log_level", "unknown"),
    (
        "algorithm",
        {MAIN: '[auth]\nalgorithms = ["SHA-512"]\n'},
        MAIN,
        "auth.algorithms[0]",
        "algorithm",
    ),
    ("no algorithms", {MAIN: "[auth]\nalgorithms = []\n"}, MAIN, "auth.algorithms", "empty"),
    (
        "algorithm twice",
        {MAIN: '[auth]\nalgorithms = ["MD5", "MD5"]\n'},
        MAIN,
        "auth.algorithms[1]",
        "twice",
    ),
    (
        "compression",
        {MAIN: "[recording]\ncompression_level = 1.5\n"},
        MAIN,
        "recording.compression_level",
        "range",
    ),
    ("webhook url", {MAIN: '[crm]\nwebhook_url = "crm.local"\n'}, MAIN, "crm.webhook_url", "URL"),
    # profiles
    (
        "port",
        {"internal.toml": "[profile]\nsip_port = 70000\n"},
        "internal.toml",
        "profile.sip_port",
        "range",
    ),
    (
        "ip",
        {"external.toml": '[profile]\nsip_ip = "999.1.1.1"\n'},
        "external.toml",
        "profile.sip_ip",
        "IP",
    ),
    (
        "transport",
        {"internal.toml": '[profile]\ntransports = ["udp", "sctp"]\n'},
        "internal.toml",
        "profile.transports[1]",
        "unknown",
    ),
    (
        "no transports",
        {"internal.toml": "[profile]\ntransports = []\n"},
        "internal.toml",
        "profile.transports",
        "empty",
    ),
    (
        "name key",
        {"internal.toml": '[profile]\nname = "x"\n'},
        "internal.toml",
        "profile.name",
        "unknown",
    ),
    ("profile section", {"internal.toml": "[listener]\n"}, "internal.toml", "listener", "unknown"),
    # directory
    ("no [user]", {DIR: 'password = "x"\n'}, DIR, "password", "unknown"),
    ("empty file", {DIR: ""}, DIR, "user", "missing"),
    ("bad id", {DIR: '[user]\nid = "10 1"\npassword = "x"\n'}, DIR, "user.id", "invalid"),
    ("bad stem", {"directory/a b.toml": USER_OK}, "directory/a b.toml", "user.id", "invalid"),
    (
        "dup id",
        {"directory/104.toml": '[user]\nid = "101"\npassword = "x"\n'},
        "directory/104.toml",
        "user.id",
        "duplicate",
    ),
    ("empty password", {DIR: '[user]\npassword = ""\n'}, DIR, "user.password", "empty"),
    ("no password", {DIR: "[user]\nrecord = false\n"}, DIR, "user.password", "required"),
    ("user key", {DIR: '[user]\npassword = "x"\nemail = "a@b"\n'}, DIR, "user.email", "unknown"),
    # gateways
    ("no proxy", {GW: "[gateway]\n"}, GW, "gateway.proxy", "required"),
    ("proxy space", {GW: '[gateway]\nproxy = "carrier host"\n'}, GW, "gateway.proxy", "invalid"),
    ("proxy port", {GW: '[gateway]\nproxy = "1.2.3.4:99999"\n'}, GW, "gateway.proxy", "port"),
    ("proxy bracket", {GW: '[gateway]\nproxy = "[::1:5070"\n'}, GW, "gateway.proxy", "invalid"),
    ("proxy v4 bracket", {GW: '[gateway]\nproxy = "[1.2.3.4]"\n'}, GW, "gateway.proxy", "IPv6"),
    ("transport", {GW: GW_OK + 'transport = "sctp"\n'}, GW, "gateway.transport", "unknown"),
    (
        "inbound hostname",
        {GW: GW_OK + 'inbound_addresses = ["carrier.example.com"]\n'},
        GW,
        "gateway.inbound_addresses[0]",
        "IP",
    ),
    (
        "inbound port",
        {GW: GW_OK + 'inbound_addresses = ["127.0.0.1", "127.0.0.1:0"]\n'},
        GW,
        "gateway.inbound_addresses[1]",
        "port",
    ),
    ("register no user", {GW: GW_OK + "register = true\n"}, GW, "gateway.username", "register"),
    ("gateway name key", {GW: GW_OK + 'name = "x"\n'}, GW, "gateway.name", "unknown"),
    (
        "bad gateway name",
        {"gateways/my gw.toml": GW_OK},
        "gateways/my gw.toml",
        "gateway",
        "invalid",
    ),
    # dial plan
    ("dp section", {DP: "[[route]]\nx = 1\n"}, DP, "route", "unknown"),
    ("dp not array", {DP: "[inbound]\ndid = '1'\n"}, DP, "inbound", "array"),
    (
        "dp unknown key",
        {DP: dialplan(inbound='did = "1"\ndestination = "101"\nto = "x"')},
        DP,
        "inbound[0].to",
        "unknown",
    ),
    (
        "no destination",
        {DP: dialplan(inbound='did = "1"')},
        DP,
        "inbound[0].destination",
        "required",
    ),
    (
        "unknown ext",
        {DP: dialplan(inbound='did = "1"\ndestination = "999"')},
        DP,
        "inbound[0].destination",
        "extension",
    ),
    (
        "unknown group",
        {DP: dialplan(inbound='did = "1"\ndestination = "group:nope"')},
        DP,
        "inbound[0].destination",
        "ring group",
    ),
    (
        "unknown gateway dest",
        {DP: dialplan(inbound='did = "1"\ndestination = "gateway:nope/123"')},
        DP,
        "inbound[0].destination",
        "gateway",
    ),
    (
        "gateway dest empty number",
        {DP: dialplan(inbound='did = "1"\ndestination = "gateway:carrier/"')},
        DP,
        "inbound[0].destination",
        "gateway:<name>/<number>",
    ),
    (
        "unknown fallback",
        {DP: dialplan(inbound='did = "1"\ndestination = "101"\nfallback = "group:x"')},
        DP,
        "inbound[0].fallback",
        "ring group",
    ),
    (
        "duplicate DID",
        {DP: dialplan() + '[[inbound]]\ndid = "1"\ndestination = "102"\n'},
        DP,
        "inbound[1].did",
        "duplicate",
    ),
    (
        "bad DID",
        {DP: dialplan(inbound='did = "1 2"\ndestination = "101"')},
        DP,
        "inbound[0].did",
        "invalid",
    ),
    (
        "member not extension",
        {DP: dialplan(ring_group='name = "sales"\nmembers = ["101", "999"]')},
        DP,
        "ring_group[0].members[1]",
        "unknown extension",
    ),
    (
        "strategy",
        {DP: dialplan(ring_group='name = "sales"\nmembers = ["101"]\nstrategy = "random"')},
        DP,
        "ring_group[0].strategy",
        "unknown",
    ),
    (
        "no members",
        {DP: dialplan(ring_group='name = "sales"\nmembers = []')},
        DP,
        "ring_group[0].members",
        "empty",
    ),
    (
        "bad pattern",
        {DP: dialplan(outbound='name = "o"\npattern = "^(\\\\d+"\ngateway = "carrier"')},
        DP,
        "outbound[0].pattern",
        "compile",
    ),
    (
        "unknown route gateway",
        {DP: dialplan(outbound='name = "o"\npattern = \'.\'\ngateway = "nope"')},
        DP,
        "outbound[0].gateway",
        "unknown gateway",
    ),
    (
        "bad rewrite regex",
        {DP: dialplan() + "[[outbound.rewrites]]\nmatch = '(['\nreplace = ''\n"},
        DP,
        "outbound[0].rewrites[0].match",
        "compile",
    ),
    (
        "rewrite missing group",
        {DP: dialplan() + "[[outbound.rewrites]]\nmatch = '^8(\\d+)$'\nreplace = '+7\\2'\n"},
        DP,
        "outbound[0].rewrites[0].replace",
        "group",
    ),
    (
        "rewrite unknown key",
        {DP: dialplan() + "[[outbound.rewrites]]\nmatch = 'a'\nwith = 'b'\n"},
        DP,
        "outbound[0].rewrites[0].with",
        "unknown",
    ),
    (
        "duplicate rule",
        {DP: dialplan() + '[[outbound]]\nname = "out"\npattern = \'.\'\ngateway = "carrier"\n'},
        DP,
        "outbound[1].name",
        "duplicate",
    ),
]


@pytest.mark.parametrize(
    ("files", "file", "key", "word"),
    [pytest.param(*case[1:], id=case[0]) for case in BROKEN],
)
def test_broken_config(
    profiles: Path, files: dict[str, str], file: str, key: str, word: str
) -> None:
    write(profiles, files)
    with pytest.raises(ConfigError) as exc:
        load_config(profiles)
    err = exc.value
    assert (err.file, err.key) == (file, key), str(err)
    assert word.lower() in err.problem.lower(), str(err)
    assert str(err).startswith(f"{file}: {key}: ")


# --------------------------------------------------------------------------- IPv6, paths


def test_ipv6_everywhere(profiles: Path) -> None:
    write(
        profiles,
        {
            "internal.toml": '[profile]\nsip_ip = "::1"\next_sip_ip = "2001:db8::1"\n',
            "external.toml": '[profile]\nsip_ip = "::"\nsip_port = 5080\next_sip_ip = "2001:db8::2"\n',
            GW: '[gateway]\nproxy = "[::1]:5070"\n'
            'inbound_addresses = ["[::1]:5070", "::1", "2001:db8::5", "10.0.0.1"]\n',
            "gateways/byname.toml": '[gateway]\nproxy = "sip.example.com:5060"\n',
            "gateways/v6bare.toml": '[gateway]\nproxy = "2001:db8::7"\n',
        },
    )
    cfg = load_config(
        profiles, ["media.rtp_ip=::1", "http.http_ip=::1", "media.ext_rtp_ip=fe80::1"]
    )
    assert cfg.internal.sip_ip == "::1" and cfg.external.sip_ip == "::"
    assert cfg.media.rtp_ip == "::1"
    gw = {g.name: g for g in cfg.gateways}
    assert gw["carrier"].inbound_addresses == ("[::1]:5070", "::1", "2001:db8::5", "10.0.0.1")
    assert gw["byname"].proxy == "sip.example.com:5060"
    text = describe(cfg)
    assert "[::1]:5060" in text and "[::1]:8080" in text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", None)),
        ("127.0.0.1:5070", ("127.0.0.1", 5070)),
        ("[::1]:5070", ("::1", 5070)),
        ("[::1]", ("::1", None)),
        ("::1", ("::1", None)),
        ("sip.example.com:5061", ("sip.example.com", 5061)),
    ],
)
def test_split_host_port(text: str, expected: tuple[str, int | None]) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize("text", ["[::1", "[::1]5070", "host:", "host:x", "host:0", "host:65536"])
def test_split_host_port_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        split_host_port(text)


def test_relative_paths_kept_and_resolve_path(profiles: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # A relative data_dir is the current directory's, not the profiles folder's parent
    # (--profiles /etc/softpbx must not write /etc/softpbx.db).
    parent = tmp_path / "cwd"
    parent.mkdir()
    monkeypatch.chdir(parent)
    parent = parent.resolve()
    cfg = load_config(profiles)
    assert cfg.recording.dir == "recordings"
    assert resolve_path(cfg, cfg.global_.db_path) == str(parent / "softpbx.db")
    assert resolve_path(cfg, "/var/x.db") == "/var/x.db"
    cfg = load_config(profiles, ["global.data_dir=data"])
    assert resolve_path(cfg, cfg.recording.dir) == str(parent / "data" / "recordings")
    cfg = load_config(profiles, ["global.data_dir=/srv/pbx"])
    assert resolve_path(cfg, "softpbx.db") == "/srv/pbx/softpbx.db"


def test_config_error_message() -> None:
    err = ConfigError("directory/101.toml", "user.password", "must not be empty")
    assert str(err) == "directory/101.toml: user.password: must not be empty"
