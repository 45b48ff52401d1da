#!/usr/bin/env bash
# Seed §4.0 anomaly webhook smoke: forced anomaly signals -> SEV1/WITHDRAW_HALT and a signed webhook delivered (WEBHOOK_URL, else a local receiver that checks the signature). Success line: runbook_game_day_anomaly_ok=true
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
exec "$root/runbooks/_spotex.sh" game-day-anomaly "$@"
