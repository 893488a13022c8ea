"""``[crm]`` delivery keys: defaults, --set, and bad values stopping start-up with file, key
and problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from softpbx.config import ConfigError, describe, load_config
from softpbx.config.schema import CRM_EVENTS

SAMPLE = Path(__file__).resolve().parents[2] / "sip_profiles"


@pytest.fixture
def profiles(tmp_path: Path) -> Path:
    dest = tmp_path / "sip_profiles"
    shutil.copytree(SAMPLE, dest)
    return dest


def test_defaults_and_overrides(profiles: Path) -> None:
    crm = load_config(profiles).crm
    assert (crm.webhook_url, crm.answer_timeout_ms, crm.events, crm.internal_calls) == \
        ("", 1500, CRM_EVENTS, False)
    assert (crm.give_up_after_h, crm.signature_secret, crm.extra_fields) == (24.0, "", False)
    assert crm.retry_min_s <= crm.retry_max_s and crm.max_in_flight >= 1
    crm = load_config(profiles, ["crm.events=NOTIFY_START,NOTIFY_END", "crm.retry_min_s=2",
                                 "crm.retry_max_s=60", "crm.signature_secret=12345",
                                 "crm.webhook_url=https://crm.example/hook?k=1",
                                 "crm.internal_calls=true", "crm.extra_fields=true"]).crm
    assert crm.events == ("NOTIFY_START", "NOTIFY_END") and crm.retry_min_s == 2.0
    assert crm.signature_secret == "12345" and crm.internal_calls and crm.extra_fields
    assert load_config(profiles, ["crm.events=[]"]).crm.events == ()


def test_describe_says_where_events_go(profiles: Path) -> None:
    assert "CRM webhook: built-in inspector at http://127.0.0.1:8080/crm/" in \
        describe(load_config(profiles))
    assert "CRM webhook: https://crm.example/h" in describe(
        load_config(profiles, ["crm.webhook_url=https://crm.example/h"]))
    assert "events are not sent" in describe(load_config(profiles, ["http.http_port=0"]))


@pytest.mark.parametrize(("override", "key", "word"), [
    ("crm.events=NOTIFY_START,NOTIFY_ANSWER", "crm.events", "NOTIFY_ANSWER"),
    ("crm.events=NOTIFY_END,NOTIFY_END", "crm.events", "twice"),
    ("crm.retry_min_s=0", "crm.retry_min_s", "range"),
    ("crm.retry_max_s=0.5", "crm.retry_max_s", "retry_min_s"),
    ("crm.max_in_flight=0", "crm.max_in_flight", "range"),
    ("crm.request_timeout_ms=10", "crm.request_timeout_ms", "range"),
    ("crm.give_up_after_h=-1", "crm.give_up_after_h", "range"),
    ("crm.answer_timeout_ms=fast", "crm.answer_timeout_ms", "integer"),
    ("crm.internal_calls=yes", "crm.internal_calls", "true or false"),
    ("crm.webhook_url=crm.example/hook", "crm.webhook_url", "URL"),
])
def test_bad_values_name_the_key(profiles: Path, override: str, key: str, word: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(profiles, [override])
    assert exc.value.key.startswith(key), str(exc.value)
    assert word in exc.value.problem, str(exc.value)


def test_bad_value_in_the_file_names_file_and_key(profiles: Path) -> None:
    main = profiles / "softpbx.toml"
    main.write_text(main.read_text().replace('# events = [', 'events = ["NOTIFY_X", '))
    with pytest.raises(ConfigError) as exc:
        load_config(profiles)
    assert (exc.value.file, exc.value.key) == ("softpbx.toml", "crm.events[0]"), str(exc.value)
