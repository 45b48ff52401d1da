#!/usr/bin/env bash
# Seed §4.0 controls freshness proof: the safety budget judged on fresh evidence (the safety_budget job; exit 1 on a violation, stale or missing evidence).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
exec "$spotex" jobs run safety_budget "$@"
