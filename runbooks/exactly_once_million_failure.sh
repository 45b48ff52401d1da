#!/usr/bin/env bash
# Seed §4.0 exactly-once million failure drill: N distinct trades (default 1,000,000; pass --trades N
# for a short run) through the real ledger consumer while it is kill -9'd at >= 10 random points and
# redelivery is forced; zero duplicates, zero gaps, balances equal the core's. It runs its own
# PostgreSQL, NATS and ledger (no stack needed). Evidence: build/runbooks/exactly-once-million/
# exactly-once-million-summary.json. Success line: exactly_once_million_ok=true
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
exec "$spotex" drill exactly-once-million --out "${SPOTEX_RUNBOOK_OUT:-$root/build/runbooks/exactly-once-million}" "$@"
