"""A small asyncio SIP user agent over UDP for ``softpbx demo``: the two softphones (101 and
102, digest-registered) and the simulated carrier (IP-authenticated, no registration).

It does what the demo needs and no more, with every wait bounded:

* REGISTER and INVITE with digest answers to ``401``/``407`` (RFC 3261 §22.2: the INVITE is
  re-sent with a new branch and CSeq + 1, as the RFC asks; pyVoIP 1.6 re-uses the branch,
  which a transaction layer rightly takes as a retransmission, so it cannot place calls
  through softpbx);
* UDP retransmissions of its requests (Timer A/E doubling from T1, RFC 3261 §17.1) and of
  its ``200`` to an INVITE until the ACK (§13.3.1.4);
* takes calls: ``180``, then ``200`` with an SDP answer after ``ring_s``; answers BYE,
  CANCEL (with ``487``), OPTIONS; ACKs final responses (non-2xx in the transaction, 2xx
  end-to-end, again on every retransmission);
* RTP: one socket per call, PCMU frames every 20 ms from a looped sound, counting what it
  receives (symmetric RTP: sent from the port it receives on, so the relay latches on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from .sip.auth import answer_challenge
from .sip.errors import SipError
from .sip.message import Request, Response, make_response
from .sip.parser import parse_message

log = logging.getLogger("softpbx.demo")

T1 = 0.5
FRAME = 160
"""Samples (= PCMU bytes) in a 20 ms frame."""
SILENCE_BYTES = frozenset({0xFF, 0x7F})
"""The mu-law encodings of zero."""


class DemoError(Exception):
    """A step of the demo failed (a refused registration, a call not answered ...)."""


def _branch() -> str:
    return "z9hG4bK" + secrets.token_hex(8)


def sdp_offer(ip: str, port: int) -> bytes:
    """Audio: PCMU and telephone-event on ``ip:port``."""
    sid = secrets.randbelow(10**9)
    return (f"v=0\r\no=demo {sid} {sid} IN IP4 {ip}\r\ns=softpbx demo\r\nc=IN IP4 {ip}\r\n"
            f"t=0 0\r\nm=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
            f"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=sendrecv\r\n"
            f"a=ptime:20\r\n").encode()


def sdp_address(body: bytes) -> tuple[str, int] | None:
    """(address, port) of the first ``m=audio`` stream, or ``None``."""
    ip, port = "", None
    for raw in body.decode("utf-8", "replace").splitlines():
        line = raw.strip()
        if line.startswith("c=") and (port is None or not ip):
            ip = line.split()[-1].split("/")[0]
        elif line.startswith("m=audio") and port is None:
            with contextlib.suppress(ValueError, IndexError):
                port = int(line.split()[1])
    return (ip, port) if ip and port else None


class RtpStream(asyncio.DatagramProtocol):
    """One call's RTP: sends ``audio`` (PCMU bytes, looped) every 20 ms, counts packets in."""

    def __init__(self, audio: bytes) -> None:
        self.audio = audio or bytes([0xFF]) * FRAME
        self.transport: asyncio.DatagramTransport | None = None
        self.remote: tuple[str, int] | None = None
        self.received = 0
        self.voiced = 0
        """Packets received whose payload is not all silence."""
        self.sent = 0
        self._task: asyncio.Task[None] | None = None

    async def open(self, ip: str) -> int:
        """Bind a socket on ``ip`` (port chosen by the kernel); return the port."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(ip, 0))
        self.transport = transport  # type: ignore[assignment]
        return int(transport.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12 or data[0] >> 6 != 2:
            return
        self.received += 1
        if data[1] & 0x7F == 0 and set(data[12:]) - SILENCE_BYTES:
            self.voiced += 1

    def start(self, remote: tuple[str, int]) -> None:
        """Start sending to ``remote`` (the other side's SDP address)."""
        self.remote = remote
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        ssrc, seq, ts = secrets.randbits(32), secrets.randbits(16), secrets.randbits(32)
        pos, marker = 0, 0x80
        next_at = loop.time()
        while self.transport is not None and not self.transport.is_closing():
            chunk = self.audio[pos:pos + FRAME]
            if len(chunk) < FRAME:
                pos = FRAME - len(chunk)
                chunk += self.audio[:pos]
            else:
                pos += FRAME
            header = struct.pack("!BBHII", 0x80, marker, seq, ts, ssrc)
            if self.remote is not None:
                self.transport.sendto(header + chunk, self.remote)
                self.sent += 1
            marker, seq, ts = 0, (seq + 1) & 0xFFFF, (ts + FRAME) & 0xFFFFFFFF
            # Paced on a schedule, not "sleep 20 ms": the stream keeps its rate under load.
            next_at += 0.02
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    def close(self) -> None:
        """Stop sending and close the socket."""
        if self._task is not None:
            self._task.cancel()
        if self.transport is not None:
            self.transport.close()


@dataclass
class DemoCall:
    """One dialog of the agent (either direction)."""

    call_id: str
    outgoing: bool
    local_tag: str
    remote_tag: str = ""
    local_uri: str = ""
    remote_uri: str = ""
    remote_target: str = ""
    peer_display: str = ""
    """The other side's From (incoming) or the dialled number (outgoing), for printing."""
    rtp: RtpStream | None = None
    cseq: int = 1
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    invite: Request | None = None
    """An incoming call's INVITE."""
    last_response: bytes = b""
    """What we last answered the INVITE with (re-sent on a retransmission)."""
    ack_2xx: bytes = b""
    """Our ACK to an outgoing call's 200 (re-sent on each 200 retransmission)."""
    status: int = 0
    """The final status of an outgoing INVITE."""


@dataclass
class _ClientTxn:
    final: asyncio.Future[Response]
    provisional: bool = False
    invite: bool = False
    on_provisional: Callable[[Response], None] | None = None


class SipAgent(asyncio.DatagramProtocol):
    """One SIP user agent on a UDP port of ``host``, talking to the PBX at ``pbx``."""

    def __init__(self, *, name: str, user: str, pbx: tuple[str, int], host: str = "127.0.0.1",
                 password: str = "", audio: bytes = b"", ring_s: float = 1.0,
                 max_talk_s: float = 120.0) -> None:
        self.name, self.user, self.password = name, user, password
        self.pbx, self.host = pbx, host
        self.audio, self.ring_s, self.max_talk_s = audio, ring_s, max_talk_s
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.calls: dict[str, DemoCall] = {}
        self.incoming: asyncio.Queue[DemoCall] = asyncio.Queue()
        """Calls this agent answered (put once the ACK came)."""
        self._txns: dict[str, _ClientTxn] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._reg_call_id = secrets.token_hex(8)
        self._reg_cseq = 0

    # -- plumbing -----------------------------------------------------------------------------
    async def start(self, port: int = 0) -> None:
        """Open the UDP socket."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self,
                                                           local_addr=(self.host, port))
        self.transport = transport  # type: ignore[assignment]
        self.port = int(transport.get_extra_info("sockname")[1])

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, self.pbx)

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _via(self, branch: str) -> str:
        return f"SIP/2.0/UDP {self.host}:{self.port};branch={branch};rport"

    def _contact(self) -> str:
        return f"<sip:{self.user}@{self.host}:{self.port}>"

    def _request(self, method: str, ruri: str, headers: list[tuple[str, str]],
                 body: bytes = b"") -> tuple[bytes, str]:
        branch = _branch()
        hdrs = [("Via", self._via(branch)), ("Max-Forwards", "70"), *headers,
                ("User-Agent", f"softpbx-demo {self.name}")]
        if body:
            hdrs.append(("Content-Type", "application/sdp"))
        return Request(method, ruri, hdrs, body).serialize(), branch

    async def _transact(self, data: bytes, branch: str, *, invite: bool = False,
                        timeout: float = 10.0,
                        on_provisional: Callable[[Response], None] | None = None) -> Response:
        """Send a request, re-sent on a T1-doubling timer until a response (an INVITE: until a
        provisional one); return the final response or raise :class:`DemoError`."""
        loop = asyncio.get_running_loop()
        txn = _ClientTxn(final=loop.create_future(), invite=invite, on_provisional=on_provisional)
        self._txns[branch] = txn
        deadline = loop.time() + timeout
        interval = T1
        try:
            while True:
                if not txn.provisional:
                    self._send(data)
                left = deadline - loop.time()
                if left <= 0:
                    raise DemoError(f"{self.name}: no final response within {timeout:.0f} s")
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(txn.final), min(interval, left))
                interval = min(interval * 2, 4.0)
        finally:
            self._txns.pop(branch, None)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not data.strip():
            return  # keep-alive
        try:
            msg = parse_message(data)
        except (SipError, ValueError) as exc:
            log.debug("%s: unparsable datagram from %s: %s", self.name, addr, exc)
            return
        try:
            if isinstance(msg, Response):
                self._on_response(msg)
            else:
                self._on_request(msg)
        except (SipError, ValueError, KeyError) as exc:
            # A demo phone must not die of one odd message: log it and carry on.
            log.warning("%s: cannot handle %r: %s", self.name, msg, exc)

    # -- responses ----------------------------------------------------------------------------
    def _on_response(self, resp: Response) -> None:
        branch = resp.top_via.branch or ""
        txn = self._txns.get(branch)
        method = resp.cseq.method
        if method == "INVITE" and resp.status >= 200:
            self._ack(resp, branch)
        if txn is None or txn.final.done():
            return
        if resp.status < 200:
            txn.provisional = True
            if txn.on_provisional is not None:
                txn.on_provisional(resp)
            return
        txn.final.set_result(resp)

    def _ack(self, resp: Response, branch: str) -> None:
        """ACK a final response to our INVITE: non-2xx in its transaction (RFC 3261 §17.1.1.3),
        a 2xx as a new request to the Contact (§13.2.2.4); again for every retransmission."""
        call = self.calls.get(resp.call_id)
        if resp.status >= 300:
            hdrs = [("Via", self._via(branch)), ("Max-Forwards", "70"),
                    ("From", resp.get("from") or ""), ("To", resp.get("to") or ""),
                    ("Call-ID", resp.call_id), ("CSeq", f"{resp.cseq.number} ACK")]
            uri = call.remote_target if call is not None else f"sip:{self.pbx[0]}"
            self._send(Request("ACK", uri, hdrs).serialize())
            return
        if call is None:
            return
        if not call.ack_2xx:
            contacts = resp.contacts or []
            call.remote_target = str(contacts[0].uri) if contacts else call.remote_target
            call.remote_tag = resp.to.tag or ""
            call.ack_2xx, _ = self._request("ACK", call.remote_target, [
                ("From", f"<{call.local_uri}>;tag={call.local_tag}"),
                ("To", f"<{call.remote_uri}>;tag={call.remote_tag}"),
                ("Call-ID", call.call_id), ("CSeq", f"{resp.cseq.number} ACK")])
        self._send(call.ack_2xx)

    # -- requests -----------------------------------------------------------------------------
    def _answer(self, req: Request, status: int, *, to_tag: str | None = None,
                body: bytes = b"", extra: list[tuple[str, str]] | None = None) -> bytes:
        hdrs = list(extra or [])
        if body:
            hdrs += [("Contact", self._contact()), ("Content-Type", "application/sdp")]
        data = make_response(req, status, to_tag=to_tag, headers=hdrs, body=body).serialize()
        self._send(data)
        return data

    def _on_request(self, req: Request) -> None:
        call = self.calls.get(req.call_id)
        method = req.method
        if method == "INVITE":
            if call is None:
                self._spawn(self._take_call(req))
            elif req.to.tag:  # a re-INVITE (refresh, hold): answer with our stream
                port = call.rtp.transport.get_extra_info("sockname")[1] if call.rtp and \
                    call.rtp.transport else 0
                self._answer(req, 200, body=sdp_offer(self.host, port))
            elif call.last_response:  # a retransmission: the same answer again
                self._send(call.last_response)
        elif method == "ACK":
            if call is not None:
                call.acked.set()
        elif method == "BYE":
            self._answer(req, 200 if call is not None else 481)
            if call is not None:
                self._end(call)
        elif method == "CANCEL":
            self._answer(req, 200 if call is not None else 481)
            if call is not None and not call.answered.is_set() and call.invite is not None:
                call.last_response = self._answer(call.invite, 487, to_tag=call.local_tag)
                self._end(call)
        else:  # OPTIONS, NOTIFY ...: nothing to do, say so
            self._answer(req, 200)

    async def _take_call(self, invite: Request) -> None:
        """Ring for ``ring_s``, answer with our stream, re-send the 200 until the ACK."""
        call = DemoCall(call_id=invite.call_id, outgoing=False, local_tag=secrets.token_hex(5),
                        remote_tag=invite.from_.tag or "", local_uri=str(invite.to.uri),
                        remote_uri=str(invite.from_.uri), invite=invite,
                        peer_display=invite.get("from") or "")
        contacts = invite.contacts or []
        call.remote_target = str(contacts[0].uri) if contacts else str(invite.from_.uri)
        self.calls[call.call_id] = call
        call.last_response = self._answer(invite, 180, to_tag=call.local_tag)
        await asyncio.sleep(self.ring_s)
        if call.ended.is_set():
            return  # cancelled while ringing
        remote = sdp_address(invite.body)
        call.rtp = RtpStream(self.audio)
        port = await call.rtp.open(self.host)
        call.last_response = self._answer(invite, 200, to_tag=call.local_tag,
                                          body=sdp_offer(self.host, port))
        call.answered.set()
        if remote is not None:
            call.rtp.start(remote)
        interval, waited = T1, 0.0
        while not call.acked.is_set() and waited < 64 * T1:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(call.acked.wait(), interval)
            if not call.acked.is_set():
                self._send(call.last_response)
                waited += interval
                interval = min(interval * 2, 4.0)
        if not call.acked.is_set():
            log.warning("%s: no ACK for our 200; hanging up", self.name)
            await self.hangup(call)
            return
        self.incoming.put_nowait(call)
        with contextlib.suppress(TimeoutError):  # a safety bound on a call nobody ends
            await asyncio.wait_for(call.ended.wait(), self.max_talk_s)
        if not call.ended.is_set():
            await self.hangup(call)

    def _end(self, call: DemoCall) -> None:
        if call.rtp is not None:
            call.rtp.close()
        call.ended.set()

    # -- what the demo calls ------------------------------------------------------------------
    async def register(self, expires: int = 3600) -> None:
        """REGISTER (digest on challenge); :class:`DemoError` unless it ends in 200."""
        aor = f"sip:{self.user}@{self.pbx[0]}"
        ruri = f"sip:{self.pbx[0]}:{self.pbx[1]}"
        auth: tuple[str, str] | None = None
        for _ in range(3):  # the first try, the digest answer, one stale nonce
            self._reg_cseq += 1
            hdrs = [("From", f"<{aor}>;tag={secrets.token_hex(5)}"), ("To", f"<{aor}>"),
                    ("Call-ID", self._reg_call_id), ("CSeq", f"{self._reg_cseq} REGISTER"),
                    ("Contact", self._contact()), ("Expires", str(expires))]
            if auth is not None:
                hdrs.append(auth)
            data, branch = self._request("REGISTER", ruri, hdrs)
            resp = await self._transact(data, branch)
            if resp.status == 200:
                return
            if resp.status not in (401, 407):
                break
            auth = answer_challenge(resp, method="REGISTER", uri=ruri, username=self.user,
                                    password=self.password)
            if auth is None:
                break
        raise DemoError(f"{self.name}: registration refused: {resp.status} {resp.reason}")

    async def keep_registered(self, expires: int = 3600) -> None:
        """Re-register at half the expiry, for as long as the demo runs (a failure is logged
        and retried at the next turn)."""
        while True:
            await asyncio.sleep(expires / 2)
            try:
                await self.register(expires)
            except DemoError as exc:
                log.warning("%s", exc)

    async def call(self, number: str, *, from_user: str | None = None, display: str = "",
                   timeout: float = 20.0) -> DemoCall:
        """INVITE ``number`` at the PBX; wait (bounded) for the answer and start the audio."""
        loop = asyncio.get_running_loop()
        user = from_user or self.user
        call = DemoCall(call_id=secrets.token_hex(10), outgoing=True,
                        local_tag=secrets.token_hex(5), peer_display=number,
                        local_uri=f"sip:{user}@{self.host}",
                        remote_uri=f"sip:{number}@{self.pbx[0]}")
        call.remote_target = f"sip:{number}@{self.pbx[0]}:{self.pbx[1]}"
        self.calls[call.call_id] = call
        call.rtp = RtpStream(self.audio)
        port = await call.rtp.open(self.host)
        body = sdp_offer(self.host, port)
        name = f'"{display}" ' if display else ""
        auth: tuple[str, str] | None = None
        deadline = loop.time() + timeout
        try:
            for _ in range(3):
                hdrs = [("From", f"{name}<{call.local_uri}>;tag={call.local_tag}"),
                        ("To", f"<{call.remote_uri}>"), ("Call-ID", call.call_id),
                        ("CSeq", f"{call.cseq} INVITE"), ("Contact", self._contact())]
                if auth is not None:
                    hdrs.append(auth)
                data, branch = self._request("INVITE", call.remote_target, hdrs, body)
                resp = await self._transact(data, branch, invite=True,
                                            timeout=max(1.0, deadline - loop.time()))
                call.status = resp.status
                if resp.status in (401, 407) and self.password:
                    auth = answer_challenge(resp, method="INVITE", uri=call.remote_target,
                                            username=self.user, password=self.password)
                    if auth is None:
                        break
                    call.cseq += 1  # a new request: new branch, CSeq + 1 (RFC 3261 §22.2)
                    continue
                break
        except DemoError:
            call.rtp.close()
            self.calls.pop(call.call_id, None)
            raise
        if resp.status != 200:
            call.rtp.close()
            self.calls.pop(call.call_id, None)
            raise DemoError(f"{self.name}: call to {number} failed: {resp.status} {resp.reason}")
        remote = sdp_address(resp.body)
        if remote is not None:
            call.rtp.start(remote)
        call.answered.set()
        return call

    async def hangup(self, call: DemoCall) -> None:
        """BYE an established call (bounded wait for its 200)."""
        if call.ended.is_set():
            return
        call.cseq += 1
        # Either direction: local_uri/remote_uri were set from our side of the dialog.
        frm = f"<{call.local_uri}>;tag={call.local_tag}"
        to = f"<{call.remote_uri}>;tag={call.remote_tag}"
        self._end(call)
        data, branch = self._request("BYE", call.remote_target, [
            ("From", frm), ("To", to), ("Call-ID", call.call_id), ("CSeq", f"{call.cseq} BYE")])
        try:
            await self._transact(data, branch, timeout=5.0)
        except DemoError as exc:
            log.warning("%s: BYE unanswered: %s", self.name, exc)

    async def close(self) -> None:
        """End every call and close the socket."""
        for call in list(self.calls.values()):
            if call.answered.is_set() and not call.ended.is_set():
                await self.hangup(call)
        for task in list(self._tasks):
            task.cancel()
        if self.transport is not None:
            self.transport.close()
