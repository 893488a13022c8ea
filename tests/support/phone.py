"""A minimal SIP user agent for integration tests, over a real UDP socket on 127.0.0.1.

It registers (digest MD5, computed here from RFC 2617/2069, not with ``softpbx.sip.auth``),
places calls (INVITE, digest retry on 401, CANCEL, BYE) and takes them (180, 200 with SDP,
486, ACK, BYE), with every wait bounded. Received bytes are parsed with
``softpbx.sip.parser``; what is sent is written here by hand.

A receiver thread reads the socket, keeps every message in :attr:`Phone.log` and does what a
phone must do at once, whatever the test is waiting for:

* answers retransmitted requests with the last response sent for them;
* ACKs final responses to its INVITEs (non-2xx hop-by-hop, 2xx end-to-end; again on every
  retransmission);
* answers CANCEL with 200 and the cancelled INVITE with 487, BYE with 200, OPTIONS with 200.

::

    with Phone(user="101", password="secret101", pbx=pbx.sip_addr) as alice:
        call = alice.call("102", sdp=make_sdp(rtp.port))
        final = call.wait_final()
        ...
        call.bye()
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from softpbx.sip.errors import SipError
from softpbx.sip.message import Request, Response
from softpbx.sip.parser import parse_message

HOST = "127.0.0.1"
DEFAULT_TIMEOUT = 5.0

Message = Request | Response


# -- digest (RFC 2617 §3.2.2, RFC 2069) ----------------------------------------------------------
def md5_hex(text: str) -> str:
    """``H(text)`` with MD5, lower-case hex."""
    return hashlib.md5(text.encode("utf-8")).hexdigest()  # noqa: S324 - SIP digest is MD5


_AUTH_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


def parse_challenge(value: str) -> dict[str, str]:
    """``Digest realm="x", nonce="y", ...`` -> ``{"realm": "x", "nonce": "y", ...}``."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        raise ValueError(f"not a Digest challenge: {value!r}")
    out: dict[str, str] = {}
    for m in _AUTH_PARAM_RE.finditer(rest):
        val = m.group(2)
        if val.startswith('"'):
            val = val[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        out[m.group(1).lower()] = val
    return out


def md5_challenge(resp: Response) -> dict[str, str]:
    """The MD5 challenge among a 401/407's ``WWW-Authenticate``/``Proxy-Authenticate`` values."""
    name = "www-authenticate" if resp.status == 401 else "proxy-authenticate"
    for value in resp.get_all(name):
        params = parse_challenge(value)
        if params.get("algorithm", "MD5").upper() == "MD5":
            return params
    raise AssertionError(f"no MD5 digest challenge in {resp.status}: {resp.get_all(name)}")


def authorization(challenge: dict[str, str], *, username: str, password: str, method: str,
                  uri: str, cnonce: str | None = None) -> str:
    """An ``Authorization`` value: ``qop=auth`` when offered, else the RFC 2069 form."""
    realm, nonce = challenge["realm"], challenge["nonce"]
    ha1 = md5_hex(f"{username}:{realm}:{password}")
    ha2 = md5_hex(f"{method}:{uri}")
    parts = [f'username="{username}"', f'realm="{realm}"', f'nonce="{nonce}"', f'uri="{uri}"']
    qops = [q.strip() for q in challenge.get("qop", "").split(",") if q.strip()]
    if "auth" in qops:
        cnonce = cnonce or secrets.token_hex(8)
        nc = "00000001"
        response = md5_hex(f"{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}")
        parts += [f'response="{response}"', "algorithm=MD5", "qop=auth", f"nc={nc}",
                  f'cnonce="{cnonce}"']
    else:
        parts += [f'response="{md5_hex(f"{ha1}:{nonce}:{ha2}")}"', "algorithm=MD5"]
    if "opaque" in challenge:
        parts.append(f'opaque="{challenge["opaque"]}"')
    return "Digest " + ", ".join(parts)


# -- SDP (just what the tests need) -------------------------------------------------------------
def make_sdp(port: int, ip: str = HOST, *, session_id: int | None = None) -> bytes:
    """An audio offer/answer: PCMU (0) and telephone-event (101) on ``ip:port``."""
    sid = session_id if session_id is not None else secrets.randbelow(10**9)
    return (f"v=0\r\no=test {sid} {sid} IN IP4 {ip}\r\ns=test\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
            f"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=sendrecv\r\n"
            f"a=ptime:20\r\n").encode()


def sdp_audio_address(body: bytes) -> tuple[str, int]:
    """(connection address, port) of the first ``m=audio`` stream (its own c= over the session's)."""
    session_ip = media_ip = ""
    port: int | None = None
    for raw in body.decode("utf-8", "replace").splitlines():
        line = raw.strip()
        if line.startswith("m="):
            if port is not None:
                break
            fields = line[2:].split()
            if fields[0] == "audio":
                port = int(fields[1])
        elif line.startswith("c="):
            addr = line.split()[-1].split("/")[0]
            if port is None:
                session_ip = addr
            else:
                media_ip = addr
    ip = media_ip or session_ip
    if port is None or not ip:
        raise AssertionError(f"no audio stream with an address in SDP:\n{body.decode(errors='replace')}")
    return ip, port


# -- messages ------------------------------------------------------------------------------------
def new_tag() -> str:
    """A From/To tag."""
    return secrets.token_hex(5)


def new_branch() -> str:
    """A RFC 3261 branch (magic cookie first)."""
    return "z9hG4bK" + secrets.token_hex(8)


def build_request(method: str, ruri: str, headers: list[tuple[str, str]], body: bytes = b"",
                  content_type: str = "application/sdp") -> bytes:
    """Request bytes; Content-Type (when there is a body) and Content-Length are added."""
    lines = [f"{method} {ruri} SIP/2.0"] + [f"{n}: {v}" for n, v in headers]
    if body:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def build_response(req: Request, status: int, reason: str, *, to_tag: str | None = None,
                   headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> bytes:
    """A response to ``req`` (RFC 3261 §8.2.6.2: Via, From, To, Call-ID, CSeq copied)."""
    lines = [f"SIP/2.0 {status} {reason}"]
    lines += [f"Via: {v}" for n, v in req.headers if n.lower() in ("via", "v")]
    to = req.get("to") or ""
    if to_tag and ";tag=" not in to.replace(" ", "").lower():
        to = f"{to};tag={to_tag}"
    lines += [f"From: {req.get('from')}", f"To: {to}", f"Call-ID: {req.call_id}",
              f"CSeq: {req.get('cseq')}"]
    lines += [f"{n}: {v}" for n, v in headers or []]
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


REASONS = {100: "Trying", 180: "Ringing", 183: "Session Progress", 200: "OK",
           403: "Forbidden", 404: "Not Found", 481: "Call/Transaction Does Not Exist",
           486: "Busy Here", 487: "Request Terminated", 488: "Not Acceptable Here",
           603: "Decline"}


@dataclass
class _SentInvite:
    """What the receiver thread needs to ACK a final response to one of our INVITEs."""

    ruri: str
    branch: str
    from_value: str
    call_id: str
    cseq: int
    ack_2xx: bytes | None = None


@dataclass
class Received:
    """One message the phone got."""

    msg: Message
    at: float
    """``time.monotonic()`` when it arrived."""
    source: tuple[str, int]


class Phone:
    """A SIP phone on ``127.0.0.1:port`` (0 = any) that talks to softpbx at ``pbx``."""

    def __init__(self, *, user: str, pbx: tuple[str, int], password: str = "",
                 display: str = "", port: int = 0, domain: str = HOST,
                 auth_user: str | None = None) -> None:
        self.user = user
        self.password = password
        self.auth_user = auth_user if auth_user is not None else user
        self.display = display
        self.pbx = pbx
        self.domain = domain
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, port))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.log: list[Received] = []
        self.sent: list[bytes] = []
        self._cond = threading.Condition()
        self._lock = threading.RLock()
        self._responses: dict[tuple[str, str], bytes] = {}
        """(branch, method) of a received request -> the last response we sent for it."""
        self._invites_in: dict[str, IncomingCall] = {}
        """branch of a received INVITE -> the call it made."""
        self._invites_out: dict[tuple[str, int], _SentInvite] = {}
        self._calls_out: dict[str, OutgoingCall] = {}
        self._taken: set[str] = set()
        self._register_call_id = f"{secrets.token_hex(8)}@{HOST}"
        self._register_cseq = 0
        self._from_tag = new_tag()
        self.registered = False
        self.errors: list[str] = []
        """Problems the receiver thread met (unparsable messages): tests may assert it is empty."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"phone-{user}", daemon=True)
        self._thread.start()

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def addr(self) -> tuple[str, int]:
        """Where the phone's socket is."""
        return (HOST, self.port)

    @property
    def contact(self) -> str:
        """Our Contact URI in angle brackets."""
        return f"<sip:{self.user}@{HOST}:{self.port}>"

    def via(self, branch: str) -> str:
        """A Via value for a request we send."""
        return f"SIP/2.0/UDP {HOST}:{self.port};branch={branch};rport"

    def from_value(self, tag: str) -> str:
        """Our From (display name, AOR, tag)."""
        disp = f'"{self.display}" ' if self.display else ""
        return f"{disp}<sip:{self.user}@{self.domain}>;tag={tag}"

    def send(self, data: bytes, dest: tuple[str, int] | None = None) -> None:
        """Send bytes to softpbx (or ``dest``)."""
        self.sent.append(data)
        self.sock.sendto(data, dest or self.pbx)

    def close(self) -> None:
        """Stop the receiver and close the socket (bindings are not touched: see unregister)."""
        self._stop.set()
        self._thread.join(timeout=2.0)
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Phone:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if self.registered:
                with contextlib.suppress(AssertionError, OSError):
                    self.unregister()
        finally:
            self.close()
        if exc_type is None and self.errors:
            raise AssertionError(f"phone {self.user}: " + "; ".join(self.errors))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, src = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data.strip():
                continue  # keep-alive
            try:
                msg = parse_message(data)
            except SipError as exc:
                self.errors.append(f"unparsable message from {src}: {exc}: {data[:200]!r}")
                continue
            try:
                with self._lock:
                    if isinstance(msg, Request):
                        self._on_request(msg)
                    else:
                        self._on_response(msg)
            except Exception as exc:  # noqa: BLE001 - recorded for the test, the thread goes on
                self.errors.append(f"error handling {msg!r}: {exc!r}")
            with self._cond:
                self.log.append(Received(msg, time.monotonic(), src))
                self._cond.notify_all()

    def _reply(self, req: Request, status: int, *, to_tag: str | None = None,
               headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> bytes:
        data = build_response(req, status, REASONS.get(status, "Whatever"), to_tag=to_tag,
                              headers=headers, body=body)
        self._responses[(req.top_via.branch or "", req.method)] = data
        self.send(data)
        return data

    def _on_request(self, req: Request) -> None:
        branch = req.top_via.branch or ""
        method = req.method
        if method == "ACK":
            return
        old = self._responses.get((branch, method))
        if old is not None:
            self.send(old)  # a retransmission: answer it as before
            return
        if method == "INVITE" and not req.to.tag:
            if branch not in self._invites_in:
                self._invites_in[branch] = IncomingCall(self, req)
        elif method == "CANCEL":
            call = self._invites_in.get(branch)
            if call is None:
                self._reply(req, 481)
                return
            self._reply(req, 200, to_tag=call.local_tag)
            call.cancelled = True
            if not call.final_sent:
                call.respond(487)
        elif method == "BYE":
            self._reply(req, 200)
        elif method == "INVITE":  # re-INVITE: answer with our SDP, as a phone on hold would
            call = next((c for c in self._invites_in.values() if c.call_id == req.call_id), None)
            body = call.local_sdp if call is not None else b""
            self._reply(req, 200 if body else 488, headers=[("Contact", self.contact)], body=body)
        else:
            self._reply(req, 200)

    def _on_response(self, resp: Response) -> None:
        cseq = resp.cseq
        if cseq.method != "INVITE" or resp.status < 200:
            return
        sent = self._invites_out.get((resp.call_id, cseq.number))
        if sent is None:
            return
        if resp.status >= 300:
            # RFC 3261 §17.1.1.3: same branch, same R-URI, To of the response.
            ack = build_request("ACK", sent.ruri, [
                ("Via", self.via(sent.branch)), ("Max-Forwards", "70"),
                ("From", sent.from_value), ("To", resp.get("to") or ""),
                ("Call-ID", sent.call_id), ("CSeq", f"{sent.cseq} ACK")])
            self.send(ack)
            call = self._calls_out.get(resp.call_id)
            if (resp.status in (401, 407) and call is not None and call.authenticate
                    and not call.challenges and cseq.number == call.cseq):
                # A phone answers the challenge at once (RFC 3261 §22.2), not when the test
                # gets round to waiting for the final answer.
                call.challenges.append(resp)
                call._send_invite(authorization(
                    md5_challenge(resp), username=self.auth_user, password=self.password,
                    method="INVITE", uri=call.ruri), header=(
                        "Authorization" if resp.status == 401 else "Proxy-Authorization"))
            return
        if sent.ack_2xx is None:
            # RFC 3261 §13.2.2.4: a new transaction to the remote target.
            contacts = resp.contacts or []
            target = str(contacts[0].uri) if contacts else sent.ruri
            sent.ack_2xx = build_request("ACK", target, [
                ("Via", self.via(new_branch())), ("Max-Forwards", "70"),
                ("From", sent.from_value), ("To", resp.get("to") or ""),
                ("Call-ID", sent.call_id), ("CSeq", f"{sent.cseq} ACK")])
        self.send(sent.ack_2xx)

    # -- waiting ----------------------------------------------------------------------------
    def wait_for(self, pred: Callable[[Message], bool], what: str,
                 timeout: float = DEFAULT_TIMEOUT) -> Received:
        """The first message (oldest first) matching ``pred``; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for rec in self.log:
                    if pred(rec.msg):
                        return rec
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [repr(r.msg) + " " + (r.msg.call_id if r.msg.has("call-id") else "")
                           for r in self.log[-15:]]
                    raise AssertionError(f"phone {self.user}: no {what} within {timeout}s; "
                                         f"last messages: {got}")
                self._cond.wait(left)

    def messages(self, pred: Callable[[Message], bool]) -> list[Message]:
        """Every message received so far that matches ``pred``."""
        with self._cond:
            return [r.msg for r in self.log if pred(r.msg)]

    def wait_response(self, call_id: str, cseq: int, method: str, *, final: bool = True,
                      status: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> Response:
        """A response for (Call-ID, CSeq); the final one unless ``status`` names another."""

        def pred(m: Message) -> bool:
            if not isinstance(m, Response) or m.call_id != call_id:
                return False
            c = m.cseq
            if c.number != cseq or c.method != method:
                return False
            if status is not None:
                return m.status == status
            return m.status >= 200 or not final

        rec = self.wait_for(pred, f"{status or 'final'} response to {method} {cseq}", timeout)
        assert isinstance(rec.msg, Response)
        return rec.msg

    # -- registration -------------------------------------------------------------------------
    def _register(self, contact: str, expires: int, timeout: float) -> Response:
        ruri = f"sip:{self.domain}"
        auth: str | None = None
        for _ in range(2):
            self._register_cseq += 1
            headers = [("Via", self.via(new_branch())), ("Max-Forwards", "70"),
                       ("From", self.from_value(self._from_tag)),
                       ("To", f"<sip:{self.user}@{self.domain}>"),
                       ("Call-ID", self._register_call_id),
                       ("CSeq", f"{self._register_cseq} REGISTER"),
                       ("Contact", contact), ("Expires", str(expires)),
                       ("User-Agent", "softpbx-test-phone")]
            if auth:
                headers.append(("Authorization", auth))
            self.send(build_request("REGISTER", ruri, headers))
            resp = self.wait_response(self._register_call_id, self._register_cseq, "REGISTER",
                                      timeout=timeout)
            if resp.status != 401 or auth is not None:
                return resp
            auth = authorization(md5_challenge(resp), username=self.auth_user,
                                 password=self.password, method="REGISTER", uri=ruri)
        raise AssertionError("unreachable")

    def register(self, expires: int = 300, timeout: float = DEFAULT_TIMEOUT) -> Response:
        """REGISTER our Contact (digest retry on 401); asserts 200."""
        resp = self._register(self.contact, expires, timeout)
        assert resp.status == 200, f"REGISTER {self.user}: {resp.status} {resp.reason}"
        self.registered = True
        return resp

    def unregister(self, *, everything: bool = False, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Remove our binding (or, ``everything``, every binding of the user: ``Contact: *``)."""
        resp = self._register("*" if everything else self.contact, 0, timeout)
        assert resp.status == 200, f"un-REGISTER {self.user}: {resp.status} {resp.reason}"
        self.registered = False

    # -- calls --------------------------------------------------------------------------------
    def call(self, number: str, *, sdp: bytes, authenticate: bool = True,
             extra_headers: list[tuple[str, str]] | None = None) -> OutgoingCall:
        """Send an INVITE to ``number`` at softpbx's domain (the answer is waited for later)."""
        return OutgoingCall(self, number, sdp, authenticate, extra_headers or [])

    def wait_invite(self, timeout: float = DEFAULT_TIMEOUT) -> IncomingCall:
        """The next new call offered to this phone (each INVITE is returned once)."""

        def pred(m: Message) -> bool:
            return (isinstance(m, Request) and m.method == "INVITE" and not m.to.tag
                    and m.call_id not in self._taken)

        rec = self.wait_for(pred, "incoming INVITE", timeout)
        msg = rec.msg
        assert isinstance(msg, Request)
        self._taken.add(msg.call_id)
        with self._lock:
            call = self._invites_in[msg.top_via.branch or ""]
        call.received_at = rec.at
        return call

    def assert_no_invite(self, within: float) -> None:
        """No new INVITE arrives for ``within`` seconds."""
        time.sleep(within)
        fresh = self.messages(lambda m: isinstance(m, Request) and m.method == "INVITE"
                              and not m.to.tag and m.call_id not in self._taken)
        assert not fresh, f"phone {self.user} got an unexpected INVITE: {fresh[0]!r}"


@dataclass
class _Dialog:
    """Just enough dialog state (RFC 3261 §12) to send a BYE."""

    call_id: str
    local: str
    """Our From/To value, with our tag."""
    remote: str
    """The peer's, with its tag."""
    target: str
    """The peer's Contact URI."""
    cseq: int


class OutgoingCall:
    """A call this phone placed (it is the UAC of the INVITE)."""

    def __init__(self, phone: Phone, number: str, sdp: bytes, authenticate: bool,
                 extra_headers: list[tuple[str, str]]) -> None:
        self.phone = phone
        self.number = number
        self.ruri = f"sip:{number}@{phone.domain}"
        self.local_sdp = sdp
        self.authenticate = authenticate
        self.extra_headers = extra_headers
        self.call_id = f"{secrets.token_hex(10)}@{HOST}"
        self.from_tag = new_tag()
        self.cseq = 0
        self.branch = ""
        self.dialog: _Dialog | None = None
        self.final: Response | None = None
        self.challenges: list[Response] = []
        """The 401/407 answers that were retried with credentials."""
        with phone._lock:
            phone._calls_out[self.call_id] = self
            self._send_invite(None)

    @property
    def from_value(self) -> str:
        """Our From header."""
        return self.phone.from_value(self.from_tag)

    def _send_invite(self, auth: str | None, header: str = "Authorization") -> None:
        p = self.phone
        self.cseq += 1
        self.branch = new_branch()
        headers = [("Via", p.via(self.branch)), ("Max-Forwards", "70"),
                   ("From", self.from_value), ("To", f"<sip:{self.number}@{p.domain}>"),
                   ("Call-ID", self.call_id), ("CSeq", f"{self.cseq} INVITE"),
                   ("Contact", p.contact), ("User-Agent", "softpbx-test-phone"),
                   *self.extra_headers]
        if auth:
            headers.append((header, auth))
        with p._lock:
            p._invites_out[(self.call_id, self.cseq)] = _SentInvite(
                self.ruri, self.branch, self.from_value, self.call_id, self.cseq)
        p.send(build_request("INVITE", self.ruri, headers, self.local_sdp))

    def responses(self) -> list[Response]:
        """Every response to this call's INVITEs received so far (100s included)."""
        return [m for m in self.phone.messages(
            lambda m: isinstance(m, Response) and m.call_id == self.call_id
            and m.cseq.method == "INVITE")]  # type: ignore[misc]

    def wait_status(self, status: int, timeout: float = DEFAULT_TIMEOUT) -> Response:
        """A response with ``status`` to any of this call's INVITEs (e.g. the 180)."""
        rec = self.phone.wait_for(
            lambda m: isinstance(m, Response) and m.call_id == self.call_id
            and m.cseq.method == "INVITE" and m.status == status,
            f"{status} for {self.call_id}", timeout)
        assert isinstance(rec.msg, Response)
        return rec.msg

    def wait_final(self, timeout: float = DEFAULT_TIMEOUT) -> Response:
        """The final answer to the call (after the digest retry the receiver thread made)."""
        deadline = time.monotonic() + timeout
        while True:
            cseq = self.cseq
            resp = self.phone.wait_response(self.call_id, cseq, "INVITE",
                                            timeout=max(0.01, deadline - time.monotonic()))
            if resp.status in (401, 407) and self.cseq != cseq:
                continue  # challenged and already retried with credentials
            self.final = resp
            if 200 <= resp.status < 300:
                contacts = resp.contacts or []
                assert contacts, "2xx to INVITE without Contact"
                self.dialog = _Dialog(self.call_id, self.from_value, resp.get("to") or "",
                                      str(contacts[0].uri), self.cseq)
            return resp

    @property
    def remote_media(self) -> tuple[str, int]:
        """Where the answer's SDP says to send RTP."""
        assert self.final is not None and self.final.body, "no SDP answer"
        return sdp_audio_address(self.final.body)

    def cancel(self, timeout: float = DEFAULT_TIMEOUT) -> Response:
        """CANCEL the current INVITE (RFC 3261 §9.1); returns the CANCEL's 200."""
        p = self.phone
        p.send(build_request("CANCEL", self.ruri, [
            ("Via", p.via(self.branch)), ("Max-Forwards", "70"), ("From", self.from_value),
            ("To", f"<sip:{self.number}@{p.domain}>"), ("Call-ID", self.call_id),
            ("CSeq", f"{self.cseq} CANCEL")]))
        return p.wait_response(self.call_id, self.cseq, "CANCEL", timeout=timeout)

    def bye(self, timeout: float = DEFAULT_TIMEOUT) -> Response:
        """Hang up (BYE in the dialog); returns its final response."""
        assert self.dialog is not None, "call not answered"
        return _send_bye(self.phone, self.dialog, timeout)

    def wait_bye(self, timeout: float = DEFAULT_TIMEOUT) -> Request:
        """The far end hung up (the receiver thread already answered 200)."""
        return _wait_bye(self.phone, self.call_id, timeout)


def _send_bye(phone: Phone, dialog: _Dialog, timeout: float) -> Response:
    dialog.cseq += 1
    phone.send(build_request("BYE", dialog.target, [
        ("Via", phone.via(new_branch())), ("Max-Forwards", "70"), ("From", dialog.local),
        ("To", dialog.remote), ("Call-ID", dialog.call_id), ("CSeq", f"{dialog.cseq} BYE")]))
    return phone.wait_response(dialog.call_id, dialog.cseq, "BYE", timeout=timeout)


def _wait_bye(phone: Phone, call_id: str, timeout: float) -> Request:
    rec = phone.wait_for(lambda m: isinstance(m, Request) and m.method == "BYE"
                         and m.call_id == call_id, f"BYE for {call_id}", timeout)
    assert isinstance(rec.msg, Request)
    return rec.msg


@dataclass(eq=False)
class IncomingCall:
    """A call offered to this phone (it is the UAS of the INVITE)."""

    phone: Phone
    request: Request
    local_tag: str = field(default_factory=new_tag)
    final_sent: bool = False
    cancelled: bool = False
    local_sdp: bytes = b""
    received_at: float = 0.0
    local_cseq: int = 0

    @property
    def call_id(self) -> str:
        """The INVITE's Call-ID."""
        return self.request.call_id

    @property
    def from_display(self) -> str | None:
        """Display name of the caller as the callee sees it."""
        return self.request.from_.display

    @property
    def from_user(self) -> str:
        """User part of the caller's From URI."""
        return self.request.from_.uri.unescaped_user

    @property
    def remote_media(self) -> tuple[str, int]:
        """Where the offer says to send RTP (softpbx's relay port)."""
        return sdp_audio_address(self.request.body)

    def respond(self, status: int, body: bytes = b"") -> None:
        """Send a response to the INVITE (a final one only once)."""
        p = self.phone
        with p._lock:
            if self.final_sent:
                return
            if status >= 200:
                self.final_sent = True
            headers = [("Contact", p.contact)] if status < 300 else []
            p._reply(self.request, status, to_tag=self.local_tag, headers=headers, body=body)

    def ring(self) -> None:
        """180 Ringing."""
        self.respond(180)

    def answer(self, sdp: bytes, *, wait_ack: bool = True,
               timeout: float = DEFAULT_TIMEOUT) -> None:
        """200 OK with ``sdp``; waits for the ACK unless told not to."""
        self.local_sdp = sdp
        self.respond(200, sdp)
        if wait_ack:
            self.wait_ack(timeout)

    def reject(self, status: int = 486, timeout: float = DEFAULT_TIMEOUT) -> None:
        """A final failure; waits for the ACK (RFC 3261 §17.2.1)."""
        self.respond(status)
        self.wait_ack(timeout)

    def wait_ack(self, timeout: float = DEFAULT_TIMEOUT) -> Request:
        """The ACK of our final response."""
        rec = self.phone.wait_for(lambda m: isinstance(m, Request) and m.method == "ACK"
                                  and m.call_id == self.call_id, f"ACK for {self.call_id}", timeout)
        assert isinstance(rec.msg, Request)
        return rec.msg

    def wait_cancel(self, timeout: float = DEFAULT_TIMEOUT) -> Request:
        """The caller gave up (the receiver thread answered 200 and 487)."""
        rec = self.phone.wait_for(lambda m: isinstance(m, Request) and m.method == "CANCEL"
                                  and m.call_id == self.call_id, f"CANCEL for {self.call_id}",
                                  timeout)
        assert isinstance(rec.msg, Request)
        return rec.msg

    def wait_bye(self, timeout: float = DEFAULT_TIMEOUT) -> Request:
        """The far end hung up (the receiver thread already answered 200)."""
        return _wait_bye(self.phone, self.call_id, timeout)

    def bye(self, timeout: float = DEFAULT_TIMEOUT) -> Response:
        """Hang up from the callee's side."""
        req = self.request
        contacts = req.contacts or []
        assert contacts, "INVITE without Contact"
        to = req.get("to") or ""
        dialog = _Dialog(self.call_id, f"{to};tag={self.local_tag}", req.get("from") or "",
                         str(contacts[0].uri), self.local_cseq)
        resp = _send_bye(self.phone, dialog, timeout)
        self.local_cseq = dialog.cseq
        return resp
