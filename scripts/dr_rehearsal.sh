#!/usr/bin/env bash
# Seed §8 DR rehearsal: back up the stack (core snapshot + WAL, pg_dump), restore into a fresh place,
# replay, compare state hashes, run the ledger invariants. Report: build/dr/dr-report.json
# (restore_time_ms, replay_time_ms, invariant_violations, RTO/RPO against [dr]).
# Success line: dr_rehearsal_ok=true (non-zero exit and dr_rehearsal_failed=<reason> otherwise).
# Against the stack in SPOTEX_DATA_DIR when one is running there, else a private one.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export SPOTEX_RUNBOOK_OUT="${SPOTEX_RUNBOOK_OUT:-$root/build/dr}"
exec "$root/runbooks/_spotex.sh" dr-rehearsal "$@"
