-- Engines load a symbol's open positions in pages ordered by id (keyset pagination), so that
-- a start-up with 100,000 open positions never holds them all as full rows at once.
CREATE INDEX IF NOT EXISTS positions_open_symbol_id_idx
    ON positions (symbol, id) WHERE status = 'open';
DROP INDEX IF EXISTS positions_open_idx;
