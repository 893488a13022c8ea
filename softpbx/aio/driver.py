"""Feeds the sans-IO switch from the transports and carries out what it asks (aioquic-style).

After every input: send what the core queued, hand store actions to the store, and re-arm
the single loop timer at ``switch.get_timer()``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..core.events import RecordingCodecs, SendWebhook, StartRecording, StopRecording
from ..core.notify import CrmAnswer
from ..core.switch import Switch
from ..sip.events import Flow
from ..store.api import Store
from .outbox import Outbox
from .recording import RecordingManager
from .sip_transport import SipTransports

log = logging.getLogger("softpbx.driver")


class SwitchDriver:
    """The asyncio shell around one :class:`Switch`."""

    def __init__(self, *, switch: Switch, store: Store | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.switch = switch
        self.store = store
        self.loop = loop
        sip = switch.config.sip
        self.transports = SipTransports(receiver=self.receive, max_size=sip.max_message_size,
                                        max_connections=sip.tcp_max_connections,
                                        max_per_ip=sip.tcp_max_connections_per_ip,
                                        on_closed=self.flow_closed)
        self.recordings: RecordingManager | None = None
        """Set by the app when recording is on."""
        self.outbox: Outbox | None = None
        """Set by the app when CRM webhooks go somewhere (a URL or the inspector)."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._store_handle: asyncio.TimerHandle | None = None
        self._closed = False

    def wall_offset(self) -> float:
        """Wall-clock time minus loop time (the store keeps wall times)."""
        return time.time() - self.loop.time()

    def receive(self, data: bytes, flow: Flow, framing_error: str | None) -> None:
        """Transport callback: one message (or keep-alive) from ``flow``."""
        try:
            self.switch.receive(data, flow, self.loop.time(), framing_error=framing_error)
        except Exception:
            # Protocol errors never get here (the core answers them); this is a bug in softpbx.
            # Log it with its traceback and keep serving everyone else.
            log.exception("internal error handling %d bytes from %s", len(data), flow)
        self._after_input()

    def flow_closed(self, flow: Flow) -> None:
        """Transport callback: a TCP connection closed (either side, or a cap)."""
        if self._closed:
            return  # shutting down: every connection goes, the bindings stay as they are
        self.switch.flow_closed(flow, self.loop.time())
        self._after_input()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self.switch.handle_timer(self.loop.time())
        except Exception:
            log.exception("internal error in a timer")
        self._after_input()

    def _after_input(self) -> None:
        sw = self.switch
        send = self.transports.send
        for out in sw.datagrams_to_send():
            send(out)
        action = sw.next_action()
        if action is not None:
            offset = self.wall_offset()
            while action is not None:
                if isinstance(action, SendWebhook):
                    if self.outbox is not None:
                        self.outbox.submit(action)
                    elif action.wants_answer:  # no CRM to ask: route now, not at the deadline
                        self.loop.call_soon(self.crm_answer, action.pbx_call_id,
                                            CrmAnswer.failed("no CRM webhook destination"))
                elif isinstance(action, StartRecording):
                    if self.recordings is not None:
                        self.recordings.start(action)
                elif isinstance(action, StopRecording):
                    if self.recordings is not None:
                        self.recordings.stop(action.call_id, action.at)
                elif isinstance(action, RecordingCodecs):
                    if self.recordings is not None:
                        self.recordings.set_codecs(action.call_id, action.caller, action.callee)
                elif self.store is not None:
                    self.store.apply(action, wall_offset=offset)
                action = sw.next_action()
        store = self.store
        if store is not None and store.buffered and self._store_handle is None:
            self._store_handle = self.loop.call_later(0.05, self._hand_over)
        when = sw.get_timer()
        if when != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(when, self._on_timer) if when is not None else None
            self._timer_at = when

    def _hand_over(self) -> None:
        self._store_handle = None
        if self.store is not None:
            self.store.hand_over()

    def crm_answer(self, pbx_call_id: str, answer: CrmAnswer) -> None:
        """The outcome of a NOTIFY_START's first attempt: into the switch, then flush."""
        try:
            self.switch.crm_answer(pbx_call_id, answer, self.loop.time())
        except Exception:  # a bug in softpbx: logged with its traceback, the loop goes on
            log.exception("internal error applying the CRM answer of %s", pbx_call_id)
        self._after_input()

    def recording_finished(self, call_id: str, link: str | None) -> None:
        """A call's recording is final (``link`` None: not recorded): into the switch (its
        NOTIFY_RECORD), then flush."""
        try:
            self.switch.recording_finished(call_id, link, self.loop.time())
        except Exception:  # as above
            log.exception("internal error reporting the recording of %s", call_id)
        self._after_input()

    def kick(self) -> None:
        """Flush what the switch queued and re-arm the timer after an input from outside the
        transports (start-up load, a CRM answer, a finished recording)."""
        self._after_input()

    def close(self) -> None:
        """Stop the timer."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
