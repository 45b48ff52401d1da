#!/usr/bin/env bash
# Seed §4.2 WS resume-gap drill. Success line: runbook_ws_resume_gap_spike_ok=true
exec "$(dirname "$0")/_spotex.sh" ws-resume-gap-spike "$@"
