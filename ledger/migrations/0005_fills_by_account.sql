-- The fills history the edge serves (GET /v1/fills, Binance myTrades) reads ledger_trades by
-- account: one index per side of the trade, ordered like the API pages (per market, by trade id).
-- They cost the settlement path: COPY into ledger_trades alone went from ~54k to ~26k rows/s in a
-- noisy A/B here (docs/api.md, "Fills"); without them every fills request scans the trade table.
CREATE INDEX IF NOT EXISTS ledger_trades_taker_idx ON ledger_trades (taker_account_id, symbol, trade_id);
CREATE INDEX IF NOT EXISTS ledger_trades_maker_idx ON ledger_trades (maker_account_id, symbol, trade_id);
