#!/usr/bin/env bash
# Shared by the seed-named drill entrypoints: run `spotex drill NAME` from the project's venv,
# evidence under build/runbooks/NAME (override with SPOTEX_RUNBOOK_OUT), against the stack in
# SPOTEX_DATA_DIR when one is running there, else a fresh one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
name="$1"; shift
args=(drill "$name" --out "${SPOTEX_RUNBOOK_OUT:-$root/build/runbooks/$name}")
if [ -n "${SPOTEX_DATA_DIR:-}" ] && "$spotex" status --data-dir "$SPOTEX_DATA_DIR" >/dev/null 2>&1; then
  args+=(--data-dir "$SPOTEX_DATA_DIR")
fi
exec "$spotex" "${args[@]}" "$@"
