#!/usr/bin/env bash
# Seed §4.0 safety budget freshness proof: every budget's evidence exists and is fresh (the freshness job; exit 1 when any is stale or missing).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
exec "$spotex" jobs run freshness "$@"
