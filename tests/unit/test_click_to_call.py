"""softpbx.crm.click_to_call: field parsing and normalisation, the token check, the repeat
limiter (fake clock), and the [crm]/[http] keys of click-to-call and the API in the loader."""

from __future__ import annotations

import dataclasses
import hmac
import shutil
from pathlib import Path

import pytest

from softpbx.config import ConfigError, describe, load_config
from softpbx.crm import click_to_call as c2c
from softpbx.crm.click_to_call import (
    ClickToCall,
    Refusal,
    RepeatLimiter,
    normalise_number,
    parse_request,
    token_matches,
)

SAMPLE = Path(__file__).resolve().parents[2] / "sip_profiles"

# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(("text", "expected"), [
    ("+7 (916) 123-45-67", "+79161234567"),
    ("8 916 123 45 67", "89161234567"),
    ("8.916.123.45.67", "89161234567"),
    ("+7\u00a0916\u2009123\u201345\u201467", "+79161234567"),  # NBSP, thin space, en/em dash
    ("[495] 123/4567", "4951234567"),
    ("101", "101"),                  # an internal extension: the second leg rings it
    ("  79161234567\t", "79161234567"),
    ("0" * 20, "0" * 20),
    ("+" + "1" * 20, "+" + "1" * 20),
])
def test_numbers_are_normalised_for_the_dial_plan(text: str, expected: str) -> None:
    assert normalise_number(text) == expected


@pytest.mark.parametrize("text", [
    "", "+", "-", "()", "abc", "7916abc", "1+2", "++79", "7916*1", "79#1", "tel:+7916",
    "٣٣٣",                           # Arabic-Indic digits: str.isdigit() would say yes
    "1" * 21, "+" + "1" * 21, "79;drop", "7916\x00", "+7 916 123 45 67 ext 5",
])
def test_malformed_numbers_are_refused(text: str) -> None:
    assert normalise_number(text) is None


# --------------------------------------------------------------------------- fields


def test_a_valid_request() -> None:
    got = parse_request({"from": " 101 ", "to": "+7 (916) 123-45-67", "name": " Ivanov Ivan ",
                         "crm_user": "ignored"})
    assert got == ClickToCall(extension="101", number="+79161234567", caller_name="Ivanov Ivan")


def test_json_numbers_are_taken_as_text() -> None:
    assert parse_request({"from": 101, "to": 79161234567}) == ClickToCall("101", "79161234567")


@pytest.mark.parametrize(("fields", "field", "word"), [
    ({}, "from", "missing"),
    ({"to": "123"}, "from", "missing"),
    ({"from": "  ", "to": "123"}, "from", "missing"),
    ({"from": None, "to": "123"}, "from", "missing"),
    ({"from": "101"}, "to", "missing"),
    ({"from": "101", "to": ""}, "to", "missing"),
    ({"from": "101", "to": "call me"}, "to", "malformed"),
    ({"from": "10 1", "to": "123"}, "from", "malformed"),
    ({"from": "<sip:101@x>", "to": "123"}, "from", "malformed"),
    ({"from": "1" * 65, "to": "123"}, "from", "malformed"),
    ({"from": ["101"], "to": "123"}, "from", "string"),
    ({"from": True, "to": "123"}, "from", "string"),
    ({"from": "101", "to": {"n": 1}}, "to", "string"),
    ({"from": "101", "to": 1.5}, "to", "string"),
    ({"from": "101", "to": "123", "name": [7]}, "name", "string"),
])
def test_refusals_are_400_and_name_the_field(fields: dict[str, object], field: str,
                                              word: str) -> None:
    got = parse_request(fields)
    assert isinstance(got, Refusal)
    assert (got.status, got.field) == (400, field)
    assert f"'{field}'" in got.error and word in got.error


def test_from_is_checked_before_to() -> None:
    got = parse_request({"to": "bad number"})
    assert isinstance(got, Refusal) and got.field == "from"


def test_caller_name_cannot_break_a_header_and_is_capped() -> None:
    got = parse_request({"from": "101", "to": "1", "name": "Evil\r\nVia: x\x00\u2028y"})
    assert isinstance(got, ClickToCall)
    assert got.caller_name == "Evil  Via: x  y"
    long = parse_request({"from": "101", "to": "1", "name": "N" * 500})
    assert isinstance(long, ClickToCall) and len(long.caller_name) == c2c.MAX_NAME_LENGTH


# --------------------------------------------------------------------------- token


def test_token_matches_only_the_exact_token() -> None:
    assert token_matches("s3cret-token", "s3cret-token")
    for given in ("s3cret-tokeN", "s3cret-toke", "s3cret-token ", "", None, "S3CRET-TOKEN"):
        assert not token_matches(given, "s3cret-token")


def test_an_empty_token_never_matches() -> None:
    # An empty configured token means "disabled", even for a request without the header.
    assert not token_matches("", "")
    assert not token_matches(None, "")


def test_non_utf8_header_values_are_compared_not_crashed_on() -> None:
    assert not token_matches("tok\udcff", "token")


def test_token_check_uses_compare_digest_on_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(c2c.hmac, "compare_digest", spy)
    assert not token_matches(None, "abc")
    assert token_matches("abc", "abc")
    # Both compared as bytes, a missing header as b"" (the same path as a wrong token).
    assert seen == [(b"", b"abc"), (b"abc", b"abc")]


# --------------------------------------------------------------------------- repeat limit


def test_a_second_click_within_the_interval_is_429() -> None:
    lim = RepeatLimiter(min_interval=5.0)
    assert lim.check("101", 100.0) is None
    lim.record("101", 100.0)
    again = lim.check("101", 104.9)
    assert isinstance(again, Refusal) and again.status == 429 and again.field == "from"
    assert "'from'" in again.error
    assert lim.check("102", 104.9) is None          # other extensions are not affected
    assert lim.check("101", 105.0) is None          # the interval passed


def test_only_placed_calls_count() -> None:
    lim = RepeatLimiter(min_interval=5.0)
    assert lim.check("101", 0.0) is None  # e.g. refused by the switch afterwards: no record()
    assert lim.check("101", 0.1) is None


def test_interval_zero_turns_the_limiter_off() -> None:
    lim = RepeatLimiter(min_interval=0.0)
    for i in range(3):
        lim.record("101", float(i) / 10)
        assert lim.check("101", float(i) / 10) is None


def test_limiter_memory_is_bounded() -> None:
    lim = RepeatLimiter(min_interval=5.0, max_entries=100)
    for i in range(1000):
        lim.record(str(i), 0.0)          # all recent: the oldest half is dropped
        assert len(lim._last) <= 100
    assert lim.check("999", 1.0) is not None  # the newest are kept
    lim.record("new", 10.0)               # all old by now: swept
    assert len(lim._last) <= 51


# --------------------------------------------------------------------------- config


@pytest.fixture
def profiles(tmp_path: Path) -> Path:
    dest = tmp_path / "sip_profiles"
    shutil.copytree(SAMPLE, dest)
    return dest


def test_defaults() -> None:
    cfg = load_config(SAMPLE)
    crm = cfg.crm
    assert crm.click_to_call_path == "/click-to-call"
    assert crm.click_to_call_token == ""
    assert crm.click_to_call_error_codes is True
    assert crm.click_to_call_ring_s == 30
    assert crm.click_to_call_auto_answer is False
    assert crm.click_to_call_min_interval_s == 5.0
    assert cfg.http.api_token == ""


def test_old_token_key_is_an_alias(profiles: Path) -> None:
    main = profiles / "softpbx.toml"
    assert "\n[crm]\n" in main.read_text()
    text = main.read_text().replace("\n[crm]\n", '\n[crm]\ntoken = "t0ken"\n', 1)
    main.write_text(text)
    assert load_config(profiles).crm.click_to_call_token == "t0ken"
    assert load_config(profiles, ["crm.token=other"]).crm.click_to_call_token == "other"
    main.write_text(text.replace("\n[crm]\n", '\n[crm]\nclick_to_call_token = "x"\n', 1))
    with pytest.raises(ConfigError) as err:
        load_config(profiles)
    assert err.value.key == "crm.token" and "only one" in err.value.problem


@pytest.mark.parametrize(("override", "key", "word"), [
    ("http.admin_user=admin", "http.admin_password", "both"),
    ("http.admin_password=pw", "http.admin_user", "both"),
    ("http.admin_password=has space", "http.admin_password", "visible ASCII"),
    ("http.api_token=has space", "http.api_token", "visible ASCII"),
    ("crm.click_to_call_token=tok\u00e9n", "crm.click_to_call_token", "visible ASCII"),
    ("crm.click_to_call_path=click", "crm.click_to_call_path", "start with /"),
    ("crm.click_to_call_path=/a//b", "crm.click_to_call_path", "empty segment"),
    ("crm.click_to_call_path=/c2c/{ext}", "crm.click_to_call_path", "invalid path"),
    ("crm.click_to_call_path=/api/calls", "crm.click_to_call_path", "taken"),
    ("crm.click_to_call_path=/rec", "crm.click_to_call_path", "taken"),
    ("crm.click_to_call_ring_s=0", "crm.click_to_call_ring_s", "range"),
    ("crm.click_to_call_min_interval_s=-1", "crm.click_to_call_min_interval_s", "range"),
    ("crm.click_to_call_error_codes=yes", "crm.click_to_call_error_codes", "true or false"),
])
def test_broken_keys_are_named(override: str, key: str, word: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(SAMPLE, [override])
    assert err.value.key == override.split("=", 1)[0] or err.value.key == key
    assert word in err.value.problem


def test_non_loopback_http_with_a_token_loads_and_describe_says_which() -> None:
    cfg = load_config(SAMPLE, ["http.http_ip=0.0.0.0", "http.api_token=k3y",
                               "crm.click_to_call_token=t", "crm.click_to_call_path=/crm-c2c"])
    assert cfg.http.api_token == "k3y"
    text = describe(cfg)
    assert "API auth: bearer token (http.api_token) required for the console" in text
    assert "click-to-call on (POST /crm-c2c)" in text
    loop = describe(load_config(SAMPLE))
    assert "API auth: none (the console, /api/* and /crm/ answer loopback clients only" in loop
    assert "click-to-call off" in loop
    assert "API auth: bearer token (http.api_token) required" in describe(
        load_config(SAMPLE, ["http.api_token=k3y"]))
    # No credential beyond loopback loads (the console answers loopback clients) with a warning.
    open_cfg = load_config(SAMPLE, ["http.http_ip=0.0.0.0"])
    assert "API auth: WARNING: no http.admin_password or http.api_token" in describe(open_cfg)
    assert "console login (http.admin_user) or bearer token" in describe(load_config(
        SAMPLE, ["http.admin_user=a", "http.admin_password=b", "http.api_token=k3y"]))
    # The HTTP server off: no API to open, nothing to refuse.
    off = dataclasses.replace(cfg, http=dataclasses.replace(cfg.http, http_port=0))
    assert "API auth: none (HTTP disabled)" in describe(off)


def test_http_off_needs_no_api_token() -> None:
    # Nothing listens, so nothing is open: the loader must not ask for a token.
    cfg = load_config(SAMPLE, ["http.http_port=0", "http.http_ip=0.0.0.0",
                               "crm.webhook_url=http://127.0.0.1:9/hook"])
    assert cfg.http.api_token == ""
