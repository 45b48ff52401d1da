-- Base schema: bookkeeping shared by every service. The ledger's own tables come in later migrations.
CREATE TABLE IF NOT EXISTS service_heartbeat (
    service     text PRIMARY KEY,
    instance    text NOT NULL,
    beat_at     timestamptz NOT NULL DEFAULT now(),
    info        jsonb NOT NULL DEFAULT '{}'::jsonb
);
