#!/usr/bin/env bash
# Seed §3.4 / §4.0 WS drop/slow-consumer drill. Success line: runbook_ws_drop_spike_ok=true
exec "$(dirname "$0")/_spotex.sh" ws-drop-spike "$@"
