-- State of the store writer (gateway/store/writer.py) in the journal.

-- How far the journal's `signals` table has been copied to the store.
CREATE TABLE IF NOT EXISTS store_cursor (
    name       TEXT PRIMARY KEY,          -- 'signals'
    last_rowid INTEGER NOT NULL           -- rowid of the last signal the store confirmed
);

-- Heartbeat batches that did not fit in memory while the store was down or slow.
-- AUTOINCREMENT keeps ids from being reused after the spool empties.
CREATE TABLE IF NOT EXISTS store_spool (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id   TEXT NOT NULL UNIQUE,      -- the batch id written to the store, kept across retries
    rows       INTEGER NOT NULL,
    oldest_at  REAL NOT NULL,             -- received_at of the batch's oldest heartbeat, Unix seconds
    spooled_at REAL NOT NULL,
    body       BLOB NOT NULL              -- msgpack array of heartbeats
);
