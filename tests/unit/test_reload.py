"""``Switch.reload`` on the fake clock: a live call survives a reload, a new extension is
callable at once, a removed one is refused and its registrations dropped, gateways are
added and withdrawn, and what needs a restart is named (the shell refuses a bad
configuration before the switch sees it: tested here through the loader)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from softpbx.config.loader import load_config
from softpbx.config.schema import ConfigError
from softpbx.core.call import CallState
from softpbx.core.events import DeleteBinding
from softpbx.core.routing import Direction, ExtensionTarget, NoRoute, Router

from .test_calls import (
    ALICE,
    BOB,
    CARRIER,
    ROOT,
    Net,
    answer,
    answered_call,
    flow,
    in_dialog,
    make_net,
    place_call,
    sdp,
)
from .test_registrar import authed_register

CAROL = ("127.0.0.1", 5064)  # extension 103's phone


def copy_profiles(tmp_path: Path) -> Path:
    d = tmp_path / "profiles"
    shutil.copytree(ROOT / "sip_profiles", d)
    return d


def reload_from(net: Net, profiles: Path, *overrides: str):
    """What the shell does on SIGHUP: load (validate) the files, hand them to the switch."""
    result = net.sw.reload(load_config(profiles, ["calls.max_duration=0", *overrides]),
                           net.clock.now)
    net.collect()
    return result


def hang_up(net: Net, ok) -> None:
    """101 hangs up the call whose 200 was ``ok``; 102 confirms its BYE."""
    net.feed(in_dialog("BYE", ok, frm_tag="caller-tag", to_tag=ok.to.tag, cseq=3, src=ALICE,
                       frm="101", to="102"), ALICE)
    assert [m.status for m in net.take(ALICE)] == [200]
    (bye,) = net.take(BOB)
    net.feed(answer(bye, 200), BOB)


def test_live_call_survives_a_reload_that_removes_its_callee(tmp_path: Path) -> None:
    net = make_net()
    _, ok = answered_call(net)
    (call,) = net.sw.calls.values()
    profiles = copy_profiles(tmp_path)
    (profiles / "directory" / "102.toml").unlink()
    dialplan = profiles / "dialplan.toml"
    dialplan.write_text(dialplan.read_text().replace('fallback = "102"', 'fallback = "103"')
                        .replace('["101", "102"]', '["101", "103"]'))
    result = reload_from(net, profiles)
    assert result.extensions_removed == ("102",) and result.dialplan_changed
    assert result.needs_restart == ()
    # 102's registration is gone (and deleted from the store), its live call is not
    assert net.sw.registrar.lookup("102", net.clock.now) == []
    assert DeleteBinding("102", "b") in net.actions
    assert net.sw.calls == {call.id: call} and call.state is CallState.ANSWERED
    net.advance(5.0)
    assert call.state is CallState.ANSWERED
    hang_up(net, ok)
    net.drain()
    (cdr,) = net.cdrs
    assert (cdr.disposition, cdr.duration, cdr.extension) == ("answered", 5, "102")
    # a new call to 102 finds no such extension now
    place_call(net, "102")
    assert [m.status for m in net.take(ALICE)][-1] == 404
    net.assert_no_leaks()


def test_new_extension_registers_and_is_callable_at_once(tmp_path: Path) -> None:
    net = make_net()
    profiles = copy_profiles(tmp_path)
    (profiles / "directory" / "104.toml").write_text(
        '[user]\npassword = "secret104"\neffective_caller_id_name = "Dan 104"\n')
    result = reload_from(net, profiles)
    assert result.extensions_added == ("104",) and result.summary().startswith(
        "extensions added: 104")
    assert net.sw.auth  # the same authenticator, with 104's password now
    ok = authed_register(net.sw, net.clock, user="104", password="secret104",
                         contact="<sip:104@127.0.0.1:5065>", flow=flow(("127.0.0.1", 5065)))
    assert ok.status == 200
    net.collect()
    assert len(net.sw.registrar.lookup("104", net.clock.now)) == 1
    place_call(net, "104")
    (inv,) = net.take(("127.0.0.1", 5065))
    assert inv.method == "INVITE" and inv.from_.uri.user == "101"
    # 101..103 kept their registrations
    assert all(net.sw.registrar.lookup(e, net.clock.now) for e in ("101", "102", "103"))


def test_removed_extension_can_neither_call_nor_register(tmp_path: Path) -> None:
    net = make_net()
    profiles = copy_profiles(tmp_path)
    (profiles / "directory" / "101.toml").unlink()
    dialplan = profiles / "dialplan.toml"
    dialplan.write_text(dialplan.read_text().replace('destination = "101"', 'destination = "102"')
                        .replace('["101", "102"]', '["102", "103"]'))
    result = reload_from(net, profiles)
    assert result.extensions_removed == ("101",) and result.bindings_dropped == 1
    place_call(net, "102", frm="101", password="secret101")
    assert [m.status for m in net.take(ALICE)][-1] == 403
    assert net.take(BOB) == []


def test_changed_password_applies_and_disabled_extension_is_dropped(tmp_path: Path) -> None:
    net = make_net()
    profiles = copy_profiles(tmp_path)
    ext = profiles / "directory" / "101.toml"
    ext.write_text(ext.read_text().replace('password = "secret101"', 'password = "new101"'))
    ext = profiles / "directory" / "103.toml"
    ext.write_text(ext.read_text() + "enabled = false\n")
    result = reload_from(net, profiles)
    assert result.extensions_changed == ("101", "103") and result.bindings_dropped == 1
    place_call(net, "102", password="secret101")
    assert [m.status for m in net.take(ALICE)][-1] == 403
    net.advance(40.0)
    net.take(ALICE)
    place_call(net, "102", password="new101")
    (inv,) = net.take(BOB)
    assert inv.method == "INVITE"
    assert net.sw.registrar.lookup("103", net.clock.now) == []


def test_bad_config_is_refused_whole_and_the_running_one_stays(tmp_path: Path) -> None:
    net = make_net()
    profiles = copy_profiles(tmp_path)
    (profiles / "directory" / "104.toml").write_text('[user]\npassword = "secret104"\n')
    dialplan = profiles / "dialplan.toml"
    dialplan.write_text(dialplan.read_text().replace('fallback = "102"', 'fallback = "109"'))
    running = net.sw.config
    with pytest.raises(ConfigError) as err:
        reload_from(net, profiles)
    assert str(err.value).startswith("dialplan.toml: inbound[0].fallback: unknown extension")
    # nothing of it applied: 104 (valid on its own) is unknown, 101 -> 102 still works
    assert net.sw.config is running and "104" not in net.sw.extensions
    place_call(net, "102")
    (inv,) = net.take(BOB)
    assert inv.method == "INVITE"


def test_restart_only_sections_are_reported_not_applied(tmp_path: Path) -> None:
    net = make_net()
    result = reload_from(net, ROOT / "sip_profiles", "internal.sip_port=5099",
                         "media.rtp_start_port=30000", "calls.no_answer_timeout=5")
    assert set(result.needs_restart) == {"internal.toml", "media", "calls"}
    assert "NOT applied until a restart: " in result.summary()
    assert net.sw.config.internal.sip_port != 5099
    assert net.sw.config.media.rtp_start_port != 30000
    assert net.sw.config.calls.no_answer_timeout != 5


def test_gateway_added_registers_removed_one_unregisters(tmp_path: Path) -> None:
    net = make_net()
    profiles = copy_profiles(tmp_path)
    (profiles / "gateways" / "second.toml").write_text(
        '[gateway]\nproxy = "127.0.0.1:5080"\nregister = true\nusername = "acct"\n'
        'password = "pw"\n')
    result = reload_from(net, profiles)
    assert result.gateways_added == ("second",)
    (reg,) = net.take(("127.0.0.1", 5080))
    assert reg.method == "REGISTER" and "acct@" in reg.get("to")
    net.feed(answer(reg, 200, contact=reg.get("contact")).replace(
        b"Contact:", b"Expires: 3600\r\nContact:"), ("127.0.0.1", 5080))
    assert net.sw.gateway_registrations["second"].expires_at is not None
    # removed: REGISTER with Expires: 0 (RFC 3261 §10.2.2); inbound from it is a stranger now
    (profiles / "gateways" / "second.toml").unlink()
    result = reload_from(net, profiles)
    assert result.gateways_removed == ("second",)
    (unreg,) = net.take(("127.0.0.1", 5080))
    assert unreg.method == "REGISTER" and unreg.get("expires") == "0"
    assert "second" not in net.sw.gateway_registrations
    assert net.sw.gateway_for(flow(("127.0.0.1", 5080))) is None
    assert net.sw.gateway_for(flow(CARRIER)).name == "carrier"


def test_outbound_call_through_a_gateway_removed_mid_call_ends_normally(tmp_path: Path) -> None:
    net = make_net()
    place_call(net, "89991234567")
    (out,) = net.take(CARRIER)
    net.feed(answer(out, 200, contact="<sip:carrier@127.0.0.1:5070>", body=sdp(60000)),
             CARRIER)
    profiles = copy_profiles(tmp_path)
    (profiles / "gateways" / "carrier.toml").unlink()
    dialplan = profiles / "dialplan.toml"
    text = dialplan.read_text()
    dialplan.write_text(text[:text.index("[[outbound]]")])
    result = reload_from(net, profiles)
    assert result.gateways_removed == ("carrier",)
    (call,) = net.sw.calls.values()
    assert call.state is CallState.ANSWERED
    call.hang_up(net.clock.now)
    net.collect()
    (bye,) = [m for m in net.take(CARRIER) if getattr(m, "method", "") == "BYE"]
    net.feed(answer(bye, 200), CARRIER)
    net.drain()  # (101 never ACKed its 200 here: its BYE waits for that, then gives up)
    net.take(ALICE)
    (cdr,) = net.cdrs
    assert cdr.gateway == "carrier" and (cdr.callee, cdr.sent_number) == ("89991234567",
                                                                         "+79991234567")
    place_call(net, "89991234567")
    assert [m.status for m in net.take(ALICE)][-1] == 404


def test_ring_group_does_not_ring_the_caller() -> None:
    net = make_net()
    route = net.sw.router.from_extension("101", "group:sales")
    assert route.direction is Direction.INTERNAL
    assert [t for s in route.stages for t in s.targets] == [ExtensionTarget("102")]
    place_call(net, "sales")
    assert net.take(BOB)[0].method == "INVITE"
    assert [getattr(m, "method", None) for m in net.take(ALICE)] == [None]  # only the 100
    # a group of the caller alone has nobody to ring
    cfg = load_config(ROOT / "sip_profiles", ["dialplan.ring_group[0].members=101"])
    assert Router(config=cfg).from_extension("101", "sales") == NoRoute(480,
                                                                       "Temporarily Unavailable")

