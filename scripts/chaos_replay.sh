#!/usr/bin/env bash
# Seed §4.1 full crash recovery drill: the core and then the ledger kill -9ed and recovered. Success line: chaos_replay_success=true
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export CHAOS_SKIP_LEDGER_ASSERTS="${CHAOS_SKIP_LEDGER_ASSERTS:-false}"
exec "$root/runbooks/crash_recovery.sh" "$@"
