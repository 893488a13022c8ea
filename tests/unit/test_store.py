"""SQLite store: batched writes reach the disk, bindings and CDRs read back."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from softpbx.config.schema import Transport
from softpbx.core.events import Binding, CallRecord, DeleteBinding, SaveBinding, WriteCdr
from softpbx.sip.events import Flow
from softpbx.store.sqlite import SqliteStore

FLOW = Flow(Transport.TCP, ("203.0.113.5", 40123), ("127.0.0.1", 5060))


def binding(key: str, expires_at: float) -> Binding:
    return Binding(aor="101", contact=f"sip:101@10.0.0.{key}:5060", key=key, expires_at=expires_at,
                   call_id="c", cseq=3, flow=FLOW, q="0.5", user_agent="UA", params=";ob")


def test_bindings_survive_a_new_store_and_expired_ones_are_dropped(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    st = SqliteStore(path=path)
    # monotonic now = 100 while wall time = 1_000_100: offset 1_000_000
    for a in (SaveBinding(binding("1", 100 + 3600)), SaveBinding(binding("2", 100 + 10)),
              SaveBinding(binding("3", 100 + 60)), DeleteBinding("101", "3")):
        st.apply(a, wall_offset=1_000_000.0)
    assert st.buffered == 4  # nothing handed to the writer yet: one batch later
    assert st.flush()
    st.close()
    again = SqliteStore(path=path)
    # 20 s later on the wall; the new process's monotonic clock reads 5
    got = again.load_bindings(now=5.0, wall=1_000_120.0)
    again.close()
    assert [b.key for b in got] == ["1"]
    (b,) = got
    assert b.flow == FLOW and b.q == "0.5" and b.params == ";ob" and b.user_agent == "UA"
    assert abs(b.expires_at - (5.0 + 3600 - 20)) < 1e-6


def test_cdr_rows(tmp_path: Path) -> None:
    st = SqliteStore(path=str(tmp_path / "c.db"))
    rec = CallRecord(call_id="in_" + "a" * 40, sip_call_id="x@y", direction="inbound",
                     caller="7999", callee="7495", did="7495", extension="101", gateway="carrier",
                     started_at=10.0, answered_at=12.0, ended_at=42.4, disposition="answered",
                     sip_code=200, cause="BYE from a")
    st.apply(WriteCdr(rec), wall_offset=1000.0)
    st.flush()
    (row,) = st.recent_cdrs()
    st.close()
    assert row["duration"] == 30 and row["started_at"] == 1010.0 and row["disposition"] == "answered"


def test_cdr_caller_extension_and_an_older_database_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)  # a cdr table as the first schema made it
    db.execute("CREATE TABLE cdr (call_id TEXT PRIMARY KEY, sip_call_id TEXT NOT NULL,"
               " direction TEXT NOT NULL, caller TEXT NOT NULL, callee TEXT NOT NULL,"
               " did TEXT NOT NULL, extension TEXT NOT NULL, gateway TEXT NOT NULL,"
               " started_at REAL NOT NULL, answered_at REAL, ended_at REAL NOT NULL,"
               " duration INTEGER NOT NULL, disposition TEXT NOT NULL, sip_code INTEGER NOT NULL,"
               " cause TEXT NOT NULL)")
    db.execute("INSERT INTO cdr VALUES ('int_old','a@b','internal','101','102','','102','',"
               "1.0,NULL,2.0,0,'busy',486,'x')")
    db.commit()
    db.close()
    st = SqliteStore(path=str(path))
    rec = CallRecord(call_id="out_" + "b" * 40, sip_call_id="c@d", direction="outbound",
                     caller="74950000101", callee="89991234567", did="", extension="",
                     gateway="carrier", started_at=10.0, answered_at=None, ended_at=11.0,
                     disposition="failed", sip_code=503, cause="trunk down",
                     caller_extension="101")
    st.apply(WriteCdr(rec), wall_offset=0.0)
    st.flush()
    rows = {r["call_id"]: r for r in st.recent_cdrs()}
    st.close()
    assert rows[rec.call_id]["caller_extension"] == "101"
    assert rows["int_old"]["caller_extension"] == ""


# -- text from the wire, a failing write, read connections --------------------------------------
def test_surrogate_escaped_header_text_is_stored_and_the_writer_keeps_going(
        tmp_path: Path) -> None:
    """A Latin-1 User-Agent / Contact parameter, decoded with surrogateescape, reaches the
    store as lone surrogates: sqlite3 cannot encode them (UnicodeEncodeError, not an
    sqlite3.Error). It must neither kill the writer thread nor cost the batch's other rows."""
    path = str(tmp_path / "s.db")
    st = SqliteStore(path=path)
    latin = Binding(aor="101", contact="sip:101@10.0.0.9:5060;x=caf\udce9", key="9",
                    expires_at=3600.0, call_id="c\udce9", cseq=1, flow=FLOW, q=None,
                    user_agent="T\udce9l\udce9phone", params=";p=\udce9")
    rec = CallRecord(call_id="in_" + "b" * 40, sip_call_id="x\udce9@y", direction="inbound",
                     caller="Ren\udce9", callee="7495", did="", extension="101", gateway="",
                     started_at=1.0, answered_at=None, ended_at=2.0, disposition="cancel",
                     sip_code=487, cause="CANCEL")
    st.apply(SaveBinding(binding("1", 3600.0)), wall_offset=0.0)
    st.apply(SaveBinding(latin), wall_offset=0.0)
    st.apply(WriteCdr(rec), wall_offset=0.0)
    st.apply(SaveBinding(binding("2", 3600.0)), wall_offset=0.0)
    assert st.flush(timeout=3.0), "the writer thread died"
    st.apply(SaveBinding(binding("3", 3600.0)), wall_offset=0.0)  # and it still writes
    assert st.flush(timeout=3.0)
    (cdr,) = st.recent_cdrs()
    st.close()
    assert st.write_failures == 0
    assert (cdr["caller"], cdr["sip_call_id"]) == ("Ren\\xe9", "x\\xe9@y")
    got = {b.key: b for b in SqliteStore(path=path).load_bindings(now=0.0, wall=0.0)}
    assert sorted(got) == ["1", "2", "3", "9"]
    assert got["9"].user_agent == "T\\xe9l\\xe9phone" and got["9"].params == ";p=\\xe9"
    assert got["9"].contact == "sip:101@10.0.0.9:5060;x=caf\\xe9"


def test_a_failing_write_costs_only_itself(tmp_path: Path) -> None:
    st = SqliteStore(path=str(tmp_path / "s.db"))
    st.apply(SaveBinding(binding("1", 3600.0)), wall_offset=0.0)
    st.execute("INSERT INTO no_such_table VALUES (?)", (1,))  # sqlite3.OperationalError
    st.execute("INSERT INTO recordings (call_id) VALUES (?)", (object(),))  # unsupported type
    st.apply(SaveBinding(binding("2", 3600.0)), wall_offset=0.0)
    assert st.flush(timeout=3.0)
    st.apply(SaveBinding(binding("3", 3600.0)), wall_offset=0.0)
    assert st.flush(timeout=3.0)
    keys = sorted(b.key for b in st.load_bindings(now=0.0, wall=0.0))
    st.close()
    assert keys == ["1", "2", "3"] and st.write_failures == 2


def test_lookups_reuse_one_read_connection_per_thread(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    st = SqliteStore(path=str(tmp_path / "s.db"))
    st.execute("INSERT INTO recordings (call_id, token_hash, path, status, created_at)"
               " VALUES ('c', 'h', '/x.mp3', 'ready', 1)", ())
    assert st.flush()
    opened: list[str] = []
    connect = sqlite3.connect

    def counting_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        opened.append(threading.current_thread().name)
        return connect(*args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", counting_connect)
    with ThreadPoolExecutor(max_workers=2) as pool:
        got = list(pool.map(st.recording_by_hash, ["h", "nope"] * 50))
    assert got[:2] == [("/x.mp3", "ready", "c"), None] and len(got) == 100
    assert len(opened) <= 2, opened
    # A reader sees what the writer commits later (no stale snapshot is kept open).
    st.execute("UPDATE recordings SET status='deleted' WHERE call_id='c'", ())
    assert st.flush()
    assert st.recording_by_hash("h") == ("/x.mp3", "deleted", "c")
    st.close()
