-- The log tail (issue 17): every event row carries the id of the transaction that wrote it, so
-- that other processes can read committed events in an order that never skips one committed
-- late (storage/tail.py). Event ids (bigserial) are taken at INSERT, not at COMMIT: a reader
-- that followed ids would pass over a lower id still uncommitted. A transaction id below a
-- snapshot's xmin belongs to a finished transaction, so a reader that reads up to xmin has
-- seen every event that will ever exist below it. Existing rows get this migration's own
-- transaction id (they are all committed, and older than any tail started after it).
ALTER TABLE events ADD COLUMN IF NOT EXISTS tx xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX IF NOT EXISTS events_tx_idx ON events (tx, id);
