"""SQLite store: batched writes reach the disk, bindings and CDRs read back."""

from __future__ import annotations

from pathlib import Path

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
