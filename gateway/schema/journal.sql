-- Local journal, outbox and registry of the gateway (SQLite, WAL).
-- Times are seconds since the Unix epoch (REAL, UTC).

CREATE TABLE IF NOT EXISTS signals (
    id          TEXT PRIMARY KEY,
    device_id   TEXT NOT NULL,
    facility_id TEXT NOT NULL DEFAULT '',
    event_class TEXT NOT NULL,
    code        TEXT NOT NULL DEFAULT '',
    qualifier   TEXT NOT NULL,
    zone        INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    dedup_key   TEXT,
    body        BLOB NOT NULL,          -- the whole canonical signal, msgpack
    routed      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS signals_unrouted ON signals (received_at) WHERE routed = 0;
CREATE INDEX IF NOT EXISTS signals_dedup ON signals (dedup_key, received_at);
CREATE INDEX IF NOT EXISTS signals_facility ON signals (facility_id, received_at);

CREATE TABLE IF NOT EXISTS quarantine (
    id          INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    source      TEXT NOT NULL,
    origin      TEXT NOT NULL DEFAULT '',   -- topic, port or line the input came from
    device_id   TEXT NOT NULL DEFAULT '',
    reason      TEXT NOT NULL,
    detail      TEXT NOT NULL,
    raw         BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS quarantine_time ON quarantine (received_at);

CREATE TABLE IF NOT EXISTS facilities (
    id        TEXT PRIMARY KEY,
    name      TEXT NOT NULL,
    address   TEXT NOT NULL DEFAULT '',
    commune   TEXT NOT NULL DEFAULT '',
    province  TEXT NOT NULL DEFAULT '',
    latitude  REAL,
    longitude REAL,
    team      TEXT NOT NULL DEFAULT ''     -- area fire team that covers the facility
);

CREATE TABLE IF NOT EXISTS zones (
    facility_id TEXT NOT NULL REFERENCES facilities (id) ON DELETE CASCADE,
    zone        INTEGER NOT NULL,
    label       TEXT NOT NULL,
    PRIMARY KEY (facility_id, zone)
);

CREATE TABLE IF NOT EXISTS devices (
    id            TEXT PRIMARY KEY,
    facility_id   TEXT REFERENCES facilities (id),
    protocol      TEXT NOT NULL DEFAULT 'mqtt',
    heartbeat_s   INTEGER NOT NULL DEFAULT 60,
    window_s      INTEGER NOT NULL DEFAULT 180,
    test_mode     INTEGER NOT NULL DEFAULT 0,
    password_hash TEXT NOT NULL DEFAULT '',  -- Mosquitto password-file hash ($7$ PBKDF2-SHA512)
    created_at    REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS incidents (
    id              TEXT PRIMARY KEY,
    correlation_key TEXT NOT NULL,
    facility_id     TEXT NOT NULL DEFAULT '',
    device_id       TEXT NOT NULL DEFAULT '',
    event_class     TEXT NOT NULL,
    state           TEXT NOT NULL,
    outcome         TEXT NOT NULL DEFAULT '',
    opened_at       REAL NOT NULL,
    updated_at      REAL NOT NULL,
    zones           TEXT NOT NULL DEFAULT '[]',  -- JSON list of zones that reported
    active_conditions TEXT NOT NULL DEFAULT '[]',  -- JSON list of device:code:zone not yet restored
    restored_at     REAL,                        -- when the last active zone restored
    test            INTEGER NOT NULL DEFAULT 0
);
-- One open incident per correlation key, enforced by the database.
CREATE UNIQUE INDEX IF NOT EXISTS incidents_open_key ON incidents (correlation_key)
    WHERE state IN ('open', 'acknowledged', 'dispatched', 'on_scene');

CREATE TABLE IF NOT EXISTS incident_events (
    id          TEXT PRIMARY KEY,
    incident_id TEXT NOT NULL REFERENCES incidents (id),
    at          REAL NOT NULL,
    kind        TEXT NOT NULL,          -- opened, attached, restored, state
    signal_id   TEXT,
    detail      TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS incident_events_incident ON incident_events (incident_id, at);

CREATE TABLE IF NOT EXISTS outbox (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id         TEXT NOT NULL,
    destination      TEXT NOT NULL,
    incident_id      TEXT NOT NULL DEFAULT '',
    event_class      TEXT NOT NULL DEFAULT '',
    created_at       REAL NOT NULL,
    body             BLOB NOT NULL,      -- JSON without the forwarding time
    state            TEXT NOT NULL DEFAULT 'pending',   -- pending, delivered, dead
    attempts         INTEGER NOT NULL DEFAULT 0,
    first_attempt_at REAL,
    next_attempt_at  REAL NOT NULL DEFAULT 0,
    delivered_at     REAL,
    last_error       TEXT NOT NULL DEFAULT '',
    UNIQUE (event_id, destination)
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (destination, seq) WHERE state = 'pending';
