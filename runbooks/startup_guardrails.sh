#!/usr/bin/env bash
# Seed §4.4 startup guardrails drill. Success line: runbook_startup_guardrails_ok=true
# (RUNBOOK_ALLOW_CORE_FAIL has no effect: the core here is Python and always checked.)
exec "$(dirname "$0")/_spotex.sh" startup-guardrails "$@"
