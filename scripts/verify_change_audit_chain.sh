#!/usr/bin/env bash
# Seed §4.0 change audit-chain verify: ./scripts/verify_change_audit_chain.sh --require-events [--json]
# Recomputes the 'change' audit chain in PostgreSQL (SPOTEX_DATA_DIR or --data-dir); exit 1 if broken
# (or empty with --require-events), naming the first bad entry.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
exec "$spotex" audit verify --chain change "$@"
