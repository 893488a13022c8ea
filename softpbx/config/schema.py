"""The configuration model: frozen dataclasses filled from ``sip_profiles/`` TOML.

Names follow FreeSWITCH, snake_cased (``sip_ip``, ``sip_port``, ``effective_caller_id_name``,
``outbound_caller_id_number``, ``expire_seconds`` ...). Keys for behaviour that later issues
build (calls, media, recording, CRM) are defined here already so that a profile written today
keeps working. This module imports nothing of ours and nothing outside the stdlib.

File layout (see ``loader.py``)::

    sip_profiles/softpbx.toml        [global] [sip] [auth] [registrar] [media] [recording]
                                     [calls] [http] [crm]
    sip_profiles/internal.toml       [profile]   phones
    sip_profiles/external.toml       [profile]   trunks
    sip_profiles/directory/*.toml    [user]      one extension per file
    sip_profiles/gateways/*.toml     [gateway]   one trunk per file (name = file stem)
    sip_profiles/dialplan.toml       [[inbound]] [[outbound]] [[ring_group]]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Transport(StrEnum):
    """A SIP transport a profile listens on or a gateway is reached over."""

    UDP = "udp"
    TCP = "tcp"
    TLS = "tls"
    """SIP over TLS (RFC 3261 §26.2.1, RFC 5630): TCP framing inside a TLS 1.2+ session."""


@dataclass(frozen=True, slots=True)
class GlobalSettings:
    """``softpbx.toml`` ``[global]``: switch-wide identity and files."""

    domain: str = "127.0.0.1"
    """SIP domain of the switch; also the digest realm offered to phones."""
    timezone: str = "UTC"
    """IANA zone for local times (CDR, CRM ``call_start``)."""
    data_dir: str = "."
    """Data directory (database, recordings, pid file) and base of the relative paths below;
    relative to the current directory (``softpbx --data-dir`` overrides it)."""
    db_path: str = "softpbx.db"
    """SQLite database (registrations, CDRs, recordings index, webhook outbox)."""
    log_level: str = "info"
    """``debug`` | ``info`` | ``warning`` | ``error``."""
    user_agent: str = "softpbx"
    """Value of the ``User-Agent``/``Server`` header."""


@dataclass(frozen=True, slots=True)
class SipSettings:
    """``softpbx.toml`` ``[sip]``: RFC 3261 timers and message limits."""

    t1_ms: int = 500
    """RFC 3261 §17.1.1.1 T1, RTT estimate."""
    t2_ms: int = 4000
    """T2, maximum retransmit interval for non-INVITE requests and INVITE responses."""
    t4_ms: int = 5000
    """T4, maximum duration a message remains in the network."""
    max_message_size: int = 65536
    """Messages larger than this are refused (UDP: dropped; TCP: 513 and close)."""
    tcp_idle_timeout: int = 600
    """Seconds an idle TCP/TLS connection is kept open; one that carries a live registration
    is kept until the binding expires (the phone may send no keep-alives)."""
    tcp_max_connections: int = 10_000
    """Open TCP connections at most; a new one beyond closes the one silent the longest."""
    tcp_max_connections_per_ip: int = 100
    """Open TCP connections from one IP at most (phones behind one NAT share it); a new one
    beyond closes that IP's connection silent the longest."""
    trace: bool = False
    """Log every SIP message sent and received (``softpbx run -v`` turns it on too)."""
    capture_pcap: str = ""
    """Write every SIP message to this pcap file (relative to ``data_dir``); empty: off."""
    capture_max_mb: int = 20
    """Size of one pcap file before it rotates (``x.pcap`` -> ``x.pcap.1``)."""
    capture_files: int = 5
    """pcap files kept, the current one included."""
    hep_address: str = ""
    """``host:port`` of a HEP v3 collector (Homer, ``sngrep -L udp:...``) that gets every
    SIP message over UDP; empty: off."""
    hep_capture_id: int = 2001
    """The HEP capture agent id softpbx sends (tells several capturing hosts apart)."""


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """``softpbx.toml`` ``[auth]``: digest authentication (RFC 2617, RFC 8760)."""

    nonce_ttl: int = 300
    """Seconds a nonce stays valid; an older one is answered with ``stale=true``."""
    secret: str = ""
    """HMAC key for stateless nonces; empty means a random key per start."""
    algorithms: tuple[str, ...] = ("MD5",)
    """Digest algorithms offered, one challenge header each, in this order. Only MD5 by default
    (as Asterisk and FreeSWITCH): phones on libre (baresip) walk every challenge and fail on
    the first algorithm they do not know, others answer only the first one. SHA-256 (RFC 8760)
    is opt-in here or per extension (``directory/<ext>.toml`` ``auth_algorithms``)."""
    max_failures: int = 20
    """Failed authentications from one source IP within ``failure_window`` before it is banned."""
    failure_window: int = 60
    """Seconds over which failures are counted."""
    ban_time: int = 300
    """Seconds a banned source IP gets ``403`` without any check."""


@dataclass(frozen=True, slots=True)
class RegistrarSettings:
    """``softpbx.toml`` ``[registrar]``: RFC 3261 §10 registrations."""

    min_expires: int = 60
    """Shorter requested expiry gets ``423 Interval Too Brief`` with ``Min-Expires``."""
    max_expires: int = 3600
    """Longer requested expiry is shortened to this."""
    default_expires: int = 3600
    """Expiry when the REGISTER names none."""
    max_contacts: int = 10
    """Bindings per extension; the oldest is dropped when a new one would exceed it."""


@dataclass(frozen=True, slots=True)
class MediaSettings:
    """``softpbx.toml`` ``[media]``: the RTP relay."""

    rtp_ip: str = "127.0.0.1"
    """Address the relay binds RTP/RTCP sockets on."""
    ext_rtp_ip: str = ""
    """Address written into SDP ``c=`` lines; empty means ``rtp_ip``."""
    rtp_start_port: int = 16384
    """First port of the RTP range (even)."""
    rtp_end_port: int = 32767
    """Last port of the RTP range."""
    rtp_timeout: int = 60
    """Seconds with no RTP from either side after which an answered call is hung up (0 = off)."""
    codecs: tuple[str, ...] = ("PCMU", "PCMA", "telephone-event")
    """Codecs softpbx knows by name; any other codec is relayed untouched."""


@dataclass(frozen=True, slots=True)
class RecordingSettings:
    """``softpbx.toml`` ``[recording]``: MP3 call recording."""

    enabled: bool = True
    """Master switch; extensions, gateways and dial rules turn recording on per call."""
    dir: str = "recordings"
    """Where finished MP3 files are written."""
    stereo: bool = True
    """Stereo (caller left, callee right) or a mono mix."""
    flush_seconds: float = 5.0
    """How often buffered audio is encoded to disk."""
    compression_level: float = 0.5
    """libsndfile MP3 compression level, 0.0 (best quality) .. 1.0 (smallest)."""
    bitrate_mode: str = "VARIABLE"
    """``VARIABLE``, ``AVERAGE`` or ``CONSTANT`` MP3 bitrate; VBR encodes fastest (stereo:
    about 0.5 % of a core per call here, CBR 0.6-0.7 %)."""
    max_age_days: int = 0
    """Delete recordings older than this (0 = keep forever)."""
    max_total_mb: int = 0
    """Delete the oldest recordings beyond this total size (0 = no limit)."""


@dataclass(frozen=True, slots=True)
class CallSettings:
    """``softpbx.toml`` ``[calls]``: call-wide limits."""

    max_duration: int = 14400
    """Seconds after which an answered call is hung up (0 = no limit)."""
    no_answer_timeout: int = 60
    """Seconds a call may ring before it counts as ``no answer``."""


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """``softpbx.toml`` ``[http]``: the HTTP server (recordings, click-to-call, status)."""

    http_ip: str = "127.0.0.1"
    """Listen address."""
    http_port: int = 8080
    """Listen port (0 disables the HTTP server)."""
    public_base_url: str = "http://127.0.0.1:8080"
    """Base of links handed to the CRM (recordings)."""
    api_token: str = ""
    """``Authorization: Bearer`` token of ``/api/*`` (and the console, the inspector),
    checked whenever it is set."""
    admin_user: str = ""
    """The web console's login (with ``admin_password``)."""
    admin_password: str = ""
    """The web console's password; with neither it nor ``api_token`` set, the console,
    ``/api/*`` and the inspector answer loopback clients only (``softpbx check`` warns)."""


CRM_EVENTS: tuple[str, ...] = ("NOTIFY_START", "NOTIFY_INTERNAL", "NOTIFY_END",
                               "NOTIFY_OUT_START", "NOTIFY_OUT_END", "NOTIFY_RECORD")
"""Every event of the CRM contract (crm-telephony-api.md §1)."""


@dataclass(frozen=True, slots=True)
class CrmSettings:
    """``softpbx.toml`` ``[crm]``: the CRM contract (``crm-telephony-api.md``)."""

    webhook_url: str = ""
    """Where ``NOTIFY_*`` events are POSTed; empty means the built-in inspector."""
    click_to_call_path: str = "/click-to-call"
    """HTTP path the CRM POSTs click-to-call requests to (``crm-telephony-api.md`` §5)."""
    click_to_call_token: str = ""
    """Click-to-call ``x-pbx-authentication`` token; empty disables click-to-call (the
    endpoint answers 403, it is never open). The old key ``token`` is read as this one."""
    click_to_call_error_codes: bool = True
    """Refusals get the fitting HTTP status (400/401/403/404/409/422/429); false answers every
    request with HTTP 200 and only the JSON ``status`` tells (the OnlinePBX convention)."""
    click_to_call_ring_s: int = 30
    """Seconds the employee's phone rings before the click ends as ``no answer``."""
    click_to_call_auto_answer: bool = False
    """Ask desk phones to answer the employee leg by themselves (``Call-Info: answer-after=0``
    and ``Alert-Info: info=alert-autoanswer``)."""
    click_to_call_min_interval_s: float = 5.0
    """One click per extension within this many seconds; a repeat is refused with 429 (0 = no
    limit)."""
    answer_timeout_ms: int = 1500
    """How long an inbound call waits for the CRM's answer to ``NOTIFY_START``."""
    events: tuple[str, ...] = CRM_EVENTS
    """Which events are sent (any of :data:`CRM_EVENTS`; empty sends none)."""
    internal_calls: bool = False
    """Whether extension-to-extension calls produce events at all."""
    request_timeout_ms: int = 5000
    """How long one delivery attempt may take before it counts as a timeout (and is retried)."""
    max_in_flight: int = 16
    """Requests to the CRM at the same time, all calls together."""
    retry_min_s: float = 1.0
    """First retry delay; each retry doubles it (with jitter) up to ``retry_max_s``."""
    retry_max_s: float = 300.0
    """Longest delay between two attempts of one event."""
    give_up_after_h: float = 24.0
    """Hours after which an undelivered event is given up (kept in the outbox, re-queueable)."""
    signature_secret: str = ""
    """Zadarma-style ``Signature`` header key (HMAC-SHA1); empty sends no signature."""
    extra_fields: bool = False
    """Add Zadarma's ``status_code`` and ``is_recorded`` to NOTIFY_END / NOTIFY_OUT_END."""


@dataclass(frozen=True, slots=True)
class Profile:
    """``internal.toml`` / ``external.toml`` ``[profile]``: a SIP listener set.

    Two profiles may share one address: a request is then classified by its source
    (a gateway's address means ``external``).
    """

    name: str
    """``internal`` (phones) or ``external`` (trunks)."""
    sip_ip: str = "127.0.0.1"
    """Listen address (IPv4 or IPv6 literal)."""
    sip_port: int = 5060
    """Listen port."""
    transports: tuple[Transport, ...] = (Transport.UDP, Transport.TCP)
    """Transports opened on ``sip_ip:sip_port``."""
    ext_sip_ip: str = ""
    """Address advertised in Via/Contact/SDP; empty means ``sip_ip``."""
    auth_calls: bool = True
    """Challenge requests from this profile's non-gateway sources."""
    tls_port: int = 5061
    """TLS listen port on ``sip_ip`` (when ``"tls"`` is in ``transports``)."""
    tls_cert: str = ""
    """PEM certificate chain of the TLS listener (relative paths: the profiles directory)."""
    tls_key: str = ""
    """PEM private key of ``tls_cert`` (relative paths: the profiles directory)."""
    tls_verify: bool = True
    """Verify the peer's certificate on the TLS connections softpbx opens from this profile
    (to gateways with ``transport = "tls"``, back to a phone): chain and host name."""
    tls_ca_file: str = ""
    """PEM CA bundle for ``tls_verify``; empty means the system's trust store."""


@dataclass(frozen=True, slots=True)
class Extension:
    """``directory/<number>.toml`` ``[user]``: one extension (a phone user)."""

    id: str
    """Extension number / SIP user name (``101``)."""
    password: str
    """Digest password."""
    effective_caller_id_name: str = ""
    """Display name shown on internal calls."""
    effective_caller_id_number: str = ""
    """Number shown on internal calls; empty means ``id``."""
    outbound_caller_id_name: str = ""
    """Display name sent to trunks."""
    outbound_caller_id_number: str = ""
    """Caller ID sent to trunks (and as ``caller_id`` in outbound CRM events; ``0`` if empty)."""
    record: bool = False
    """Record calls this extension places or answers (a call is recorded when any party of
    it -- extension, gateway, dial rule or inbound route -- asks for it)."""
    enabled: bool = True
    """A disabled extension cannot register or call."""
    auth_algorithms: tuple[str, ...] = ()
    """Digest algorithms offered to this extension (its REGISTERs by To, its calls by From), in
    this order, e.g. ``["SHA-256", "MD5"]``; empty means ``[auth] algorithms``."""
    pickup_group: str = ""
    """Call pickup group: ``*8`` on this extension's phone picks up a call ringing another
    extension of the same group (``**<ext>`` picks up any extension); "" = none."""


@dataclass(frozen=True, slots=True)
class Gateway:
    """``gateways/<name>.toml`` ``[gateway]``: a SIP trunk (carrier)."""

    name: str
    """Gateway name (file stem)."""
    proxy: str
    """``host[:port]`` requests to the trunk are sent to."""
    transport: Transport = Transport.UDP
    """Transport towards the trunk."""
    register: bool = False
    """Register to the provider (outbound REGISTER with refresh)."""
    username: str = ""
    """Credentials for the provider's 401/407 challenges and for registering."""
    password: str = ""
    """Password for ``username``."""
    realm: str = ""
    """Realm/domain used in From/To of outbound requests; empty means the proxy host."""
    from_user: str = ""
    """User part of From when registering; empty means ``username``."""
    expire_seconds: int = 3600
    """Registration expiry asked of the provider."""
    retry_seconds: int = 30
    """Wait after a failed registration before retrying."""
    inbound_addresses: tuple[str, ...] = ()
    """Sources whose requests are this gateway's: ``ip`` or ``ip:port``. Empty: the proxy's
    address (``ip:port`` when the proxy names a port)."""
    caller_id_in_from: bool = True
    """Put the outbound caller ID in the From user part."""
    record: bool = False
    """Record calls through this gateway."""
    max_calls: int = 0
    """Concurrent calls allowed through this gateway (0 = unlimited)."""
    auth_algorithms: tuple[str, ...] = ("MD5", "SHA-256")
    """Digest algorithms we accept to answer in the provider's 401/407 challenges; the
    provider's order decides among them (RFC 8760 §2.4)."""


@dataclass(frozen=True, slots=True)
class InboundRoute:
    """``dialplan.toml`` ``[[inbound]]``: where a DID from a trunk goes."""

    did: str
    """Dialled number as the trunk sends it (``74950000000``), or ``*`` for any."""
    destination: str
    """An extension (``101``), a ring group (``group:sales``), an outside number through a
    gateway (``gateway:carrier/+79990000000``) or the dialled number itself through a gateway
    (``gateway:carrier``)."""
    no_answer_timeout: int = 0
    """Seconds before the fallback is tried (0 = ``calls.no_answer_timeout``)."""
    fallback: str = ""
    """Destination after no answer (same forms as ``destination``)."""
    record: bool = False
    """Record every call on this route."""


@dataclass(frozen=True, slots=True)
class RingGroup:
    """``dialplan.toml`` ``[[ring_group]]``: several extensions behind one destination."""

    name: str
    """Referenced as ``group:<name>``."""
    members: tuple[str, ...]
    """Extensions, in order."""
    strategy: str = "all"
    """``all`` (ring together) or ``sequential`` (one after another)."""
    member_timeout: int = 20
    """Seconds each member rings with ``sequential``."""


@dataclass(frozen=True, slots=True)
class Rewrite:
    """One number normalisation step: a regex and its replacement (``\\1`` groups)."""

    match: str
    """Python regular expression matched against the whole number."""
    replace: str
    """Replacement template."""


@dataclass(frozen=True, slots=True)
class OutboundRoute:
    """``dialplan.toml`` ``[[outbound]]``: which gateway an outside number goes through."""

    name: str
    """Rule name (for logs and CDRs)."""
    pattern: str
    """Python regular expression matched against the whole dialled number."""
    gateway: str
    """Gateway name."""
    rewrites: tuple[Rewrite, ...] = ()
    """Normalisations applied in order once the pattern matched."""
    caller_id_number: str = ""
    """Outbound caller ID overriding the extension's."""
    caller_id_name: str = ""
    """Outbound display name overriding the extension's."""
    record: bool = False
    """Record every call on this route."""


@dataclass(frozen=True, slots=True)
class Dialplan:
    """``dialplan.toml``: inbound DIDs, ring groups and outbound rules (first match wins)."""

    inbound: tuple[InboundRoute, ...] = ()
    ring_groups: tuple[RingGroup, ...] = ()
    outbound: tuple[OutboundRoute, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    """Everything loaded from one ``sip_profiles/`` directory."""

    profiles_dir: str
    """The directory it was loaded from (absolute)."""
    global_: GlobalSettings = field(default_factory=GlobalSettings)
    sip: SipSettings = field(default_factory=SipSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    registrar: RegistrarSettings = field(default_factory=RegistrarSettings)
    media: MediaSettings = field(default_factory=MediaSettings)
    recording: RecordingSettings = field(default_factory=RecordingSettings)
    calls: CallSettings = field(default_factory=CallSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    crm: CrmSettings = field(default_factory=CrmSettings)
    internal: Profile = field(default_factory=lambda: Profile(name="internal"))
    external: Profile = field(default_factory=lambda: Profile(name="external"))
    extensions: tuple[Extension, ...] = ()
    gateways: tuple[Gateway, ...] = ()
    dialplan: Dialplan = field(default_factory=Dialplan)

    def extension(self, ext_id: str) -> Extension | None:
        """The enabled-or-not extension named ``ext_id``, or ``None``."""
        for ext in self.extensions:
            if ext.id == ext_id:
                return ext
        return None


class ConfigError(Exception):
    """A problem in the configuration, naming the file, the key and what is wrong."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        super().__init__(f"{file}: {key}: {problem}")
        self.file = file
        self.key = key
        self.problem = problem
