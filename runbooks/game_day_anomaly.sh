#!/usr/bin/env bash
# Seed §4.5 game-day anomaly drill. Success line: runbook_game_day_anomaly_ok=true
exec "$(dirname "$0")/_spotex.sh" game-day-anomaly "$@"
