"""Digest algorithms: MD5 only by default (what every phone survives), SHA-256 (RFC 8760)
opt-in globally, per extension and per gateway; their validation in the config loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from softpbx.config.loader import load_config
from softpbx.config.schema import AuthSettings, ConfigError, Extension, Gateway
from softpbx.core.leg import with_credentials
from softpbx.core.switch import Switch
from softpbx.sip.auth import (
    AuthOutcome,
    Credentials,
    DigestAuthenticator,
    answer_challenge,
    parse_credentials,
)
from softpbx.sip.message import Request, Response

from .sipkit import FakeClock, challenge_params, crlf, digest, sent, udp

SAMPLE = Path(__file__).resolve().parents[2] / "sip_profiles"
REALM = "127.0.0.1"


@pytest.fixture
def profiles(tmp_path: Path) -> Path:
    """A writable copy of the shipped sample."""
    dest = tmp_path / "sip_profiles"
    shutil.copytree(SAMPLE, dest)
    return dest


# -- defaults -----------------------------------------------------------------------------------
def test_defaults_offer_md5_only_and_answer_both() -> None:
    """Offered: MD5 (libre-based phones give up on a SHA-256 challenge); answered to trunks:
    both (we can compute either, and a provider may insist on SHA-256)."""
    assert AuthSettings().algorithms == ("MD5",)
    assert Extension(id="1", password="p").auth_algorithms == ()
    assert Gateway(name="g", proxy="h").auth_algorithms == ("MD5", "SHA-256")
    assert DigestAuthenticator(realm=REALM).algorithms == ("MD5",)
    cfg = load_config(SAMPLE)
    assert cfg.auth.algorithms == ("MD5",)
    assert all(e.auth_algorithms == () for e in cfg.extensions)


def test_sample_switch_sends_one_md5_challenge() -> None:
    r = _exchange(_switch(), _register("101"))
    assert r.status == 401
    assert [challenge_params(v)["algorithm"] for v in r.get_all("www-authenticate")] == ["MD5"]


# -- config -------------------------------------------------------------------------------------
def test_per_extension_and_gateway_keys_load(profiles: Path) -> None:
    (profiles / "directory" / "103.toml").write_text(
        '[user]\npassword = "secret103"\nauth_algorithms = ["SHA-256", "MD5"]\n')
    cfg = load_config(profiles, ['gateways.carrier.auth_algorithms=["SHA-256"]'])
    assert cfg.extension("103").auth_algorithms == ("SHA-256", "MD5")
    assert cfg.extension("101").auth_algorithms == ()
    assert cfg.gateways[0].auth_algorithms == ("SHA-256",)


EXT = "directory/101.toml"
GW = "gateways/carrier.toml"


@pytest.mark.parametrize(
    ("file", "line", "key", "word"),
    [
        (EXT, 'auth_algorithms = ["SHA-1"]', "user.auth_algorithms[0]", "unknown digest algorithm"),
        (EXT, 'auth_algorithms = ["MD5", "MD5"]', "user.auth_algorithms[1]", "listed twice"),
        (EXT, "auth_algorithms = 7", "user.auth_algorithms", "array"),
        (GW, "auth_algorithms = []", "gateway.auth_algorithms", "empty"),
        (GW, 'auth_algorithms = ["md5"]', "gateway.auth_algorithms[0]", "allowed: SHA-256, MD5"),
        ("softpbx.toml", 'algorithms = ["SHA-256", "SHA-256"]', "auth.algorithms[1]",
         "listed twice"),
    ],
)
def test_bad_algorithm_lists_name_file_and_key(profiles: Path, file: str, line: str, key: str,
                                               word: str) -> None:
    path = profiles / file
    table = {EXT: "[user]", GW: "[gateway]"}.get(file, "[auth]")
    lines = path.read_text().splitlines()
    at = lines.index(table)
    path.write_text("\n".join([*lines[:at + 1], line, *lines[at + 1:]]) + "\n")
    with pytest.raises(ConfigError) as exc:
        load_config(profiles)
    assert (exc.value.file, exc.value.key) == (file, key)
    assert word in exc.value.problem


def test_bad_override_is_reported_against_set(profiles: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(profiles, ['directory.101.auth_algorithms=["SHA-512"]'])
    assert exc.value.file == "--set" and "unknown digest algorithm" in exc.value.problem


def test_empty_extension_list_means_the_global_one(profiles: Path) -> None:
    cfg = load_config(profiles, ["directory.101.auth_algorithms=[]",
                                 'auth.algorithms=["SHA-256", "MD5"]'])
    a = DigestAuthenticator(realm=REALM, algorithms=cfg.auth.algorithms)
    a.set_users({"101": "pw"}, {"101": cfg.extension("101").auth_algorithms})
    assert a.algorithms_for("101") == ("SHA-256", "MD5")


# -- the authenticator --------------------------------------------------------------------------
def _authenticator() -> DigestAuthenticator:
    a = DigestAuthenticator(realm=REALM, secret=b"s" * 32)
    a.set_users({"101": "secret101", "103": "secret103"}, {"103": ("SHA-256", "MD5"), "101": ()})
    return a


def _answer(a: DigestAuthenticator, user: str, password: str, algorithm: str) -> AuthOutcome:
    nonce = parse_credentials(a.challenge(0.0, user=user)[0])[1]["nonce"]
    auth = digest(user=user, password=password, realm=REALM, nonce=nonce, method="REGISTER",
                  uri=f"sip:{REALM}", algorithm=algorithm)
    return a.check("REGISTER", [auth], 1.0, request_uri=f"sip:{REALM}").outcome


def test_challenge_follows_the_users_list() -> None:
    a = _authenticator()
    algs = {u: [parse_credentials(v)[1]["algorithm"] for v in a.challenge(0.0, user=u)]
            for u in ("101", "103", "nobody")}
    assert algs == {"101": ["MD5"], "103": ["SHA-256", "MD5"], "nobody": ["MD5"]}
    assert [parse_credentials(v)[1]["algorithm"] for v in a.challenge(0.0)] == ["MD5"]


def test_check_accepts_the_users_algorithms_only() -> None:
    a = _authenticator()
    assert _answer(a, "103", "secret103", "SHA-256") is AuthOutcome.OK
    assert _answer(a, "103", "secret103", "MD5") is AuthOutcome.OK
    assert _answer(a, "103", "wrong", "SHA-256") is AuthOutcome.WRONG_PASSWORD
    assert _answer(a, "101", "secret101", "MD5") is AuthOutcome.OK
    # SHA-256 was not offered to 101: a new challenge (a phone with cached credentials from
    # before the change recovers), never a 200 and never counted as a failure.
    assert _answer(a, "101", "secret101", "SHA-256") is AuthOutcome.MISSING
    assert _answer(a, "nobody", "x", "SHA-256") is AuthOutcome.MISSING
    assert _answer(a, "nobody", "x", "MD5") is AuthOutcome.UNKNOWN_USER


# -- the switch ---------------------------------------------------------------------------------
def _switch(*overrides: str) -> Switch:
    return Switch(config=load_config(SAMPLE, list(overrides)), auth_secret=b"k" * 32)


def _register(user: str, auth: str = "", cseq: int = 1) -> bytes:
    lines = ["REGISTER sip:127.0.0.1 SIP/2.0",
             f"Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKr{user}{cseq};rport",
             f"From: <sip:{user}@127.0.0.1>;tag=f{cseq}", f"To: <sip:{user}@127.0.0.1>",
             f"Call-ID: reg-{user}", f"CSeq: {cseq} REGISTER",
             f"Contact: <sip:{user}@127.0.0.1:5062>", "Expires: 600", "Max-Forwards: 70"]
    if auth:
        lines.append(f"Authorization: {auth}")
    return crlf("\n".join([*lines, "Content-Length: 0", "", ""]))


def _invite(frm: str, to: str) -> bytes:
    return crlf("\n".join([
        f"INVITE sip:{to}@127.0.0.1 SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bKinv{frm}{to};rport",
        f"From: <sip:{frm}@127.0.0.1>;tag=a", f"To: <sip:{to}@127.0.0.1>", f"Call-ID: inv-{frm}-{to}",
        "CSeq: 1 INVITE", f"Contact: <sip:{frm}@127.0.0.1:5062>", "Max-Forwards: 70",
        "Content-Length: 0", "", ""]))


def _exchange(sw: Switch, data: bytes) -> Response:
    sw.receive(data, udp(), FakeClock().now)
    (resp,) = [m for m in sent(sw) if isinstance(m, Response) and m.status >= 200]
    return resp


def test_switch_challenges_by_to_user_for_register_and_from_user_for_invite() -> None:
    sw = _switch('directory.103.auth_algorithms=["SHA-256", "MD5"]')

    def algorithms(resp: Response) -> list[str]:
        assert resp.status == 401
        return [challenge_params(v)["algorithm"] for v in resp.get_all("www-authenticate")]

    assert algorithms(_exchange(sw, _register("103"))) == ["SHA-256", "MD5"]
    assert algorithms(_exchange(sw, _register("101"))) == ["MD5"]
    assert algorithms(_exchange(sw, _invite("103", "102"))) == ["SHA-256", "MD5"]
    assert algorithms(_exchange(sw, _invite("101", "103"))) == ["MD5"]


def test_switch_registers_an_opted_in_extension_with_sha256() -> None:
    sw = _switch('directory.103.auth_algorithms=["SHA-256"]')
    ch = challenge_params(_exchange(sw, _register("103")).get("www-authenticate"))
    auth = digest(user="103", password="secret103", realm=ch["realm"], nonce=ch["nonce"],
                  method="REGISTER", uri="sip:127.0.0.1", algorithm="SHA-256")
    assert _exchange(sw, _register("103", auth, cseq=2)).status == 200


# -- answering a provider's challenge -----------------------------------------------------------
def _challenge(*algorithms: str) -> Response:
    values = [f'Digest realm="carrier", nonce="n{i}", algorithm={alg}, qop="auth"'
              for i, alg in enumerate(algorithms)]
    return Response(401, "Unauthorized", [("WWW-Authenticate", v) for v in values])


def _answered_algorithm(resp: Response, algorithms: tuple[str, ...]) -> str | None:
    answer = answer_challenge(resp, method="INVITE", uri="sip:1@carrier", username="u",
                              password="p", algorithms=algorithms)
    return None if answer is None else parse_credentials(answer[1])[1]["algorithm"]


def test_answer_challenge_takes_the_providers_first_allowed_algorithm() -> None:
    both = _challenge("SHA-256", "MD5")
    assert _answered_algorithm(both, ("MD5", "SHA-256")) == "SHA-256"  # provider's order
    assert _answered_algorithm(both, ("MD5",)) == "MD5"
    assert _answered_algorithm(_challenge("SHA-256"), ("MD5",)) is None
    assert _answered_algorithm(_challenge("MD5"), ("SHA-256",)) is None


def test_legs_answer_with_the_gateways_algorithms() -> None:
    req = Request("INVITE", "sip:1@carrier", [("Call-ID", "c"), ("CSeq", "1 INVITE")])
    md5_only = Credentials("u", "p", ("MD5",))
    again = with_credentials(req, _challenge("SHA-256", "MD5"), md5_only, 2)
    assert again is not None
    assert parse_credentials(again.get("authorization"))[1]["algorithm"] == "MD5"
    assert with_credentials(req, _challenge("SHA-256"), md5_only, 2) is None
    assert Credentials("u", "p").algorithms == ("MD5", "SHA-256")
