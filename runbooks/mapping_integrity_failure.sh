#!/usr/bin/env bash
# Seed §4.0 mapping integrity failure drill: a market's definition drifted between the configuration
# and the engine; caught before deploy (spotex mapping check), refused by the edge once deployed
# (409 MARKET_MAPPING_MISMATCH), repaired. Runs on its own private stack (it rewrites that stack's
# configuration file), never on SPOTEX_DATA_DIR's. Evidence: build/runbooks/mapping-integrity-failure/.
# Success line: runbook_mapping_integrity_failure_ok=true
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
exec "$spotex" drill mapping-integrity-failure --out "${SPOTEX_RUNBOOK_OUT:-$root/build/runbooks/mapping-integrity-failure}" "$@"
