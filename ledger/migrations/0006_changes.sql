-- Change workflow (ledger/changes.py, docs/changes.md): an operator's proposal to alter the running
-- exchange's operational settings, approved by two distinct approvers (neither the proposer), then
-- applied and verified. Every step is also an entry of the 'change' audit chain; ``hash`` is the
-- sha256 of the canonical proposal content, and each approval records the hash it approved, so a
-- proposal changed after approval is refused at apply (CHANGE_TAMPERED).
CREATE TABLE IF NOT EXISTS change_proposals (
    id             text        PRIMARY KEY,
    ops            jsonb       NOT NULL,
    reason         text        NOT NULL,
    ticket         text        NOT NULL,
    proposer       text        NOT NULL,
    created_at_ms  bigint      NOT NULL,
    expires_at_ms  bigint      NOT NULL,
    hash           text        NOT NULL,
    state          text        NOT NULL DEFAULT 'proposed',  -- proposed | applying | verified | verify_failed
    proposed_seq   bigint      NOT NULL,                     -- change-chain seq of ChangeProposed
    applied_by     text,
    applied_at_ms  bigint,
    result         jsonb
);
CREATE INDEX IF NOT EXISTS change_proposals_created ON change_proposals (created_at_ms DESC);

CREATE TABLE IF NOT EXISTS change_approvals (
    change_id      text        NOT NULL REFERENCES change_proposals (id),
    approver       text        NOT NULL,
    approved_at_ms bigint      NOT NULL,
    hash           text        NOT NULL,                     -- the proposal hash this approval is for
    audit_seq      bigint      NOT NULL,                     -- change-chain seq of ChangeApproved
    PRIMARY KEY (change_id, approver)
);
