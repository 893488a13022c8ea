"""A real CRM webhook receiver for tests and benchmarks: an aiohttp server on 127.0.0.1 in a
background thread that parses each POST's form as a CRM does and records it.

::

    with CrmServer() as crm:                 # crm.url is the webhook URL
        crm.status = 500                     # answer 500 from now on (a CRM outage)
        ...
        crm.wait_for(lambda got: len(got) >= 4, "four events")
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from .server import HOST, free_port


@dataclass
class Received:
    """One POST as the CRM saw it."""

    event_id: str
    fields: list[tuple[str, str]]
    content_type: str
    status: int
    """What the CRM answered."""
    signature: str = ""
    at: float = field(default_factory=time.monotonic)

    @property
    def event(self) -> str:
        return dict(self.fields).get("event", "")

    @property
    def pbx_call_id(self) -> str:
        return dict(self.fields).get("pbx_call_id", "")


class CrmServer:
    """Records every webhook; answers ``status`` (and ``answer`` JSON to NOTIFY_START)."""

    def __init__(self) -> None:
        self.port = free_port(udp=False)
        self.status = 200
        self.answer = ""
        """Body of a 2xx answer to NOTIFY_START ("" = empty body)."""
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        form = await request.post()
        fields = [(str(k), str(v)) for k, v in form.items()]
        status = self.status
        got = Received(event_id=request.headers.get("X-Event-Id", ""), fields=fields,
                       content_type=request.headers.get("Content-Type", "").split(";")[0],
                       status=status, signature=request.headers.get("Signature", ""))
        with self._lock:
            self.received.append(got)
        if 200 <= status <= 299 and got.event == "NOTIFY_START" and self.answer:
            return web.Response(status=status, text=self.answer, content_type="application/json")
        return web.Response(status=status, text="" if status < 300 else "CRM is down")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(self._runner.setup())
        loop.run_until_complete(web.TCPSite(self._runner, HOST, self.port).start())
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def start(self) -> CrmServer:
        self._thread = threading.Thread(target=self._run, name="crm", daemon=True)
        self._thread.start()
        assert self._ready.wait(5), "the test CRM did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> CrmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def accepted(self) -> list[Received]:
        """The POSTs answered with a 2xx (what the CRM took in), in arrival order."""
        return [r for r in self.snapshot() if 200 <= r.status <= 299]

    def wait_for(self, pred: Callable[[list[Received]], bool], what: str,
                 timeout: float = 10.0) -> list[Received]:
        """Poll (bounded) until ``pred(all received)`` holds; return them."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.snapshot()
            if pred(got):
                return got
            if time.monotonic() >= deadline:
                summary = [(r.event, r.pbx_call_id[:12], r.status) for r in got]
                raise AssertionError(f"CRM: not within {timeout}s: {what}; got {summary}")
            time.sleep(0.02)
