"""pyVoIP as a real softphone: it registers as 102 and deregisters when stopped.

pyVoIP 1.6.8 answers only 401 challenges, without qop (RFC 2069), with the digest uri
``sip:<server>;transport=UDP`` which differs from its Request-URI ``sip:<server>``, and adds
``+sip.instance`` to its Contact: a good stand-in for a cheap desk phone.

pyVoIP blocks and starts threads of its own: every call into it runs in a daemon thread
joined with a timeout, its socket waits are cut to a few seconds, and it is always stopped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from pyVoIP.VoIP import PhoneStatus, VoIPPhone

from tests.support.server import HOST, PbxProcess, free_port

pytestmark = pytest.mark.integration

PYVOIP_WAIT_S = 3
"""pyVoIP's own socket wait (its default, 30 s, would outlast the test)."""
CALL_TIMEOUT_S = 15.0


def _bounded(fn: Callable[[], object], what: str, timeout: float = CALL_TIMEOUT_S) -> None:
    """Run a blocking pyVoIP call in a daemon thread; fail (not hang) if it overruns."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the test thread below
            errors.append(exc)

    t = threading.Thread(target=target, name=f"pyvoip-{what}", daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"pyVoIP {what} did not return within {timeout}s"
    if errors:
        raise AssertionError(f"pyVoIP {what} failed: {errors[0]!r}") from errors[0]


def _phone(pbx: PbxProcess, user: str, password: str) -> VoIPPhone:
    rtp_low = free_port(tcp=False)
    phone = VoIPPhone(HOST, pbx.sip_port, user, password, myIP=HOST,
                      sipPort=free_port(tcp=False), rtpPortLow=rtp_low, rtpPortHigh=rtp_low + 10)
    phone.sip.register_timeout = PYVOIP_WAIT_S
    return phone


@pytest.fixture
def phones() -> Iterator[list[VoIPPhone]]:
    """Phones a test started; each is stopped (bounded) afterwards, whatever happened."""
    started: list[VoIPPhone] = []
    yield started
    for phone in started:
        if phone.get_status() not in (PhoneStatus.INACTIVE, PhoneStatus.FAILED):
            _bounded(phone.stop, "stop")


def _wait_status(phone: VoIPPhone, want: PhoneStatus, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while phone.get_status() != want:
        assert time.monotonic() < deadline, f"phone status {phone.get_status()}, wanted {want}"
        time.sleep(0.05)


def test_pyvoip_registers_as_102_and_deregisters(pbx: PbxProcess, phones: list[VoIPPhone]) -> None:
    phone = _phone(pbx, "102", "secret102")
    phones.append(phone)
    _bounded(phone.start, "start")
    assert phone.get_status() == PhoneStatus.REGISTERED
    row, = pbx.wait_registrations("102", 1)
    my_port = phone.sip.myPort
    assert row["contact"] == f"sip:102@{HOST}:{my_port};transport=UDP"
    assert row["source"] == f"udp:{HOST}:{my_port}"
    assert row["user_agent"].startswith("pyVoIP")
    # pyVoIP asks for 120 s (registrar.min_expires is 60, max 3600): granted as asked.
    assert 110 <= row["expires_in"] <= 120
    assert 'user="102"' not in pbx.log_text(), "no authentication failure expected"
    _bounded(phone.stop, "stop")
    assert phone.get_status() == PhoneStatus.INACTIVE
    pbx.wait_registrations("102", 0)


def test_pyvoip_with_a_wrong_password_is_not_registered(pbx: PbxProcess,
                                                        phones: list[VoIPPhone]) -> None:
    """403 after the challenge: pyVoIP gives up after its failure threshold, nothing bound."""
    phone = _phone(pbx, "102", "not-the-password")
    phones.append(phone)
    _bounded(phone.start, "start")
    _wait_status(phone, PhoneStatus.FAILED)
    assert pbx.registrations() == []
    pbx.wait_for_log('user="102" reason=wrong_password')
