-- The ledger: the double-entry book of record fed by the core's events (docs/ledger.md).
--
-- Money is integers in each asset's minor units. A posting's delta is a bigint (the core never
-- moves more than 2**62 at once); balances are numeric so no sum can overflow.
-- Every statement here is safe to re-run.

-- One row that every writer of the book locks first (settlement batches, corrections, balance
-- rebuilds): writers are serialised, and journal transaction ids are handed out under the lock.
CREATE TABLE IF NOT EXISTS ledger_writer (
    id          integer PRIMARY KEY CHECK (id = 1),
    next_tx_id  bigint NOT NULL CHECK (next_tx_id > 0)
);
INSERT INTO ledger_writer (id, next_tx_id) VALUES (1, 1) ON CONFLICT (id) DO NOTHING;

-- Accounts: one per (account, asset, bucket), including the fee account (1) and the custody /
-- outside-world account (0, goes negative). `balance` is the materialized balance: updated in the
-- same transaction as the postings, and recomputable from them (`spotex ledger rebuild-balances`).
CREATE TABLE IF NOT EXISTS ledger_accounts (
    account_id  bigint NOT NULL CHECK (account_id >= 0),
    asset       text NOT NULL,
    bucket      text NOT NULL CHECK (bucket IN ('available', 'hold')),
    kind        text GENERATED ALWAYS AS (
                    CASE account_id WHEN 0 THEN 'custody' WHEN 1 THEN 'fee' ELSE 'user' END) STORED,
    balance     numeric(40, 0) NOT NULL DEFAULT 0,
    last_tx_id  bigint NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, asset, bucket)
) WITH (fillfactor = 50);  -- room for HOT updates: every batch rewrites the balances it touches

-- Journal transactions: one per balance-changing event (source = stream + engine seq, unique, so
-- a replay cannot post twice) and one per applied correction (stream '~correction', seq = the
-- correction request id).
--
-- The key is the source. tx_id (handed out under the writer lock, in order) links the postings; it
-- gets a BRIN index rather than a second B-tree on the settlement path, and the invariant checker
-- proves it unique.
CREATE TABLE IF NOT EXISTS ledger_journal (
    tx_id           bigint NOT NULL,
    stream          text NOT NULL,
    seq             bigint NOT NULL CHECK (seq > 0),
    kind            text NOT NULL,
    reference_type  text NOT NULL,
    reference_id    text NOT NULL,
    occurred_at_ms  bigint NOT NULL,
    fencing_token   bigint NOT NULL,
    correlation_id  text NOT NULL,
    legs            smallint NOT NULL CHECK (legs > 0),
    posted_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT ledger_journal_source_key PRIMARY KEY (stream, seq)
);
CREATE INDEX IF NOT EXISTS ledger_journal_tx_brin ON ledger_journal USING brin (tx_id);

-- Postings: the legs of a journal transaction, exactly the event's moves. Written in tx_id order,
-- so a BRIN index finds any range for a fraction of a B-tree's upkeep (a B-tree primary key on
-- (tx_id, leg) cost a third of the settlement COPY). (tx_id, leg) is unique by construction (tx
-- ids are handed out under the writer lock and the journal's primary key refuses a reused one), no
-- foreign key either (an index probe per leg); the invariant checker proves every transaction has
-- exactly `legs` postings summing to zero per asset and that no posting lacks its transaction.
CREATE TABLE IF NOT EXISTS ledger_postings (
    tx_id       bigint NOT NULL,
    leg         smallint NOT NULL CHECK (leg >= 0),
    account_id  bigint NOT NULL CHECK (account_id >= 0),
    asset       text NOT NULL,
    bucket      text NOT NULL CHECK (bucket IN ('available', 'hold')),
    delta       bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_postings_tx_brin ON ledger_postings USING brin (tx_id);
-- No index by account on purpose: it would cost another third on the settlement path. Account
-- statements read ledger_accounts (balances) or scan by transaction range.

-- One row per TradeExecuted: its primary key makes a duplicated trade impossible and countable.
CREATE TABLE IF NOT EXISTS ledger_trades (
    symbol            text NOT NULL,
    trade_id          bigint NOT NULL,
    seq               bigint NOT NULL,
    tx_id             bigint NOT NULL,
    taker_order_id    bigint NOT NULL,
    taker_account_id  bigint NOT NULL,
    taker_side        text NOT NULL,
    maker_order_id    bigint NOT NULL,
    maker_account_id  bigint NOT NULL,
    price_ticks       bigint NOT NULL,
    qty_lots          bigint NOT NULL,
    base_amount       bigint NOT NULL,
    quote_amount      bigint NOT NULL,
    taker_fee         bigint NOT NULL,
    taker_fee_asset   text NOT NULL,
    maker_fee         bigint NOT NULL,
    maker_fee_asset   text NOT NULL,
    occurred_at_ms    bigint NOT NULL,
    PRIMARY KEY (symbol, trade_id)
);

-- The book is append-only: UPDATE, DELETE and TRUNCATE are refused by the database itself.
-- Corrections are new journal transactions.
CREATE OR REPLACE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only (% refused); corrections are new entries', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['ledger_journal', 'ledger_postings', 'ledger_trades'] LOOP
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %I', t || '_no_change', t);
        EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE OR DELETE ON %I FOR EACH ROW '
                       'EXECUTE FUNCTION ledger_append_only()', t || '_no_change', t);
        EXECUTE format('DROP TRIGGER IF EXISTS %I ON %I', t || '_no_truncate', t);
        EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I FOR EACH STATEMENT '
                       'EXECUTE FUNCTION ledger_append_only()', t || '_no_truncate', t);
    END LOOP;
END;
$$;

-- Double entry in the database too: every INSERT statement into ledger_postings must carry whole
-- transactions that sum to zero per asset (the writers insert a transaction's legs in one
-- statement). One aggregate over the statement's rows, so COPY stays fast.
CREATE OR REPLACE FUNCTION ledger_postings_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE bad record;
BEGIN
    SELECT tx_id, asset, sum(delta) AS total INTO bad FROM new_rows
        GROUP BY tx_id, asset HAVING sum(delta) <> 0 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'unbalanced journal transaction % in %: postings sum to %', bad.tx_id, bad.asset, bad.total
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END;
$$;
DROP TRIGGER IF EXISTS ledger_postings_balanced ON ledger_postings;
CREATE TRIGGER ledger_postings_balanced AFTER INSERT ON ledger_postings
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION ledger_postings_balanced();

-- Seed §5.1: one row per journal transaction, in the shape operators query.
CREATE OR REPLACE VIEW ledger_entries AS
SELECT j.tx_id AS entry_id,
       j.reference_type,
       j.reference_id,
       CASE j.kind
           WHEN 'TradeExecuted' THEN 'settlement'
           WHEN 'OrderAccepted' THEN 'reserve'
           WHEN 'OrderAmended' THEN 'reserve_adjust'
           WHEN 'OrderCanceled' THEN 'release'
           WHEN 'Deposited' THEN 'deposit'
           WHEN 'Withdrawn' THEN 'withdrawal'
           WHEN 'Correction' THEN 'correction'
           ELSE lower(j.kind)
       END AS entry_kind,
       CASE WHEN j.stream LIKE '~%' THEN NULL ELSE j.stream END AS symbol,
       CASE WHEN j.stream LIKE '~%' THEN NULL ELSE j.seq END AS engine_seq,
       j.kind AS event_type,
       j.legs,
       j.occurred_at_ms,
       j.posted_at AS created_at
FROM ledger_journal j;

-- Postings with their transaction's source, for people.
CREATE OR REPLACE VIEW ledger_posting_lines AS
SELECT p.tx_id, p.leg, j.stream, j.seq, j.kind, p.account_id, p.asset, p.bucket, p.delta, j.posted_at
FROM ledger_postings p JOIN ledger_journal j USING (tx_id);

-- Consumer checkpoint: last applied engine seq per stream, written in the same transaction as the
-- batch. `last_js_seq` is the EVT stream sequence of the message holding `last_seq`: where a
-- restarted consumer must resume for this stream. A stream stops (state 'stopped') on a gap, a
-- fencing-token refusal or an unbalanced event; only an audited operator resume restarts it.
CREATE TABLE IF NOT EXISTS ledger_consumer_checkpoint (
    stream               text PRIMARY KEY,
    last_seq             bigint NOT NULL CHECK (last_seq >= 0),
    max_fencing_token    bigint NOT NULL DEFAULT 0,
    last_js_seq          bigint NOT NULL DEFAULT 0,
    last_occurred_at_ms  bigint NOT NULL DEFAULT 0,
    events_applied       bigint NOT NULL DEFAULT 0,
    state                text NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'stopped')),
    stop_reason          text,
    stopped_at_seq       bigint,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- What the core told us about markets, symbol modes and the withdrawals halt (from its events).
CREATE TABLE IF NOT EXISTS ledger_markets (
    symbol      text PRIMARY KEY,
    base        text NOT NULL,
    quote       text NOT NULL,
    mode        text NOT NULL DEFAULT 'NORMAL',
    mode_seq    bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS ledger_core_flags (
    name        text PRIMARY KEY,
    value       text NOT NULL,
    seq         bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- EngineCheckpoints, kept and evaluated once the ledger has applied every stream up to the
-- checkpoint's watermark (stream_seqs): ledger totals at that watermark must equal the core's.
CREATE TABLE IF NOT EXISTS ledger_engine_checkpoints (
    sys_seq       bigint PRIMARY KEY,
    last_seq      bigint NOT NULL,
    state_hash    text NOT NULL,
    stream_seqs   jsonb NOT NULL,
    totals        jsonb NOT NULL,
    occurred_at_ms bigint NOT NULL,
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'match', 'mismatch')),
    detail        jsonb,
    received_at   timestamptz NOT NULL DEFAULT now(),
    evaluated_at  timestamptz
);
CREATE INDEX IF NOT EXISTS ledger_engine_checkpoints_pending_idx ON ledger_engine_checkpoints (sys_seq)
    WHERE status = 'pending';

-- Alerts: invariant violations, gaps, fencing refusals, lag breaches. One open row per
-- (category, check, key) while unresolved; the automatic response is recorded with it.
CREATE TABLE IF NOT EXISTS ledger_alerts (
    id              bigserial PRIMARY KEY,
    category        text NOT NULL CHECK (category IN ('invariant', 'gap', 'fencing', 'lag', 'decode')),
    check_name      text NOT NULL,
    key             text NOT NULL,
    stream          text,
    detail          jsonb NOT NULL DEFAULT '{}'::jsonb,
    occurrences     integer NOT NULL DEFAULT 1,
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at    timestamptz NOT NULL DEFAULT now(),
    response_state  text NOT NULL DEFAULT 'pending' CHECK (response_state IN ('pending', 'done', 'failed', 'none')),
    response        jsonb,
    resolved_at     timestamptz,
    resolved_by     text,
    resolve_reason  text
);
CREATE UNIQUE INDEX IF NOT EXISTS ledger_alerts_open_key ON ledger_alerts (category, check_name, key)
    WHERE resolved_at IS NULL;
CREATE INDEX IF NOT EXISTS ledger_alerts_pending_idx ON ledger_alerts (id) WHERE response_state = 'pending';

-- Invariant runs (each check's result), for the daily report and `spotex ledger status`.
CREATE TABLE IF NOT EXISTS ledger_invariant_runs (
    id                   bigserial PRIMARY KEY,
    scope                text NOT NULL CHECK (scope IN ('incremental', 'full')),
    ok                   boolean NOT NULL,
    results              jsonb NOT NULL,
    checked_through_tx   bigint NOT NULL DEFAULT 0,
    started_at           timestamptz NOT NULL DEFAULT now(),
    seconds              double precision NOT NULL DEFAULT 0
);

-- Reconciliation: engine seq (EVT) against ledger seq per stream, now and the history of changes.
CREATE TABLE IF NOT EXISTS ledger_reconciliation (
    stream        text PRIMARY KEY,
    engine_seq    bigint NOT NULL,
    ledger_seq    bigint NOT NULL,
    lag           bigint NOT NULL,
    level         text NOT NULL CHECK (level IN ('ok', 'warn', 'throttle', 'halt')),
    breach_since  timestamptz,
    checked_at    timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS ledger_reconciliation_history (
    id              bigserial PRIMARY KEY,
    stream          text NOT NULL,
    engine_seq      bigint NOT NULL,
    ledger_seq      bigint NOT NULL,
    lag             bigint NOT NULL,
    level           text NOT NULL,
    previous_level  text,
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ledger_reconciliation_history_stream_idx ON ledger_reconciliation_history (stream, id);

-- The safety latch per symbol ('_sys' latches the withdrawals). Engaged by the ledger; released
-- only by an approved, audited release when lag is 0 and the invariants pass.
CREATE TABLE IF NOT EXISTS ledger_latches (
    symbol             text PRIMARY KEY,
    engaged            boolean NOT NULL,
    mode               text NOT NULL CHECK (mode IN ('CANCEL_ONLY', 'SOFT_HALT', 'HARD_HALT')),
    cause              text NOT NULL,
    reason             text NOT NULL,
    engaged_at         timestamptz NOT NULL DEFAULT now(),
    engaged_audit_seq  bigint,
    released_at        timestamptz,
    released_by        text[],
    release_reason     text,
    release_ticket     text,
    release_audit_seq  bigint,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS ledger_latch_history (
    id          bigserial PRIMARY KEY,
    symbol      text NOT NULL,
    action      text NOT NULL,
    mode        text,
    cause       text,
    reason      text,
    actors      text[] NOT NULL DEFAULT '{}',
    ticket      text,
    audit_seq   bigint,
    detail      jsonb,
    at          timestamptz NOT NULL DEFAULT now()
);

-- Corrections: a request (balanced postings, reason, ticket), two approvals by distinct operators
-- other than the requester, then a correction journal transaction. Every step is audited.
CREATE TABLE IF NOT EXISTS ledger_correction_requests (
    id             bigserial PRIMARY KEY,
    requested_by   text NOT NULL,
    reason         text NOT NULL,
    ticket         text NOT NULL,
    postings       jsonb NOT NULL,
    status         text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'applied', 'rejected')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    audit_seq      bigint,
    applied_at     timestamptz,
    tx_id          bigint,
    rejected_by    text,
    reject_reason  text
);
CREATE TABLE IF NOT EXISTS ledger_correction_approvals (
    request_id   bigint NOT NULL REFERENCES ledger_correction_requests (id),
    approver     text NOT NULL,
    approved_at  timestamptz NOT NULL DEFAULT now(),
    audit_seq    bigint,
    PRIMARY KEY (request_id, approver)
);
