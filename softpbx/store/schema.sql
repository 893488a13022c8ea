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
