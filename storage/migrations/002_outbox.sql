-- The event outbox: every change writes its event here in the same transaction, with the
-- user's next seq (gap-free: the counter row is updated in that transaction too).
CREATE TABLE IF NOT EXISTS user_seq (
    user_id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL CHECK (seq >= 0)
);

CREATE TABLE IF NOT EXISTS events (
    id BIGSERIAL PRIMARY KEY,
    user_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    type TEXT NOT NULL CHECK (type IN ('position.created', 'position.closed')),
    position_id UUID NOT NULL,
    message TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at TIMESTAMPTZ,
    UNIQUE (user_id, seq)
);

CREATE INDEX IF NOT EXISTS events_unpublished_idx ON events (id) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS events_position_idx ON events (position_id);
