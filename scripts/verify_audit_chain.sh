#!/usr/bin/env bash
# Seed §4.0 audit tamper-evidence verify: recompute the admin audit chain (--require-events: an empty chain fails); the head hash, or the first broken entry and why.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
exec "$spotex" audit verify "$@"
