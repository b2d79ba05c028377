-- Engine members (issue 18, stage 3): every engine process announces itself here and renews its
-- row with its lease keeper's cycle. The live members (expires_at > now()) are what each engine's
-- balancer divides the partitions by: with N of them and P partitions, an engine wants at most
-- ceil(P/N). A member that stops renewing (killed, paused, cut off) drops out after the TTL.
CREATE TABLE IF NOT EXISTS engine_members (
    owner TEXT PRIMARY KEY,
    expires_at TIMESTAMPTZ NOT NULL
);
