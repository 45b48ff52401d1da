#!/usr/bin/env bash
# Seed §4.3 load regression drill: load-smoke, load-10k, load-50k in one pass, judged by the load safety
# budgets. Evidence: load-all-<stamp>.json, load-all-latest.json, safety-budget-*.json,
# status-before.json / status-after.json. Success line: runbook_load_regression_ok=true
# Gateway-only dry-run (violations recorded, not fatal): RUNBOOK_ALLOW_BUDGET_FAIL=true ./runbooks/load_regression.sh
# Smaller, for a harness check (not release evidence): ./runbooks/load_regression.sh --scale 0.01
exec "$(dirname "$0")/_spotex.sh" load-regression "$@"
