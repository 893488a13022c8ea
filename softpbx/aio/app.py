"""Start and stop the whole switch: store, SIP listeners, HTTP server (the one place that wires
everything together and owns the event loop)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import ipaddress
import json
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..config.loader import data_dir, resolve_path, split_host_port
from ..config.schema import Config, ConfigError, Gateway, Transport
from ..core.events import OriginateRefused
from ..core.reconfig import ReloadResult
from ..core.switch import Switch
from ..crm.webhook import WebhookSender
from ..http.app import make_app
from ..http.inspector import CrmInspector
from ..store.cdr_search import CdrSearch
from ..store.outbox import OutboxDb
from ..store.sqlite import SqliteStore
from .capture import SipCapture, install_capture
from .console import console_sources
from .driver import SwitchDriver
from .metrics import Metrics
from .outbox import Outbox
from .recording import FinishedRecording, RecordingManager
from .rtp_transport import RtpRelay
from .tls import client_context, server_context

log = logging.getLogger("softpbx")


class Server:
    """A running softpbx: ``await start()``, then ``await stop()``."""

    def __init__(self, *, config: Config) -> None:
        self.config = config
        self.switch = Switch(config=config)
        self.store: SqliteStore | None = None
        self.driver: SwitchDriver | None = None
        self.http_runner: web.AppRunner | None = None
        self.relay: RtpRelay | None = None
        self.recordings: RecordingManager | None = None
        self.outbox: Outbox | None = None
        self.inspector: CrmInspector | None = None
        self._cdr_search: CdrSearch | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self.capture: SipCapture | None = None
        self.metrics: Metrics | None = None
        self.pid_path = os.path.join(data_dir(config), PID_FILE)
        """Where ``softpbx reload`` finds the running process (written once it runs)."""
        self._tls_names: dict[tuple[str, int], str] = {}
        """Resolved TLS gateway address -> the host name its certificate must name."""

    async def start(self) -> None:
        """Open the store and every listener; log one line per listener."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        db_path = resolve_path(cfg, cfg.global_.db_path)
        os.makedirs(os.path.dirname(db_path) or ".", exist_ok=True)
        self.store = SqliteStore(path=db_path, timezone=cfg.global_.timezone)
        bindings = self.store.load_bindings(now=loop.time(), wall=time.time())
        self.switch.load_bindings(bindings)
        # No TCP connection outlives the process: a binding registered over one has a dead flow.
        for b in bindings:
            if b.flow.reliable:
                self.switch.flow_closed(b.flow, loop.time())
        log.info("store %s: %d registrations restored", db_path, len(bindings))
        _raise_nofile_limit()
        self.relay = RtpRelay(settings=cfg.media, loop=loop)
        self.switch.relay = self.relay
        await self._resolve_gateways(loop)
        self.driver = SwitchDriver(switch=self.switch, store=self.store, loop=loop)
        self.driver.transports.tls_names.update(self._tls_names)
        self.switch.wall_offset = self.driver.wall_offset()  # refreshed by _housekeep
        self.capture = install_capture(cfg, self.driver.transports, loop)
        self._start_outbox(loop, db_path)
        if cfg.recording.enabled:
            rec_dir = resolve_path(cfg, cfg.recording.dir)
            self.recordings = RecordingManager(
                settings=cfg.recording, directory=rec_dir, public_base_url=cfg.http.public_base_url,
                store=self.store, loop=loop, on_finished=self._recording_finished)
            await self.recordings.recover()
            self.driver.recordings = self.recordings
            log.info("recording calls into %s", rec_dir)
        seen: set[tuple[str, int]] = set()
        for profile in (cfg.internal, cfg.external):
            addr = (profile.sip_ip, profile.sip_port)
            if addr in seen:
                log.info("profile %s shares %s:%d", profile.name, *addr)
                continue
            seen.add(addr)
            try:
                lines = await self.driver.transports.listen(profile.sip_ip, profile.sip_port,
                                                            profile.transports)
            except OSError as exc:
                raise _bind_error(f"SIP profile {profile.name} ({profile.name}.toml)",
                                  profile.sip_ip, profile.sip_port, exc) from exc
            for line in lines:
                log.info("%s (profile %s)", line, profile.name)
        await self._listen_tls()
        self.switch.start(loop.time())
        self.driver.kick()
        if cfg.http.http_port:
            sources, self._cdr_search = console_sources(self, db_path)
            app = make_app(switch=self.switch, clock=loop.time, cdr_fetch=self.store.recent_cdrs,
                           recording_lookup=self.store.recording_by_hash,
                           originate=self._originate, outbox=self.outbox,
                           inspector=self.inspector, console_sources=sources)
            self.metrics = Metrics(switch=self.switch, loop=loop, relay=self.relay,
                                   recordings=self.recordings, outbox=self.outbox)
            self.metrics.install(app)  # GET /metrics, behind the /api access rule
            self.http_runner = web.AppRunner(app, access_log=None)
            await self.http_runner.setup()
            site = web.TCPSite(self.http_runner, cfg.http.http_ip, cfg.http.http_port,
                               reuse_address=True)
            try:
                await site.start()
            except OSError as exc:
                raise _bind_error("HTTP ([http] in softpbx.toml)", cfg.http.http_ip,
                                  cfg.http.http_port, exc) from exc
            log.info("HTTP listening on http://%s:%d", cfg.http.http_ip, cfg.http.http_port)
        self._housekeeping = loop.create_task(self._housekeep())
        # Everything built so far (config, tables, modules) lives as long as the process:
        # keep it out of every future collection.
        gc.collect()
        gc.freeze()
        # Calls, legs and transactions are freed by reference counting (tests check that
        # no cycles are left), so the collector only finds the odd cycle: with CPython's
        # default of a young collection every 700 allocations it cost ~25 % of the CPU per
        # call (bench/cps_bench.sh: 1.94 -> 1.42 ms/call at 200 calls/s with these). The
        # older generations keep CPython's cadence relative to it (a full collection at most
        # every 10M allocations, ~10-20 s under load), so cycles from elsewhere (aiohttp,
        # tracebacks) that outlive the young collections are still reclaimed.
        gc.set_threshold(50_000, 20, 10)

    async def _listen_tls(self) -> None:
        """The TLS listener of each profile with ``"tls"`` (once per address: profiles may
        share one, the first one's files serve it) and the context of the connections opened
        from it (the loader already checked that the files load)."""
        assert self.driver is not None
        transports = self.driver.transports
        root = self.config.profiles_dir
        for profile in (self.config.internal, self.config.external):
            local = (profile.sip_ip, profile.tls_port)
            if Transport.TLS not in profile.transports or local in transports.tls_client:
                continue
            transports.tls_client[local] = client_context(profile, root)
            line = await transports.listen_tls(profile.sip_ip, profile.tls_port,
                                               server_context(profile, root))
            log.info("%s (profile %s)", line, profile.name)

    async def reload(self, config: Config) -> ReloadResult:
        """Apply a re-read (and validated) configuration to the running switch: extensions,
        gateways and the dial plan at once, for new calls; the rest is logged as needing a
        restart (:meth:`Switch.reload`). Gateways named by host name are resolved first."""
        loop = asyncio.get_running_loop()
        old = {g.name: g for g in self.switch.config.gateways}
        result = self.switch.reload(config, loop.time())
        self.config = self.switch.config
        fresh = [g for g in self.config.gateways if old.get(g.name) != g]
        if fresh:
            await self._resolve_gateways(loop, fresh)
            if self.driver is not None:
                self.driver.transports.tls_names.update(self._tls_names)
        if self.driver is not None:
            self.driver.kick()  # the un-REGISTERs and REGISTERs of changed gateways
        log.info("configuration reloaded: %s", result.summary())
        return result

    def write_pid(self) -> None:
        """``<data dir>/softpbx.pid``: how ``softpbx reload`` finds this process."""
        with open(self.pid_path, "w", encoding="ascii") as fh:
            fh.write(f"{os.getpid()}\n")

    def remove_pid(self) -> None:
        """Remove the pid file if it is still ours (a second instance may have replaced it)."""
        with contextlib.suppress(OSError, ValueError):
            with open(self.pid_path, encoding="ascii") as fh:
                if int(fh.read().strip()) != os.getpid():
                    return
            os.unlink(self.pid_path)

    def _start_outbox(self, loop: asyncio.AbstractEventLoop, db_path: str) -> None:
        """The webhook outbox, posting to ``crm.webhook_url`` or to the built-in inspector.
        Started before the listeners: a call's events are accepted from the first INVITE,
        and what an earlier run left pending goes out now."""
        crm, http = self.config.crm, self.config.http
        url = crm.webhook_url
        if not url:
            if not http.http_port:
                log.warning("CRM webhooks off: no crm.webhook_url and the HTTP server (and "
                            "so the built-in inspector) is disabled")
                self.switch.notifier.enabled = frozenset()  # no events, no call waits for one
                return
            self.inspector = CrmInspector()
            host = http.http_ip
            if host in ("0.0.0.0", "::"):
                host = "127.0.0.1" if host == "0.0.0.0" else "::1"
            host = f"[{host}]" if ":" in host else host
            url = f"http://{host}:{http.http_port}/crm/webhook"

        def deliver(fn: Callable[[], None]) -> None:
            # From the outbox's writer thread; after the loop closed there is nobody to tell.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn)

        sender = WebhookSender(url=url, timeout_s=crm.request_timeout_ms / 1000.0,
                               max_in_flight=crm.max_in_flight, secret=crm.signature_secret)
        assert self.driver is not None
        self.outbox = Outbox(settings=crm, db=OutboxDb(path=db_path, deliver=deliver),
                             sender=sender, loop=loop, on_answer=self.driver.crm_answer)
        self.driver.outbox = self.outbox
        self.outbox.start()
        log.info("CRM webhooks to %s%s", url, " (built-in inspector at /crm/)"
                 if self.inspector is not None else "")

    def _recording_finished(self, result: FinishedRecording) -> None:
        if self.driver is not None:
            self.driver.recording_finished(result.call_id, result.link)

    def _originate(self, extension: str, number: str, *, caller_name: str = "",
                   auto_answer: bool = False) -> str | OriginateRefused:
        """Click-to-call and ``POST /api/calls``: the switch's origination at loop time, then
        the core's output flushed (the INVITEs go out now, the timers are re-armed)."""
        assert self.driver is not None
        loop = asyncio.get_running_loop()
        try:
            return self.switch.originate(extension, number, loop.time(), caller_name=caller_name,
                                         auto_answer=auto_answer)
        finally:
            self.driver.kick()  # even after a bug: whatever was queued before it still goes

    async def _resolve_gateways(self, loop: asyncio.AbstractEventLoop,
                                gateways: list[Gateway] | None = None) -> None:
        """Gateways named by host name are resolved at start-up (and when a reload adds or
        changes them)."""
        for gw in self.config.gateways if gateways is None else gateways:
            host, port = split_host_port(gw.proxy)
            if gw.transport is Transport.TLS:
                port = port or 5061  # RFC 3263 §4.2: the TLS default port
            try:
                ipaddress.ip_address(host)
                continue
            except ValueError:
                pass
            try:
                infos = await loop.getaddrinfo(host, port or 5060, type=socket.SOCK_DGRAM)
            except OSError as exc:
                # Not a configuration error (DNS may be down for a while): the rest of the
                # switch runs; calls through this gateway fail until the next start.
                log.error("gateway %s: cannot resolve %s: %s; its calls will fail", gw.name,
                          host, exc)
                continue
            ip, p = infos[0][4][0], infos[0][4][1]
            # RFC 5922 §7.2: the certificate must name the host the proxy was given as.
            self._tls_names[(ip, p)] = host
            self.switch.set_gateway_address(gw.name, (ip, p))
            log.info("gateway %s: %s resolved to %s:%d", gw.name, gw.proxy, ip, p)

    async def _hang_up_calls(self, loop: asyncio.AbstractEventLoop, wait: float = 1.0) -> None:
        """BYE/CANCEL every live call so each writes its CDR and its phones stop; wait
        (bounded) for the dialogs to end, so a BYE waiting for a caller's ACK still goes."""
        assert self.driver is not None
        n = len(self.switch.calls)
        if not n:
            return
        log.info("hanging up %d calls", n)
        self.switch.shutdown(loop.time())
        self.driver.kick()
        deadline = loop.time() + wait
        while loop.time() < deadline and self.switch.dialog_count:
            await asyncio.sleep(0.05)

    async def _unregister_gateways(self, loop: asyncio.AbstractEventLoop,
                                   wait: float = 2.0) -> None:
        """REGISTER with Expires: 0 to every provider we are registered to; wait (bounded)
        for their answers, so the provider stops sending calls to a switch that is gone."""
        assert self.driver is not None
        if not self.switch.unregister_gateways(loop.time()):
            return
        self.driver.kick()
        deadline = loop.time() + wait
        regs = self.switch.gateway_registrations.values()
        while loop.time() < deadline and any(r.unregistering for r in regs):
            await asyncio.sleep(0.05)

    async def _housekeep(self) -> None:
        loop = asyncio.get_running_loop()
        idle = float(self.config.sip.tcp_idle_timeout)
        ticks = 0
        while True:
            if self.recordings is not None and ticks % 120 == 0:  # at start, then hourly
                await loop.run_in_executor(None, self.recordings.enforce_retention)
            ticks += 1
            await asyncio.sleep(30.0)
            if self.driver is not None:
                # Wall-clock steps (NTP) reach the Date headers within 30 s.
                self.switch.wall_offset = self.driver.wall_offset()
                now = loop.time()
                # A connection a registration lives on stays open until the binding lapses.
                n = self.driver.transports.tcp.close_idle(
                    now, idle, keep=functools.partial(self.switch.registrar.holds_binding,
                                                      now=now))
                if n:
                    log.info("closed %d idle TCP connections", n)

    async def stop(self) -> None:
        """Withdraw provider registrations, close listeners, flush the store."""
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self.driver is not None:
            loop = asyncio.get_running_loop()
            await self._hang_up_calls(loop)
            await self._unregister_gateways(loop)
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        if self._cdr_search is not None:
            self._cdr_search.close()
        if self.driver is not None:
            self.driver.close()
            await self.driver.transports.close()
        if self.capture is not None:
            self.capture.close()
        if self.metrics is not None:
            await self.metrics.aclose()
        if self.recordings is not None:
            await self.recordings.aclose()
        if self.outbox is not None:
            # After the calls were hung up and the recordings finalised: their NOTIFY_END and
            # NOTIFY_RECORD (already handed over by the driver) are committed before it stops.
            await self.outbox.stop()
        if self.relay is not None:
            await self.relay.aclose()
        if self.store is not None:
            self.store.close()
        log.info("stopped")


PID_FILE = "softpbx.pid"
"""In the data directory while softpbx runs: its process id."""
RELOAD_STATUS_FILE = "softpbx.reload"
"""In the data directory: the outcome of the last reload, as JSON (read by ``softpbx
reload``): ``{"pid", "serial", "ok", "message"}``."""


async def run_forever(config: Config, load: Callable[[], Config] | None = None) -> None:
    """Run until SIGINT/SIGTERM; on SIGHUP re-read the configuration with ``load`` (the
    same profiles directory and ``--set`` options as at start) and apply it."""
    server = Server(config=config)
    try:
        await server.start()
    except BaseException:
        # Whatever was opened before the failure (store, outbox thread, listeners) is
        # closed, so the error message is the last thing the process says.
        with contextlib.suppress(Exception):
            await server.stop()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: list[asyncio.Task[None]] = []
    serial = 0

    async def reload() -> None:
        nonlocal serial
        serial += 1
        try:
            assert load is not None
            result = await server.reload(load())
            ok, message = True, result.summary()
        except ConfigError as exc:
            # Refused whole: the running configuration stays as it is.
            ok, message = False, f"configuration error: {exc}; the running configuration stays"
            log.error("reload refused: %s", message)
        except Exception as exc:  # a bug must not take the running switch down
            log.exception("reload failed")
            ok, message = False, f"internal error: {exc}"
        _write_status(os.path.join(data_dir(config), RELOAD_STATUS_FILE),
                      {"pid": os.getpid(), "serial": serial, "ok": ok, "message": message})

    def on_hup() -> None:
        log.info("SIGHUP: re-reading the configuration from %s", config.profiles_dir)
        # One at a time, in order: a second HUP during a reload waits for the first.
        prev = reloads[-1] if reloads else None

        async def chained() -> None:
            if prev is not None:
                await asyncio.gather(prev, return_exceptions=True)
            await reload()
        reloads[:] = [loop.create_task(chained())]

    if load is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    server.write_pid()
    log.info("softpbx running (pid %d); Ctrl-C stops it%s", os.getpid(),
             ", SIGHUP or `softpbx reload` re-reads the configuration" if load else "")
    try:
        await stop.wait()
    finally:
        if load is not None:
            loop.remove_signal_handler(signal.SIGHUP)
        if reloads:
            await asyncio.gather(*reloads, return_exceptions=True)
        server.remove_pid()
        await server.stop()


def _write_status(path: str, status: dict[str, object]) -> None:
    """Replace the reload status file atomically (the CLI may be reading it)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(status, fh)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)


def _bind_error(what: str, ip: str, port: int, exc: OSError) -> OSError:
    """``exc`` (``[Errno 99] Cannot assign requested address``) naming what could not
    listen where, so the operator knows which key to fix."""
    host = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    # asyncio words some of them its own way ("error while attempting to bind on address
    # ('127.0.0.1', 8080): address already in use"): the errno's text says it plainly.
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return OSError(exc.errno, f"{what} cannot listen on {host}: {reason}")


class _HttpParseErrorFilter(logging.Filter):
    """aiohttp logs a malformed request (a scanner, TLS on the HTTP port) with a 10-line
    traceback: one line is what an operator needs; aiohttp already answered it 400."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            why = " ".join(str(exc.message).split())[:200]
            record.msg, record.args = "%s: %d %s", (record.getMessage(), exc.code, why)
            record.exc_info = record.exc_text = None
            if record.levelno > logging.INFO:
                record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _raise_nofile_limit() -> None:
    """Every relayed call holds four UDP sockets: lift the soft file limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(config: Config, load: Callable[[], Config] | None = None) -> None:
    """Run the switch on uvloop where available (stock asyncio costs 2.3x per RTP packet);
    ``load`` re-reads the configuration on SIGHUP."""
    logging.getLogger("aiohttp.server").addFilter(_HttpParseErrorFilter())
    try:
        import uvloop
    except ImportError:  # pragma: no cover - non-Linux
        uvloop = None  # type: ignore[assignment]
    if uvloop is not None and sys.platform != "win32":
        uvloop.run(run_forever(config, load))
    else:  # pragma: no cover
        asyncio.run(run_forever(config, load))
