"""A SIP phone over TCP on 127.0.0.1, optionally "behind NAT", for integration tests.

It opens one connection to softpbx (its registration's flow) and, if asked, a listening TCP
socket (the port its Via and Contact name) on which it accepts connections softpbx opens. A
phone behind NAT writes a private address (``192.168.1.50``) into its Contact, Via and SDP
and listens nowhere: softpbx can only reach it over the registration's connection. Nothing
is ever sent to the written address: every socket here talks to 127.0.0.1 only.

A receiver thread per connection frames messages by Content-Length, keeps them in
:attr:`TcpPhone.log` (with the connection they came on) and answers at once what a phone
answers at once: BYE and OPTIONS with 200; ACKs are just logged. INVITEs wait for the test
(:meth:`TcpPhone.wait_invite`, then ``ring``/``answer`` on the connection it came in on).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from softpbx.sip.errors import SipError
from softpbx.sip.message import Request, Response
from softpbx.sip.parser import parse_message

from .phone import (
    REASONS,
    authorization,
    build_request,
    build_response,
    md5_challenge,
    new_branch,
    new_tag,
)

HOST = "127.0.0.1"
PRIVATE_IP = "192.168.1.50"
"""What a phone behind NAT writes into its messages. Never a traffic target."""
DEFAULT_TIMEOUT = 5.0
Message = Request | Response


@dataclass
class Got:
    """One message the phone received, and the connection it came on."""

    msg: Message
    conn: Connection
    at: float


class Connection:
    """One TCP connection of the phone (to softpbx, or accepted from it)."""

    def __init__(self, phone: TcpPhone, sock: socket.socket, name: str) -> None:
        self.phone = phone
        self.sock = sock
        self.name = name
        self.local = sock.getsockname()[:2]
        self.closed = threading.Event()
        """Set when the peer closed it (or we did)."""
        self._buf = bytearray()
        sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._run, name=f"tcp-phone-{name}", daemon=True)

    def start(self) -> Connection:
        """Start reading (once the phone knows the connection: tests compare them)."""
        self._thread.start()
        return self

    def send(self, data: bytes) -> None:
        """Write bytes on this connection."""
        self.sock.sendall(data)

    def close(self) -> None:
        """Close it from our side (a NAT dropping the mapping, a phone going away)."""
        self.closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)

    def _run(self) -> None:
        for _ in range(10_000_000):  # bounded; ends with the connection
            if self.closed.is_set():
                return
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            self._buf += data
            while (raw := self._frame()) is not None:
                self.phone._received(raw, self)
        self.closed.set()

    def _frame(self) -> bytes | None:
        buf = self._buf
        while buf.startswith(b"\r\n"):
            del buf[:2]  # keep-alive pongs
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        length = 0
        for line in bytes(buf[:end]).split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() in (b"content-length", b"l"):
                length = int(value.strip())
        total = end + 4 + length
        if len(buf) < total:
            return None
        msg = bytes(buf[:total])
        del buf[:total]
        return msg


class TcpPhone:
    """Extension ``user`` on TCP. ``nat``: private address in messages, no listener;
    otherwise it listens on ``127.0.0.1:<listen port>`` and writes that. ``outbound``: RFC 5626
    Contact (``;ob``, ``reg-id``, ``+sip.instance``)."""

    def __init__(self, *, user: str, password: str, pbx: tuple[str, int], nat: bool = False,
                 listen: bool | None = None, outbound: bool = False) -> None:
        assert pbx[0] == HOST, "tests only talk to 127.0.0.1"
        self.user, self.password, self.pbx = user, password, pbx
        self.nat = nat
        self.outbound = outbound
        self.log: list[Got] = []
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self._conns: list[Connection] = []
        self.listener: socket.socket | None = None
        self.accepted: list[Connection] = []
        """Connections softpbx opened to our listener."""
        if listen if listen is not None else not nat:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind((HOST, 0))
            self.listener.listen(8)
            self.listener.settimeout(0.05)
            self.listen_port = self.listener.getsockname()[1]
            self._accepting = threading.Thread(target=self._accept, daemon=True)
            self._stop = threading.Event()
            self._accepting.start()
        else:
            self.listen_port = 5060  # what it writes; nothing listens there
        self.conn = self.connect()
        self._reg_call_id = f"{secrets.token_hex(8)}@{self.written_ip}"
        self._reg_cseq = 0
        self.instance = f"<urn:uuid:{secrets.token_hex(4)}-0000-4000-8000-{secrets.token_hex(6)}>"

    # -- addresses ------------------------------------------------------------------------
    @property
    def written_ip(self) -> str:
        """The address this phone writes into Via, Contact and SDP."""
        return PRIVATE_IP if self.nat else HOST

    @property
    def contact(self) -> str:
        """Our Contact (with the RFC 5626 parameters when ``outbound``)."""
        uri = f"sip:{self.user}@{self.written_ip}:{self.listen_port};transport=tcp"
        if self.outbound:
            return f'<{uri};ob>;reg-id=1;+sip.instance="{self.instance}"'
        return f"<{uri}>"

    def via(self, branch: str | None = None) -> str:
        """A Via naming the written address and the listening port."""
        return f"SIP/2.0/TCP {self.written_ip}:{self.listen_port};branch={branch or new_branch()};rport"

    def sdp(self, rtp_port: int) -> bytes:
        """An audio SDP naming the written address and the real RTP port."""
        ip = self.written_ip
        sid = secrets.randbelow(10**9)
        return (f"v=0\r\no=tcp {sid} {sid} IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
                f"m=audio {rtp_port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
                f"a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n").encode()

    # -- connections ------------------------------------------------------------------------
    def connect(self) -> Connection:
        """A new connection to softpbx (from an ephemeral port, as a NAT would map it)."""
        sock = socket.create_connection(self.pbx, timeout=DEFAULT_TIMEOUT, source_address=(HOST, 0))
        conn = Connection(self, sock, f"{self.user}-out{len(self._conns)}")
        self._conns.append(conn)
        return conn.start()

    def _accept(self) -> None:
        assert self.listener is not None
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn = Connection(self, sock, f"{self.user}-in{len(self.accepted)}")
            with self._cond:
                self.accepted.append(conn)
                self._conns.append(conn)
                self._cond.notify_all()
            conn.start()

    def close(self) -> None:
        """Close every connection and the listener."""
        if self.listener is not None:
            self._stop.set()
            self._accepting.join(timeout=2.0)
            self.listener.close()
        for c in self._conns:
            c.close()

    def __enter__(self) -> TcpPhone:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()
        if exc_type is None and self.errors:
            raise AssertionError(f"tcp phone {self.user}: " + "; ".join(self.errors))

    # -- receiving ----------------------------------------------------------------------------
    def _received(self, raw: bytes, conn: Connection) -> None:
        try:
            msg = parse_message(raw)
        except SipError as exc:
            self.errors.append(f"unparsable message on {conn.name}: {exc}: {raw[:200]!r}")
            return
        if isinstance(msg, Request) and msg.method in ("BYE", "OPTIONS"):
            conn.send(build_response(msg, 200, "OK"))
        with self._cond:
            self.log.append(Got(msg, conn, time.monotonic()))
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[Message], bool], what: str,
                 timeout: float = DEFAULT_TIMEOUT) -> Got:
        """The first message received (oldest first) that matches ``pred``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for got in self.log:
                    if pred(got.msg):
                        return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"tcp phone {self.user}: no {what} within {timeout}s; "
                                         f"got {[repr(g.msg) for g in self.log[-10:]]}")
                self._cond.wait(left)

    def wait_response(self, call_id: str, cseq: int, method: str, status: int | None = None,
                      timeout: float = DEFAULT_TIMEOUT) -> Got:
        """A final response (or one with ``status``) for (Call-ID, CSeq, method)."""
        def pred(m: Message) -> bool:
            return (isinstance(m, Response) and m.call_id == call_id and m.cseq.number == cseq
                    and m.cseq.method == method
                    and (m.status == status if status is not None else m.status >= 200))
        return self.wait_for(pred, f"{status or 'final'} response to {method} {cseq}", timeout)

    # -- registration -------------------------------------------------------------------------
    def register(self, expires: int = 300) -> Response:
        """REGISTER over the main connection (digest on 401); asserts 200."""
        ruri = f"sip:{self.pbx[0]}"
        auth = None
        extra = [("Supported", "outbound")] if self.outbound else []
        for _ in range(2):
            self._reg_cseq += 1
            headers = [("Via", self.via()), ("Max-Forwards", "70"),
                       ("From", f"<sip:{self.user}@{self.pbx[0]}>;tag={new_tag()}"),
                       ("To", f"<sip:{self.user}@{self.pbx[0]}>"),
                       ("Call-ID", self._reg_call_id), ("CSeq", f"{self._reg_cseq} REGISTER"),
                       ("Contact", self.contact), ("Expires", str(expires)), *extra]
            if auth:
                headers.append(("Authorization", auth))
            self.conn.send(build_request("REGISTER", ruri, headers))
            resp = self.wait_response(self._reg_call_id, self._reg_cseq, "REGISTER").msg
            assert isinstance(resp, Response)
            if resp.status == 401 and auth is None:
                auth = authorization(md5_challenge(resp), username=self.user,
                                     password=self.password, method="REGISTER", uri=ruri)
                continue
            assert resp.status == 200, f"REGISTER {self.user}: {resp.status} {resp.reason}"
            return resp
        raise AssertionError("unreachable")

    # -- calls ------------------------------------------------------------------------------
    def wait_invite(self, timeout: float = DEFAULT_TIMEOUT) -> Got:
        """The next new INVITE offered to this phone."""
        return self.wait_for(lambda m: isinstance(m, Request) and m.method == "INVITE"
                             and not m.to.tag, "incoming INVITE", timeout)

    def respond(self, got: Got, status: int, *, to_tag: str, body: bytes = b"") -> None:
        """Answer a received request on the connection it came in on."""
        assert isinstance(got.msg, Request)
        headers = [("Contact", self.contact)] if status < 300 else []
        got.conn.send(build_response(got.msg, status, REASONS.get(status, "Whatever"),
                                     to_tag=to_tag, headers=headers, body=body))

    def invite(self, number: str, body: bytes, *, conn: Connection | None = None) -> OutgoingInvite:
        """Start a call to ``number``, answering the digest challenge; returns at the 100."""
        return OutgoingInvite(self, number, body, conn or self.conn)


class OutgoingInvite:
    """A call this phone places (the UAC side, just what the tests need)."""

    def __init__(self, phone: TcpPhone, number: str, body: bytes, conn: Connection) -> None:
        self.phone = phone
        self.ruri = f"sip:{number}@{phone.pbx[0]}"
        self.to = f"<sip:{number}@{phone.pbx[0]}>"
        self.frm = f"<sip:{phone.user}@{phone.pbx[0]}>;tag={new_tag()}"
        self.call_id = f"{secrets.token_hex(8)}@{phone.written_ip}"
        self.body = body
        self.cseq = 1
        self.branch = new_branch()
        conn.send(self._request(None))
        r401 = phone.wait_response(self.call_id, 1, "INVITE").msg
        assert isinstance(r401, Response) and r401.status == 401, r401
        conn.send(self._ack(r401, self.branch))
        self.cseq, self.branch = 2, new_branch()
        auth = authorization(md5_challenge(r401), username=phone.user, password=phone.password,
                             method="INVITE", uri=self.ruri)
        conn.send(self._request(auth))
        phone.wait_response(self.call_id, 2, "INVITE", status=100)

    def _request(self, auth: str | None) -> bytes:
        p = self.phone
        headers = [("Via", p.via(self.branch)), ("Max-Forwards", "70"), ("From", self.frm),
                   ("To", self.to), ("Call-ID", self.call_id), ("CSeq", f"{self.cseq} INVITE"),
                   ("Contact", p.contact)]
        if auth:
            headers.append(("Authorization", auth))
        return build_request("INVITE", self.ruri, headers, self.body)

    def _ack(self, resp: Response, branch: str) -> bytes:
        return build_request("ACK", self.ruri, [
            ("Via", self.phone.via(branch)), ("Max-Forwards", "70"), ("From", self.frm),
            ("To", resp.get("to") or ""), ("Call-ID", self.call_id), ("CSeq", f"{self.cseq} ACK")])

    def ack_2xx(self, got: Got) -> None:
        """ACK a 2xx (a new transaction, RFC 3261 §13.2.2.4) on the connection it came on."""
        assert isinstance(got.msg, Response)
        got.conn.send(self._ack(got.msg, new_branch()))
