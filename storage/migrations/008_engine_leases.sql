-- Engine leases (issues 17 and 18): one row per partition of the symbol space. The engine that
-- holds a partition renews its row (UPDATE) within the TTL; `token` is the fencing token, bumped
-- on every change of owner, and every fenced close checks it (FOR SHARE) in its transaction.
-- Rows are created on demand by storage.leases.acquire; expiry uses PostgreSQL's clock only.
CREATE TABLE IF NOT EXISTS engine_leases (
    partition INTEGER PRIMARY KEY CHECK (partition >= 0),
    owner TEXT,
    token BIGINT NOT NULL DEFAULT 0,
    expires_at TIMESTAMPTZ NOT NULL
);
