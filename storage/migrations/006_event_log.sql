-- The event log (issue 17): the outbox kept after publication, with structured columns beside
-- the rendered ``message`` (which stays the exact WebSocket text). ``source`` is who made the
-- change (api or engine), ``trade_id`` the Coinbase trade whose window triggered an engine
-- close (NULL otherwise, and for events written before this migration), ``payload`` the event
-- body as JSONB (type, source, seq, recovered?, position as of the event). Existing rows are
-- converted from their ``message`` (the JSON event text).
ALTER TABLE events ADD COLUMN IF NOT EXISTS source TEXT;
ALTER TABLE events ADD COLUMN IF NOT EXISTS trade_id BIGINT;
ALTER TABLE events ADD COLUMN IF NOT EXISTS payload JSONB;

UPDATE events
   SET payload = message::jsonb,
       source = message::jsonb ->> 'source'
 WHERE payload IS NULL;

ALTER TABLE events ALTER COLUMN source SET NOT NULL;
ALTER TABLE events ALTER COLUMN payload SET NOT NULL;
ALTER TABLE events DROP CONSTRAINT IF EXISTS events_source_check;
ALTER TABLE events ADD CONSTRAINT events_source_check CHECK (source IN ('api', 'engine'));
-- UNIQUE (user_id, seq) already indexes replays (/ws?since) and events_position_idx the audit
-- route; retention finds closed positions through positions.
