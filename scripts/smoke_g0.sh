#!/usr/bin/env bash
# Seed §5 smoke G0: an order through REST, its trade settled in PostgreSQL, WS events delivered. Success line: smoke_g0_success=true
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
exec "$spotex" smoke g0 "$@"
