#!/usr/bin/env bash
# Seed §4.1 crash recovery drill: the core is kill -9'd under load and must recover the pre-crash
# WAL hash; then (unless CHAOS_SKIP_LEDGER_ASSERTS=true, the seed's default for fast drills) the
# ledger is kill -9'd and must catch up with no duplicate and no missing trade row.
# Success line: chaos_replay_success=true
set -uo pipefail
dir="$(cd "$(dirname "$0")" && pwd)"
"$dir/_spotex.sh" core-kill-recover "$@"
core=$?
if [ "${CHAOS_SKIP_LEDGER_ASSERTS:-true}" = "true" ]; then
  echo "ledger_asserts=skipped (CHAOS_SKIP_LEDGER_ASSERTS=true)"
  ledger=0
else
  "$dir/_spotex.sh" ledger-kill-recover
  ledger=$?
fi
if [ "$core" -eq 0 ] && [ "$ledger" -eq 0 ]; then
  echo "chaos_replay_success=true"
  exit 0
fi
echo "chaos_replay_success=false"
exit 1
