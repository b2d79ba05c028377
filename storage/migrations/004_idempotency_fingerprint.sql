-- What an Idempotency-Key replay must match: sha256 of the request that first used the key
-- (web.routes.fingerprint). Null for rows written before it existed; those replay as before.
ALTER TABLE positions ADD COLUMN IF NOT EXISTS request_fingerprint TEXT;
