"""Finished calls are freed by reference counting: no reference cycles are left for the garbage
collector (the shell runs it rarely, ``aio/app.py``; a cycle per call would pile up between
collections and make each one slow)."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from .test_calls import (
    ALICE,
    BOB,
    CARRIER,
    Net,
    answer,
    answered_call,
    in_dialog,
    invite,
    make_net,
    place_call,
    sdp,
)


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def cyclic_garbage() -> Counter[str]:
    """softpbx objects a collection would find unreachable now, by type (what pytest itself
    leaves, the tracebacks of earlier failures, is not ours to count)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return Counter(type(o).__name__ for o in gc.garbage
                       if type(o).__module__.startswith("softpbx"))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def answered_then_bye(net: Net, i: int) -> None:
    b_inv, ok = answered_call(net)
    net.feed(in_dialog("BYE", ok, frm_tag="caller-tag", to_tag=ok.to.tag, cseq=3, src=ALICE,
                       frm="101", to="102", branch=f"z9hG4bKbye{i}x"), ALICE)


def busy(net: Net, i: int) -> None:
    place_call(net, "102")
    (b_inv,) = net.take(BOB)
    net.feed(answer(b_inv, 486), BOB)


def trunk_call_answered(net: Net, i: int) -> None:
    net.feed(invite(to="74950000000", frm="79990001122", src=CARRIER,
                    branch=f"z9hG4bKtr{i}", call_id=f"trunk-{i}"), CARRIER)
    (leg,) = [m for m in net.take(ALICE) if getattr(m, "method", "") == "INVITE"]
    net.feed(answer(leg, 180), ALICE)
    net.feed(answer(leg, 200, body=sdp(50000), contact="<sip:101@127.0.0.1:5061>"), ALICE)
    net.advance(1.0)
    (call,) = net.sw.calls.values()
    call.shutdown(net.clock.now)  # our side hangs up both legs


@pytest.mark.parametrize("flow", [answered_then_bye, busy, trunk_call_answered],
                         ids=lambda f: f.__name__)
def test_calls_leave_no_cycles(no_gc: None, flow: Callable[[Net, int], None]) -> None:
    net = make_net()
    for i in range(20):
        flow(net, i)
        net.collect()
        net.inbox.clear()
        net.advance(200.0)  # every transaction, Timer C included, has run out
        net.inbox.clear()
    assert net.sw.calls == {} and net.sw.dialog_count == 0
    assert net.sw.stack.transaction_count == 0 and net.relay.sessions == []
    garbage = cyclic_garbage()
    assert not garbage, f"reference cycles left by {flow.__name__}: {garbage.most_common(8)}"
