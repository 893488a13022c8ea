"""``GET /metrics``: Prometheus text exposition built with ``prometheus_client``.

Nothing on a hot path touches a metrics object. The SIP stack, the switch, the failure
tracker and the relay count in plain ints (:mod:`softpbx.core.stats`, ``SipStack.requests_in``
and friends, :class:`~softpbx.media.relay.RelayTotals`); :class:`SoftpbxCollector` reads them
when Prometheus scrapes and yields metric families built then. The collector sits on a
registry of its own per application (never the process-global one, so two servers in one
process -- the tests -- do not mix their numbers), together with ``prometheus_client``'s
process collector (CPU seconds, resident memory, open files).

The one thing measured here rather than counted elsewhere is the event loop's lag: a task
sleeps :data:`LAG_INTERVAL` seconds and records how late it woke up (a loop busy with a
burst of calls, or blocked by a slow call, shows as lag).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from ..config.schema import Transport
from ..core.routing import Direction
from ..core.stats import Histogram
from ..core.switch import Switch
from .outbox import Outbox
from .recording import RecordingManager
from .rtp_transport import RtpRelay

log = logging.getLogger("softpbx.metrics")

LAG_INTERVAL = 0.5
"""Seconds between two event-loop lag probes."""
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Webhook attempt latency bounds, seconds (the CRM answers in ms; a timeout is seconds)."""


class LagProbe:
    """How late the event loop runs a timer: the lag of the latest probe and a histogram."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = LAG_INTERVAL) -> None:
        self.loop = loop
        self.interval = interval
        self.last = 0.0
        self.histogram = Histogram(LAG_BUCKETS)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start probing (one sleep per ``interval``: nothing measurable against the calls)."""
        if self._task is None:
            self._task = self.loop.create_task(self._run())

    async def _run(self) -> None:
        loop = self.loop
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            lag = max(0.0, loop.time() - due)
            self.last = lag
            self.histogram.observe(lag)

    async def aclose(self) -> None:
        """Stop probing."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class TimedSender:
    """Wraps the outbox's sender: each attempt's latency goes into a plain histogram (the
    outbox already counts attempts and outcomes; this adds their time distribution)."""

    def __init__(self, inner: Any, histogram: Histogram) -> None:
        self.inner = inner
        self.histogram = histogram

    async def post(self, **kwargs: Any) -> Any:
        """One attempt through the real sender; its ``latency_ms`` is observed."""
        result = await self.inner.post(**kwargs)
        latency = getattr(result, "latency_ms", None)
        if isinstance(latency, (int, float)) and latency > 0:
            self.histogram.observe(latency / 1000.0)
        return result

    async def close(self) -> None:
        """Close the real sender."""
        await self.inner.close()


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets = [("+Inf" if b == float("inf") else repr(float(b)), n) for b, n in h.cumulative()]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.sum)


def _class_label(index: int) -> str:
    return f"{index}xx" if index else "other"


class SoftpbxCollector(Collector):
    """Reads the switch's plain counters at scrape time (``prometheus_client`` calls
    :meth:`collect` on every ``GET /metrics``)."""

    def __init__(self, *, switch: Switch, clock: Callable[[], float],
                 relay: RtpRelay | None = None, recordings: RecordingManager | None = None,
                 outbox: Outbox | None = None, lag: LagProbe | None = None,
                 webhook_latency: Histogram | None = None) -> None:
        self.switch = switch
        self.clock = clock
        self.relay = relay
        self.recordings = recordings
        self.outbox = outbox
        self.lag = lag
        self.webhook_latency = webhook_latency
        self.started = time.time()

    def collect(self) -> Iterator[Metric]:
        """Every softpbx family, built from the counters as they are now."""
        yield from self._sip()
        yield from self._calls()
        yield from self._media()
        yield from self._recordings()
        yield from self._webhooks()
        g = GaugeMetricFamily("softpbx_start_time_seconds", "When softpbx started (Unix time).")
        g.add_metric([], self.started)
        yield g
        if self.lag is not None:
            g = GaugeMetricFamily("softpbx_event_loop_lag_seconds",
                                  "How late the latest event-loop probe timer ran.")
            g.add_metric([], self.lag.last)
            yield g
            yield _histogram("softpbx_event_loop_lag_probe_seconds",
                             f"Event-loop lag of each probe ({self.lag.interval} s apart).",
                             self.lag.histogram)

    def _sip(self) -> Iterator[Metric]:
        sw = self.switch
        now = self.clock()
        regs = GaugeMetricFamily("softpbx_registrations",
                                 "Registered contacts a call can reach, by transport.",
                                 labels=["transport"])
        by_tp = dict.fromkeys((t.value for t in Transport), 0)
        for ext in sw.extensions:
            for b in sw.registrar.lookup(ext, now):
                tp = b.flow.transport.value
                by_tp[tp] = by_tp.get(tp, 0) + 1
        for tp, n in by_tp.items():
            regs.add_metric([tp], n)
        yield regs
        stack = sw.stack
        req = CounterMetricFamily("softpbx_sip_requests", "SIP requests (retransmissions "
                                  "included), by direction and method.",
                                  labels=["direction", "method"])
        for method, n in sorted(stack.requests_in.items()):
            req.add_metric(["in", method], n)
        for raw, n in sorted(stack.requests_out.items()):
            req.add_metric(["out", raw.decode("ascii", "replace")], n)
        yield req
        resp = CounterMetricFamily("softpbx_sip_responses", "SIP responses (retransmissions "
                                   "included), by direction and status class.",
                                   labels=["direction", "status_class"])
        for direction, counts in (("in", stack.responses_in), ("out", stack.responses_out)):
            for i, n in enumerate(counts):
                if i or n:
                    resp.add_metric([direction, _class_label(i)], n)
        yield resp
        yield _counter("softpbx_sip_transactions_active", "SIP transactions alive now.",
                       stack.transaction_count, gauge=True)
        f = sw.failures
        yield _counter("softpbx_auth_failures", "Failed authentications (SIP digest, API and "
                       "click-to-call tokens).", f.failures_total)
        yield _counter("softpbx_auth_bans", "Source addresses banned after too many failures.",
                       f.bans_total)
        yield _counter("softpbx_auth_banned_sources", "Source addresses banned now (an expired "
                       "ban lapses at the source's next request).", f.banned_count, gauge=True)

    def _calls(self) -> Iterator[Metric]:
        sw = self.switch
        active = GaugeMetricFamily("softpbx_calls_active", "Calls in progress, by direction.",
                                   labels=["direction"])
        counts = dict.fromkeys((d.value for d in Direction), 0)
        for call in list(sw.calls.values()):
            counts[call.route.direction.value] += 1
        for d, n in counts.items():
            active.add_metric([d], n)
        yield active
        ended = CounterMetricFamily("softpbx_calls_ended", "Calls ended, by direction and CDR "
                                    "disposition.", labels=["direction", "disposition"])
        for (d, disp), n in sorted(sw.stats.ended.items()):
            ended.add_metric([d, disp], n)
        yield ended
        yield _histogram("softpbx_call_setup_seconds", "Answered calls: seconds from the "
                         "INVITE (or click) to the answer.", sw.stats.setup)
        yield _counter("softpbx_dialogs_active", "SIP dialogs alive now.", sw.dialog_count,
                       gauge=True)

    def _media(self) -> Iterator[Metric]:
        relay = self.relay
        if relay is None:
            return
        t = relay.closed
        packets, rejected, unroutable, nbytes = t.packets_in, t.rejected, t.unroutable, t.bytes_in
        for session in relay.sessions:
            for s in session.streams():
                packets += s.packets_in
                nbytes += s.bytes_in
                rejected += s.rejected
                unroutable += s.unroutable
        yield _counter("softpbx_rtp_packets_relayed", "RTP and RTCP packets forwarded by the "
                       "relay.", packets - unroutable)
        yield _counter("softpbx_rtp_bytes_relayed", "Bytes of RTP and RTCP accepted by the "
                       "relay.", nbytes)
        dropped = CounterMetricFamily("softpbx_rtp_packets_dropped", "Packets the relay did "
                                      "not forward, by reason.", labels=["reason"])
        dropped.add_metric(["source"], rejected)
        dropped.add_metric(["no_destination"], unroutable)
        yield dropped
        yield _counter("softpbx_relay_sessions", "Media relay sessions open now (one per "
                       "call with media).", relay.session_count, gauge=True)
        yield _counter("softpbx_relay_sessions_opened", "Media relay sessions opened.",
                       t.opened)
        yield _counter("softpbx_rtp_ports_in_use", "RTP port pairs allocated.",
                       relay.ports_in_use, gauge=True)

    def _recordings(self) -> Iterator[Metric]:
        rec = self.recordings
        if rec is None:
            return
        st = rec.stats()
        yield _counter("softpbx_recordings_in_progress", "Calls being recorded or finalised.",
                       st.active, gauge=True)
        yield _counter("softpbx_recordings_finished", "Recordings published.", st.recorded)
        failed = CounterMetricFamily("softpbx_recordings_failed", "Calls not recorded, by "
                                     "reason.", labels=["reason"])
        failed.add_metric(["encoder_overloaded"], st.overloaded)
        failed.add_metric(["other"], st.failed - st.overloaded)
        yield failed
        yield _counter("softpbx_recording_encode_queue", "MP3 jobs queued or running.",
                       st.backlog, gauge=True)

    def _webhooks(self) -> Iterator[Metric]:
        ob = self.outbox
        if ob is None:
            return
        yield _counter("softpbx_webhooks_delivered", "Webhook events the CRM confirmed (2xx).",
                       ob.delivered)
        finals = ob.delivered + ob.failed + ob.given_up
        yield _counter("softpbx_webhooks_retried", "Webhook attempts that failed and were "
                       "scheduled again.", max(0, ob.attempts - finals))
        failed = CounterMetricFamily("softpbx_webhooks_failed", "Webhook events that will not "
                                     "be sent again, by reason.", labels=["reason"])
        failed.add_metric(["refused"], ob.failed)
        failed.add_metric(["given_up"], ob.given_up)
        yield failed
        yield _counter("softpbx_webhook_attempts", "Webhook POSTs made.", ob.attempts)
        yield _counter("softpbx_webhook_outbox_depth", "Webhook events waiting for delivery "
                       "held in memory (the rest wait in the database).", ob.held, gauge=True)
        yield _counter("softpbx_webhooks_in_flight", "Webhook POSTs under way.", ob.in_flight,
                       gauge=True)
        if self.webhook_latency is not None:
            yield _histogram("softpbx_webhook_latency_seconds", "Seconds per webhook attempt "
                             "until the CRM's answer (or the error).", self.webhook_latency)


def _counter(name: str, doc: str, value: float, *, gauge: bool = False) -> Metric:
    fam: Metric = (GaugeMetricFamily(name, doc) if gauge else CounterMetricFamily(name, doc))
    fam.add_metric([], value)  # type: ignore[attr-defined]
    return fam


class Metrics:
    """The per-application registry, the lag probe and the ``/metrics`` handler."""

    def __init__(self, *, switch: Switch, loop: asyncio.AbstractEventLoop,
                 relay: RtpRelay | None = None, recordings: RecordingManager | None = None,
                 outbox: Outbox | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.lag = LagProbe(loop)
        latency: Histogram | None = None
        if outbox is not None:
            latency = Histogram(LATENCY_BUCKETS)
            outbox.sender = TimedSender(outbox.sender, latency)
        self.collector = SoftpbxCollector(switch=switch, clock=loop.time, relay=relay,
                                          recordings=recordings, outbox=outbox, lag=self.lag,
                                          webhook_latency=latency)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)

    def exposition(self) -> bytes:
        """The text format, as a scrape gets it."""
        return generate_latest(self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        """``GET /metrics`` (behind the ``/api`` access rule)."""
        resp = web.Response(body=self.exposition())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    def install(self, app: web.Application) -> None:
        """Add ``GET /metrics`` to ``app`` and start the lag probe."""
        app.router.add_get("/metrics", self.handle)
        self.lag.start()

    async def aclose(self) -> None:
        """Stop the lag probe."""
        await self.lag.aclose()

