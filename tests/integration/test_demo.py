"""``softpbx demo --exit-when-done`` as a user runs it: a real subprocess on the shipped
profiles, checked for what it promises (issue 11).

- every call's webhooks, in order, with the fields the CRM contract gives them, as the
  built-in inspector received them (the demo's ``demo-result.json``);
- three stereo MP3 recordings served at their ``record_link`` and on disk, each channel
  carrying the right party's melody (its strongest frequency is one of that party's notes:
  no silent side, no crossed audio);
- three answered CDRs under the same ``pbx_call_id``;
- a demo whose carrier is refused exits non-zero and names what is missing.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from softpbx.demo_audio import MELODIES
from tests.support.server import PROJECT_ROOT, SHIPPED_PROFILES

pytestmark = pytest.mark.integration

DEMO_TIMEOUT_S = 90
"""The demo bounds itself at 60 s (--timeout); this bounds the process."""
TALK_S = 3.0
DID = "74950000000"


def run_demo(workdir: Path, *extra: str, timeout: float = DEMO_TIMEOUT_S
             ) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "softpbx", "demo", "--exit-when-done", "--tone",
           "--profiles", str(SHIPPED_PROFILES), "--workdir", str(workdir),
           "--talk-seconds", str(TALK_S), *extra]
    return subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


def assert_party(channel: np.ndarray, rate: int, party: str, what: str) -> None:
    """``channel`` is audible and its strongest frequency is one of ``party``'s notes."""
    rms = float(np.sqrt(np.mean(channel ** 2)))
    assert rms > 0.02, f"{what}: silent channel (rms {rms:.4f})"
    hz = peak_hz(channel, rate)
    notes = MELODIES[party]
    assert any(abs(hz - n) / n < 0.03 for n in notes), \
        f"{what}: strongest frequency {hz:.0f} Hz is none of {party}'s notes {notes}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str],
                                                             dict[str, Any], Path]:
    workdir = tmp_path_factory.mktemp("demo")
    proc = run_demo(workdir)
    result_path = workdir / "demo-result.json"
    assert result_path.exists(), f"no demo-result.json\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(result_path.read_text()), workdir


def test_demo_exits_0_with_every_promise_kept(demo: tuple[Any, dict[str, Any], Path]) -> None:
    proc, result, _ = demo
    assert proc.returncode == 0, f"status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert result["ok"] and result["missing"] == []
    assert "all 3 calls produced their webhooks and recordings" in proc.stdout
    # The webhooks were printed as they came, with the record links.
    for sc in result["scenarios"]:
        assert sc["pbx_call_id"] in proc.stdout
        assert sc["record_link"] in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr


def test_each_call_gets_its_events_in_order_with_the_contract_fields(
        demo: tuple[Any, dict[str, Any], Path]) -> None:
    _, result, _ = demo
    inbound, internal, click = result["scenarios"]

    def fields(sc: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
        return [(e["event"], e["fields"]) for e in sc["events"]]

    ev = fields(inbound)
    assert [e for e, _ in ev] == ["NOTIFY_START", "NOTIFY_INTERNAL", "NOTIFY_END",
                                  "NOTIFY_RECORD"]
    assert inbound["pbx_call_id"].startswith("in_")
    assert ev[0][1]["called_did"] == DID and ev[0][1]["caller_id"] == "79161234567"
    assert ev[1][1]["internal"] == "101"
    end = ev[2][1]
    assert (end["disposition"], end["internal"]) == ("answered", "101")
    assert int(end["duration"]) >= TALK_S - 1

    ev = fields(internal)
    assert [e for e, _ in ev] == ["NOTIFY_INTERNAL", "NOTIFY_END", "NOTIFY_RECORD"]
    assert (ev[0][1]["caller_id"], ev[0][1]["internal"]) == ("101", "102")
    assert ev[1][1]["disposition"] == "answered"

    ev = fields(click)
    assert [e for e, _ in ev] == ["NOTIFY_OUT_START", "NOTIFY_OUT_END", "NOTIFY_RECORD"]
    assert click["pbx_call_id"].startswith("out_")
    # destination as clicked (digits), the employee's outside caller ID (directory/101.toml)
    assert ev[0][1]["destination"] == "89167654321"
    assert (ev[0][1]["internal"], ev[0][1]["caller_id"]) == ("101", "74950000101")
    assert ev[1][1]["disposition"] == "answered" and int(ev[1][1]["duration"]) >= TALK_S - 1
    for sc in result["scenarios"]:
        assert all(e["fields"]["pbx_call_id"] == sc["pbx_call_id"] for e in sc["events"])
        assert not any(e["duplicate"] for e in sc["events"])


def test_recordings_are_served_and_carry_each_party_on_its_side(
        demo: tuple[Any, dict[str, Any], Path]) -> None:
    _, result, workdir = demo
    # (caller on the left, callee on the right)
    parties = {"inbound": ("carrier", "101"), "internal": ("101", "102"),
               "click-to-call": ("101", "carrier")}
    for sc in result["scenarios"]:
        hex_id = sc["pbx_call_id"].split("_", 1)[1]
        files = list((workdir / "recordings").glob(f"*_{hex_id}.mp3"))
        assert len(files) == 1, f"{sc['title']}: {files}"
        assert sc["record_link"].startswith(result["http"] + "/rec/")
        assert sc["record_bytes"] == files[0].stat().st_size, "the link serves another file"
        data, rate = soundfile.read(files[0], always_2d=True)
        assert data.shape[1] == 2, "stereo"
        assert len(data) / rate >= TALK_S - 0.5, f"{sc['title']}: {len(data) / rate:.1f} s"
        left, right = parties[sc["kind"]]
        assert_party(data[:, 0], rate, left, f"{sc['title']} left")
        assert_party(data[:, 1], rate, right, f"{sc['title']} right")


def test_cdrs_are_answered_under_the_same_ids(demo: tuple[Any, dict[str, Any], Path]) -> None:
    _, result, workdir = demo
    with sqlite3.connect(workdir / "softpbx.db") as db:
        rows = {r[0]: r[1:] for r in db.execute(
            "SELECT pbx_call_id, direction, disposition FROM cdr")}
    want = {sc["pbx_call_id"]: d for sc, d in
            zip(result["scenarios"], ("inbound", "internal", "outbound"), strict=True)}
    assert {k: v for k, v in rows.items() if k in want} == \
        {k: (d, "answered") for k, d in want.items()}, rows


def test_a_refused_carrier_fails_the_demo_and_says_what_is_missing(tmp_path: Path) -> None:
    # The carrier is no longer recognised by its address: its call is challenged (401) and
    # the inbound scenario cannot happen; the other two still run and are reported.
    proc = run_demo(tmp_path, "--set", "gateways.carrier.inbound_addresses=127.0.0.2",
                    "--timeout", "30")
    assert proc.returncode == 1, f"status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    result = json.loads((tmp_path / "demo-result.json").read_text())
    assert not result["ok"]
    assert any("1. carrier -> DID -> 101" in m and "401" in m for m in result["missing"]), \
        result["missing"]
    assert "MISSING:" in proc.stdout
