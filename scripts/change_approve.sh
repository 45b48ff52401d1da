#!/usr/bin/env bash
# Seed §4.0 change workflow, record approval (docs/changes.md):
#   ./scripts/change_approve.sh CHG-<id> --actor <approver> [--json]
# Two approvals by distinct approvers, neither the proposer, are needed before apply.
# The stack: SPOTEX_DATA_DIR or --data-dir. A refusal (CHANGE_SELF_APPROVAL, CHANGE_DUPLICATE_APPROVAL,
# CHANGE_TAMPERED, CHANGE_EXPIRED, ...): one line on stderr, exit 1.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
if [ $# -lt 1 ]; then
  echo "usage: $0 CHANGE_ID --actor APPROVER [--json]" >&2
  exit 2
fi
exec "$spotex" change approve "$@"
