"""``softpbx demo``: the whole switch at work with no phones and no CRM.

It starts softpbx in this process on a temporary copy of the profiles (free 127.0.0.1
ports), two softphones (101 and 102) and a simulated carrier (:mod:`softpbx.demo_ua`, real
SIP and RTP over UDP on 127.0.0.1), and places three calls, each with its own sound
(:mod:`softpbx.demo_audio`) so the recordings are worth playing:

1. the carrier calls the DID routed to 101, and 101 answers;
2. 101 calls 102;
3. click-to-call: ``POST /click-to-call`` from 101 to an outside number (101 rings first,
   then the carrier is dialled and answers).

The CRM events go to the built-in inspector (``crm.webhook_url`` empty); the demo reads its
JSON feed (``/crm/events.json``) and prints each event as it arrives, then the recording
links, then leaves everything running (Ctrl-C stops it) and prints the HTTP base URL.
``--exit-when-done`` stops once every promised event and recording arrived: exit status 0,
or 1 with what was missing. The outcome is also written to ``<workdir>/demo-result.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("softpbx.demo")

HOST = "127.0.0.1"
CARRIER_NUMBER = "79161234567"
"""The outside caller of scenario 1 (as the carrier sends it)."""
CLICK_NUMBER = "8 (916) 765-43-21"
"""The number clicked in scenario 3 (the outbound rule rewrites 8... to +7...)."""
EVENTS_BY_KIND = {
    "inbound": ("NOTIFY_START", "NOTIFY_INTERNAL", "NOTIFY_END", "NOTIFY_RECORD"),
    "internal": ("NOTIFY_INTERNAL", "NOTIFY_END", "NOTIFY_RECORD"),
    "click-to-call": ("NOTIFY_OUT_START", "NOTIFY_OUT_END", "NOTIFY_RECORD"),
}
"""What each call promises (docs/crm.md, with ``crm.internal_calls = true``)."""
ALL_EVENTS = "NOTIFY_START,NOTIFY_INTERNAL,NOTIFY_END,NOTIFY_OUT_START,NOTIFY_OUT_END,NOTIFY_RECORD"


def add_demo_parser(sub: Any) -> None:
    """The ``demo`` subcommand (``sub``: the ``add_subparsers`` object of ``softpbx``)."""
    text = "run a self-contained demo: PBX, two softphones, a carrier, three recorded calls"
    s = sub.add_parser(
        "demo", help=text, description=text + ". Needs no phone and no CRM; everything runs "
        "on 127.0.0.1 in this process.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  softpbx demo                      # then open the printed URL\n"
               "  softpbx demo --exit-when-done     # unattended: exit 0 when all arrived\n"
               "  softpbx demo --http-port 8080 --workdir /tmp/demo   # fixed port, kept files")
    s.add_argument("--profiles", default=os.environ.get("SOFTPBX_PROFILES", "sip_profiles"),
                   help="profiles to copy (default: ./sip_profiles, the shipped sample)")
    s.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="extra override, after the demo's own")
    s.add_argument("--exit-when-done", action="store_true",
                   help="stop after the calls: exit 0 when every webhook and recording arrived")
    s.add_argument("--workdir", default="",
                   help="keep profiles, database, recordings and log here (default: a temporary "
                        "directory, removed at exit)")
    s.add_argument("--sip-port", type=int, default=0, help="SIP port (default: a free one)")
    s.add_argument("--http-port", type=int, default=0, help="HTTP port (default: a free one)")
    s.add_argument("--talk-seconds", type=float, default=4.0,
                   help="seconds each call talks (default: 4)")
    s.add_argument("--tone", action="store_true",
                   help="play melodies even when espeak-ng is installed")
    s.add_argument("--timeout", type=float, default=60.0,
                   help="seconds the calls and their webhooks may take in all (default: 60)")


def free_port(*, udp: bool = True, tcp: bool = True) -> int:
    """A port free on 127.0.0.1 for every transport asked (the same number for both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        ok = True
        for kind, wanted in ((socket.SOCK_DGRAM, udp), (socket.SOCK_STREAM, tcp)):
            if wanted:
                with socket.socket(socket.AF_INET, kind) as s:
                    try:
                        s.bind((HOST, port))
                    except OSError:
                        ok = False
        if ok:
            return port
    raise OSError("no free port on 127.0.0.1 in 50 tries")


@dataclass
class Scenario:
    """One scripted call and what it must produce."""

    kind: str
    title: str
    pbx_call_id: str = ""
    error: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    record_link: str = ""
    record_bytes: int = 0

    def missing(self) -> list[str]:
        """What this call promised and has not produced yet."""
        if self.error:
            return [f"{self.title}: {self.error}"]
        if not self.pbx_call_id:
            return [f"{self.title}: no pbx_call_id seen"]
        got = [e["event"] for e in self.events]
        out = [f"{self.title}: {name}" for name in EVENTS_BY_KIND[self.kind] if name not in got]
        end = next((e for e in self.events if e["event"] in ("NOTIFY_END", "NOTIFY_OUT_END")),
                   None)
        if end is not None and end["fields"].get("disposition") != "answered":
            out.append(f"{self.title}: disposition {end['fields'].get('disposition')!r}")
        if "NOTIFY_RECORD" in got and not self.record_bytes:
            out.append(f"{self.title}: recording {self.record_link or '(no link)'} not served")
        return out


class Demo:
    """The running demo: PBX, agents, inspector watcher."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.sip_port = args.sip_port or free_port()
        self.http_port = args.http_port or free_port(udp=False)
        self.carrier_port = free_port(tcp=False)
        self.base = f"http://{HOST}:{self.http_port}"
        self.token = secrets.token_urlsafe(18)
        self.scenarios = [Scenario("inbound", "1. carrier -> DID -> 101"),
                          Scenario("internal", "2. 101 -> 102"),
                          Scenario("click-to-call", "3. click-to-call 101 -> outside")]
        self.events: list[dict[str, Any]] = []
        self.server: Any = None
        self.agents: dict[str, Any] = {}
        self._seq = 0

    # -- setup --------------------------------------------------------------------------------
    def overrides(self) -> list[str]:
        """The demo's config: loopback ports, the inspector, a click-to-call token, the carrier
        moved to the simulated one (proxy and inbound address both: one derives nothing)."""
        carrier = f"{HOST}:{self.carrier_port}"
        return [
            f"internal.sip_ip={HOST}", f"external.sip_ip={HOST}",
            f"internal.sip_port={self.sip_port}", f"external.sip_port={self.sip_port}",
            f"media.rtp_ip={HOST}", f"http.http_ip={HOST}", f"http.http_port={self.http_port}",
            f"http.public_base_url={self.base}",
            # No API token: on 127.0.0.1 the console, the API and the inspector are then open
            # to this machine, so the printed URL works in a browser as it is.
            "http.api_token=",
            f"global.data_dir={self.workdir}", f"global.db_path={self.workdir / 'softpbx.db'}",
            "recording.enabled=true", "recording.dir=recordings",
            "crm.webhook_url=", f"crm.click_to_call_token={self.token}",
            "crm.internal_calls=true", f"crm.events={ALL_EVENTS}",
            f"gateways.carrier.proxy={carrier}", "gateways.carrier.transport=udp",
            f"gateways.carrier.inbound_addresses={carrier}", "gateways.carrier.register=false",
            "gateways.carrier.record=true",
            "directory.101.record=true", "directory.102.record=true",
            *self.args.overrides,
        ]

    def load(self) -> Any:
        """Copy the profiles and load them with the demo's overrides."""
        from .config.loader import load_config

        profiles = self.workdir / "sip_profiles"
        if not profiles.exists():
            shutil.copytree(self.args.profiles, profiles)
        return load_config(profiles, self.overrides())

    @staticmethod
    def inbound_did(config: Any) -> str:
        """The DID routed to 101 (74950000000 in the shipped sample)."""
        for route in config.dialplan.inbound:
            if route.destination == "101" and route.did != "*":
                return str(route.did)
        raise ValueError("the profiles have no inbound DID routed to 101")

    async def start(self, config: Any) -> None:
        from .aio.app import Server
        from .demo_audio import party_audio
        from .demo_ua import SipAgent

        exts = {e.id: e for e in config.extensions}
        for ext in ("101", "102"):
            if ext not in exts:
                raise ValueError(f"the profiles have no extension {ext}")
        self.server = Server(config=config)
        await self.server.start()
        pbx = (HOST, self.sip_port)
        for name, user, password, port in (("carrier", CARRIER_NUMBER, "", self.carrier_port),
                                           ("101", "101", exts["101"].password, 0),
                                           ("102", "102", exts["102"].password, 0)):
            audio, what = party_audio(name, use_speech=not self.args.tone)
            agent = SipAgent(name=name, user=user, password=password, pbx=pbx, audio=audio,
                             ring_s=0.5 if name == "carrier" else 1.0)
            await agent.start(port)
            self.agents[name] = agent
            say(f"{name:>7}: SIP UA on {HOST}:{agent.port}, plays a {what}")
        for ext in ("101", "102"):
            await self.agents[ext].register()
            say(f"{ext:>7}: registered to {HOST}:{self.sip_port}")

    # -- the inspector feed -------------------------------------------------------------------
    async def watch(self) -> None:
        """Poll ``/crm/events.json`` and print each new event (oldest first)."""
        import aiohttp

        last_error = ""
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(f"{self.base}/crm/events.json",
                                        params={"after": str(self._seq)},
                                        timeout=aiohttp.ClientTimeout(total=5)) as r:
                        r.raise_for_status()
                        feed = await r.json()
                    last_error = ""
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    if str(exc) != last_error:  # once per distinct problem, not 4 times a second
                        log.warning("inspector feed %s/crm/events.json: %s", self.base, exc)
                        last_error = str(exc)
                    feed = {"events": []}
                for ev in reversed(feed.get("events", [])):
                    self._seq = max(self._seq, int(ev["seq"]))
                    self._take(ev)
                await asyncio.sleep(0.25)

    def _take(self, ev: dict[str, Any]) -> None:
        fields = dict(ev.get("fields", []))
        ev = {**ev, "fields": fields}
        self.events.append(ev)
        shown = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("event", "call_start"))
        say(f"  webhook {ev['event']:<16} {shown}")

    def events_of(self, pbx_call_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["fields"].get("pbx_call_id") == pbx_call_id]

    async def wait_events(self, sc: Scenario, first: str, match: dict[str, str],
                          timeout: float = 5.0) -> None:
        """Find the call's ``pbx_call_id`` by its first event's fields (bounded wait)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not sc.pbx_call_id:
            for e in self.events:
                f = e["fields"]
                if e["event"] == first and all(f.get(k) == v for k, v in match.items()) \
                        and f.get("pbx_call_id") not in {s.pbx_call_id for s in self.scenarios}:
                    sc.pbx_call_id = f["pbx_call_id"]
                    break
            await asyncio.sleep(0.1)

    # -- the calls ----------------------------------------------------------------------------
    async def talk(self, hang_up_by: Any, call: Any, other_side: Any) -> None:
        """Let both sides play for ``--talk-seconds``, then hang up; wait for the far end."""
        await asyncio.sleep(self.args.talk_seconds)
        heard = call.rtp.voiced if call.rtp is not None else 0
        far = None
        with contextlib.suppress(asyncio.QueueEmpty):
            far = other_side.incoming.get_nowait()
        far_heard = far.rtp.voiced if far is not None and far.rtp is not None else 0
        say(f"    audio: {hang_up_by.name} heard {heard} voiced packets, "
            f"{other_side.name} heard {far_heard}; {hang_up_by.name} hangs up")
        await hang_up_by.hangup(call)
        if far is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(far.ended.wait(), 5.0)

    async def inbound(self, sc: Scenario, did: str) -> None:
        carrier, alice = self.agents["carrier"], self.agents["101"]
        say(f"\n{sc.title}: the carrier calls {did} from {CARRIER_NUMBER}")
        call = await carrier.call(did, from_user=CARRIER_NUMBER)
        say("    101 answered")
        await self.talk(carrier, call, alice)
        await self.wait_events(sc, "NOTIFY_START", {"called_did": did})

    async def internal(self, sc: Scenario) -> None:
        alice, bob = self.agents["101"], self.agents["102"]
        say(f"\n{sc.title}: 101 dials 102")
        call = await alice.call("102")
        say("    102 answered")
        await self.talk(alice, call, bob)
        await self.wait_events(sc, "NOTIFY_INTERNAL", {"caller_id": "101", "internal": "102"})

    async def click_to_call(self, sc: Scenario) -> None:
        import aiohttp

        carrier, alice = self.agents["carrier"], self.agents["101"]
        path = self.server.config.crm.click_to_call_path
        say(f"\n{sc.title}: POST {self.base}{path} from=101 to={CLICK_NUMBER!r}")
        async with aiohttp.ClientSession() as http, http.post(
                f"{self.base}{path}", data={"from": "101", "to": CLICK_NUMBER,
                                            "name": "Demo Client"},
                headers={"x-pbx-authentication": self.token},
                timeout=aiohttp.ClientTimeout(total=10)) as r:
            answer = await r.json(content_type=None)
        say(f"    HTTP {r.status} {json.dumps(answer)}")
        if answer.get("status") != "1":
            raise RuntimeError(f"click-to-call refused: HTTP {r.status} {answer}")
        sc.pbx_call_id = str(answer["pbx_call_id"])
        # 101 rings and answers by itself; then the PBX dials the carrier, which answers.
        far = await asyncio.wait_for(carrier.incoming.get(), 15.0)
        say(f"    101 answered; the carrier got the call for {far.local_uri}")
        with contextlib.suppress(asyncio.QueueEmpty):
            alice.incoming.get_nowait()  # 101's leg ends when the carrier hangs up
        await asyncio.sleep(self.args.talk_seconds)
        say(f"    audio: the carrier heard {far.rtp.voiced if far.rtp else 0} voiced packets; "
            "the carrier hangs up")
        await carrier.hangup(far)

    async def run_calls(self, did: str) -> None:
        steps = (lambda sc: self.inbound(sc, did), self.internal, self.click_to_call)
        for sc, step in zip(self.scenarios, steps, strict=True):
            try:
                await step(sc)
            except Exception as exc:  # a failed step is reported; the next still runs
                sc.error = f"{type(exc).__name__}: {exc}"
                say(f"    FAILED: {sc.error}")
                log.debug("demo step failed", exc_info=True)

    async def collect(self, deadline: float) -> list[str]:
        """Wait (until ``deadline``) for every promised event; fetch each recording."""
        import aiohttp

        async with aiohttp.ClientSession() as http:
            while True:
                for sc in self.scenarios:
                    sc.events = self.events_of(sc.pbx_call_id) if sc.pbx_call_id else []
                    rec = next((e for e in sc.events if e["event"] == "NOTIFY_RECORD"), None)
                    if rec is not None and not sc.record_bytes:
                        sc.record_link = rec["fields"].get("record_link", "")
                        sc.record_bytes = await _fetch_size(http, sc.record_link)
                missing = [m for sc in self.scenarios for m in sc.missing()]
                # A failed step will not produce its events: wait only for the others.
                waiting = [sc for sc in self.scenarios if not sc.error and sc.missing()]
                if not waiting or time.monotonic() >= deadline:
                    return missing
                await asyncio.sleep(0.25)

    async def stop(self) -> None:
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                await agent.close()
        if self.server is not None:
            await self.server.stop()

    def result(self, missing: list[str]) -> dict[str, Any]:
        return {"ok": not missing, "missing": missing, "http": self.base,
                "sip": f"{HOST}:{self.sip_port}", "workdir": str(self.workdir),
                "scenarios": [{"kind": sc.kind, "title": sc.title, "pbx_call_id": sc.pbx_call_id,
                               "error": sc.error, "events": sc.events,
                               "record_link": sc.record_link, "record_bytes": sc.record_bytes}
                              for sc in self.scenarios]}


async def _fetch_size(http: Any, link: str) -> int:
    """Bytes served at a recording link (0 when it is not an MP3 answered with 200)."""
    import aiohttp

    if not link:
        return 0
    try:
        async with http.get(link, timeout=aiohttp.ClientTimeout(total=5)) as r:
            body = await r.read()
            return len(body) if r.status == 200 and r.content_type == "audio/mpeg" else 0
    except (aiohttp.ClientError, TimeoutError):
        return 0


def say(text: str) -> None:
    """One line of the demo's own output (stdout, flushed: it may be piped)."""
    print(text, flush=True)


async def _run(demo: Demo, config: Any) -> int:
    did = demo.inbound_did(config)
    started = time.monotonic()
    await demo.start(config)
    watcher = asyncio.get_running_loop().create_task(demo.watch())
    try:
        say(f"softpbx demo: SIP {HOST}:{demo.sip_port}, HTTP {demo.base}, "
            f"inspector {demo.base}/crm/")
        await demo.run_calls(did)
        say("\nwaiting for the webhooks and recordings ...")
        missing = await demo.collect(started + demo.args.timeout)
        say("\nrecordings:")
        for sc in demo.scenarios:
            say(f"  {sc.title}: {sc.record_link or '(none)'}"
                + (f"  ({sc.record_bytes} bytes)" if sc.record_bytes else ""))
        result = demo.result(missing)
        (demo.workdir / "demo-result.json").write_text(json.dumps(result, indent=1,
                                                                  ensure_ascii=False))
        if missing:
            say("\nMISSING:\n" + "\n".join(f"  {m}" for m in missing))
        else:
            say("\nall 3 calls produced their webhooks and recordings")
        if not demo.args.exit_when_done:
            say(f"\nsoftpbx is running: {demo.base}/  (web console; CRM inspector at "
                f"{demo.base}/crm/, CDRs at {demo.base}/api/cdr)\n"
                f"register a phone at {HOST}:{demo.sip_port} as 103 / "
                f"{next((e.password for e in config.extensions if e.id == '103'), '?')} "
                "and call 101 or 102 (they answer by themselves). Ctrl-C stops the demo.")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            refresh = [loop.create_task(demo.agents[e].keep_registered()) for e in ("101", "102")]
            watcher.add_done_callback(lambda _: [t.cancel() for t in refresh])
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        return 1 if missing else 0
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await demo.stop()


def main(args: argparse.Namespace) -> int:
    """``softpbx demo``."""
    from .config.schema import ConfigError

    own_dir = not args.workdir
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="softpbx-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # softpbx's own log goes to a file (the console shows the demo's story); warnings and
    # errors are shown too.
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fh = logging.FileHandler(workdir / "softpbx.log")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    sh = logging.StreamHandler()
    sh.setLevel(logging.WARNING)
    sh.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(fh)
    root.addHandler(sh)
    demo = Demo(args, workdir)
    try:
        config = demo.load()
        Demo.inbound_did(config)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"softpbx demo: cannot start: {exc}", flush=True)
        return 2
    say(f"softpbx demo in {workdir} (log: {workdir / 'softpbx.log'})")
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - non-Linux
            return asyncio.run(_run(demo, config))
        return uvloop.run(_run(demo, config))
    except OSError as exc:
        print(f"softpbx demo: cannot start: {exc}", flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        root.removeHandler(fh)
        fh.close()
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
