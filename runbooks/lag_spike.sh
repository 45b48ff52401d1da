#!/usr/bin/env bash
# Seed §4.0 reconciliation lag drill (policy of §3.2). Success line: runbook_lag_spike_ok=true
exec "$(dirname "$0")/_spotex.sh" lag-spike "$@"
