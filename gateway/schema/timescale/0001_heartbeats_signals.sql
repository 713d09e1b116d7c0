-- Heartbeat and signal history as TimescaleDB hypertables, partitioned by received_at.

CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE heartbeats (
    received_at timestamptz NOT NULL,
    device_id   text NOT NULL,
    source      text NOT NULL,
    panel_time  timestamptz,
    boot        bigint,
    seq         bigint,
    mains       boolean,
    battery_v   double precision,
    rssi        integer,
    link        text,
    panel       text,
    fw          text,
    uptime_s    bigint
);
-- No default index on received_at alone: retention drops whole chunks and every query
-- filters by device. Each extra index slows the COPY that writes heartbeats.
SELECT create_hypertable(
    'heartbeats', by_range('received_at', INTERVAL '1 day'), create_default_indexes => false
);
CREATE INDEX heartbeats_device_time ON heartbeats (device_id, received_at DESC);

CREATE TABLE signals (
    received_at  timestamptz NOT NULL,
    id           text NOT NULL,
    source       text NOT NULL,
    device_id    text NOT NULL,
    facility_id  text NOT NULL DEFAULT '',
    event_class  text NOT NULL,
    code         text NOT NULL DEFAULT '',
    qualifier    text NOT NULL,
    sia_code     text NOT NULL DEFAULT '',
    group_number integer NOT NULL DEFAULT 0,
    zone         integer NOT NULL DEFAULT 0,
    zone_label   text NOT NULL DEFAULT '',
    text         text NOT NULL DEFAULT '',
    panel_time   timestamptz,
    seq          bigint,
    boot         bigint,
    test         boolean NOT NULL DEFAULT false,
    body         bytea NOT NULL,          -- the whole canonical signal, msgpack
    raw          bytea NOT NULL DEFAULT '\x',
    PRIMARY KEY (id, received_at)
);
SELECT create_hypertable('signals', by_range('received_at', INTERVAL '7 days'));
CREATE INDEX signals_facility_time ON signals (facility_id, received_at DESC);
CREATE INDEX signals_device_time ON signals (device_id, received_at DESC);

-- One row per written batch. A batch id found here is not written again.
CREATE TABLE ingest_batches (
    batch_id   text PRIMARY KEY,
    kind       text NOT NULL,             -- heartbeats or signals
    rows       integer NOT NULL,
    written_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ingest_batches_written ON ingest_batches (written_at);
