-- Edge security: trader API keys, operator keys, Idempotency-Key records, the admin audit chain and
-- break-glass state. Times the edge reasons about (expiry, audit timestamps) are integer epoch
-- milliseconds supplied by the edge so they follow one clock and tests can drive them.

-- Trader API keys. An HMAC key keeps its secret encrypted (AES-256-GCM under the edge's master key,
-- additional data = the api key, so a ciphertext cannot be moved to another row); an Ed25519 key
-- keeps only the client's public key.
CREATE TABLE IF NOT EXISTS api_keys (
    api_key        text PRIMARY KEY CHECK (api_key ~ '^[A-Za-z0-9_-]{16,128}$'),
    account_id     bigint NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('hmac', 'ed25519')),
    scopes         text[] NOT NULL CHECK (scopes <@ ARRAY['read', 'trade']::text[] AND cardinality(scopes) > 0),
    label          text NOT NULL DEFAULT '',
    secret_enc     bytea,
    enc_key_id     text,
    public_key     bytea,
    created_at_ms  bigint NOT NULL,
    revoked_at_ms  bigint,
    CHECK (
        (kind = 'hmac' AND secret_enc IS NOT NULL AND enc_key_id IS NOT NULL AND public_key IS NULL)
        OR (kind = 'ed25519' AND public_key IS NOT NULL AND octet_length(public_key) = 32 AND secret_enc IS NULL)
    )
);
CREATE INDEX IF NOT EXISTS api_keys_account_idx ON api_keys (account_id);

-- Operator (admin API) keys: Ed25519 public keys with roles. Keys may also come from config
-- (security.admin_keys); a row here with revoked_at_ms set revokes a config key too, so a leaked
-- operator key can be shut off without a redeploy.
CREATE TABLE IF NOT EXISTS operator_keys (
    public_key_hex text PRIMARY KEY CHECK (public_key_hex ~ '^[0-9a-f]{64}$'),
    name           text NOT NULL,
    roles          text[] NOT NULL CHECK (roles <@ ARRAY['viewer', 'operator', 'approver', 'admin']::text[]),
    created_at_ms  bigint NOT NULL,
    revoked_at_ms  bigint
);

-- Idempotency-Key records, scoped per api key. An in-progress claim carries a lease
-- (locked_until_ms) and a claim token so only the current holder can complete it.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    api_key          text NOT NULL,
    idem_key         text NOT NULL CHECK (idem_key ~ '^[A-Za-z0-9._:-]{1,128}$'),
    fingerprint      text NOT NULL,
    state            text NOT NULL CHECK (state IN ('in_progress', 'completed')),
    claim_token      text NOT NULL,
    attempts         integer NOT NULL DEFAULT 1,
    status           integer,
    body             bytea,
    headers          jsonb,
    created_at_ms    bigint NOT NULL,
    locked_until_ms  bigint NOT NULL,
    completed_at_ms  bigint,
    expires_at_ms    bigint NOT NULL,
    PRIMARY KEY (api_key, idem_key),
    CHECK (state = 'in_progress' OR (status IS NOT NULL AND body IS NOT NULL AND headers IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS idempotency_keys_expiry_idx ON idempotency_keys (expires_at_ms);

-- Tamper-evident audit chains ("admin" for emergency controls, "change" for change management).
-- `body` is the canonical JSON entry exactly as hashed and is authoritative; the other columns
-- are copies for querying.
CREATE TABLE IF NOT EXISTS audit_chain (
    chain      text NOT NULL,
    seq        bigint NOT NULL CHECK (seq > 0),
    ts_ms      bigint NOT NULL,
    actor      text NOT NULL,
    action     text NOT NULL,
    prev_hash  text NOT NULL,
    hash       text NOT NULL,
    body       text NOT NULL,
    PRIMARY KEY (chain, seq)
);

-- One head row per chain: appenders lock it (SELECT ... FOR UPDATE) so appends are serialised,
-- and it pins the last hash so a truncated tail is detectable.
CREATE TABLE IF NOT EXISTS audit_head (
    chain  text PRIMARY KEY,
    seq    bigint NOT NULL,
    hash   text NOT NULL
);
INSERT INTO audit_head (chain, seq, hash)
VALUES ('admin', 0, repeat('0', 64)), ('change', 0, repeat('0', 64))
ON CONFLICT (chain) DO NOTHING;

-- The application never rewrites history; refuse it in the database too. (Someone with DDL rights
-- can drop this trigger: the hash chain and exported/anchored heads are what catch that.)
CREATE OR REPLACE FUNCTION audit_chain_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_chain is append-only (% refused)', TG_OP USING ERRCODE = 'insufficient_privilege';
END;
$$;
DROP TRIGGER IF EXISTS audit_chain_no_update ON audit_chain;
CREATE TRIGGER audit_chain_no_update BEFORE UPDATE OR DELETE ON audit_chain
    FOR EACH ROW EXECUTE FUNCTION audit_chain_append_only();
DROP TRIGGER IF EXISTS audit_chain_no_truncate ON audit_chain;
CREATE TRIGGER audit_chain_no_truncate BEFORE TRUNCATE ON audit_chain
    FOR EACH STATEMENT EXECUTE FUNCTION audit_chain_append_only();

-- Break-glass: one row, changed only together with an audit entry in the same transaction.
CREATE TABLE IF NOT EXISTS break_glass (
    id              integer PRIMARY KEY CHECK (id = 1),
    enabled         boolean NOT NULL,
    actor           text NOT NULL,
    reason          text NOT NULL,
    ticket          text NOT NULL,
    enabled_at_ms   bigint NOT NULL,
    expires_at_ms   bigint NOT NULL,
    disabled_at_ms  bigint,
    disabled_by     text,
    disable_reason  text,
    audit_seq       bigint NOT NULL
);
