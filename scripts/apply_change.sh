#!/usr/bin/env bash
# Seed §4.0 change workflow, apply change (with verification) (docs/changes.md):
#   ./scripts/apply_change.sh CHG-<id> --actor <operator> [--skip-verification] [--json]
# Executes the approved ops (each audited on the admin chain), checks each effect is visible and,
# unless --skip-verification, runs the ledger invariants and verifies the admin and change chains.
# Exit 0 only when verified; a refusal or a failed verification: one line on stderr, exit 1.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
if [ $# -lt 1 ]; then
  echo "usage: $0 CHANGE_ID --actor OPERATOR [--skip-verification] [--json]" >&2
  exit 2
fi
exec "$spotex" change apply "$@"
