"""What the web console reads from the running process (:class:`softpbx.http.console.
ConsoleSources`), built from the server's store, switch, driver and outbox."""

from __future__ import annotations

import asyncio
import time
from importlib import metadata
from typing import TYPE_CHECKING

from ..http.console import ConsoleSources
from ..store.cdr_search import CdrSearch

if TYPE_CHECKING:
    from .app import Server


def version() -> str:
    """The installed package's version ("" when run from a tree that is not installed)."""
    try:
        return metadata.version("softpbx")
    except metadata.PackageNotFoundError:
        return ""


def listeners(server: Server) -> list[str]:
    """One line per listener as the status page shows them."""
    cfg = server.config
    out = []
    seen: set[tuple[str, int]] = set()
    for profile in (cfg.internal, cfg.external):
        addr = (profile.sip_ip, profile.sip_port)
        if addr in seen:
            continue
        seen.add(addr)
        transports = ", ".join(str(getattr(t, "value", t)) for t in profile.transports)
        out.append(f"SIP {profile.sip_ip}:{profile.sip_port} ({transports}; profile "
                   f"{profile.name})")
    out.append(f"HTTP {cfg.http.http_ip}:{cfg.http.http_port}")
    out.append(f"RTP {cfg.media.rtp_ip} ports {cfg.media.rtp_start_port}-"
               f"{cfg.media.rtp_end_port}")
    return out


def console_sources(server: Server, db_path: str) -> tuple[ConsoleSources, CdrSearch]:
    """The console's view of ``server`` and the read-only connections to close at stop."""
    search = CdrSearch(path=db_path, timezone=server.config.global_.timezone)

    def hang_up(call_id: str) -> bool:
        assert server.driver is not None
        try:
            return server.switch.hang_up(call_id, asyncio.get_running_loop().time())
        finally:
            server.driver.kick()  # the BYE/CANCEL goes out now

    outbox = server.outbox
    page = None
    if outbox is not None:
        def page() -> list[dict[str, object]]:
            return outbox.rows(state="", pbx_call_id="", before_id=0, limit=50)

    sources = ConsoleSources(cdr_search=search.search, cdr_mark=search.mark,
                             recording_path=search.recording, store_size=search.size,
                             hang_up=hang_up, listeners=listeners(server), version=version(),
                             started_at=time.time(), webhook_page=page,
                             inspector=server.inspector is not None)
    return sources, search
