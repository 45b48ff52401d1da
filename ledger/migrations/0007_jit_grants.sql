-- Just-in-time operator role grants (edge/access.py, docs/security.md "Access control: SoD, JIT
-- grants and the access review"): a time-bound extra role on an operator key that already exists
-- (security.admin_keys or operator_keys). The edge's operator key store adds the role while
-- now < expires_at_ms and the grant is not revoked. A grant row is written in the same transaction
-- as its admin-chain entry (JitGrant), a revocation with its entry (JitRevoke): audit_seq and
-- revoke_audit_seq point at them. Times are integer epoch milliseconds from the granting process.
CREATE TABLE IF NOT EXISTS jit_grants (
    id                bigserial PRIMARY KEY,
    username          text   NOT NULL CHECK (username ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$'),
    public_key_hex    text   NOT NULL CHECK (public_key_hex ~ '^[0-9a-f]{64}$'),
    role              text   NOT NULL CHECK (role IN ('viewer', 'operator', 'approver', 'admin')),
    ticket            text   NOT NULL CHECK (length(btrim(ticket)) > 0),
    reason            text   NOT NULL CHECK (length(btrim(reason)) > 0),
    granted_by        text   NOT NULL CHECK (length(btrim(granted_by)) > 0),
    granted_at_ms     bigint NOT NULL,
    expires_at_ms     bigint NOT NULL CHECK (expires_at_ms > granted_at_ms),
    audit_seq         bigint NOT NULL,
    revoked_at_ms     bigint,
    revoked_by        text,
    revoke_reason     text,
    revoke_ticket     text,
    revoke_audit_seq  bigint,
    CHECK ((revoked_at_ms IS NULL) = (revoked_by IS NULL))
);
CREATE INDEX IF NOT EXISTS jit_grants_key_idx ON jit_grants (public_key_hex, expires_at_ms) WHERE revoked_at_ms IS NULL;
CREATE INDEX IF NOT EXISTS jit_grants_user_idx ON jit_grants (username);
