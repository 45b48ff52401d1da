#!/usr/bin/env bash
# Seed §4.0 "Access review report" (monthly, §4): every operator key with its source, roles, last
# use and JIT grants; trader API keys by scope and the ones unused for over --unused-days (90); the
# SoD result. Writes build/access/access-review-<stamp>.json and access-review-latest.json
# (ACCESS_OUT_DIR overrides the directory); prints `access_review_ok=true` when the report was
# written and SoD passes, else exit 1. The stack: SPOTEX_DATA_DIR (or --data-dir).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
exec "$spotex" access review --out "${ACCESS_OUT_DIR:-$root/build/access}" "$@"
