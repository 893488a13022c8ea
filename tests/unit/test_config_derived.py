"""Derived values follow what they derive from (``--set``), the data directory is not the
configuration's, ``softpbx check`` warns about risky settings, CDR times in the zone."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from softpbx.config.checks import config_warnings
from softpbx.config.loader import data_dir, describe, load_config, resolve_path
from softpbx.core.events import CallRecord, WriteCdr
from softpbx.store.sqlite import SqliteStore

SAMPLE = Path(__file__).resolve().parents[2] / "sip_profiles"


@pytest.fixture
def profiles(tmp_path: Path) -> Path:
    dest = tmp_path / "sip_profiles"
    shutil.copytree(SAMPLE, dest)
    return dest


def test_public_base_url_follows_the_http_port_unless_set_apart(profiles: Path) -> None:
    assert load_config(profiles).http.public_base_url == "http://127.0.0.1:8080"
    cfg = load_config(profiles, ["http.http_port=9080"])
    assert cfg.http.public_base_url == "http://127.0.0.1:9080"
    cfg = load_config(profiles, ["http.http_port=9080", "http.http_ip=127.0.0.2"])
    assert cfg.http.public_base_url == "http://127.0.0.2:9080"
    cfg = load_config(profiles, ["http.http_port=9080",
                                 "http.public_base_url=https://pbx.example.com"])
    assert cfg.http.public_base_url == "https://pbx.example.com"
    # unset in the file: derived from the file's own address
    main = profiles / "softpbx.toml"
    main.write_text(main.read_text().replace('public_base_url = "http://127.0.0.1:8080"', "")
                    .replace("http_port = 8080", "http_port = 8181"))
    assert load_config(profiles).http.public_base_url == "http://127.0.0.1:8181"
    # set to something else in the file: the operator's, and check says it disagrees
    main.write_text(main.read_text() + "")
    text = main.read_text().replace('http_port = 8181', 'http_port = 8181\n'
                                    'public_base_url = "http://127.0.0.1:8080"')
    main.write_text(text)
    cfg = load_config(profiles, ["http.http_port=9090"])
    assert cfg.http.public_base_url == "http://127.0.0.1:8080"
    assert any("http.public_base_url" in w and "9090" in w for w in config_warnings(cfg))


def test_inbound_addresses_follow_a_moved_proxy(profiles: Path) -> None:
    cfg = load_config(profiles, ["gateways.carrier.proxy=127.0.0.1:5080"])
    (gw,) = cfg.gateways
    assert gw.inbound_addresses == ("127.0.0.1:5080",)
    assert not any("inbound_addresses" in w for w in config_warnings(cfg))
    # a host name: the list empties, so the resolved proxy address is the gateway's
    (gw,) = load_config(profiles, ["gateways.carrier.proxy=sip.example.com"]).gateways
    assert gw.inbound_addresses == ()
    # moved in the file and the list left behind: check says so
    f = profiles / "gateways" / "carrier.toml"
    f.write_text(f.read_text().replace('proxy = "127.0.0.1:5070"', 'proxy = "127.0.0.1:5090"'))
    cfg = load_config(profiles)
    (w,) = [w for w in config_warnings(cfg) if "inbound_addresses" in w]
    assert w.startswith("gateways/carrier.toml: gateway.inbound_addresses:") and "5090" in w


def test_data_dir_is_the_current_directory_or_data_dir_never_the_profiles_parent(
        profiles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load_config(profiles)
    assert data_dir(cfg) == str(work.resolve())
    assert resolve_path(cfg, cfg.global_.db_path) == str(work.resolve() / "softpbx.db")
    assert str(profiles.parent.resolve() / "softpbx.db") not in describe(cfg)
    cfg = load_config(profiles, [f'global.data_dir="{tmp_path / "var"}"'])
    assert resolve_path(cfg, cfg.recording.dir) == str(tmp_path / "var" / "recordings")
    assert f"data directory {tmp_path / 'var'}" in describe(cfg)


def test_check_warns_about_risky_settings(profiles: Path, tmp_path: Path) -> None:
    dp = profiles / "dialplan.toml"
    dp.write_text(dp.read_text() + '\n[[inbound]]\ndid = "*"\ndestination = "gateway:carrier"\n')
    # A folder that cannot be made (a file is in the way: even root cannot write there).
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = load_config(profiles, [f'global.data_dir="{blocker}/data"'])
    text = "\n".join(config_warnings(cfg))
    assert 'inbound[1].destination: did = "*" sends ANY number' in text
    assert "http: no login" in text
    assert (f"global.data_dir: {blocker}/data cannot be created ({blocker} is not a "
            "directory)") in text
    assert f"recording.dir: {blocker}/data/recordings cannot be created" not in text  # once
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        warnings = config_warnings(load_config(profiles, [f'recording.dir="{ro}"']))
    finally:
        os.chmod(ro, 0o700)
    if os.geteuid() != 0:  # os.access: root may write anywhere, so no warning for root
        assert any(w.startswith(f"softpbx.toml: recording.dir: {ro} is not writable")
                   for w in warnings)
    # nothing to say about a tidy configuration with a token and writable folders
    cfg = load_config(SAMPLE, ["http.api_token=abc", f'global.data_dir="{tmp_path}"'])
    assert [w for w in config_warnings(cfg) if "no login" in w or "data_dir" in w] == []


def test_cdr_keeps_the_number_dialled_and_sent_and_local_times(tmp_path: Path) -> None:
    store = SqliteStore(path=str(tmp_path / "s.db"), timezone="Europe/Moscow")
    try:
        rec = CallRecord(call_id="out_1", sip_call_id="c", direction="outbound", caller="101",
                         callee="89991234567", did="", extension="", gateway="carrier",
                         started_at=10.0, answered_at=None, ended_at=12.0,
                         disposition="failed", sip_code=503, cause="x",
                         sent_number="+79991234567")
        store.apply(WriteCdr(rec), wall_offset=1_764_700_000.0)
        assert store.flush()
        (row,) = store.recent_cdrs()
    finally:
        store.close()
    assert (row["callee"], row["sent_number"]) == ("89991234567", "+79991234567")
    assert row["started_at"] == 1_764_700_010.0  # the epoch stays
    assert row["started_at_local"] == "2025-12-02T21:26:50+03:00"
    assert row["answered_at_local"] is None
