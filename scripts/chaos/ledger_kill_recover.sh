#!/usr/bin/env bash
# Seed §4.1 ledger only: the ledger kill -9ed while trades flow; no duplicate, none missing. Success line: ledger_kill_recover_ok=true
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
exec "$root/runbooks/_spotex.sh" ledger-kill-recover "$@"
