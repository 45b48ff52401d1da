#!/usr/bin/env bash
# Seed §4.0 "RBAC SoD check": the separation-of-duties rules (edge/access.py SOD_RULES) over the
# effective operator set of the stack in SPOTEX_DATA_DIR (security.admin_keys + operator_keys +
# active JIT grants). Prints one `violation key=... roles=... rule=...` line per violation and
# `rbac_sod_ok=true|false`; exit 1 on violations. Evidence: build/access/rbac-sod-<stamp>.json and
# rbac-sod-latest.json (ACCESS_OUT_DIR overrides the directory). Extra args go to
# `spotex access sod-check` (e.g. --json, --data-dir DIR).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
exec "$spotex" access sod-check --out "${ACCESS_OUT_DIR:-$root/build/access}" "$@"
