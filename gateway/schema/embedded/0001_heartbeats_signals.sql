-- Heartbeat and signal history of the embedded store (SQLite, WAL).
-- Times are microseconds since the Unix epoch (INTEGER, UTC), so they round-trip exactly.

CREATE TABLE heartbeats (
    received_at INTEGER NOT NULL,
    device_id   TEXT NOT NULL,
    source      TEXT NOT NULL,
    panel_time  INTEGER,
    boot        INTEGER,
    seq         INTEGER,
    mains       INTEGER,
    battery_v   REAL,
    rssi        INTEGER,
    link        TEXT,
    panel       TEXT,
    fw          TEXT,
    uptime_s    INTEGER
);
CREATE INDEX heartbeats_device_time ON heartbeats (device_id, received_at);
CREATE INDEX heartbeats_time ON heartbeats (received_at);

CREATE TABLE signals (
    id           TEXT PRIMARY KEY,
    received_at  INTEGER NOT NULL,
    source       TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    facility_id  TEXT NOT NULL DEFAULT '',
    event_class  TEXT NOT NULL,
    code         TEXT NOT NULL DEFAULT '',
    qualifier    TEXT NOT NULL,
    sia_code     TEXT NOT NULL DEFAULT '',
    group_number INTEGER NOT NULL DEFAULT 0,
    zone         INTEGER NOT NULL DEFAULT 0,
    zone_label   TEXT NOT NULL DEFAULT '',
    text         TEXT NOT NULL DEFAULT '',
    panel_time   INTEGER,
    seq          INTEGER,
    boot         INTEGER,
    test         INTEGER NOT NULL DEFAULT 0,
    body         BLOB NOT NULL,          -- the whole canonical signal, msgpack
    raw          BLOB NOT NULL DEFAULT x''
);
CREATE INDEX signals_facility_time ON signals (facility_id, received_at);
CREATE INDEX signals_time ON signals (received_at);

-- One row per written batch. A batch id found here is not written again.
CREATE TABLE ingest_batches (
    batch_id   TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,            -- heartbeats or signals
    rows       INTEGER NOT NULL,
    written_at INTEGER NOT NULL
);
CREATE INDEX ingest_batches_written ON ingest_batches (written_at);
