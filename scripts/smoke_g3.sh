#!/usr/bin/env bash
# Seed §5.1 smoke G3: G0 plus the reserve and settlement entries of the trade in the ledger. Success line: smoke_g3_success=true
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
exec "$spotex" smoke g3 "$@"
