#!/usr/bin/env bash
# Seed §4.0 change workflow, create proposal (docs/changes.md):
#   ./scripts/change_proposal.sh --op mode:BTC-USDT=CANCEL_ONLY --op throttle:BTC-USDT=5/10 \
#       --actor <proposer> --reason <why> --ticket <ticket> [--ttl-sec N] [--json]
# Ops: mode:SYM=MODE | throttle:SYM=RATE[/BURST] | throttle-clear:SYM | withdrawals-halt:on|off.
# The stack: SPOTEX_DATA_DIR or --data-dir. Prints change_id=...; a refusal: one line on stderr, exit 1.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
exec "$spotex" change propose "$@"
