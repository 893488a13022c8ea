"""RFC 3261 §17 transactions driven by raw bytes and a fake clock: every timer A..M."""

from __future__ import annotations

import pytest

from softpbx.config.schema import SipSettings
from softpbx.sip.events import (
    CancelReceived,
    MessageRejected,
    RequestReceived,
    ResponseReceived,
    TransactionTimeout,
)
from softpbx.sip.message import Request, Response
from softpbx.sip.parser import parse_message
from softpbx.sip.stack import SipStack
from softpbx.sip.transaction import TIMER_C, TxState

from .sipkit import PHONE, FakeClock, crlf, run_until, tcp, udp

T1, T2, T4 = 0.5, 4.0, 5.0


def make_stack() -> SipStack:
    return SipStack(settings=SipSettings(t1_ms=500, t2_ms=4000, t4_ms=5000))


def events(stack: SipStack) -> list:
    out = []
    while (ev := stack.next_event()) is not None:
        out.append(ev)
    return out


def wire(stack: SipStack) -> list:
    return [parse_message(o.data) if o.data.strip() else o.data for o in stack.datagrams_to_send()]


def request(method: str = "OPTIONS", branch: str = "z9hG4bKtx1", cseq: int = 1, extra: str = "") -> bytes:
    return crlf(f"""{method} sip:101@127.0.0.1 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5062;branch={branch};rport
From: <sip:102@127.0.0.1>;tag=ft
To: <sip:101@127.0.0.1>
Call-ID: call-1
CSeq: {cseq} {method}
Max-Forwards: 70
{extra}Content-Length: 0

""")


def test_nist_absorbs_retransmissions_and_timer_j() -> None:
    st, clock = make_stack(), FakeClock()
    st.receive(request(), udp(), clock.now)
    (ev,) = events(st)
    assert isinstance(ev, RequestReceived) and ev.tx is not None
    st.receive(request(), udp(), clock.now)  # retransmission before any answer: absorbed
    assert events(st) == [] and wire(st) == []
    st.reply(ev.tx, 200, now=clock.now, to_tag="t")
    (r,) = wire(st)
    assert r.status == 200 and r.top_via.params["rport"] == "5062"
    st.receive(request(), udp(), clock.advance(1))
    (again,) = wire(st)
    assert again.status == 200 and events(st) == []
    assert st.transaction_count == 1
    run_until(st, clock, clock.now + 64 * T1 - 1.1)
    assert st.transaction_count == 1
    run_until(st, clock, clock.now + 0.2)
    assert st.transaction_count == 0  # Timer J = 64*T1 after the final response


def test_nist_over_tcp_terminates_at_once() -> None:
    st, clock = make_stack(), FakeClock()
    st.receive(request(), tcp(), clock.now)
    (ev,) = events(st)
    st.reply(ev.tx, 200, now=clock.now)
    assert ev.tx.state is TxState.TERMINATED and st.transaction_count == 0
    assert st.get_timer() is None


def test_ist_sends_100_and_retransmits_final_with_timer_g_until_ack() -> None:
    st, clock = make_stack(), FakeClock()
    st.receive(request("INVITE"), udp(), clock.now)
    (trying,) = wire(st)
    assert trying.status == 100
    (ev,) = events(st)
    st.receive(request("INVITE"), udp(), clock.advance(0.1))  # INVITE retransmitted
    assert [m.status for m in wire(st)] == [100]
    st.reply(ev.tx, 486, now=clock.now, to_tag="busy")
    assert [m.status for m in wire(st)] == [486]
    # Timer G: T1, 2T1, 4T1, then capped at T2
    times = []
    start = clock.now
    for _ in range(6):
        when = st.get_timer()
        run_until(st, clock, when)
        msgs = wire(st)
        if msgs:
            times.append(round(clock.now - start, 3))
    assert times[:5] == [0.5, 1.5, 3.5, 7.5, 11.5]
    ack = request("ACK", branch="z9hG4bKtx1")
    st.receive(ack, udp(), clock.now)
    assert ev.tx.state is TxState.CONFIRMED and events(st) == []
    st.receive(ack, udp(), clock.advance(1))  # ACK retransmission absorbed
    assert events(st) == [] and wire(st) == []
    run_until(st, clock, clock.now + T4 + 0.1)  # Timer I
    assert st.transaction_count == 0


def test_ist_timer_h_reports_missing_ack() -> None:
    st, clock = make_stack(), FakeClock()
    st.receive(request("INVITE"), udp(), clock.now)
    (ev,) = events(st)
    st.reply(ev.tx, 404, now=clock.now, to_tag="x")
    wire(st)
    run_until(st, clock, clock.now + 64 * T1 + 0.1)
    evs = events(st)
    assert len(evs) == 1 and isinstance(evs[0], TransactionTimeout) and evs[0].tx is ev.tx
    assert st.transaction_count == 0


def test_ist_2xx_goes_accepted_and_ack_for_2xx_reaches_tu() -> None:
    st, clock = make_stack(), FakeClock()
    st.receive(request("INVITE"), udp(), clock.now)
    (ev,) = events(st)
    st.reply(ev.tx, 200, now=clock.now, to_tag="ok")
    assert ev.tx.state is TxState.ACCEPTED
    wire(st)
    st.receive(request("INVITE"), udp(), clock.advance(0.2))  # absorbed in Accepted (RFC 6026)
    assert wire(st) == [] and events(st) == []
    st.receive(request("ACK", branch="z9hG4bKnewbranch"), udp(), clock.now)
    (ack_ev,) = events(st)
    assert isinstance(ack_ev, RequestReceived) and ack_ev.tx is None
    run_until(st, clock, clock.now + 64 * T1)  # Timer L
    assert st.transaction_count == 0


def test_cancel_matches_invite_gets_200_and_tu_event() -> None:
    st, clock = make_stack(), FakeClock()
    st.receive(request("INVITE"), udp(), clock.now)
    (inv,) = events(st)
    wire(st)
    st.receive(request("CANCEL"), udp(), clock.now)
    (ok,) = wire(st)
    assert ok.status == 200 and ok.cseq.method == "CANCEL"
    (cev,) = events(st)
    assert isinstance(cev, CancelReceived) and cev.invite_tx is inv.tx
    st.receive(request("CANCEL", branch="z9hG4bKother"), udp(), clock.now)
    (nomatch,) = wire(st)
    assert nomatch.status == 481


def test_2543_transactions_without_magic_cookie() -> None:
    st, clock = make_stack(), FakeClock()
    st.receive(request(branch="oldstyle"), udp(), clock.now)
    (ev,) = events(st)
    st.receive(request(branch="oldstyle"), udp(), clock.now)
    assert events(st) == []  # matched by Call-ID/From tag/CSeq/sent-by
    st.receive(request(branch="oldstyle", cseq=2), udp(), clock.now)
    assert len(events(st)) == 1


def test_malformed_request_answered_once_in_one_place() -> None:
    st, clock = make_stack(), FakeClock()
    st.receive(request().replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE"), udp(), clock.now)
    (r,) = wire(st)
    assert r.status == 400 and "CSeq" in r.reason
    (ev,) = events(st)
    assert isinstance(ev, MessageRejected) and ev.status == 400
    st.receive(b"\x00\x01garbage", udp(), clock.now)
    assert wire(st) == []
    (ev,) = events(st)
    assert isinstance(ev, MessageRejected) and ev.status is None


def test_keepalive_ping_pong() -> None:
    st, clock = make_stack(), FakeClock()
    st.receive(b"\r\n\r\n", tcp(), clock.now)
    assert [o.data for o in st.datagrams_to_send()] == [b"\r\n"]
    st.receive(b"\r\n", tcp(), clock.now)
    assert st.datagrams_to_send() == []


def outgoing_request(method: str) -> Request:
    return Request(method, "sip:102@127.0.0.1:5062", [
        ("Max-Forwards", "70"), ("From", "<sip:pbx@127.0.0.1>;tag=abc"),
        ("To", "<sip:102@127.0.0.1>"), ("Call-ID", "out-1"), ("CSeq", f"1 {method}"),
        ("Content-Length", "0")])


def reply_to(req_bytes: bytes, status: int, to_tag: str = "callee") -> bytes:
    req = parse_message(req_bytes)
    hdrs = [(n, v) for n, v in req.headers if n in ("Via", "From", "Call-ID", "CSeq")]
    hdrs.append(("To", f"{req.get('to')};tag={to_tag}"))
    return Response(status, None, hdrs).serialize()


def test_nict_timer_e_doubles_to_t2_and_timer_f_times_out() -> None:
    st, clock = make_stack(), FakeClock()
    tx = st.send_request(outgoing_request("OPTIONS"), udp(PHONE), clock.now)
    (first,) = st.datagrams_to_send()
    assert parse_message(first.data).top_via.branch.startswith("z9hG4bK")
    times = []
    start = clock.now
    while True:
        when = st.get_timer()
        if when is None:
            break
        run_until(st, clock, when)
        if st.datagrams_to_send():
            times.append(round(clock.now - start, 2))
    assert times[:6] == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5]
    assert all(b - a <= T2 + 1e-9 for a, b in zip(times, times[1:], strict=False))
    evs = events(st)
    assert len(evs) == 1 and isinstance(evs[0], TransactionTimeout) and evs[0].tx is tx
    assert round(clock.now - start, 2) == 64 * T1 and st.transaction_count == 0


def test_nict_response_then_timer_k() -> None:
    st, clock = make_stack(), FakeClock()
    tx = st.send_request(outgoing_request("OPTIONS"), udp(PHONE), clock.now)
    (o,) = st.datagrams_to_send()
    st.receive(reply_to(o.data, 100), udp(PHONE), clock.advance(0.1))
    (ev,) = events(st)
    assert isinstance(ev, ResponseReceived) and ev.response.status == 100
    run_until(st, clock, clock.now + 1.0)
    (rt,) = st.datagrams_to_send()  # Proceeding: Timer E fires at T2
    st.receive(reply_to(o.data, 200), udp(PHONE), clock.advance(0.1))
    (ev,) = events(st)
    assert ev.response.status == 200 and tx.state is TxState.COMPLETED
    st.receive(reply_to(o.data, 200), udp(PHONE), clock.now)  # retransmitted 200: absorbed
    assert events(st) == []
    run_until(st, clock, clock.now + T4 + 0.01)
    assert st.transaction_count == 0


def test_ict_timer_a_b_and_ack_for_failure() -> None:
    st, clock = make_stack(), FakeClock()
    tx = st.send_request(outgoing_request("INVITE"), udp(PHONE), clock.now)
    (o,) = st.datagrams_to_send()
    run_until(st, clock, clock.now + 0.6)
    assert len(st.datagrams_to_send()) == 1  # Timer A
    st.receive(reply_to(o.data, 180), udp(PHONE), clock.advance(0.1))
    assert tx.state is TxState.PROCEEDING
    run_until(st, clock, clock.now + 10)
    assert st.datagrams_to_send() == []  # no retransmission once a provisional came
    st.receive(reply_to(o.data, 486), udp(PHONE), clock.now)
    (ack,) = [parse_message(x.data) for x in st.datagrams_to_send()]
    assert ack.method == "ACK" and ack.top_via.branch == parse_message(o.data).top_via.branch
    assert ack.to.tag == "callee" and ack.cseq.method == "ACK" and ack.cseq.number == 1
    assert [e.response.status for e in events(st)] == [180, 486]
    st.receive(reply_to(o.data, 486), udp(PHONE), clock.advance(1))
    assert len(st.datagrams_to_send()) == 1 and events(st) == []  # ACK re-sent, absorbed
    run_until(st, clock, clock.now + 32.1)  # Timer D
    assert st.transaction_count == 0


def test_ict_timer_b_without_any_response() -> None:
    st, clock = make_stack(), FakeClock()
    st.send_request(outgoing_request("INVITE"), udp(PHONE), clock.now)
    run_until(st, clock, clock.now + 64 * T1 + 0.1)
    sends = st.datagrams_to_send()
    assert len(sends) == 7  # initial + Timer A at 0.5, 1.5, 3.5, 7.5, 15.5, 31.5
    evs = events(st)
    assert len(evs) == 1 and isinstance(evs[0], TransactionTimeout)


def test_ict_2xx_accepted_then_timer_m_and_retransmitted_2xx_to_tu() -> None:
    st, clock = make_stack(), FakeClock()
    tx = st.send_request(outgoing_request("INVITE"), udp(PHONE), clock.now)
    (o,) = st.datagrams_to_send()
    st.receive(reply_to(o.data, 200), udp(PHONE), clock.now)
    assert tx.state is TxState.ACCEPTED
    st.receive(reply_to(o.data, 200), udp(PHONE), clock.advance(0.5))
    assert [e.response.status for e in events(st)] == [200, 200]
    run_until(st, clock, clock.now + 64 * T1)
    assert st.transaction_count == 0


def test_cancel_deferred_until_provisional() -> None:
    st, clock = make_stack(), FakeClock()
    tx = st.send_request(outgoing_request("INVITE"), udp(PHONE), clock.now)
    (o,) = st.datagrams_to_send()
    assert st.cancel(tx, clock.now) is None and tx.cancel_pending
    assert st.datagrams_to_send() == []
    st.receive(reply_to(o.data, 180), udp(PHONE), clock.advance(0.1))
    (c,) = [parse_message(x.data) for x in st.datagrams_to_send()]
    assert c.method == "CANCEL" and c.cseq.number == 1
    assert c.top_via.branch == parse_message(o.data).top_via.branch


def test_response_with_two_vias_or_no_match_is_dropped() -> None:
    st, clock = make_stack(), FakeClock()
    st.send_request(outgoing_request("OPTIONS"), udp(PHONE), clock.now)
    (o,) = st.datagrams_to_send()
    two = reply_to(o.data, 200).replace(b"Via: ", b"Via: SIP/2.0/UDP 1.2.3.4;branch=z9hG4bKx\r\nVia: ", 1)
    st.receive(two, udp(PHONE), clock.now)
    assert [type(e) for e in events(st)] == [MessageRejected]
    st.receive(reply_to(o.data, 200).replace(b"z9hG4bK", b"z9hG4bKzz"), udp(PHONE), clock.now)
    assert events(st) == []


@pytest.mark.parametrize("settings", [SipSettings(t1_ms=100, t2_ms=400, t4_ms=1000)])
def test_timers_follow_config(settings: SipSettings) -> None:
    st = SipStack(settings=settings)
    clock = FakeClock()
    st.send_request(outgoing_request("OPTIONS"), udp(PHONE), clock.now)
    st.datagrams_to_send()
    run_until(st, clock, clock.now + 6.4 + 0.01)
    assert [type(e) for e in events(st)] == [TransactionTimeout]  # F = 64 * 0.1 s


# -- Timer C and the CANCEL wait (RFC 3261 §16.6 step 11, §9.1) ----------------------------------
def _timeouts(evs: list) -> list:
    return [e for e in evs if isinstance(e, TransactionTimeout)]


@pytest.mark.parametrize("make_flow", [udp, tcp])
def test_ict_timer_c_after_provisional_cancels_and_reports_timeout(make_flow) -> None:
    st, clock = make_stack(), FakeClock()
    tx = st.send_request(outgoing_request("INVITE"), make_flow(PHONE), clock.now)
    tx.user_data = owner = object()
    (o,) = st.datagrams_to_send()
    st.receive(reply_to(o.data, 180), make_flow(PHONE), clock.advance(0.1))
    assert [e.response.status for e in events(st)] == [180]
    run_until(st, clock, clock.now + TIMER_C - 0.1)
    assert events(st) == [] and st.datagrams_to_send() == []  # the callee rings, silently
    run_until(st, clock, clock.now + 0.2)
    (ev,) = events(st)
    assert isinstance(ev, TransactionTimeout) and ev.tx is tx and ev.owner is owner
    (c,) = wire(st)
    assert c.method == "CANCEL" and c.top_via.branch == parse_message(o.data).top_via.branch
    assert st.cancel(tx, clock.now) is None  # the TU cancelling too sends no second CANCEL
    st.receive(reply_to(c.serialize(), 200), make_flow(PHONE), clock.advance(0.1))
    st.receive(reply_to(o.data, 487), make_flow(PHONE), clock.now)
    assert [m.method for m in wire(st)] == ["ACK"]  # the 487 is still ACKed
    assert [e.response.status for e in events(st)] == [200, 487]
    run_until(st, clock, clock.now + 64 * T1 + 1)
    assert _timeouts(events(st)) == [] and st.transaction_count == 0


def test_ict_timer_c_restarts_on_provisionals_other_than_100() -> None:
    st, clock = make_stack(), FakeClock()
    tx = st.send_request(outgoing_request("INVITE"), udp(PHONE), clock.now)
    (o,) = st.datagrams_to_send()
    start = clock.now
    st.receive(reply_to(o.data, 100), udp(PHONE), start)
    st.receive(reply_to(o.data, 183), udp(PHONE), clock.advance(100))  # restarts Timer C
    st.receive(reply_to(o.data, 100), udp(PHONE), clock.advance(50))  # a 100 does not
    run_until(st, clock, start + 100 + TIMER_C - 0.1)
    assert _timeouts(events(st)) == [] and tx.state is TxState.PROCEEDING
    run_until(st, clock, start + 100 + TIMER_C + 0.1)
    assert [e.tx for e in _timeouts(events(st))] == [tx]
    assert len(st._timers) <= 3  # provisionals move the deadline; they do not pile up entries


def test_ict_vanished_callee_without_provisional_then_silent_after_cancel() -> None:
    """A CANCEL the callee answers 200 but never with 487: 64*T1 later the INVITE is over."""
    st, clock = make_stack(), FakeClock()
    tx = st.send_request(outgoing_request("INVITE"), udp(PHONE), clock.now)
    (o,) = st.datagrams_to_send()
    st.receive(reply_to(o.data, 180), udp(PHONE), clock.advance(0.1))
    events(st)
    ctx = st.cancel(tx, clock.now)
    assert ctx is not None
    (c,) = wire(st)
    st.receive(reply_to(c.serialize(), 200), udp(PHONE), clock.advance(0.1))
    st.receive(reply_to(o.data, 180), udp(PHONE), clock.advance(1))  # no longer extends anything
    events(st)
    sent_at = clock.now - 1.1
    run_until(st, clock, sent_at + 64 * T1 - 0.1)
    assert events(st) == [] and tx.state is TxState.PROCEEDING
    run_until(st, clock, sent_at + 64 * T1 + 0.1)
    (ev,) = events(st)
    assert isinstance(ev, TransactionTimeout) and ev.tx is tx
    assert tx.state is TxState.TERMINATED and st.transaction_count == 0


def test_ict_deferred_cancel_also_gets_the_64_t1_wait() -> None:
    st, clock = make_stack(), FakeClock()
    tx = st.send_request(outgoing_request("INVITE"), udp(PHONE), clock.now)
    (o,) = st.datagrams_to_send()
    st.cancel(tx, clock.now)
    st.receive(reply_to(o.data, 100), udp(PHONE), clock.advance(0.2))
    assert [m.method for m in wire(st)] == ["CANCEL"]
    run_until(st, clock, clock.now + 64 * T1 + 0.1)  # neither the CANCEL nor the INVITE answered
    assert tx in [e.tx for e in _timeouts(events(st))]
    assert st.transaction_count == 0


# -- responses the stack builds itself (RFC 3261 §8.2.6.2) -------------------------------------
NATTED = ("192.0.2.7", 40000)


@pytest.mark.parametrize(("mutate", "status"), [
    (lambda d: d.replace(b"CSeq: 1 OPTIONS", b"CSeq: 1 INVITE"), 400),
    (lambda d: d.replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1), 505),
])
def test_stack_error_responses_carry_to_tag_and_via_received(mutate, status: int) -> None:
    st, clock = make_stack(), FakeClock()
    st.receive(mutate(request()), udp(NATTED), clock.now)
    (r,) = wire(st)
    assert r.status == status and r.to.tag
    assert r.top_via.params["received"] == "192.0.2.7" and r.top_via.params["rport"] == "40000"


def test_stack_error_response_keeps_an_existing_to_tag_and_513_on_tcp() -> None:
    st, clock = make_stack(), FakeClock()
    data = request().replace(b"To: <sip:101@127.0.0.1>", b"To: <sip:101@127.0.0.1>;tag=dlg")
    st.receive(data, tcp(NATTED), clock.now, framing_error="Message too large")
    (o,) = st.datagrams_to_send()
    r = parse_message(o.data)
    assert o.close_after and r.status == 513
    assert r.get_all("to") == ["<sip:101@127.0.0.1>;tag=dlg"]
    assert r.top_via.params["received"] == "192.0.2.7"


def test_200_to_cancel_after_only_a_100_and_481_carry_a_to_tag() -> None:
    st, clock = make_stack(), FakeClock()
    st.receive(request("INVITE"), udp(), clock.now)
    assert [m.status for m in wire(st)] == [100]
    st.receive(request("CANCEL"), udp(), clock.now)
    (ok,) = wire(st)
    assert ok.status == 200 and ok.to.tag
    st.receive(request("CANCEL", branch="z9hG4bKother"), udp(), clock.now)
    (nomatch,) = wire(st)
    assert nomatch.status == 481 and nomatch.to.tag


def test_200_to_cancel_reuses_the_invite_responses_to_tag() -> None:
    st, clock = make_stack(), FakeClock()
    st.receive(request("INVITE"), udp(), clock.now)
    (inv,) = events(st)
    st.reply(inv.tx, 180, now=clock.now, to_tag="ringtag")
    wire(st)
    st.receive(request("CANCEL"), udp(), clock.now)
    (ok,) = wire(st)
    assert ok.status == 200 and ok.to.tag == "ringtag"


# -- SIP-Version is case-insensitive on receipt (RFC 3261 §7.1) ----------------------------------
def test_lowercase_sip_version_request_and_response_are_understood() -> None:
    st, clock = make_stack(), FakeClock()
    lower = request().replace(b" SIP/2.0\r\n", b" sip/2.0\r\n", 1).replace(b"SIP/2.0/UDP", b"sip/2.0/udp")
    st.receive(lower, udp(), clock.now)
    (ev,) = events(st)
    assert isinstance(ev, RequestReceived)
    st.reply(ev.tx, 200, now=clock.now, to_tag="t")
    (o,) = st.datagrams_to_send()
    assert o.data.startswith(b"SIP/2.0 200 OK\r\n")  # we send upper case
    tx = st.send_request(outgoing_request("OPTIONS"), udp(PHONE), clock.now)
    (o,) = st.datagrams_to_send()
    st.receive(reply_to(o.data, 200).replace(b"SIP/2.0 200", b"sip/2.0 200", 1), udp(PHONE), clock.now)
    (ev,) = events(st)
    assert isinstance(ev, ResponseReceived) and ev.tx is tx and ev.response.status == 200


# -- the same through the switch: a vanished callee no longer leaks its leg ---------------------
@pytest.mark.parametrize(("no_answer", "status"), [(300, 408), (60, 480)])
def test_switch_vanished_callee_ends_call_and_frees_every_transaction(no_answer: int,
                                                                      status: int) -> None:
    """Ringing for ever (Timer C: 408), or cancelled at the no-answer timeout and never 487."""
    from softpbx.config.loader import load_config
    from softpbx.core.events import Binding
    from softpbx.core.switch import Switch

    from .test_calls import ALICE, BOB, ROOT, FakeRelay, Net, answer, flow, place_call

    cfg = load_config(ROOT / "sip_profiles", ["calls.max_duration=0",
                                              f"calls.no_answer_timeout={no_answer}"])
    sw = Switch(config=cfg, auth_secret=b"s" * 32, relay=FakeRelay())
    for ext, addr in (("101", ALICE), ("102", BOB)):
        sw.registrar.load([Binding(aor=ext, contact=f"sip:{ext}@{addr[0]}:{addr[1]}", key=ext,
                                   expires_at=1e9, call_id=ext, cseq=1, flow=flow(addr))])
    net = Net(sw, FakeClock(), sw.relay)  # type: ignore[arg-type]
    place_call(net, "102")
    (b_inv,) = net.take(BOB)
    net.feed(answer(b_inv, 180), BOB)
    net.inbox.clear()
    net.advance(min(no_answer, TIMER_C) + 1)
    assert {m.method for m in net.take(BOB)} == {"CANCEL"}  # the callee stays silent
    assert {m.status for m in net.take(ALICE)} == {status} and sw.calls == {}
    net.advance(64 * T1 + 1)
    assert sw.stack.transaction_count == 0
