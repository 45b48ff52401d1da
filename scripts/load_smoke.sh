#!/usr/bin/env bash
# Seed §7 load harness: REST orders + WS subscribers through the whole stack -> build/load/load-smoke.json
# (order_p99_ms, order_error_rate, order_tps, ws_messages, thresholds, pass). Exit 1 on a threshold
# violation: block the release and investigate. Against the stack in SPOTEX_DATA_DIR when one is
# running there, else a private one. Success line: load_smoke_ok=true
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
args=(load smoke --out "${SPOTEX_RUNBOOK_OUT:-$root/build/load}")
if [ -n "${SPOTEX_DATA_DIR:-}" ] && "$spotex" status --data-dir "$SPOTEX_DATA_DIR" >/dev/null 2>&1; then
  args+=(--data-dir "$SPOTEX_DATA_DIR")
fi
exec "$spotex" "${args[@]}" "$@"
