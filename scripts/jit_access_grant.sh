#!/usr/bin/env bash
# Seed §9 JIT grant generation:
#   ./scripts/jit_access_grant.sh <user> <ticket_id> <reason> <duration_minutes> \
#       [--key <operator pubkey hex>] [--role viewer|operator|approver|admin] [--actor <granting admin>]
# --key/--role/--actor may come from JIT_OPERATOR_KEY / JIT_ROLE / JIT_ACTOR. The grant is
# appended to the admin audit chain (JitGrant) in the transaction that stores it, and the binding
# document (annotations ticket-id, reason, expires-at, granted-by) is written to
# build/access/jit-<user>-<stamp>-<id>.json (ACCESS_OUT_DIR overrides the directory).
# Duration 1..480 minutes. Errors: one line on stderr, exit 1. Revoke: spotex access jit-revoke.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
if [ $# -lt 4 ]; then
  echo "usage: $0 <user> <ticket_id> <reason> <duration_minutes> [--key HEX] [--role ROLE] [--actor A]" >&2
  exit 2
fi
exec "$spotex" access jit-grant --out "${ACCESS_OUT_DIR:-$root/build/access}" "$@"
