-- The positions table of the old backend, adopted when it already exists (its rows intact),
-- plus what tickguard adds: triggered_at, the idempotency key, and the constraints.
CREATE TABLE IF NOT EXISTS positions (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id TEXT NOT NULL,
    symbol TEXT NOT NULL,
    side TEXT NOT NULL,
    entry_price NUMERIC(18, 8) NOT NULL,
    take_profit NUMERIC(18, 8),
    stop_loss NUMERIC(18, 8),
    status TEXT NOT NULL DEFAULT 'open',
    close_price NUMERIC(18, 8),
    close_reason TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    closed_at TIMESTAMPTZ
);

ALTER TABLE positions ADD COLUMN IF NOT EXISTS triggered_at TIMESTAMPTZ;
ALTER TABLE positions ADD COLUMN IF NOT EXISTS idempotency_key TEXT;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'positions_side_check') THEN
        ALTER TABLE positions ADD CONSTRAINT positions_side_check
            CHECK (side IN ('long', 'short'));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'positions_status_check') THEN
        ALTER TABLE positions ADD CONSTRAINT positions_status_check
            CHECK (status IN ('open', 'closed'));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'positions_close_reason_check') THEN
        ALTER TABLE positions ADD CONSTRAINT positions_close_reason_check
            CHECK (close_reason IS NULL
                   OR close_reason IN ('take_profit', 'stop_loss', 'manual', 'system'));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'positions_prices_positive') THEN
        ALTER TABLE positions ADD CONSTRAINT positions_prices_positive
            CHECK (entry_price > 0
                   AND (take_profit IS NULL OR take_profit > 0)
                   AND (stop_loss IS NULL OR stop_loss > 0)
                   AND (close_price IS NULL OR close_price > 0));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'positions_close_fields') THEN
        ALTER TABLE positions ADD CONSTRAINT positions_close_fields
            CHECK ((status = 'open' AND close_price IS NULL AND close_reason IS NULL
                    AND closed_at IS NULL)
                OR (status = 'closed' AND close_price IS NOT NULL AND close_reason IS NOT NULL
                    AND closed_at IS NOT NULL));
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION tickguard_touch_updated_at() RETURNS trigger AS $$
BEGIN
    NEW.updated_at = now();
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS positions_touch_updated_at ON positions;
CREATE TRIGGER positions_touch_updated_at
    BEFORE UPDATE ON positions
    FOR EACH ROW EXECUTE FUNCTION tickguard_touch_updated_at();

CREATE INDEX IF NOT EXISTS positions_user_created_idx ON positions (user_id, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS positions_symbol_status_idx ON positions (symbol, status);
CREATE INDEX IF NOT EXISTS positions_open_idx ON positions (symbol) WHERE status = 'open';
CREATE INDEX IF NOT EXISTS positions_user_closed_idx
    ON positions (user_id, closed_at DESC, id DESC) WHERE status = 'closed';
CREATE UNIQUE INDEX IF NOT EXISTS positions_idempotency_idx
    ON positions (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
