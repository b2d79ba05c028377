-- The event log (issue 17): the outbox kept after publication, with structured columns beside
-- the rendered ``message`` (which stays the exact WebSocket text). ``source`` is who made the
-- change (api or engine), ``trade_id`` the Coinbase trade whose window triggered an engine
-- close (NULL otherwise, and for events written before this migration). The event body as
-- JSONB (type, source, seq, recovered?, position as of the event) is ``payload`` in the
-- ``event_log`` view, parsed from ``message`` when read: stored, it cost the writer ~15 us per
-- event (a 10k stop cascade's commit ~150 ms) for a column only audits read. Existing rows get
-- their ``source`` from their ``message`` (the JSON event text).
ALTER TABLE events ADD COLUMN IF NOT EXISTS source TEXT;
ALTER TABLE events ADD COLUMN IF NOT EXISTS trade_id BIGINT;

UPDATE events SET source = message::jsonb ->> 'source' WHERE source IS NULL;

ALTER TABLE events ALTER COLUMN source SET NOT NULL;
ALTER TABLE events DROP CONSTRAINT IF EXISTS events_source_check;
ALTER TABLE events ADD CONSTRAINT events_source_check CHECK (source IN ('api', 'engine'));
-- UNIQUE (user_id, seq) already indexes replays (/ws?since) and events_position_idx the audit
-- route; retention finds closed positions through positions.

CREATE OR REPLACE VIEW event_log AS
SELECT id, user_id, seq, type, source, position_id, trade_id, message::jsonb AS payload,
       message, created_at, published_at
  FROM events;
