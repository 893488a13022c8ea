-- softpbx state (SQLite, WAL). PRAGMA user_version tracks the schema version.
CREATE TABLE IF NOT EXISTS registrations (
    aor         TEXT    NOT NULL,   -- extension id
    key         TEXT    NOT NULL,   -- binding identity (instance/reg-id or normalised URI)
    contact     TEXT    NOT NULL,   -- Contact URI as sent
    params      TEXT    NOT NULL DEFAULT '',
    expires_at  REAL    NOT NULL,   -- Unix time the binding lapses
    call_id     TEXT    NOT NULL,
    cseq        INTEGER NOT NULL,
    transport   TEXT    NOT NULL,   -- where the REGISTER really came from (NAT)
    remote_ip   TEXT    NOT NULL,
    remote_port INTEGER NOT NULL,
    local_ip    TEXT    NOT NULL,
    local_port  INTEGER NOT NULL,
    q           TEXT,
    user_agent  TEXT    NOT NULL DEFAULT '',
    updated_at  REAL    NOT NULL,
    PRIMARY KEY (aor, key)
);
CREATE INDEX IF NOT EXISTS registrations_expiry ON registrations (expires_at);

CREATE TABLE IF NOT EXISTS cdr (
    call_id      TEXT PRIMARY KEY,  -- softpbx id: in_/out_/int_ + 40 hex
    sip_call_id  TEXT NOT NULL,     -- Call-ID of the caller's leg
    direction    TEXT NOT NULL,     -- inbound | outbound | internal
    caller       TEXT NOT NULL,
    callee       TEXT NOT NULL,     -- number dialled
    did          TEXT NOT NULL,     -- DID of an inbound call, else ''
    extension    TEXT NOT NULL,     -- extension that answered (or last rang), else ''
    caller_extension TEXT NOT NULL DEFAULT '',  -- extension that placed the call, else ''
    gateway      TEXT NOT NULL,     -- trunk used, else ''
    started_at   REAL NOT NULL,     -- Unix times
    answered_at  REAL,
    ended_at     REAL NOT NULL,
    duration     INTEGER NOT NULL,  -- talk time, seconds
    disposition  TEXT NOT NULL,     -- answered | busy | cancel | no answer | failed
    sip_code     INTEGER NOT NULL,
    cause        TEXT NOT NULL,
    pbx_call_id  TEXT NOT NULL DEFAULT '',  -- the CRM's id of the call (in_/out_ + 40 hex), else ''
    sent_number  TEXT NOT NULL DEFAULT '',  -- number sent to the gateway after rewrites, else ''
    transfers    TEXT NOT NULL DEFAULT ''   -- transfer/pickup chain (JSON list), else ''
);
CREATE INDEX IF NOT EXISTS cdr_started ON cdr (started_at);

CREATE TABLE IF NOT EXISTS recordings (
    call_id     TEXT PRIMARY KEY,
    token_hash  TEXT NOT NULL UNIQUE,  -- sha256 of the link token: lookups never compare tokens
    path        TEXT NOT NULL,         -- final MP3 path
    status      TEXT NOT NULL,         -- recording | ready | failed | deleted
    reason      TEXT NOT NULL DEFAULT '',
    duration    REAL,                  -- seconds of audio
    size        INTEGER,               -- bytes
    created_at  REAL NOT NULL,         -- Unix times
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS recordings_created ON recordings (created_at);

-- The CRM webhook outbox: every NOTIFY_* is committed here before its first attempt.
CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,  -- commit order (= order within a call)
    event_id        TEXT    NOT NULL UNIQUE,  -- X-Event-Id: <pbx_call_id>.<seq>
    pbx_call_id     TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    event           TEXT    NOT NULL,         -- NOTIFY_START ... NOTIFY_RECORD
    fields          TEXT    NOT NULL,         -- JSON array of [name, value], in POST order
    state           TEXT    NOT NULL,         -- pending | delivered | failed | given_up
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL    NOT NULL,         -- Unix times
    created_at      REAL    NOT NULL,
    last_status     INTEGER,                  -- HTTP status of the last attempt (NULL: none)
    last_error      TEXT    NOT NULL DEFAULT '',
    last_latency_ms REAL,
    delivered_at    REAL
);
CREATE INDEX IF NOT EXISTS outbox_state ON outbox (state, id);
CREATE INDEX IF NOT EXISTS outbox_call ON outbox (pbx_call_id, id);
