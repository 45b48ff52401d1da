#!/usr/bin/env bash
# Seed §4.8 safety budget failure drill. Success line: runbook_budget_failure_ok=true
exec "$(dirname "$0")/_spotex.sh" budget-failure "$@"
