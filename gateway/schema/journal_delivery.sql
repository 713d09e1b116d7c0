-- Delivery records of the forwarder, beside the outbox of journal.sql.
-- Times are seconds since the Unix epoch (REAL, UTC). A `seq` column names an outbox row, which
-- is one event for one destination. These columns carry no foreign key, so outbox retention may
-- delete old rows without first deleting these.

-- Attempt details that the outbox row does not keep.
CREATE TABLE IF NOT EXISTS deliveries (
    seq              INTEGER PRIMARY KEY,
    last_attempt_at  REAL NOT NULL,
    last_status      INTEGER,            -- HTTP status of the last response; NULL after a connection error or timeout
    confirmed_status INTEGER             -- the 2xx or 409 status that confirmed delivery
);

-- Every permanent rejection, kept after a requeue so the history stays visible.
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY,
    seq         INTEGER NOT NULL,
    event_id    TEXT NOT NULL,
    destination TEXT NOT NULL,
    dead_at     REAL NOT NULL,
    status      INTEGER,                 -- HTTP status of the rejection
    reason      TEXT NOT NULL DEFAULT '',
    requeued_at REAL                     -- set by `gateway outbox requeue`
);
CREATE INDEX IF NOT EXISTS dead_letters_seq ON dead_letters (seq);
CREATE INDEX IF NOT EXISTS outbox_dead ON outbox (destination, seq) WHERE state = 'dead';

-- Rows set back to pending by `gateway outbox requeue`, possibly in another process. The
-- running forwarder polls this table, loads the rows behind its cursor and deletes the marks.
CREATE TABLE IF NOT EXISTS outbox_requeue (
    seq          INTEGER PRIMARY KEY,
    requested_at REAL NOT NULL
);

-- Forwarding troubles raised for an event, so that a restart neither raises one twice nor
-- leaves one unrestored. kind: dead_letter (a destination rejected the event permanently) or
-- unconfirmed (no destination confirmed a fire alarm within the limit).
CREATE TABLE IF NOT EXISTS forward_troubles (
    event_id    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    device_id   TEXT NOT NULL,           -- forward:<destination>, the device id of the trouble signal
    raised_at   REAL NOT NULL,
    restored_at REAL,
    PRIMARY KEY (event_id, kind, device_id)
);

-- Circuit breaker state per destination as the forwarder last wrote it, for `gateway outbox`.
CREATE TABLE IF NOT EXISTS destination_status (
    destination TEXT PRIMARY KEY,
    circuit     TEXT NOT NULL,           -- closed, open or half_open
    changed_at  REAL NOT NULL,
    last_error  TEXT NOT NULL DEFAULT ''
);
