-- Per symbol, the last Coinbase trade whose window was fully judged and whose resulting closes
-- committed (issue 14). Gap recovery fetches the trades after it. Only persistence writes it,
-- and only forward (GREATEST), in the close batch's transaction or in its own write.
CREATE TABLE IF NOT EXISTS watermarks (
    symbol TEXT PRIMARY KEY,
    last_trade_id BIGINT NOT NULL CHECK (last_trade_id >= 0),
    last_trade_time TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
