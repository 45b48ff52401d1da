#!/usr/bin/env bash
# Seed §4.0 anomaly detector probe: one run of the anomaly job (severity, recommended action, evidence). Against SPOTEX_DATA_DIR's stack (or --data-dir).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/runbooks/_find_spotex.sh"
exec "$spotex" jobs run anomaly "$@"
